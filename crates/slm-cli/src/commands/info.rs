use std::collections::BTreeMap;

use anyhow::Result;
use slm::io::{open_weights, ModelFiles, WeightFormat};
use slm::models::config_of;
use slm::tokenize::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder or .gguf file.
    #[arg(long, short = 'm', default_value_os_t = super::default_model())]
    model: std::path::PathBuf,
}

pub fn run(mut a: Args) -> Result<()> {
    super::resolve_model(&mut a.model)?;
    let files = ModelFiles::locate(&a.model)?;
    let weights = open_weights(&files)?;
    let config = config_of(&files)?;
    // Weights without a tokenizer (bare checkpoints) can still be described.
    let tok = Tokenizer::load(&files).ok();
    let format = match &files.format {
        WeightFormat::Safetensors(p) => format!(
            "safetensors ({} file{})",
            p.len(),
            if p.len() > 1 { "s" } else { "" }
        ),
        WeightFormat::PyTorch(p) => format!(
            "pytorch zip-pickle ({} file{})",
            p.len(),
            if p.len() > 1 { "s" } else { "" }
        ),
        WeightFormat::Gguf(_) => "gguf".to_string(),
    };
    let tensors = weights.tensors();
    let params: usize = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let mut by_type: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for t in &tensors {
        let e = by_type.entry(&t.dtype).or_default();
        e.0 += 1;
        e.1 += t.shape.iter().product::<usize>();
    }
    outln!("model:          {}", a.model.display());
    outln!("architecture:   {}", config.architecture().name());
    if let slm::models::ModelConfig::Bert(c) = &config {
        let head = c
            .architectures
            .first()
            .map_or("(none: bare encoder)", |s| s.as_str());
        outln!("head:           {head}");
        if let Some(labels) = &c.id2label {
            outln!(
                "labels:         {}",
                labels.values().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    outln!("format:         {format}");
    if let WeightFormat::Gguf(p) = &files.format {
        outln!("packed cache:   {}", pack_cache(p));
    }
    outln!("parameters:     {params} ({:.1}M)", params as f64 / 1e6);
    for (dtype, (n, p)) in &by_type {
        outln!("  {dtype:<12}  {n:>4} tensors, {p:>11} parameters");
    }
    if let slm::models::ModelConfig::Rnn(c) = &config {
        outln!("layers:         {}", c.describe());
        outln!("context length: unbounded (recurrent state)");
    } else {
        outln!("context length: {}", config.context_length());
    }
    let Some(tok) = tok else {
        outln!(
            "vocab size:     {} (no tokenizer found)",
            config.vocab_size()
        );
        return Ok(());
    };
    outln!(
        "vocab size:     {} (tokenizer: {})",
        config.vocab_size(),
        tok.vocab_size()
    );
    let name = |id: u32| format!("{:?} ({id})", tok.id_to_token(id).unwrap_or_default());
    outln!(
        "bos:            {}",
        tok.bos.map(name).unwrap_or_else(|| "none".into())
    );
    outln!(
        "eos:            {}",
        if tok.eos.is_empty() {
            "none".into()
        } else {
            tok.eos
                .iter()
                .map(|&i| name(i))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    outln!("add bos/eos:    {}/{}", tok.add_bos, tok.add_eos);
    outln!(
        "chat template:  {}",
        if tok.chat_template.is_some() {
            "yes"
        } else {
            "no"
        }
    );
    Ok(())
}

/// Where the kernels' packing of this file is cached, and whether a load has written it yet.
fn pack_cache(gguf: &std::path::Path) -> String {
    use slm::io::pack_cache::PackCache;
    match PackCache::for_file(gguf, &slm::nn::qmatmul::packed_layout()) {
        None => "off".to_string(),
        Some(c) if c.is_filled() => {
            let size = std::fs::metadata(c.path()).map_or(0, |m| m.len());
            format!("{} ({:.1} MB)", c.path().display(), size as f64 / 1e6)
        }
        Some(c) => format!("{} (written at the next load)", c.path().display()),
    }
}
