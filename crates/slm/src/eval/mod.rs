//! Measuring models: perplexity of causal LMs, classification metrics, n-gram overlap of
//! generated text (BLEU, chrF, ROUGE), an encoder-decoder's loss and generated outputs.

pub mod compare;
pub mod metrics;
pub mod overlap;
pub mod perplexity;
pub mod seq2seq;
