//! LoRA adapters in Hugging Face PEFT's format: `adapter_config.json` and
//! `adapter_model.safetensors`, whose keys are `base_model.model.<module>.lora_{A,B}.weight`
//! for the low-rank factors and `base_model.model.<module>.weight` for `modules_to_save`
//! (a classifier head trained in full).
//!
//! An adapter is applied by wrapping the base model's weight store: a weight with LoRA factors
//! reads as `W + (alpha/r)·B·A`, a saved module reads from the adapter. The model code does not
//! know an adapter is there, and every family gets adapters at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::write::{read_safetensors_f32, F32Tensor};
use super::{TensorMeta, Weight, WeightStore};
use crate::error::{Error, Result};

const PREFIX: &str = "base_model.model.";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f32,
    #[serde(default)]
    pub lora_dropout: f32,
    #[serde(default)]
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub inference_mode: bool,
}

fn bias_none() -> String {
    "none".into()
}

impl AdapterConfig {
    /// The LoRA scale: alpha/r, or alpha/√r with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f32).sqrt()
        } else {
            self.lora_alpha / self.r as f32
        }
    }
}

/// A PEFT LoRA adapter read into memory (adapters are small).
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// Tensors by their key without the `base_model.model.` prefix.
    tensors: HashMap<String, F32Tensor>,
    /// `id2label` that slm stores in the safetensors metadata of classification adapters.
    pub labels: Option<Vec<String>>,
}

impl PeftAdapter {
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: AdapterConfig =
            serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, e))?;
        let unsupported = |what: &str| {
            Err(Error::file(
                &cfg_path,
                format!("{what} adapters are not supported"),
            ))
        };
        if config.peft_type != "LORA" {
            return unsupported(&config.peft_type);
        }
        if config.use_dora {
            return unsupported("DoRA");
        }
        if config.bias != "none" {
            return unsupported(&format!("bias '{}'", config.bias));
        }
        let st = dir.join("adapter_model.safetensors");
        if !st.is_file() {
            return Err(Error::file(
                dir,
                "no adapter_model.safetensors (adapter_model.bin is not read: convert it with PEFT's save_pretrained)",
            ));
        }
        let raw = read_safetensors_f32(&st)?;
        let mut tensors = HashMap::new();
        for (k, v) in raw {
            let key = k.strip_prefix(PREFIX).unwrap_or(&k).to_string();
            tensors.insert(key, v);
        }
        let labels = read_labels(&st);
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tensors,
            labels,
        })
    }

    /// `(A [r, in], B [out, r])` for the weight `module.weight`, if the adapter adapts it.
    fn factors(&self, module: &str) -> Option<(&F32Tensor, &F32Tensor)> {
        Some((
            self.tensors.get(&format!("{module}.lora_A.weight"))?,
            self.tensors.get(&format!("{module}.lora_B.weight"))?,
        ))
    }

    /// Adapter keys name modules as PEFT saw them (`bert.encoder…`); a bare base checkpoint
    /// names them without the task model's prefix. Returns the adapter's name for `name`.
    fn key_for(&self, name: &str, body: Option<&str>) -> String {
        match body {
            Some(b) => format!("{b}.{name}"),
            None => name.to_string(),
        }
    }
}

/// Labels from `{"id2label": "{\"0\": \"neg\", ...}"}` in the safetensors header metadata.
fn read_labels(st: &Path) -> Option<Vec<String>> {
    let data = std::fs::read(st).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&data).ok()?;
    let text = meta.metadata().as_ref()?.get("id2label")?.clone();
    let map: HashMap<String, String> = serde_json::from_str(&text).ok()?;
    let mut labels = vec![String::new(); map.len()];
    for (k, v) in map {
        *labels.get_mut(k.parse::<usize>().ok()?)? = v;
    }
    Some(labels)
}

