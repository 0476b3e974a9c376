//! Measuring models: perplexity of causal LMs.

pub mod perplexity;
