//! Measuring models: perplexity of causal LMs, classification metrics.

pub mod compare;
pub mod metrics;
pub mod perplexity;
