//! The `slm` binary's tests, one binary: each module runs the real command line.
//! (One binary, not one per file: each links the whole dependency tree, ~60 MB in a debug build.)

mod common;
#[path = "../../slm/tests/support/mock_hub.rs"]
mod mock_hub;
#[path = "../../slm/tests/support/scratch.rs"]
mod scratch;

mod bad_input;
mod damaged_files;
mod encoders_cli;
mod eval_cli;
mod finetune_cli;
mod hub_cli;
mod pack_cache_cli;
mod quantize_cli;
mod seq2seq_cli;
mod serve_cli;
mod user_errors;
