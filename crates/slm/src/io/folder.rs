//! Finding the files of a model: a Hugging Face folder or a single GGUF file.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub enum WeightFormat {
    /// One or more safetensors files (several when sharded with an index).
    Safetensors(Vec<PathBuf>),
    /// One or more PyTorch zip-pickle files.
    PyTorch(Vec<PathBuf>),
    Gguf(PathBuf),
}

/// Everything slm reads for one model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub root: PathBuf,
    pub config: Option<PathBuf>,
    pub format: WeightFormat,
}

impl ModelFiles {
    pub fn locate(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::file(path, "no such file or directory"));
        }
        if path.is_file() {
            if path.extension().is_some_and(|e| e == "gguf") || starts_with_gguf_magic(path) {
                return Ok(Self {
                    root: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                    config: None,
                    format: WeightFormat::Gguf(path.to_path_buf()),
                });
            }
            return Err(Error::file(
                path,
                "not a GGUF file; pass a GGUF file or a Hugging Face model folder",
            ));
        }
        let config = path.join("config.json");
        let config = config.exists().then_some(config);
        let format = find_weights(path)?;
        // A `word_language_model` checkpoint has a vocab.txt and no config: its sizes are
        // read from the tensors (`models::config_of`).
        if config.is_none()
            && !matches!(format, WeightFormat::Gguf(_))
            && !path.join("vocab.txt").exists()
        {
            return Err(Error::file(path, "config.json not found in model folder"));
        }
        Ok(Self {
            root: path.to_path_buf(),
            config,
            format,
        })
    }

    pub fn file(&self, name: &str) -> Option<PathBuf> {
        let p = self.root.join(name);
        p.exists().then_some(p)
    }
}

fn starts_with_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Prefers safetensors (single, then sharded), then PyTorch .bin (single, then sharded), then a
/// lone GGUF file in the folder.
fn find_weights(dir: &Path) -> Result<WeightFormat> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(WeightFormat::Safetensors(vec![single]));
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        return Ok(WeightFormat::Safetensors(shards(&index)?));
    }
    for name in [
        "pytorch_model.bin",
        "model.pth",
        "model.pt",
        "consolidated.pth",
    ] {
        let p = dir.join(name);
        if p.exists() {
            return Ok(WeightFormat::PyTorch(vec![p]));
        }
    }
    let index = dir.join("pytorch_model.bin.index.json");
    if index.exists() {
        return Ok(WeightFormat::PyTorch(shards(&index)?));
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    ggufs.sort();
    match ggufs.len() {
        1 => Ok(WeightFormat::Gguf(ggufs.remove(0))),
        0 if dir.join("adapter_config.json").exists() => {
            let base = std::fs::read_to_string(dir.join("adapter_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|j| j["base_model_name_or_path"].as_str().map(String::from))
                .map(|b| format!(" (trained on {b})"))
                .unwrap_or_default();
            Err(Error::file(
                dir,
                format!("is a LoRA adapter, not a model: pass its base model{base} with --model and this folder with --adapter"),
            ))
        }
        0 => Err(Error::file(
            dir,
            "no weights found (model.safetensors, model.safetensors.index.json, pytorch_model.bin, model.pt or a .gguf file)",
        )),
        _ => Err(Error::file(dir, "several .gguf files in the folder; pass one of them")),
    }
}

/// The distinct shard files named by a `*.index.json` weight map, in order of first appearance.
fn shards(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(index, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::file(index, "missing 'weight_map'"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut out: Vec<PathBuf> = Vec::new();
    for file in map.values() {
        let name = file
            .as_str()
            .ok_or_else(|| Error::file(index, "weight_map values must be file names"))?;
        if name.contains("..") || Path::new(name).is_absolute() {
            return Err(Error::file(
                index,
                format!("shard name '{name}' points outside the folder"),
            ));
        }
        let p = dir.join(name);
        if !out.contains(&p) {
            if !p.exists() {
                return Err(Error::file(index, format!("shard '{name}' is missing")));
            }
            out.push(p);
        }
    }
    Ok(out)
}
