//! AdamW as PyTorch computes it, the learning-rate schedules of transformers, and gradient
//! clipping by global norm.

use rayon::prelude::*;

use super::params::Params;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// The update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    #[default]
    AdamW,
    /// Plain SGD, `w -= lr·(g + weight_decay·w)`: what PyTorch's `word_language_model` uses
    /// for its recurrent models (lr 20, gradients clipped to 0.25).
    Sgd,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    #[serde(default)]
    pub optimizer: Optimizer,
    /// After an evaluation without improvement, the learning rate is multiplied by this
    /// (`word_language_model` divides it by 4).
    #[serde(default)]
    pub plateau_factor: Option<f32>,
    pub lr: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (0: off).
    pub max_grad_norm: f32,
}

impl OptimConfig {
    /// A constant learning rate with PyTorch's AdamW defaults and no decay, warmup or clipping.
    pub fn constant(lr: f32) -> Self {
        Self {
            optimizer: Optimizer::AdamW,
            plateau_factor: None,
            lr,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            max_grad_norm: 0.0,
        }
    }

    /// transformers' `get_{constant,linear,cosine}_schedule_with_warmup` at `step` of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f32 {
        if step < self.warmup_steps {
            return self.lr * step as f32 / self.warmup_steps.max(1) as f32;
        }
        let progress = (step - self.warmup_steps) as f32
            / (total.saturating_sub(self.warmup_steps)).max(1) as f32;
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr * (1.0 - progress).max(0.0),
            Schedule::Cosine => {
                self.lr * 0.5 * (1.0 + (std::f32::consts::PI * progress.min(1.0)).cos())
            }
        }
    }
}

/// First and second moments for every trained parameter (empty for frozen ones).
#[derive(Debug, Clone, Default)]
pub struct AdamW {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Updates done so far (PyTorch's `state['step']`).
    pub t: u64,
}

impl AdamW {
    pub fn new(p: &Params) -> Self {
        let zeros = |p: &super::params::Param| {
            if p.grad.is_some() {
                vec![0f32; p.value.len()]
            } else {
                Vec::new()
            }
        };
        Self {
            m: p.list.iter().map(zeros).collect(),
            v: p.list.iter().map(zeros).collect(),
            t: 0,
        }
    }

    /// One update with learning rate `lr`, in parallel chunks, fused: decay, moments and the
    /// step in one pass over each tensor.
    pub fn step(&mut self, p: &mut Params, cfg: &OptimConfig, lr: f32) {
        self.t += 1;
        let t = self.t as i32;
        let bc1 = 1.0 - cfg.beta1.powi(t);
        let bc2 = 1.0 - cfg.beta2.powi(t);
        let step_size = lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        for ((param, m), v) in p.list.iter_mut().zip(&mut self.m).zip(&mut self.v) {
            let Some(g) = &param.grad else {
                continue;
            };
            let decay = if param.decay {
                1.0 - lr * cfg.weight_decay
            } else {
                1.0
            };
            const CHUNK: usize = 1 << 14;
            param
                .value
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((w, g), m), v)| {
                    for i in 0..w.len() {
                        m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g[i];
                        v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
                        let denom = v[i].sqrt() / bc2_sqrt + cfg.eps;
                        w[i] = w[i] * decay - step_size * m[i] / denom;
                    }
                });
        }
    }
}

/// One SGD update of every trained parameter (PyTorch's `torch.optim.SGD` without momentum)
/// from the gradients scaled by `clip` (the clipping factor, [`clip_factor`]), which it also
/// zeroes: a recurrent LM's step is short enough that separate passes to scale, step and zero
/// its 6M parameters cost several percent of it. The same arithmetic as scaling first.
pub fn sgd_step(p: &mut Params, lr: f32, weight_decay: f32, clip: f32) {
    for param in p.list.iter_mut() {
        let Some(g) = &mut param.grad else {
            continue;
        };
        let wd = if param.decay { weight_decay } else { 0.0 };
        param
            .value
            .par_chunks_mut(1 << 14)
            .zip(g.par_chunks_mut(1 << 14))
            .for_each(|(w, g)| {
                for (w, g) in w.iter_mut().zip(g) {
                    let d = if clip != 1.0 { *g * clip } else { *g };
                    *w -= lr * (d + wd * *w);
                    *g = 0.0;
                }
            });
    }
}

