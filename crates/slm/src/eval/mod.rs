//! Measuring models: perplexity of causal LMs, classification metrics.

pub mod metrics;
pub mod perplexity;
