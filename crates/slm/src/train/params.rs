//! Trainable parameters by their Hugging Face names, and LoRA-capable linear layers on them.

use rand::{Rng, SeedableRng};

use super::ops;

/// One tensor: value, gradient (only if trained) and whether AdamW decays it.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Vec<f32>,
    pub grad: Option<Vec<f32>>,
    /// HF Trainer's rule: weight decay on matrices, not on biases and norm weights.
    pub decay: bool,
}

#[derive(Debug, Default, Clone)]
pub struct Params {
    pub list: Vec<Param>,
}

impl Params {
    pub fn add(
        &mut self,
        name: String,
        shape: Vec<usize>,
        value: Vec<f32>,
        trainable: bool,
    ) -> usize {
        debug_assert_eq!(shape.iter().product::<usize>(), value.len(), "{name}");
        let decay = shape.len() >= 2 && !name.contains("LayerNorm") && !name.contains("norm");
        self.list.push(Param {
            grad: trainable.then(|| vec![0.0; value.len()]),
            name,
            shape,
            value,
            decay,
        });
        self.list.len() - 1
    }

    pub fn value(&self, i: usize) -> &[f32] {
        &self.list[i].value
    }

    pub fn trainable(&self, i: usize) -> bool {
        self.list[i].grad.is_some()
    }

    /// The gradient buffer of a trained parameter.
    pub fn grad(&mut self, i: usize) -> Option<&mut [f32]> {
        self.list[i].grad.as_deref_mut()
    }

    /// Value and gradient at once (for `dW += …` next to a read of W).
    pub fn split(&mut self, i: usize) -> (&[f32], Option<&mut [f32]>) {
        let p = &mut self.list[i];
        (&p.value, p.grad.as_deref_mut())
    }

    pub fn zero_grad(&mut self) {
        use rayon::prelude::*;
        for p in &mut self.list {
            if let Some(g) = &mut p.grad {
                g.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
            }
        }
    }

    pub fn n_trainable(&self) -> usize {
        self.list
            .iter()
            .filter(|p| p.grad.is_some())
            .map(|p| p.value.len())
            .sum()
    }

    pub fn n_total(&self) -> usize {
        self.list.iter().map(|p| p.value.len()).sum()
    }
}

/// `N(0, std²)` values from a seeded generator, as transformers initialises new weights.
pub fn normal(n: usize, std: f32, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
    // Box-Muller on the generator's uniforms: reproducible across platforms.
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-12);
            let u2: f32 = rng.random::<f32>();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos() * std
        })
        .collect()
}