/// The global L2 norm of all gradients.
pub fn grad_norm(p: &Params) -> f32 {
    // Fixed chunks summed in order: the same norm whatever the thread count.
    let sq: f64 = p
        .list
        .iter()
        .filter_map(|p| p.grad.as_ref())
        .map(|g| {
            g.par_chunks(1 << 16)
                // In f64: an f32 running sum of 65,536 squares drifts by ~1e-4 (PyTorch's
                // norm agrees with the f64 one).
                .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
                .collect::<Vec<f64>>()
                .iter()
                .sum::<f64>()
        })
        .sum();
    sq.sqrt() as f32
}

/// What gradients of norm `norm` are scaled by so that theirs is at most `max` (PyTorch's
/// `clip_grad_norm_`); 1 when they are within it or `max` is 0.
pub fn clip_factor(norm: f32, max: f32) -> f32 {
    if max > 0.0 && norm > max {
        max / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Scales all gradients so their global L2 norm is at most `max` (PyTorch's
/// `clip_grad_norm_`); returns the norm before.
pub fn clip_grad_norm(p: &mut Params, max: f32) -> f32 {
    let norm = grad_norm(p);
    scale_grads(p, clip_factor(norm, max));
    norm
}

/// Multiplies every gradient by `k` (a [`clip_factor`]).
pub fn scale_grads(p: &mut Params, k: f32) {
    if k != 1.0 {
        for g in p.list.iter_mut().filter_map(|p| p.grad.as_mut()) {
            g.par_iter_mut().for_each(|x| *x *= k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        let c = |schedule| OptimConfig {
            optimizer: Optimizer::AdamW,
            plateau_factor: None,
            lr: 1.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 10,
            schedule,
            max_grad_norm: 1.0,
        };
        assert_eq!(c(Schedule::Linear).lr_at(5, 110), 0.5);
        assert_eq!(c(Schedule::Linear).lr_at(60, 110), 0.5);
        assert_eq!(c(Schedule::Linear).lr_at(110, 110), 0.0);
        assert!((c(Schedule::Cosine).lr_at(60, 110) - 0.5).abs() < 1e-6);
        assert_eq!(c(Schedule::Constant).lr_at(100, 110), 1.0);
    }

    #[test]
    fn adamw_matches_pytorch_on_two_steps() {
        // torch 2.5.1: torch.optim.AdamW([w], lr=0.1, weight_decay=0.01) on w=[1,-2], grads
        // [0.5,-1] then [0.25,3]: [0.8990000, -1.8980000], then [0.8048831, -1.9455210].
        let mut p = Params::default();
        p.add("w".into(), vec![1, 2], vec![1.0, -2.0], true);
        let cfg = OptimConfig {
            optimizer: Optimizer::AdamW,
            plateau_factor: None,
            lr: 0.1,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            max_grad_norm: 0.0,
        };
        let mut opt = AdamW::new(&p);
        p.list[0].grad = Some(vec![0.5, -1.0]);
        opt.step(&mut p, &cfg, 0.1);
        let w = p.list[0].value.clone();
        assert!(
            (w[0] - 0.899).abs() < 1e-5 && (w[1] + 1.898).abs() < 1e-5,
            "{w:?}"
        );
        p.list[0].grad = Some(vec![0.25, 3.0]);
        opt.step(&mut p, &cfg, 0.1);
        let w = &p.list[0].value;
        assert!(
            (w[0] - 0.804_883_1).abs() < 1e-6 && (w[1] + 1.945_521).abs() < 1e-6,
            "{w:?}"
        );
    }
}
