//! Sentence embeddings from token states, configured the sentence-transformers way
//! (`modules.json` + `1_Pooling/config.json`, a `Normalize` module for unit vectors).

use std::path::Path;

use candle_core::{Tensor, D};
use serde_json::Value;

use crate::error::{Context, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Mean,
    Cls,
    Max,
    /// Sum divided by sqrt(token count).
    MeanSqrtLen,
}

impl std::str::FromStr for PoolMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "mean" => PoolMode::Mean,
            "cls" => PoolMode::Cls,
            "max" => PoolMode::Max,
            "mean-sqrt-len" => PoolMode::MeanSqrtLen,
            _ => {
                return Err(format!(
                    "unknown pooling '{s}' (mean, cls, max, mean-sqrt-len)"
                ))
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    pub mode: PoolMode,
    pub normalize: bool,
}

impl Default for Pooling {
    /// sentence-transformers' choice for a plain transformers checkpoint: mean, unnormalised.
    fn default() -> Self {
        Pooling {
            mode: PoolMode::Mean,
            normalize: false,
        }
    }
}

fn read(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).in_file(path)
}

impl Pooling {
    /// The pooling a sentence-transformers folder declares, or the default without one.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let modules = dir.join("modules.json");
        if !modules.exists() {
            return Ok(Self::default());
        }
        let list = read(&modules)?;
        let list = list
            .as_array()
            .ok_or_else(|| Error::file(&modules, "expected a list of modules"))?;
        let kind = |m: &Value| {
            m.get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("")
                .to_string()
        };
        let mut pooling = Self::default();
        for m in list {
            let k = kind(m);
            if k.ends_with("models.Pooling") {
                let sub = m
                    .get("path")
                    .and_then(|p| p.as_str())
                    .unwrap_or("1_Pooling");
                // A module lives inside the model folder: `../x` or `/abs` would read any file.
                let inside = std::path::Path::new(sub)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
                if !inside {
                    return Err(Error::file(
                        &modules,
                        format!("module path '{sub}' points outside the model folder"),
                    ));
                }
                let cfg_path = dir.join(sub).join("config.json");
                let cfg = read(&cfg_path)?;
                let on = |key: &str| cfg.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
                let modes = [
                    (on("pooling_mode_cls_token"), PoolMode::Cls),
                    (on("pooling_mode_mean_tokens"), PoolMode::Mean),
                    (on("pooling_mode_max_tokens"), PoolMode::Max),
                    (
                        on("pooling_mode_mean_sqrt_len_tokens"),
                        PoolMode::MeanSqrtLen,
                    ),
                ];
                let chosen: Vec<PoolMode> = modes.iter().filter(|m| m.0).map(|m| m.1).collect();
                pooling.mode = match chosen.as_slice() {
                    [one] => *one,
                    [] => {
                        return Err(Error::file(&cfg_path, "no pooling mode is enabled"));
                    }
                    _ => {
                        return Err(Error::file(
                            &cfg_path,
                            "several pooling modes at once (concatenated) are not supported; pass --pooling",
                        ))
                    }
                };
            } else if k.ends_with("models.Normalize") {
                pooling.normalize = true;
            } else if !k.ends_with("models.Transformer") {
                return Err(Error::file(
                    &modules,
                    format!("sentence-transformers module '{k}' is not supported (Transformer, Pooling, Normalize are)"),
                ));
            }
        }
        Ok(pooling)
    }

    /// Pools `hidden` (`[b, t, h]`) under `mask` (`[b, t]`, 1 for tokens) into `[b, h]`.
    pub fn apply(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let m = mask.unsqueeze(2)?; // [b, t, 1]
        let pooled = match self.mode {
            PoolMode::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            PoolMode::Mean | PoolMode::MeanSqrtLen => {
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                let div = match self.mode {
                    PoolMode::Mean => count,
                    _ => count.sqrt()?,
                };
                sum.broadcast_div(&div)?
            }
            PoolMode::Max => {
                // Padding gets -1e9 so it never wins, as sentence-transformers does.
                let neg = ((m.ones_like()? - &m)? * -1e9)?;
                hidden.broadcast_add(&neg)?.max(1)?
            }
        };
        if !self.normalize {
            return Ok(pooled);
        }
        let norm = pooled
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(pooled.broadcast_div(&norm)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn run(mode: PoolMode, normalize: bool) -> Vec<Vec<f32>> {
        // Two rows; the second has one padding position holding a huge value that must not leak.
        let h = Tensor::new(
            &[
                [[1f32, 2.], [3., -4.], [5., 0.]],
                [[2., 2.], [-1., 4.], [100., 100.]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let m = Tensor::new(&[[1f32, 1., 1.], [1., 1., 0.]], &Device::Cpu).unwrap();
        Pooling { mode, normalize }
            .apply(&h, &m)
            .unwrap()
            .to_vec2()
            .unwrap()
    }

    #[test]
    fn modes_ignore_padding() {
        assert_eq!(
            run(PoolMode::Mean, false),
            vec![vec![3., -2. / 3.], vec![0.5, 3.]]
        );
        assert_eq!(run(PoolMode::Cls, false), vec![vec![1., 2.], vec![2., 2.]]);
        assert_eq!(run(PoolMode::Max, false), vec![vec![5., 2.], vec![2., 4.]]);
        let s = run(PoolMode::MeanSqrtLen, false);
        assert!((s[1][1] - 6. / 2f32.sqrt()).abs() < 1e-6);
        let n = run(PoolMode::Cls, true);
        assert!((n[1][0] - 1. / 2f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn module_paths_outside_the_folder_are_refused() {
        let d = std::env::temp_dir().join(format!("slm-modules-{}", std::process::id()));
        for bad in ["../1_Pooling", "/etc", "1_Pooling/../../x"] {
            std::fs::create_dir_all(&d).unwrap();
            let m = serde_json::json!([{"idx": 1, "name": "1", "path": bad,
                "type": "sentence_transformers.models.Pooling"}]);
            std::fs::write(d.join("modules.json"), m.to_string()).unwrap();
            let err = Pooling::from_folder(&d).unwrap_err().to_string();
            assert!(
                err.contains("modules.json") && err.contains("outside"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
