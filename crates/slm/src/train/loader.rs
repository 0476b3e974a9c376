//! Training weights by Hugging Face name: what is trained (full, or LoRA per PEFT target, new
//! heads), read from any weight store through the family's [`Loader`] calls.

use std::collections::HashMap;

use super::params::{add_lora, normal, Lin, Params};
use super::tape::{EmbP, NormP, TrainW};
use crate::error::Result;
use crate::nn::exec::{Loader, NormKind};
use crate::nn::infer::{stored_module, stored_tensor};
use crate::nn::Vb;

/// LoRA on the modules a PEFT `target_modules` list names.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    /// PEFT's `lora_dropout` on each LoRA branch's input while training.
    pub dropout: f32,
}

impl LoraSpec {
    /// PEFT's rule: a target matches the module's full name or its last components.
    fn matches(&self, name: &str) -> bool {
        self.targets
            .iter()
            .any(|t| name == t || name.ends_with(&format!(".{t}")))
    }
}

/// How a model with no checkpoint yet is initialised: transformers' `_init_weights` (linear
/// and embedding weights from N(0, std²), biases zero, norms one), which a family states.
#[derive(Debug, Clone)]
pub struct InitRule {
    pub std: f32,
    /// Weights whose name ends with one of these are drawn with `std · factor` instead, the
    /// first match deciding (GPT-2's residual projections: 1/√(2·layers); T5's per-module
    /// fan-in scaling).
    pub scaled: Vec<(&'static str, f32)>,
    /// The output layer reads the embedding table; otherwise `lm_head` is a weight of its own.
    pub tied: bool,
}

/// What a tensor of a new model starts as.
#[derive(Debug, Clone, Copy)]
enum Fresh {
    Normal,
    Ones,
    Zeros,
}

/// Where the parameters' values come from.
enum Source {
    Stored(Vb),
    Init(InitRule),
}

/// Loads a model's weights as f32 parameters under their Hugging Face names: all trained
/// (`lora: None`), or frozen with LoRA factors on the targeted modules; or draws a new
/// model's by its family's [`InitRule`].
pub struct ParamLoader {
    source: Source,
    pub params: Params,
    lora: Option<LoraSpec>,
    rng: rand::rngs::StdRng,
    /// New heads draw from their own stream, so a LoRA run starts from exactly the head a
    /// full run with the same seed gets.
    head_rng: rand::rngs::StdRng,
    by_name: HashMap<String, usize>,
}

impl ParamLoader {
    pub fn new(vb: Vb, lora: Option<LoraSpec>, seed: u64) -> Self {
        Self::with_source(Source::Stored(vb), lora, seed)
    }

    /// A new model, every parameter trained, drawn by `rule` from `seed`.
    pub fn init(rule: InitRule, seed: u64) -> Self {
        Self::with_source(Source::Init(rule), None, seed)
    }

    fn with_source(source: Source, lora: Option<LoraSpec>, seed: u64) -> Self {
        Self {
            source,
            params: Params::default(),
            lora,
            rng: super::params::seeded(seed ^ 0x4c6f_5241),
            head_rng: super::params::seeded(seed),
            by_name: HashMap::new(),
        }
    }

    fn full(&self) -> bool {
        self.lora.is_none()
    }

    fn stored(&self) -> Option<&Vb> {
        match &self.source {
            Source::Stored(vb) => Some(vb),
            Source::Init(_) => None,
        }
    }

    /// The tensor `name` (as a task model names it) as a parameter of that name; `fresh`
    /// says what it starts as in a new model.
    fn get(
        &mut self,
        name: &str,
        shape: &[usize],
        transposed: bool,
        fresh: Fresh,
    ) -> Result<usize> {
        self.get_as(name, shape, transposed, self.full(), fresh)
    }