/// A weight store with an adapter applied.
pub struct AdaptedStore {
    base: Arc<dyn WeightStore>,
    adapter: PeftAdapter,
    /// The prefix the adapter puts before the base's names (`bert` for a bare BERT base).
    body: Option<String>,
}

impl AdaptedStore {
    pub fn new(base: Arc<dyn WeightStore>, adapter: PeftAdapter) -> Result<Self> {
        // Which naming the adapter uses relative to the base: try each LoRA key's module with
        // and without its first component.
        let lora_modules: Vec<String> = adapter
            .tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".lora_A.weight").map(str::to_string))
            .collect();
        let mut body = None;
        if let Some(m) = lora_modules.first() {
            if !base.contains(&format!("{m}.weight")) {
                match m.split_once('.') {
                    Some((first, rest)) if base.contains(&format!("{rest}.weight")) => {
                        body = Some(first.to_string());
                    }
                    _ => {
                        return Err(Error::file(
                            &adapter.dir,
                            format!("the adapter adapts '{m}', which the base model does not have"),
                        ))
                    }
                }
            }
        }
        let store = Self {
            base,
            adapter,
            body,
        };
        for m in &lora_modules {
            let name = match &store.body {
                Some(b) => m.strip_prefix(&format!("{b}.")).unwrap_or(m).to_string(),
                None => m.clone(),
            };
            if !store.base.contains(&format!("{name}.weight")) {
                return Err(Error::file(
                    &store.adapter.dir,
                    format!("the adapter adapts '{m}', which the base model does not have"),
                ));
            }
        }
        Ok(store)
    }

    pub fn adapter(&self) -> &PeftAdapter {
        &self.adapter
    }

    /// The task model's prefix the adapter's names carry over a bare base (`bert`).
    pub fn body(&self) -> Option<&str> {
        self.body.as_deref()
    }

    /// A tensor the adapter saves whole (`classifier.weight`), under the base's naming.
    fn saved(&self, name: &str) -> Option<&F32Tensor> {
        self.adapter
            .tensors
            .get(name)
            .or_else(|| {
                self.adapter
                    .tensors
                    .get(&self.adapter.key_for(name, self.body.as_deref()))
            })
            .filter(|_| !name.contains(".lora_"))
    }
}

fn tensor(shape: &[usize], v: &[f32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, shape, &Device::Cpu)?)
}

impl WeightStore for AdaptedStore {
    fn file_of(&self, name: &str) -> &Path {
        if self.saved(name).is_some() {
            &self.adapter.dir
        } else {
            self.base.file_of(name)
        }
    }

    fn tensors(&self) -> Vec<TensorMeta> {
        let mut t = self.base.tensors();
        for (k, (shape, _)) in &self.adapter.tensors {
            if !k.contains(".lora_") && !t.iter().any(|m| &m.name == k) {
                t.push(TensorMeta {
                    name: k.clone(),
                    dtype: "F32".into(),
                    shape: shape.clone(),
                });
            }
        }
        t
    }

    fn contains(&self, name: &str) -> bool {
        self.saved(name).is_some() || self.base.contains(name)
    }

    fn load(&self, name: &str, keep_quant: bool) -> Result<Weight> {
        if let Some((shape, v)) = self.saved(name) {
            return Ok(Weight::Dense(tensor(shape, v)?));
        }
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let key = self.adapter.key_for(module, self.body.as_deref());
        let Some(((sa, a), (sb, b))) = self.adapter.factors(&key) else {
            return self.base.load(name, keep_quant);
        };
        let w = self.base.load(name, false)?.into_dense()?;
        // fan_in_fan_out: the weight is stored [in, out] (GPT-2's Conv1D); the update B·A
        // is [out, in] either way.
        let fan_in_fan_out = self.adapter.config.fan_in_fan_out;
        let (out, inp) = match w.dims2()? {
            (a, b) if fan_in_fan_out => (b, a),
            d => d,
        };
        let r = self.adapter.config.r;
        if sa != &[r, inp] || sb != &[out, r] {
            return Err(Error::file(
                &self.adapter.dir,
                format!("{key}: LoRA factors {sa:?} and {sb:?} do not fit the weight [{out}, {inp}] with r={r}"),
            ));
        }
        let mut delta = tensor(sb, b)?.matmul(&tensor(sa, a)?)?;
        if fan_in_fan_out {
            delta = delta.t()?.contiguous()?;
        }
        let merged = (w + (delta * self.adapter.config.scale() as f64)?)?;
        Ok(Weight::Dense(merged))
    }
}

