//! Forward and backward passes of the layers training needs, on row-major f32 buffers.
//!
//! Training does not go through candle's autograd: its fused softmax/norm ops pass no gradient,
//! it computes weight gradients of frozen weights, and a step measured 3.5× slower than PyTorch
//! here. Each layer instead has a forward that keeps what its backward needs, and a backward
//! written out by hand (the way llm.c does it), on the same GEMM the inference kernels use.
//! Reductions over rows run in fixed chunks summed in order, so a step is bit-for-bit
//! repeatable whatever the thread scheduling: a resumed run equals an uninterrupted one.

use rayon::prelude::*;

pub use super::attention::{attention, attention_backward, AttnGrads, AttnShape, Bias};
pub use crate::nn::kernels::matmul;
use crate::nn::kernels::{erf, exp, softmax_in_place, tanh};
use crate::nn::Activation;

/// Rows per task in row-parallel loops; fixed so that partial sums are always the same.
const ROWS_PER_TASK: usize = 64;

/// `y[n, out] = x[n, in] · wᵀ + b` with `w` in PyTorch's `[out, in]` layout.
pub fn linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (n, din, dout): (usize, usize, usize),
) -> Vec<f32> {
    let mut y = match b {
        Some(b) => b.repeat(n),
        None => vec![0.0; n * dout],
    };
    matmul(&mut y, b.is_some(), x, false, w, true, (n, dout, din), 1.0);
    y
}

/// Backward of [`linear`]: `dx = dy · w` (added to `dx` when `acc_dx`), `dw += dyᵀ · x`,
/// `db += Σ dy`. A frozen weight passes `None` and costs nothing.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    dx: Option<(&mut [f32], bool)>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    (n, din, dout): (usize, usize, usize),
) {
    if let Some((dx, acc)) = dx {
        matmul(dx, acc, dy, false, w, false, (n, din, dout), 1.0);
    }
    if let Some(dw) = dw {
        matmul(dw, true, dy, true, x, false, (dout, din, n), 1.0);
    }
    if let Some(db) = db {
        for row in dy.chunks_exact(dout) {
            db.iter_mut().zip(row).for_each(|(g, d)| *g += d);
        }
    }
}

