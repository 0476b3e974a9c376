//! The library's integration tests, one binary: each module is one capability, checked on
//! real models and data (`SLM_ASSETS`) against recorded references.
//! (One binary, not one per file: each links the whole dependency tree, ~60 MB in a debug build.)

#[path = "support/allocations.rs"]
mod allocations;
mod common;
#[path = "support/mock_hub.rs"]
mod mock_hub;
#[path = "support/scratch.rs"]
mod scratch;
#[path = "support/train_fixture.rs"]
mod train_fixture;

mod bart_tokenizer;
mod batch_decode;
mod causal_reference;
mod encoders;
mod fuzz;
mod gemma;
mod gguf_export;
mod hub;
mod marian_tokenizer;
mod metrics;
mod overlap;
mod peft;
mod perplexity;
mod pretrain;
mod rnn;
mod seq2seq;
mod seq2seq_train;
mod smollm2;
mod t5_gguf;
mod tokenizer_train;
mod tokenizer_vectors;
mod train;
