//! Every causal family against HF transformers on tiny random-init models of the real
//! architectures (tools/make_fixtures.py): logits within 1e-4 and identical greedy tokens, from
//! safetensors (llama: sharded) and from pytorch_model.bin.

mod common;

fn check(family: &str, format: &str) {
    common::check_causal(family, &common::fixtures().join(family).join(format));
}

#[test]
fn gpt2_safetensors() {
    check("gpt2", "safetensors");
}
#[test]
fn gpt2_bin() {
    check("gpt2", "bin");
}
#[test]
fn llama_sharded_safetensors() {
    check("llama", "safetensors");
}
#[test]
fn llama_bin() {
    check("llama", "bin");
}
#[test]
fn qwen2_safetensors() {
    check("qwen2", "safetensors");
}
#[test]
fn qwen2_bin() {
    check("qwen2", "bin");
}
#[test]
fn phi3_safetensors() {
    check("phi3", "safetensors");
}
#[test]
fn phi3_bin() {
    check("phi3", "bin");
}