/// What a LayerNorm backward needs: the normalised input and 1/σ per row.
pub struct NormCache {
    pub xhat: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// `y = (x − μ)/σ · g + b` per row of `h`.
pub fn layer_norm(x: &[f32], g: &[f32], b: &[f32], eps: f32, h: usize) -> (Vec<f32>, NormCache) {
    let rows = x.len() / h;
    let mut xhat = x.to_vec();
    let mut rstd = vec![0f32; rows];
    let mut y = vec![0f32; x.len()];
    xhat.par_chunks_mut(h)
        .zip(rstd.par_iter_mut())
        .zip(y.par_chunks_mut(h))
        .for_each(|((row, r), out)| {
            let mean = row.iter().sum::<f32>() / h as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            *r = 1.0 / (var + eps).sqrt();
            for (((v, o), gg), bb) in row.iter_mut().zip(out.iter_mut()).zip(g).zip(b) {
                *v = (*v - mean) * *r;
                *o = *v * gg + bb;
            }
        });
    (y, NormCache { xhat, rstd })
}

/// Backward of [`layer_norm`]: returns `dx`; adds to `dg`, `db` when they are trained.
pub fn layer_norm_backward(
    dy: &[f32],
    cache: &NormCache,
    g: &[f32],
    grads: Option<(&mut [f32], &mut [f32])>,
    h: usize,
) -> Vec<f32> {
    let mut dx = vec![0f32; dy.len()];
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(h * ROWS_PER_TASK)
        .zip(dy.par_chunks(h * ROWS_PER_TASK))
        .zip(cache.xhat.par_chunks(h * ROWS_PER_TASK))
        .zip(cache.rstd.par_chunks(ROWS_PER_TASK))
        .map(|(((dx, dy), xhat), rstd)| {
            let (mut dg, mut db) = (vec![0f32; h], vec![0f32; h]);
            for (((dx, dy), xh), r) in dx
                .chunks_mut(h)
                .zip(dy.chunks(h))
                .zip(xhat.chunks(h))
                .zip(rstd)
            {
                let (mut m1, mut m2) = (0f32, 0f32);
                for i in 0..h {
                    let d = dy[i] * g[i];
                    m1 += d;
                    m2 += d * xh[i];
                    dg[i] += dy[i] * xh[i];
                    db[i] += dy[i];
                }
                let (m1, m2) = (m1 / h as f32, m2 / h as f32);
                for i in 0..h {
                    dx[i] = r * (dy[i] * g[i] - m1 - xh[i] * m2);
                }
            }
            (dg, db)
        })
        .collect();
    if let Some((dg, db)) = grads {
        for (pg, pb) in &partials {
            dg.iter_mut().zip(pg).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
    }
    dx
}

/// Root-mean-square norm (Llama): `y = x / rms(x) · g`. The cache keeps `x / rms` and 1/rms.
pub fn rms_norm(x: &[f32], g: &[f32], eps: f32, h: usize) -> (Vec<f32>, NormCache) {
    let rows = x.len() / h;
    let mut xhat = x.to_vec();
    let mut rstd = vec![0f32; rows];
    let mut y = vec![0f32; x.len()];
    xhat.par_chunks_mut(h)
        .zip(rstd.par_iter_mut())
        .zip(y.par_chunks_mut(h))
        .for_each(|((row, r), out)| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for ((v, o), gg) in row.iter_mut().zip(out.iter_mut()).zip(g) {
                *v *= *r;
                *o = *v * gg;
            }
        });
    (y, NormCache { xhat, rstd })
}

/// Backward of [`rms_norm`]: `dx = r · (dy·g − x̂ · mean(dy·g·x̂))`.
pub fn rms_norm_backward(
    dy: &[f32],
    cache: &NormCache,
    g: &[f32],
    dg: Option<&mut [f32]>,
    h: usize,
) -> Vec<f32> {
    let mut dx = vec![0f32; dy.len()];
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(h * ROWS_PER_TASK)
        .zip(dy.par_chunks(h * ROWS_PER_TASK))
        .zip(cache.xhat.par_chunks(h * ROWS_PER_TASK))
        .zip(cache.rstd.par_chunks(ROWS_PER_TASK))
        .map(|(((dx, dy), xhat), rstd)| {
            let mut pg = vec![0f32; h];
            for (((dx, dy), xh), r) in dx
                .chunks_mut(h)
                .zip(dy.chunks(h))
                .zip(xhat.chunks(h))
                .zip(rstd)
            {
                let mut m = 0f32;
                for i in 0..h {
                    m += dy[i] * g[i] * xh[i];
                    pg[i] += dy[i] * xh[i];
                }
                let m = m / h as f32;
                for i in 0..h {
                    dx[i] = r * (dy[i] * g[i] - xh[i] * m);
                }
            }
            pg
        })
        .collect();
    if let Some(dg) = dg {
        for p in &partials {
            dg.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
    }
    dx
}

/// BERT's GELU (the erf form).
pub fn gelu(x: &[f32]) -> Vec<f32> {
    x.par_iter()
        .map(|&v| 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2)))
        .collect()
}

/// `dx = dy · (Φ(x) + x·φ(x))`.
pub fn gelu_backward(dy: &[f32], x: &[f32]) -> Vec<f32> {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    dy.par_iter()
        .zip(x.par_iter())
        .map(|(&d, &v)| {
            // One exp serves both: erf(a) = 1 − p(t)·e^(−a²) with a = v/√2, and φ(v) ∝ e^(−v²/2).
            let e = exp(-0.5 * v * v);
            let a = (v * std::f32::consts::FRAC_1_SQRT_2).abs();
            let t = 1.0 / (1.0 + 0.327_591_1 * a);
            let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
                + 0.254_829_6)
                * t;
            let erf = (1.0 - poly * e).copysign(v);
            d * (0.5 * (1.0 + erf) + v * INV_SQRT_2PI * e)
        })
        .collect()
}

