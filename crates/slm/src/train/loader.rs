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

/// Loads a model's weights as f32 parameters under their Hugging Face names: all trained
/// (`lora: None`), or frozen with LoRA factors on the targeted modules.
pub struct ParamLoader {
    vb: Vb,
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
        Self {
            vb,
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

    /// The tensor `name` (as a task model names it) as a parameter of that name.
    fn get(&mut self, name: &str, shape: &[usize], transposed: bool) -> Result<usize> {
        self.get_as(name, shape, transposed, self.full())
    }

    fn get_as(
        &mut self,
        name: &str,
        shape: &[usize],
        transposed: bool,
        trained: bool,
    ) -> Result<usize> {
        let stored: Vec<usize> = if transposed {
            shape.iter().rev().copied().collect()
        } else {
            shape.to_vec()
        };
        let t = self.vb.get(&stored_tensor(&self.vb, name), &stored)?;
        let t = if transposed { t.t()?.contiguous()? } else { t };
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        let i = self
            .params
            .add(name.to_string(), shape.to_vec(), v, trained);
        self.params.list[i].transposed = transposed;
        self.by_name.insert(name.to_string(), i);
        Ok(i)
    }

    fn lin(&mut self, name: &str, din: usize, dout: usize, bias: bool, conv: bool) -> Result<Lin> {
        let mut l = Lin {
            w: self.get(&format!("{name}.weight"), &[dout, din], conv)?,
            b: if bias {
                Some(self.get(&format!("{name}.bias"), &[dout], false)?)
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
        self.vb.contains(&stored_tensor(&self.vb, tensor))
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
            w: self.get(weight, &[dout, din], false)?,
            b: bias.map(|b| self.get(b, &[dout], false)).transpose()?,
            din,
            dout,
            lora: None,
        })
    }

    fn conv1d(&mut self, name: &str, din: usize, dout: usize) -> Result<Lin> {
        // A GGUF file stores Conv1D weights as [out, in] already.
        let conv = !self.vb.is_gguf();
        self.lin(name, din, dout, true, conv)
    }

    fn norm(&mut self, kind: NormKind, name: &str, size: usize, eps: f64) -> Result<NormP> {
        // Checkpoints from the original TensorFlow BERT port name the parameters gamma/beta.
        let stored = stored_module(&self.vb, name);
        let (w, b) = if !self.vb.contains(&format!("{stored}.weight"))
            && self.vb.contains(&format!("{stored}.gamma"))
        {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        let g = self.get(&format!("{name}.{w}"), &[size], false)?;
        let b = match kind {
            NormKind::Rms | NormKind::RmsOffset => None,
            NormKind::Layer => Some(self.get(&format!("{name}.{b}"), &[size], false)?),
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
            table: self.get(&format!("{name}.weight"), &[count, dim], false)?,
            dim,
        })
    }

    fn tied(&mut self, name: &str, count: usize, dim: usize, bias: Option<&str>) -> Result<Lin> {
        let key = format!("{name}.weight");
        let w = match self.by_name.get(&key) {
            Some(&w) => w,
            None => self.get(&key, &[count, dim], false)?,
        };
        // A decoder's bias belongs to the head: trained (new if missing) in every run.
        let b = match bias {
            Some(b) if self.contains(b) => Some(self.get_as(b, &[count], false, true)?),
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
        let stored = self.vb.shape_of(&stored_tensor(&self.vb, &wn));
        if stored.as_deref() == Some(&[dout, din][..]) && self.contains(&bn) {
            return Ok(Lin {
                w: self.get_as(&wn, &[dout, din], false, trained)?,
                b: Some(self.get_as(&bn, &[dout], false, trained)?),
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
                self.get_as(&gn, &[size], false, true)?,
                self.get_as(&bn, &[size], false, true)?,
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