    fn get_as(
        &mut self,
        name: &str,
        shape: &[usize],
        transposed: bool,
        trained: bool,
        fresh: Fresh,
    ) -> Result<usize> {
        let n: usize = shape.iter().product();
        let v = match &self.source {
            Source::Stored(vb) => {
                let stored: Vec<usize> = if transposed {
                    shape.iter().rev().copied().collect()
                } else {
                    shape.to_vec()
                };
                let t = vb.get(&stored_tensor(vb, name), &stored)?;
                let t = if transposed { t.t()?.contiguous()? } else { t };
                t.flatten_all()?.to_vec1::<f32>()?
            }
            Source::Init(rule) => match fresh {
                Fresh::Ones => vec![1.0; n],
                Fresh::Zeros => vec![0.0; n],
                Fresh::Normal => {
                    let std = match rule.scaled.iter().find(|s| name.ends_with(s.0)) {
                        Some((_, f)) => rule.std * f,
                        None => rule.std,
                    };
                    normal(n, std, &mut self.rng)
                }
            },
        };
        let i = self
            .params
            .add(name.to_string(), shape.to_vec(), v, trained);
        self.params.list[i].transposed = transposed;
        self.by_name.insert(name.to_string(), i);
        Ok(i)
    }

    fn lin(&mut self, name: &str, din: usize, dout: usize, bias: bool, conv: bool) -> Result<Lin> {
        let mut l = Lin {
            w: self.get(&format!("{name}.weight"), &[dout, din], conv, Fresh::Normal)?,
            b: if bias {
                Some(self.get(&format!("{name}.bias"), &[dout], false, Fresh::Zeros)?)
            } else {
                None
            },
            din,
            dout,
            lora: None,
        };
        if let Some(spec) = self.lora.as_ref().filter(|s| s.matches(name)) {
            let (r, alpha, dropout) = (spec.r, spec.alpha, spec.dropout);
            add_lora(&mut self.params, &mut l, name, r, alpha, &mut self.rng);
            l.set_lora_dropout(dropout);
        }
        Ok(l)
    }
}

impl Loader for ParamLoader {
    type W = TrainW;

    fn contains(&self, tensor: &str) -> bool {
        match &self.source {
            Source::Stored(vb) => vb.contains(&stored_tensor(vb, tensor)),
            // A new model has exactly the tensors its family asks for; whether the head is
            // its own weight is the one choice the family asks about.
            Source::Init(rule) => tensor == "lm_head.weight" && !rule.tied,
        }
    }

    fn linear(&mut self, name: &str, din: usize, dout: usize, bias: bool) -> Result<Lin> {
        self.lin(name, din, dout, bias, false)
    }

    fn linear_named(
        &mut self,
        weight: &str,
        bias: Option<&str>,
        din: usize,
        dout: usize,
    ) -> Result<Lin> {
        Ok(Lin {
            w: self.get(weight, &[dout, din], false, Fresh::Normal)?,
            b: bias
                .map(|b| self.get(b, &[dout], false, Fresh::Zeros))
                .transpose()?,
            din,
            dout,
            lora: None,
        })
    }

    fn conv1d(&mut self, name: &str, din: usize, dout: usize) -> Result<Lin> {
        // A GGUF file stores Conv1D weights as [out, in] already; a new model is saved as
        // transformers stores them.
        let conv = self.stored().is_none_or(|vb| !vb.is_gguf());
        self.lin(name, din, dout, true, conv)
    }

