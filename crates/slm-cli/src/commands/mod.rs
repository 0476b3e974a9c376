pub mod bench;
pub mod chat;
pub mod classify;
pub mod convert;
pub mod embed;
pub mod encoder;
pub mod eval;
pub mod fill_mask;
pub mod finetune;
pub mod generate;
pub mod hub;
pub mod info;
pub mod merge;
pub mod pretrain;
pub mod quantize;
pub mod serve;
pub mod similarity;
pub mod tokenize;
pub mod tokenizer;
pub mod tune;

use std::path::PathBuf;

use anyhow::Result;
use slm::models::{load_causal_with, ComputeDtype, LoadedModel};
use slm::tokenize::Tokenizer;

/// Options every command that loads a model shares.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json + tokenizer + safetensors/.bin), a .gguf file,
    /// or a hub id ORG/NAME[@REVISION][:QUANT] (taken from the cache, else downloaded).
    #[arg(long, short = 'm', default_value_os_t = default_model())]
    pub model: PathBuf,
    /// `f32` dequantizes every weight (exact reference arithmetic); `auto` keeps GGUF weights
    /// quantized and uses quantized matmuls (fast).
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: Dtype,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Dtype {
    Auto,
    F32,
}

/// Where the default model comes from on a machine without the shared assets: the official
/// GGUF of SmolLM2-135M-Instruct, pulled into the Hugging Face cache on first use, as `ollama
/// run` does.
pub const DEFAULT_HUB_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";

/// The default model, SmolLM2-135M-Instruct: the Q4_1 file in SLM_ASSETS when the shared
/// assets are there (what the tests use), else [`DEFAULT_HUB_MODEL`] from the cache or the hub.
pub fn default_model() -> PathBuf {
    let local =
        slm::assets_dir().join("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    if local.exists() {
        local
    } else {
        PathBuf::from(DEFAULT_HUB_MODEL)
    }
}

pub fn load(args: &ModelArgs) -> Result<(LoadedModel, Tokenizer)> {
    let mut path = args.model.clone();
    resolve_model(&mut path)?;
    let dtype = match args.dtype {
        Dtype::Auto => ComputeDtype::Auto,
        Dtype::F32 => ComputeDtype::F32,
    };
    // The tokenizer is built while the weights load: for a 262,144-piece vocabulary (Gemma)
    // building it takes about as long as the weights do.
    let files = slm::io::ModelFiles::locate(&path)?;
    let (m, tok) = std::thread::scope(|s| {
        let tok = s.spawn(|| Tokenizer::load(&files));
        let m = load_causal_with(&path, dtype, args.adapter.as_deref());
        (m, tok.join())
    });
    let m = m?;
    let tok = tok.map_err(|_| anyhow::anyhow!("the tokenizer's loader panicked"))??;
    tok.check_matches(m.config.vocab_size())?;
    Ok((m, tok))
}

/// Sampling flags shared by generate and chat, with llama.cpp's defaults.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256, allow_negative_numbers = true, value_parser = crate::parse::count)]
    pub max_tokens: usize,
    /// 0 means greedy decoding.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true, value_parser = crate::parse::non_negative)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: off).
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true, value_parser = crate::parse::probability)]
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0: off).
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true, value_parser = crate::parse::probability)]
    pub min_p: f32,
    /// Penalise tokens seen in the last 64 (1.0: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true, value_parser = crate::parse::above_zero)]
    pub repeat_penalty: f32,
    /// Seed of the sampler: the same seed and options give the same text.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop when this text is generated (repeatable); the stop text is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    pub fn options(&self) -> slm::generate::GenerateOptions {
        slm::generate::GenerateOptions {
            max_tokens: self.max_tokens,
            sampling: slm::generate::SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                seed: self.seed,
                ..Default::default()
            },
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            ..Default::default()
        }
    }
}

/// Before writing into `dir`: removes the temporary files that killed runs left there (a
/// SIGKILLed finetune leaves its half-written checkpoint folder) and says so.
pub fn clean_stale(dir: &std::path::Path) {
    for (p, bytes) in slm::io::write::clean_stale_temps(dir) {
        eprintln!(
            "removed {} ({:.1} MB), left by a run that was killed",
            p.display(),
            bytes as f64 / 1e6
        );
    }
}

/// [`clean_stale`] for the folder an output file goes into.
pub fn clean_stale_beside(file: &std::path::Path) {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
    clean_stale(dir.unwrap_or(".".as_ref()));
}

/// Turns a hub id given where a model path goes (`--model ORG/NAME[@REV][:QUANT]`) into the
/// cached snapshot, downloading it first if needed. A path that exists is left alone.
pub fn resolve_model(path: &mut PathBuf) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let Some(spec) = path
        .to_str()
        .filter(|s| slm::hub::ModelRef::parse(s).is_ok())
    else {
        return Ok(());
    };
    let cfg = slm::hub::HubConfig::from_env();
    let bars = hub::Bars::new();
    let resolved = slm::hub::resolve_model(spec, &cfg, &bars).map_err(|e| {
        if spec == DEFAULT_HUB_MODEL {
            anyhow::anyhow!(
                "the default model is neither in SLM_ASSETS ({}) nor in the Hugging Face cache, and downloading {spec} failed: {e}; pass --model, or fetch the assets with tools/fetch_assets.sh",
                slm::assets_dir().display()
            )
        } else {
            anyhow::anyhow!("{spec}: not a local path, and getting it from the hub failed: {e}")
        }
    })?;
    *path = resolved;
    Ok(())
}
