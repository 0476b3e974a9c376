//! Measuring models: perplexity of causal LMs, classification metrics, n-gram overlap of
//! generated text (BLEU, chrF, ROUGE).

pub mod compare;
pub mod metrics;
pub mod overlap;
pub mod perplexity;