/// `act(x)` exactly as the inference kernels compute it.
pub fn act_forward(x: &[f32], act: Activation) -> Vec<f32> {
    let mut y = x.to_vec();
    crate::nn::kernels::activate(&mut y, act);
    y
}

/// `dy · act'(x)`.
pub fn act_backward(dy: &[f32], x: &[f32], act: Activation) -> Vec<f32> {
    let d = |f: fn(f32) -> f32| -> Vec<f32> {
        dy.par_iter()
            .zip(x.par_iter())
            .map(|(&d, &v)| d * f(v))
            .collect()
    };
    match act {
        Activation::Gelu => gelu_backward(dy, x),
        Activation::GeluNew => d(|v| {
            // y = x/2 · (1 + tanh u), u = c·(x + 0.044715·x³)
            const C: f32 = 0.797_884_6;
            let th = tanh(C * (v + 0.044715 * v * v * v));
            0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * C * (1.0 + 3.0 * 0.044715 * v * v)
        }),
        Activation::Silu => d(|v| {
            let s = 1.0 / (1.0 + exp(-v));
            s * (1.0 + v * (1.0 - s))
        }),
        Activation::Relu => d(|v| if v > 0.0 { 1.0 } else { 0.0 }),
        Activation::Tanh => d(|v| {
            let t = tanh(v);
            1.0 - t * t
        }),
    }
}

/// `act(gate) ⊙ up`; SwiGLU has its own fused pass.
pub fn glu(gate: &[f32], up: &[f32], act: Activation) -> Vec<f32> {
    if act == Activation::Silu {
        return swiglu(gate, up);
    }
    let mut y = act_forward(gate, act);
    y.iter_mut().zip(up).for_each(|(a, u)| *a *= u);
    y
}

/// Backward of [`glu`]: `(dgate, dup)`.
pub fn glu_backward(dy: &[f32], gate: &[f32], up: &[f32], act: Activation) -> (Vec<f32>, Vec<f32>) {
    if act == Activation::Silu {
        return swiglu_backward(dy, gate, up);
    }
    let dyu: Vec<f32> = dy.iter().zip(up).map(|(d, u)| d * u).collect();
    let dg = act_backward(&dyu, gate, act);
    let a = act_forward(gate, act);
    let du = dy.iter().zip(&a).map(|(d, a)| d * a).collect();
    (dg, du)
}

pub fn tanh_forward(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| tanh(v)).collect()
}

/// From the output `y = tanh(x)`: `dx = dy · (1 − y²)`.
pub fn tanh_backward(dy: &[f32], y: &[f32]) -> Vec<f32> {
    dy.iter().zip(y).map(|(d, y)| d * (1.0 - y * y)).collect()
}

/// `silu(g) · u` of the gate and up projections (Llama's MLP).
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.par_iter()
        .zip(up.par_iter())
        .map(|(&g, &u)| g / (1.0 + exp(-g)) * u)
        .collect()
}

/// Backward of [`swiglu`]: `(dgate, dup)`.
pub fn swiglu_backward(dy: &[f32], gate: &[f32], up: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (dg, du): (Vec<f32>, Vec<f32>) = dy
        .par_iter()
        .zip(gate.par_iter().zip(up.par_iter()))
        .map(|(&d, (&g, &u))| {
            let s = 1.0 / (1.0 + exp(-g));
            let silu = g * s;
            (d * u * s * (1.0 + g * (1.0 - s)), d * silu)
        })
        .unzip();
    (dg, du)
}

/// Cross-entropy of `logits[n, c]` against `targets` (entries `None` are ignored, as
/// PyTorch's `ignore_index`), summed and divided by `denom`. Returns that value and `dlogits`,
/// its gradient (zero on the ignored rows).
pub fn cross_entropy(
    logits: &[f32],
    targets: &[Option<u32>],
    c: usize,
    denom: f32,
) -> (f64, Vec<f32>) {
    cross_entropy_owned(logits.to_vec(), targets, c, denom)
}