/// Writes `base` with `adapter` merged in as a Hugging Face folder in `out`: f32
/// `model.safetensors`, the base's config (made a sequence classifier with the adapter's
/// labels when the adapter is one), and the tokenizer files. Returns the files written.
pub fn merge(base: &Path, adapter: &Path, out: &Path, force: bool) -> Result<Vec<String>> {
    use std::io::Write;
    let files = super::ModelFiles::locate(base)?;
    if let super::WeightFormat::Gguf(p) = &files.format {
        return Err(Error::file(
            p,
            "merging needs a Hugging Face base model; write one with `slm convert`",
        ));
    }
    let target = out.join("model.safetensors");
    if target.exists() && !force {
        return Err(Error::file(&target, "exists; pass --force to overwrite"));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let store = AdaptedStore::new(super::open_weights(&files)?, PeftAdapter::open(adapter)?)?;
    let saved: Vec<String> = store
        .adapter
        .tensors
        .keys()
        .filter(|k| !k.contains(".lora_"))
        .cloned()
        .collect();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for meta in store.tensors() {
        let t = store.load(&meta.name, false)?.into_dense()?;
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        // Over a bare base, the merged task model names its body as transformers does.
        let name = match (store.body(), saved.contains(&meta.name)) {
            (Some(b), false) => format!("{b}.{}", meta.name),
            _ => meta.name.clone(),
        };
        tensors.push((name, t.dims().to_vec(), v));
    }
    let views: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    super::write::write_safetensors(&target, &views, Some(meta))?;
    let mut written = vec!["model.safetensors".to_string()];
    if let Some(cfg_path) = &files.config {
        let text = std::fs::read_to_string(cfg_path).map_err(|e| Error::io(cfg_path, e))?;
        let mut cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::file(cfg_path, e))?;
        if store.adapter.config.task_type.as_deref() == Some("SEQ_CLS") {
            let arch = cfg["architectures"][0]
                .as_str()
                .unwrap_or("BertModel")
                .to_string();
            let body = arch
                .strip_suffix("Model")
                .or_else(|| arch.split("For").next())
                .unwrap_or("Bert")
                .to_string();
            cfg["architectures"] = serde_json::json!([format!("{body}ForSequenceClassification")]);
            // PEFT's adapters carry no label names: LABEL_i, one per classifier row.
            let rows = store
                .adapter
                .tensors
                .iter()
                .find(|(k, _)| k.ends_with("classifier.weight") || k.ends_with("score.weight"))
                .map(|(_, (s, _))| s[0]);
            let fallback = rows.map(|n| (0..n).map(|i| format!("LABEL_{i}")).collect::<Vec<_>>());
            if let Some(labels) = store.adapter.labels.as_ref().or(fallback.as_ref()) {
                cfg["id2label"] = labels
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i.to_string(), l.clone().into()))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                cfg["label2id"] = labels
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (l.clone(), i.into()))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
        }
        let json = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::msg(e.to_string()))?;
        super::write::write_atomic(&out.join("config.json"), |w| w.write_all(&json))?;
        written.push("config.json".into());
    }
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "generation_config.json",
    ] {
        let src = files.root.join(f);
        if src.is_file() && files.root != out {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            super::write::write_atomic(&out.join(f), |w| w.write_all(&bytes))?;
            written.push(f.into());
        }
    }
    Ok(written)
}
