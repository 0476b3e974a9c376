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
    /// Stored transposed in the checkpoint (GPT-2's `Conv1D`, `[in, out]`); held `[out, in]`.
    pub transposed: bool,
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
            transposed: false,
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

    /// Folds every LoRA pair (`X.lora_A.weight`, `X.lora_B.weight`) into `X.weight`:
    /// `W += scale · B·A`. The factors stay (a saved model leaves them out).
    pub fn merge_lora(&mut self, scale: f32) {
        let index: std::collections::HashMap<String, usize> = self
            .list
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        for (name, &ai) in &index {
            let Some(module) = name.strip_suffix(".lora_A.weight") else {
                continue;
            };
            let (Some(&bi), Some(&wi)) = (
                index.get(&format!("{module}.lora_B.weight")),
                index.get(&format!("{module}.weight")),
            ) else {
                continue;
            };
            let r = self.list[ai].shape[0];
            let (dout, din) = (self.list[wi].shape[0], self.list[wi].shape[1]);
            let (a, b) = (self.list[ai].value.clone(), self.list[bi].value.clone());
            ops::matmul(
                &mut self.list[wi].value,
                true,
                &b,
                false,
                &a,
                false,
                (dout, din, r),
                scale,
            );
        }
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

/// The seed of a training step's random draws (dropout masks): the run's seed and the batch's
/// tokens, so a resumed run draws exactly what the uninterrupted one drew.
pub fn step_seed(seed: u64, ids: &[u32]) -> u64 {
    ids.iter().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, &i| {
        (h ^ i as u64).wrapping_mul(0x100_0000_01b3)
    })
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
    /// PEFT's `lora_dropout`: the LoRA branch sees its input with this fraction zeroed (and
    /// the rest scaled up) while training.
    pub dropout: f32,
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

/// Where [`Lin::backward_to`] puts `dx`.
pub enum Dx<'a> {
    /// Nothing upstream is trained: no `dx` at all.
    Skip,
    New,
    Add(&'a mut [f32]),
}

/// What [`Lin::backward`] needs besides the input: `x·Aᵀ` of the LoRA branch.
#[derive(Default)]
pub struct LinCache {
    xa: Vec<f32>,
    /// With LoRA dropout: the dropped input and the mask (0 or 1/(1-p)) that made it.
    xd: Vec<f32>,
    mask: Vec<f32>,
}

/// The dropout mask of one LoRA branch: a counter-based generator (splitmix64), so a mask
/// depends only on the step's seed, the layer and the position, and costs no shared state.
pub fn dropout_mask(len: usize, p: f32, seed: u64) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    let threshold = (p as f64 * u64::MAX as f64) as u64;
    (0..len as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            if z < threshold {
                0.0
            } else {
                keep
            }
        })
        .collect()
}

