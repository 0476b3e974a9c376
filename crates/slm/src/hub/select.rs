//! Which files of a repository a model needs.
//!
//! A transformers repo often holds the same weights three or four times (safetensors, PyTorch,
//! TensorFlow, Flax, ONNX); a GGUF repo holds a dozen quantizations. We take what slm's loaders
//! read: config and tokenizer files, and one copy of the weights, safetensors before `.bin`; or
//! one GGUF quantization.

use std::path::Path;

use globset::{Glob, GlobSet, GlobSetBuilder};

use super::client::Sibling;
use super::{HubError, ModelRef, Result};

/// Files taken from a transformers repo besides the weights.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "adapter_config.json",
];

/// The quantization llama.cpp's `-hf` takes when none is named.
const DEFAULT_QUANT: &str = "Q4_K_M";

#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Globs (`*.json`, `onnx/*`): when given, exactly the matching files.
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// GGUF repos: the quantization to take (`Q4_K_M`, matched in the file name).
    pub quant: Option<String>,
    /// Ask the hub for the revision's current commit even when the cache can answer.
    pub refresh: bool,
}

impl Selection {
    pub(crate) fn choose(&self, model: &ModelRef, siblings: &[Sibling]) -> Result<Vec<Sibling>> {
        let names: Vec<&str> = siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let chosen = self.choose_names(model, &names)?;
        let mut out = Vec::with_capacity(chosen.len());
        for name in chosen {
            if !safe_relative_path(&name) {
                return Err(HubError::HostileName(name));
            }
            out.extend(siblings.iter().find(|s| s.rfilename == name).cloned());
        }
        Ok(out)
    }

    /// The chosen files when the cached snapshot already holds them all, else `None`.
    pub(crate) fn satisfied_by(
        &self,
        model: &ModelRef,
        dir: &Path,
        present: &[String],
    ) -> Option<Vec<String>> {
        let names: Vec<&str> = present.iter().map(String::as_str).collect();
        let chosen = self.choose_names(model, &names).ok()?;
        // A sharded checkpoint is complete only with every shard its index names.
        for index in chosen.iter().filter(|n| n.ends_with(".index.json")) {
            let text = std::fs::read_to_string(dir.join(index)).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            let map = json.get("weight_map")?.as_object()?;
            if !map
                .values()
                .filter_map(|v| v.as_str())
                .all(|shard| present.iter().any(|p| p == shard))
            {
                return None;
            }
        }
        Some(chosen)
    }

    fn choose_names(&self, model: &ModelRef, names: &[&str]) -> Result<Vec<String>> {
        let fail = |detail: String| HubError::Selection {
            repo: model.repo.clone(),
            detail,
        };
        let mut chosen: Vec<String> = if !self.include.is_empty() {
            let set = glob_set(&self.include).map_err(&fail)?;
            names
                .iter()
                .filter(|n| set.is_match(n))
                .map(|n| n.to_string())
                .collect()
        } else {
            let is_gguf = |n: &&str| n.to_ascii_lowercase().ends_with(".gguf");
            let ggufs: Vec<&str> = names.iter().copied().filter(is_gguf).collect();
            if self.quant.is_some() || (!ggufs.is_empty() && !names.contains(&"config.json")) {
                pick_gguf(&ggufs, self.quant.as_deref()).map_err(&fail)?
            } else {
                pick_transformers(names).map_err(&fail)?
            }
        };
        if !self.exclude.is_empty() {
            let set = glob_set(&self.exclude).map_err(&fail)?;
            chosen.retain(|n| !set.is_match(n));
        }
        if chosen.is_empty() {
            return Err(fail("no file matches the selection".into()));
        }
        Ok(chosen)
    }
}

fn glob_set(globs: &[String]) -> std::result::Result<GlobSet, String> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(Glob::new(g).map_err(|e| format!("bad glob '{g}': {e}"))?);
    }
    b.build().map_err(|e| e.to_string())
}

fn pick_transformers(names: &[&str]) -> std::result::Result<Vec<String>, String> {
    let top = |n: &&str| !n.contains('/');
    let mut out: Vec<String> = names
        .iter()
        .filter(|n| MODEL_FILES.contains(n) || is_module_config(n))
        .map(|n| n.to_string())
        .collect();
    let safetensors: Vec<&str> = names
        .iter()
        .copied()
        .filter(top)
        .filter(|n| n.ends_with(".safetensors") || *n == "model.safetensors.index.json")
        .collect();
    let bins: Vec<&str> = names
        .iter()
        .copied()
        .filter(top)
        .filter(|n| {
            n.starts_with("pytorch_model")
                && (n.ends_with(".bin") || n.ends_with(".bin.index.json"))
        })
        .collect();
    let weights = if safetensors.iter().any(|n| n.ends_with(".safetensors")) {
        safetensors
    } else {
        bins
    };
    if weights.is_empty() && !names.contains(&"adapter_config.json") {
        return Err(
            "no weights in the repository (safetensors, pytorch_model.bin or .gguf)".into(),
        );
    }
    out.extend(weights.iter().map(|n| n.to_string()));
    Ok(out)
}

/// sentence-transformers module configs (`1_Pooling/config.json`) decide the pooling.
fn is_module_config(name: &str) -> bool {
    name.split_once('/').is_some_and(|(dir, file)| {
        file == "config.json"
            && dir
                .split_once('_')
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
    })
}