pub fn seeded(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// LoRA's low-rank update `scale · B·A` beside a frozen weight (PEFT's `lora_A`, `lora_B`).
#[derive(Debug, Clone, Copy)]
pub struct Lora {
    pub a: usize,
    pub b: usize,
    pub r: usize,
    pub scale: f32,
}

/// A linear layer over parameters: `y = x·Wᵀ + b (+ scale·(x·Aᵀ)·Bᵀ)`.
#[derive(Debug, Clone, Copy)]
pub struct Lin {
    pub w: usize,
    pub b: Option<usize>,
    pub din: usize,
    pub dout: usize,
    pub lora: Option<Lora>,
}

/// What [`Lin::backward`] needs besides the input: `x·Aᵀ` of the LoRA branch.
#[derive(Default)]
pub struct LinCache {
    xa: Vec<f32>,
}

impl Lin {
    pub fn forward(&self, p: &Params, x: &[f32], n: usize) -> (Vec<f32>, LinCache) {
        let bias = self.b.map(|b| p.value(b));
        let mut y = ops::linear(x, p.value(self.w), bias, (n, self.din, self.dout));
        let mut cache = LinCache::default();
        if let Some(l) = self.lora {
            let xa = ops::linear(x, p.value(l.a), None, (n, self.din, l.r));
            ops::matmul(
                &mut y,
                true,
                &xa,
                false,
                p.value(l.b),
                true,
                (n, self.dout, l.r),
                l.scale,
            );
            cache.xa = xa;
        }
        (y, cache)
    }

    /// Adds the weight gradients of trained parameters and returns `dx` (or adds it to
    /// `dx_acc`).
    pub fn backward(
        &self,
        p: &mut Params,
        dy: &[f32],
        x: &[f32],
        cache: &LinCache,
        n: usize,
        dx_acc: Option<&mut [f32]>,
    ) -> Option<Vec<f32>> {
        let dims = (n, self.din, self.dout);
        if let Some(b) = self.b {
            if let Some(db) = p.grad(b) {
                ops::linear_backward(dy, x, &[], None, None, Some(db), dims);
            }
        }
        {
            let (w, dw) = p.split(self.w);
            if let Some(dw) = dw {
                ops::linear_backward(dy, x, w, None, Some(dw), None, dims);
            }
        }
        let mut own = None;
        let dx: &mut [f32] = match dx_acc {
            Some(d) => {
                ops::matmul(
                    d,
                    true,
                    dy,
                    false,
                    p.value(self.w),
                    false,
                    (n, self.din, self.dout),
                    1.0,
                );
                d
            }
            None => {
                let mut d = vec![0f32; n * self.din];
                ops::matmul(
                    &mut d,
                    false,
                    dy,
                    false,
                    p.value(self.w),
                    false,
                    (n, self.din, self.dout),
                    1.0,
                );
                own.insert(d)
            }
        };
        if let Some(l) = self.lora {
            // dxa = scale · dy·B; dB += scale · dyᵀ·xa; dA += dxaᵀ·x; dx += dxa·A.
            let mut dxa = vec![0f32; n * l.r];
            ops::matmul(
                &mut dxa,
                false,
                dy,
                false,
                p.value(l.b),
                false,
                (n, l.r, self.dout),
                l.scale,
            );
            if let Some(db) = p.grad(l.b) {
                ops::matmul(
                    db,
                    true,
                    dy,
                    true,
                    &cache.xa,
                    false,
                    (self.dout, l.r, n),
                    l.scale,
                );
            }
            if let Some(da) = p.grad(l.a) {
                ops::matmul(da, true, &dxa, true, x, false, (l.r, self.din, n), 1.0);
            }
            ops::matmul(
                dx,
                true,
                &dxa,
                false,
                p.value(l.a),
                false,
                (n, self.din, l.r),
                1.0,
            );
        }
        own
    }

    /// Folds the LoRA update into the weight: `W += scale · B·A`.
    pub fn merge(&self, p: &mut Params) {
        if let Some(l) = self.lora {
            let (a, b) = (p.value(l.a).to_vec(), p.value(l.b).to_vec());
            ops::matmul(
                &mut p.list[self.w].value,
                true,
                &b,
                false,
                &a,
                false,
                (self.dout, self.din, l.r),
                l.scale,
            );
        }
    }
}

/// Adds LoRA parameters to `lin` as PEFT initialises them: A ~ kaiming-uniform(a=√5), B = 0,
/// so the model starts exactly at the base.
pub fn add_lora(
    p: &mut Params,
    lin: &mut Lin,
    prefix: &str,
    r: usize,
    alpha: f32,
    rng: &mut rand::rngs::StdRng,
) {
    let bound = 1.0 / (lin.din as f32).sqrt();
    let a: Vec<f32> = (0..r * lin.din)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    let ai = p.add(format!("{prefix}.lora_A.weight"), vec![r, lin.din], a, true);
    let bi = p.add(
        format!("{prefix}.lora_B.weight"),
        vec![lin.dout, r],
        vec![0.0; lin.dout * r],
        true,
    );
    p.list[ai].decay = true;
    p.list[bi].decay = true;
    lin.lora = Some(Lora {
        a: ai,
        b: bi,
        r,
        scale: alpha / r as f32,
    });
}