impl Lin {
    /// `train`: the step's seed when training (LoRA dropout applies), `None` when evaluating.
    pub fn forward(
        &self,
        p: &Params,
        x: &[f32],
        n: usize,
        train: Option<u64>,
    ) -> (Vec<f32>, LinCache) {
        let bias = self.b.map(|b| p.value(b));
        let mut y = ops::linear(x, p.value(self.w), bias, (n, self.din, self.dout));
        let mut cache = LinCache::default();
        if let Some(l) = self.lora {
            if let Some(seed) = train.filter(|_| l.dropout > 0.0) {
                // Each layer draws its own mask: the weight's index keys the stream.
                cache.mask = dropout_mask(
                    x.len(),
                    l.dropout,
                    seed ^ (self.w as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
                );
                cache.xd = x.iter().zip(&cache.mask).map(|(a, m)| a * m).collect();
            }
            let xin = if cache.xd.is_empty() { x } else { &cache.xd };
            let xa = ops::linear(xin, p.value(l.a), None, (n, self.din, l.r));
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
        let dx = match dx_acc {
            Some(d) => Dx::Add(d),
            None => Dx::New,
        };
        self.backward_to(p, dy, x, cache, n, dx)
    }

    /// Adds the weight gradients of trained parameters, and computes `dx` as `dx` asks.
    pub fn backward_to(
        &self,
        p: &mut Params,
        dy: &[f32],
        x: &[f32],
        cache: &LinCache,
        n: usize,
        dx: Dx,
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
        let dx: Option<&mut [f32]> = match dx {
            Dx::Skip => None,
            Dx::Add(d) => {
                ops::matmul(d, true, dy, false, p.value(self.w), false, dims, 1.0);
                Some(d)
            }
            Dx::New => {
                let mut d = vec![0f32; n * self.din];
                ops::matmul(&mut d, false, dy, false, p.value(self.w), false, dims, 1.0);
                Some(own.insert(d))
            }
        };
        if let Some(l) = self.lora {
            // dxa = scale · dy·B; dB += scale · dyᵀ·xa; dA += dxaᵀ·x̃; dx += (dxa·A) ⊙ mask,
            // where x̃ is the (dropped) input the branch saw.
            let xin = if cache.xd.is_empty() { x } else { &cache.xd };
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
                ops::matmul(da, true, &dxa, true, xin, false, (l.r, self.din, n), 1.0);
            }
            match dx {
                None => {}
                Some(dx) if cache.mask.is_empty() => ops::matmul(
                    dx,
                    true,
                    &dxa,
                    false,
                    p.value(l.a),
                    false,
                    (n, self.din, l.r),
                    1.0,
                ),
                Some(dx) => {
                    let mut d = vec![0f32; n * self.din];
                    ops::matmul(
                        &mut d,
                        false,
                        &dxa,
                        false,
                        p.value(l.a),
                        false,
                        (n, self.din, l.r),
                        1.0,
                    );
                    dx.iter_mut()
                        .zip(d.iter().zip(&cache.mask))
                        .for_each(|(o, (g, m))| *o += g * m);
                }
            }
        }
        own
    }

    pub fn set_lora_dropout(&mut self, p: f32) {
        if let Some(l) = &mut self.lora {
            l.dropout = p;
        }
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
        dropout: 0.0,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = seeded(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// A LoRA linear layer (non-zero B) and `Σ y ⊙ r` as its loss.
    fn setup(dropout: f32) -> (Params, Lin, Vec<f32>, Vec<f32>) {
        let (n, din, dout, r) = (4, 6, 5, 2);
        let mut p = Params::default();
        let w = p.add("w".into(), vec![dout, din], values(dout * din, 1), true);
        let b = p.add("b".into(), vec![dout], values(dout, 2), true);
        let mut lin = Lin {
            w,
            b: Some(b),
            din,
            dout,
            lora: None,
        };
        add_lora(&mut p, &mut lin, "l", r, 4.0, &mut seeded(3));
        p.list[lin.lora.unwrap().b].value = values(dout * r, 4);
        lin.set_lora_dropout(dropout);
        (p, lin, values(n * din, 5), values(n * dout, 6))
    }

    fn loss(p: &Params, lin: &Lin, x: &[f32], r: &[f32], train: Option<u64>) -> f64 {
        let (y, _) = lin.forward(p, x, 4, train);
        y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    #[test]
    fn lora_linear_gradients_match_finite_differences_with_and_without_dropout() {
        for (dropout, seed) in [(0.0, None), (0.3, Some(77))] {
            let (mut p, lin, mut x, r) = setup(dropout);
            let (_, cache) = lin.forward(&p, &x, 4, seed);
            let dx = lin.backward(&mut p, &r, &x, &cache, 4, None).unwrap();
            let l = lin.lora.unwrap();
            let eps = 1e-2f32;
            for (param, name) in [(l.a, "A"), (l.b, "B"), (lin.w, "W")] {
                let g = p.list[param].grad.clone().unwrap();
                for (j, &gj) in g.iter().enumerate() {
                    let orig = p.list[param].value[j];
                    p.list[param].value[j] = orig + eps;
                    let up = loss(&p, &lin, &x, &r, seed);
                    p.list[param].value[j] = orig - eps;
                    let down = loss(&p, &lin, &x, &r, seed);
                    p.list[param].value[j] = orig;
                    let numeric = (up - down) / (2.0 * eps as f64);
                    assert!(
                        (numeric - gj as f64).abs() < 2e-3,
                        "dropout {dropout} d{name}[{j}]: {} vs {numeric}",
                        gj
                    );
                }
            }
            for j in 0..x.len() {
                let orig = x[j];
                x[j] = orig + eps;
                let up = loss(&p, &lin, &x, &r, seed);
                x[j] = orig - eps;
                let down = loss(&p, &lin, &x, &r, seed);
                x[j] = orig;
                let numeric = (up - down) / (2.0 * eps as f64);
                assert!(
                    (numeric - dx[j] as f64).abs() < 2e-3,
                    "dropout {dropout} dx[{j}]: {} vs {numeric}",
                    dx[j]
                );
            }
        }
    }

    #[test]
    fn dropout_only_while_training_and_repeatable() {
        let (p, lin, x, r) = setup(0.5);
        let (p0, lin0, ..) = setup(0.0);
        // Evaluation ignores the dropout rate.
        assert_eq!(loss(&p, &lin, &x, &r, None), loss(&p0, &lin0, &x, &r, None));
        // Training draws a mask from the seed: the same seed gives the same output.
        assert_eq!(
            loss(&p, &lin, &x, &r, Some(9)),
            loss(&p, &lin, &x, &r, Some(9))
        );
        assert_ne!(
            loss(&p, &lin, &x, &r, Some(9)),
            loss(&p, &lin, &x, &r, None)
        );
        let m = dropout_mask(100_000, 0.25, 42);
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    }
}