/// [`cross_entropy`] turning `logits` into the gradient in place.
pub fn cross_entropy_owned(
    mut logits: Vec<f32>,
    targets: &[Option<u32>],
    c: usize,
    denom: f32,
) -> (f64, Vec<f32>) {
    let inv = 1.0 / denom;
    let losses: Vec<f64> = logits
        .par_chunks_mut(c)
        .zip(targets.par_iter())
        .map(|(g, t)| {
            let Some(t) = *t else {
                g.fill(0.0);
                return 0.0;
            };
            let picked = g[t as usize] as f64;
            let (max, sum) = softmax_in_place(g);
            g[t as usize] -= 1.0;
            g.iter_mut().for_each(|v| *v *= inv);
            max as f64 + (sum as f64).ln() - picked
        })
        .collect();
    (losses.iter().sum::<f64>() / denom as f64, logits)
}

/// Rotary position embedding in HF's "rotate half" convention, in place on `[b·t, n·hd]`;
/// position of row `r` is `r % t`. `inverse` applies the transpose (the backward pass).
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], t: usize, n: usize, hd: usize, inverse: bool) {
    let half = hd / 2;
    x.par_chunks_mut(n * hd).enumerate().for_each(|(r, row)| {
        let pos = r % t;
        let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
        for head in row.chunks_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                let sn = if inverse { -s[i] } else { s[i] };
                a[i] = x1 * c[i] - x2 * sn;
                b[i] = x2 * c[i] + x1 * sn;
            }
        }
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    pub(crate) fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Checks an analytic gradient against central differences of `loss` (in f64 sums of f32
    /// forwards), on every element or a sample of them.
    pub(crate) fn check(
        name: &str,
        x: &mut [f32],
        analytic: &[f32],
        mut loss: impl FnMut(&[f32]) -> f64,
    ) {
        let eps = 1e-2f32;
        let step = (x.len() / 40).max(1);
        for i in (0..x.len()).step_by(step) {
            let orig = x[i];
            x[i] = orig + eps;
            let up = loss(x);
            x[i] = orig - eps;
            let down = loss(x);
            x[i] = orig;
            let numeric = (up - down) / (2.0 * eps as f64);
            let err = (numeric - analytic[i] as f64).abs();
            assert!(
                err <= 2e-3 + 2e-2 * numeric.abs(),
                "{name}[{i}]: analytic {} numeric {numeric}",
                analytic[i]
            );
        }
    }

    /// Loss = Σ y ⊙ r for a fixed random `r`, so dL/dy = r.
    pub(crate) fn dot(y: &[f32], r: &[f32]) -> f64 {
        y.iter()
            .zip(r)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum()
    }

    #[test]
    fn linear_gradients_match_finite_differences() {
        let (n, din, dout) = (5, 7, 3);
        let (mut x, mut w, mut b) = (rand(n * din, 1), rand(dout * din, 2), rand(dout, 3));
        let r = rand(n * dout, 4);
        let (mut dx, mut dw, mut db) = (vec![0.0; n * din], vec![0.0; dout * din], vec![0.0; dout]);
        linear_backward(
            &r,
            &x,
            &w,
            Some((&mut dx, false)),
            Some(&mut dw),
            Some(&mut db),
            (n, din, dout),
        );
        let (w0, b0, x0) = (w.clone(), b.clone(), x.clone());
        check("dx", &mut x, &dx, |x| {
            dot(&linear(x, &w0, Some(&b0), (n, din, dout)), &r)
        });
        check("dw", &mut w, &dw, |w| {
            dot(&linear(&x0, w, Some(&b0), (n, din, dout)), &r)
        });
        check("db", &mut b, &db, |b| {
            dot(&linear(&x0, &w0, Some(b), (n, din, dout)), &r)
        });
    }

    #[test]
    fn norm_gradients_match_finite_differences() {
        let (rows, h) = (3, 16);
        let (mut x, mut g, mut b) = (rand(rows * h, 5), rand(h, 6), rand(h, 7));
        let r = rand(rows * h, 8);
        let (_, cache) = layer_norm(&x, &g, &b, 1e-5, h);
        let (mut dg, mut db) = (vec![0.0; h], vec![0.0; h]);
        let dx = layer_norm_backward(&r, &cache, &g, Some((&mut dg, &mut db)), h);
        let (x0, g0, b0) = (x.clone(), g.clone(), b.clone());
        check("ln dx", &mut x, &dx, |x| {
            dot(&layer_norm(x, &g0, &b0, 1e-5, h).0, &r)
        });
        check("ln dg", &mut g, &dg, |g| {
            dot(&layer_norm(&x0, g, &b0, 1e-5, h).0, &r)
        });
        check("ln db", &mut b, &db, |b| {
            dot(&layer_norm(&x0, &g0, b, 1e-5, h).0, &r)
        });

        let mut x = x0.clone();
        let (_, cache) = rms_norm(&x, &g0, 1e-5, h);
        let mut dg = vec![0.0; h];
        let dx = rms_norm_backward(&r, &cache, &g0, Some(&mut dg), h);
        check("rms dx", &mut x, &dx, |x| {
            dot(&rms_norm(x, &g0, 1e-5, h).0, &r)
        });
        let mut g = g0.clone();
        check("rms dg", &mut g, &dg, |g| {
            dot(&rms_norm(&x0, g, 1e-5, h).0, &r)
        });
    }

    #[test]
    fn activation_gradients_match_finite_differences() {
        let n = 50;
        let x: Vec<f32> = rand(n, 9).iter().map(|v| v * 4.0).collect();
        let r = rand(n, 10);
        let mut xs = x.clone();
        check("gelu", &mut xs, &gelu_backward(&r, &x), |x| {
            dot(&gelu(x), &r)
        });
        let y = tanh_forward(&x);
        check("tanh", &mut xs, &tanh_backward(&r, &y), |x| {
            dot(&tanh_forward(x), &r)
        });
        let u = rand(n, 11);
        let (dg, du) = swiglu_backward(&r, &x, &u);
        check("swiglu gate", &mut xs, &dg, |g| dot(&swiglu(g, &u), &r));
        let mut us = u.clone();
        check("swiglu up", &mut us, &du, |u| dot(&swiglu(&x, u), &r));
    }

    #[test]
    fn cross_entropy_matches_a_direct_computation_and_its_gradient() {
        let (n, c) = (4, 5);
        let mut logits: Vec<f32> = rand(n * c, 12).iter().map(|v| v * 3.0).collect();
        let targets = [Some(1), None, Some(4), Some(0)];
        let (loss, grad) = cross_entropy(&logits, &targets, c, 3.0);
        let direct: f64 = [(0, 1), (2, 4), (3, 0)]
            .iter()
            .map(|&(i, t)| {
                let row = &logits[i * c..][..c];
                let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
                lse - row[t] as f64
            })
            .sum::<f64>()
            / 3.0;
        assert!((loss - direct).abs() < 1e-6, "{loss} vs {direct}");
        assert!(
            grad[c..2 * c].iter().all(|&g| g == 0.0),
            "ignored row has no gradient"
        );
        check("ce", &mut logits, &grad, |l| {
            cross_entropy(l, &targets, c, 3.0).0
        });
    }

    #[test]
    fn rope_backward_is_its_inverse_rotation() {
        let (t, n, hd) = (3, 2, 4);
        let cos = rand(t * hd / 2, 17);
        let sin = rand(t * hd / 2, 18);
        let mut x = rand(2 * t * n * hd, 19);
        let r = rand(x.len(), 20);
        let mut dx = r.clone();
        rope(&mut dx, &cos, &sin, t, n, hd, true);
        check("rope", &mut x, &dx, |x| {
            let mut y = x.to_vec();
            rope(&mut y, &cos, &sin, t, n, hd, false);
            dot(&y, &r)
        });
    }
}