fn pick_gguf(ggufs: &[&str], quant: Option<&str>) -> std::result::Result<Vec<String>, String> {
    let models: Vec<&str> = ggufs
        .iter()
        .copied()
        .filter(|n| !n.to_ascii_lowercase().contains("mmproj"))
        .collect();
    if models.is_empty() {
        return Err("no GGUF file in the repository".into());
    }
    let with = |q: &str| -> Vec<String> {
        models
            .iter()
            .filter(|n| has_quant_tag(n, q))
            .map(|n| n.to_string())
            .collect()
    };
    let quants = || {
        let mut q: Vec<&str> = models.iter().map(|n| strip_shard(n)).collect();
        q.dedup();
        q.join(", ")
    };
    match quant {
        Some(q) => {
            let found = with(q);
            if found.is_empty() {
                return Err(format!(
                    "no GGUF file with quantization {q}; found: {}",
                    quants()
                ));
            }
            Ok(found)
        }
        None => {
            let mut bases: Vec<&str> = models.iter().map(|n| strip_shard(n)).collect();
            bases.dedup();
            if bases.len() == 1 {
                return Ok(models.iter().map(|n| n.to_string()).collect());
            }
            let found = with(DEFAULT_QUANT);
            if found.is_empty() {
                return Err(format!(
                    "several GGUF files; pick one with --quant (or ORG/NAME:QUANT): {}",
                    quants()
                ));
            }
            Ok(found)
        }
    }
}

/// `Q4_K` names `model-Q4_K.gguf` but not `model-Q4_K_M.gguf`.
fn has_quant_tag(name: &str, quant: &str) -> bool {
    let (name, quant) = (name.to_ascii_lowercase(), quant.to_ascii_lowercase());
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    name.match_indices(&quant).any(|(i, m)| {
        let before = name[..i].chars().next_back();
        let after = name[i + m.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric()) && !word(after)
    })
}

/// `model-00001-of-00003.gguf` → `model.gguf` for grouping the shards of one file.
fn strip_shard(name: &str) -> &str {
    let stem = name.strip_suffix(".gguf").unwrap_or(name);
    match stem.rfind("-of-") {
        Some(i) if i >= 6 && stem[i - 6..i].starts_with('-') => &stem[..i - 6],
        _ => name,
    }
}

/// A path that stays inside the snapshot folder on every system.
pub(crate) fn safe_relative_path(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && !name.contains('\0')
        && !name.contains(':')
        && name
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelRef {
        ModelRef::parse("org/name").unwrap()
    }

    fn choose(sel: &Selection, names: &[&str]) -> Result<Vec<String>> {
        sel.choose_names(&model(), names)
    }

    #[test]
    fn transformers_repo_takes_one_copy_of_the_weights() {
        let names = [
            "config.json",
            "tokenizer.json",
            "model.safetensors",
            "pytorch_model.bin",
            "tf_model.h5",
            "onnx/model.onnx",
            "1_Pooling/config.json",
            "README.md",
        ];
        let got = choose(&Selection::default(), &names).unwrap();
        assert_eq!(
            got,
            [
                "config.json",
                "tokenizer.json",
                "1_Pooling/config.json",
                "model.safetensors"
            ]
        );
        let got = choose(&Selection::default(), &["config.json", "pytorch_model.bin"]).unwrap();
        assert_eq!(got, ["config.json", "pytorch_model.bin"]);
        assert!(choose(&Selection::default(), &["config.json", "README.md"]).is_err());
    }

    #[test]
    fn gguf_repo_takes_the_named_quantization() {
        let names = [
            "README.md",
            "m-Q4_K_M.gguf",
            "m-Q4_K_S.gguf",
            "m-Q8_0.gguf",
            "m-f16-00001-of-00002.gguf",
            "m-f16-00002-of-00002.gguf",
            "mmproj-m-f16.gguf",
        ];
        let sel = |q: &str| Selection {
            quant: Some(q.into()),
            ..Default::default()
        };
        assert_eq!(choose(&sel("q8_0"), &names).unwrap(), ["m-Q8_0.gguf"]);
        assert_eq!(choose(&sel("Q4_K_S"), &names).unwrap(), ["m-Q4_K_S.gguf"]);
        assert_eq!(choose(&sel("F16"), &names).unwrap().len(), 2);
        assert!(choose(&sel("Q4_K"), &names).is_err());
        assert_eq!(
            choose(&Selection::default(), &names).unwrap(),
            ["m-Q4_K_M.gguf"]
        );
        let err = choose(&Selection::default(), &["a-Q8_0.gguf", "a-Q4_0.gguf"]).unwrap_err();
        assert!(err.to_string().contains("--quant"), "{err}");
    }

    #[test]
    fn globs_include_and_exclude() {
        let sel = Selection {
            include: vec!["*.json".into()],
            exclude: vec!["tokenizer*".into()],
            ..Default::default()
        };
        let got = choose(
            &sel,
            &["config.json", "tokenizer.json", "a/b.json", "x.bin"],
        )
        .unwrap();
        assert_eq!(got, ["config.json", "a/b.json"]);
    }

    #[test]
    fn hostile_paths_are_not_safe() {
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            "C:/x",
            "a\\..\\x",
            "./a",
            "",
        ] {
            assert!(!safe_relative_path(bad), "{bad}");
        }
        assert!(safe_relative_path("1_Pooling/config.json"));
    }
}