    fn norm(&mut self, kind: NormKind, name: &str, size: usize, eps: f64) -> Result<NormP> {
        // Checkpoints from the original TensorFlow BERT port name the parameters gamma/beta.
        let gamma = self.stored().is_some_and(|vb| {
            let stored = stored_module(vb, name);
            !vb.contains(&format!("{stored}.weight")) && vb.contains(&format!("{stored}.gamma"))
        });
        let (w, b) = if gamma {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        // Gemma's `(1 + w)` norm starts at zero, as transformers' Gemma init has it.
        let one = match kind {
            NormKind::RmsOffset => Fresh::Zeros,
            _ => Fresh::Ones,
        };
        let g = self.get(&format!("{name}.{w}"), &[size], false, one)?;
        let b = match kind {
            NormKind::Rms | NormKind::RmsOffset => None,
            NormKind::Layer => {
                Some(self.get(&format!("{name}.{b}"), &[size], false, Fresh::Zeros)?)
            }
        };
        Ok(NormP {
            kind,
            g,
            b,
            eps: eps as f32,
        })
    }

    fn embedding(&mut self, name: &str, count: usize, dim: usize) -> Result<EmbP> {
        Ok(EmbP {
            table: self.get(
                &format!("{name}.weight"),
                &[count, dim],
                false,
                Fresh::Normal,
            )?,
            dim,
            padding: None,
        })
    }

    fn padded_embedding(
        &mut self,
        name: &str,
        count: usize,
        dim: usize,
        padding: u32,
    ) -> Result<EmbP> {
        Ok(EmbP {
            padding: Some(padding),
            ..self.embedding(name, count, dim)?
        })
    }

    fn computed(&mut self, name: &str, count: usize, dim: usize, values: Vec<f32>) -> Result<EmbP> {
        let key = format!("{name}.weight");
        let table = self
            .params
            .add(key.clone(), vec![count, dim], values, false);
        self.by_name.insert(key, table);
        Ok(EmbP {
            table,
            dim,
            padding: None,
        })
    }

    fn tied(&mut self, name: &str, count: usize, dim: usize, bias: Option<&str>) -> Result<Lin> {
        let key = format!("{name}.weight");
        let w = match self.by_name.get(&key) {
            Some(&w) => w,
            None => self.get(&key, &[count, dim], false, Fresh::Normal)?,
        };
        // A decoder's bias belongs to the head: trained (new if missing) in every run; one
        // stored `[1, count]` is a buffer (BART's `final_logits_bias`), read and never trained.
        let buffer = self
            .stored()
            .and_then(|vb| vb.shape_of(&stored_tensor(vb, bias?)))
            .is_some_and(|s| s == [1, count]);
        let b = match bias {
            Some(b) if buffer => Some(self.get_as(b, &[1, count], false, false, Fresh::Zeros)?),
            Some(b) if self.contains(b) => {
                Some(self.get_as(b, &[count], false, true, Fresh::Zeros)?)
            }
            Some(b) => Some(
                self.params
                    .add(b.to_string(), vec![count], vec![0.0; count], true),
            ),
            None => None,
        };
        Ok(Lin {
            w,
            b,
            din: dim,
            dout: count,
            lora: None,
        })
    }

    fn head(&mut self, name: &str, din: usize, dout: usize, saved: bool) -> Result<Lin> {
        let trained = self.full() || saved;
        let (wn, bn) = (format!("{name}.weight"), format!("{name}.bias"));
        let stored = self
            .stored()
            .and_then(|vb| vb.shape_of(&stored_tensor(vb, &wn)));
        if stored.as_deref() == Some(&[dout, din][..]) && self.contains(&bn) {
            return Ok(Lin {
                w: self.get_as(&wn, &[dout, din], false, trained, Fresh::Normal)?,
                b: Some(self.get_as(&bn, &[dout], false, trained, Fresh::Zeros)?),
                din,
                dout,
                lora: None,
            });
        }
        let w = normal(dout * din, 0.02, &mut self.head_rng);
        Ok(Lin {
            w: self.params.add(wn, vec![dout, din], w, trained),
            b: Some(self.params.add(bn, vec![dout], vec![0.0; dout], trained)),
            din,
            dout,
            lora: None,
        })
    }

    fn head_norm(&mut self, name: &str, size: usize, eps: f64) -> Result<NormP> {
        let (gn, bn) = (format!("{name}.weight"), format!("{name}.bias"));
        let (g, b) = if self.contains(&gn) && self.contains(&bn) {
            (
                self.get_as(&gn, &[size], false, true, Fresh::Ones)?,
                self.get_as(&bn, &[size], false, true, Fresh::Zeros)?,
            )
        } else {
            (
                self.params.add(gn, vec![size], vec![1.0; size], true),
                self.params.add(bn, vec![size], vec![0.0; size], true),
            )
        };
        Ok(NormP {
            kind: NormKind::Layer,
            g,
            b: Some(b),
            eps: eps as f32,
        })
    }
}
