//! Fused f32 CPU kernels for the dense (unquantized) path. candle runs a layer as a chain of
//! separate ops (matmul, broadcast bias add, libm `erf` per element, transposes for attention,
//! residual add, layer norm), each a full pass over memory; on two cores those passes cost as
//! much as the matmuls themselves. These kernels fold them: the bias is the GEMM's initial
//! value, activations run on the GEMM output in place with a vectorisable `erf`/`exp`,
//! attention reads Q/K/V straight from the fused projection (`attention.rs`), and the residual
//! add is part of the layer norm.

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;

use super::pool;
use super::Activation;
use crate::error::{Error, Result};

/// Runs `f` on the f32 data of `t` (made contiguous first, which is free when it already is).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            Ok(f(&v[start..start + layout.shape().elem_count()]))
        }
        _ => Err(Error::msg(format!(
            "internal: expected an f32 CPU tensor, got {:?}",
            t.dtype()
        ))),
    }
}

pub fn tensor(data: Vec<f32>, dims: Vec<usize>) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, dims, &Device::Cpu)?)
}

/// Below this many multiply-adds a GEMM runs on one thread: waking the pool costs more.
const PAR_MACS: usize = 1 << 18;

/// `y[m, n] = x[m, k] · wt[k, n] + bias`, then `act` in place (`y` overwritten).
#[allow(clippy::too_many_arguments)]
pub fn linear_into(
    x: &[f32],
    m: usize,
    k: usize,
    wt: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    act: Option<Activation>,
    y: &mut [f32],
) {
    if let Some(b) = bias {
        y.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(b));
    }
    matmul(y, bias.is_some(), x, false, wt, false, (m, n, k), 1.0);
    if let Some(act) = act {
        activate(y, act);
    }
}

/// `dst[m, n] = alpha · dst + a[m, k] · b[k, n]`, where `a` is stored `[k, m]` when `at` and
/// `b` is stored `[n, k]` when `bt`; `acc` keeps (adds to) what `dst` holds.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    acc: bool,
    a: &[f32],
    at: bool,
    b: &[f32],
    bt: bool,
    (m, n, k): (usize, usize, usize),
    scale: f32,
) {
    let threads = rayon::current_num_threads();
    let par = m * n * k >= PAR_MACS && threads > 1;
    matmul_on(
        par.then_some(threads),
        dst,
        acc,
        a,
        at,
        b,
        bt,
        (m, n, k),
        scale,
    );
}

/// [`matmul`] on `threads` pool threads, or on the calling thread alone with `None` (for
/// callers that already run one GEMM per worker).
#[allow(clippy::too_many_arguments)]
pub fn matmul_on(
    threads: Option<usize>,
    dst: &mut [f32],
    acc: bool,
    a: &[f32],
    at: bool,
    b: &[f32],
    bt: bool,
    (m, n, k): (usize, usize, usize),
    scale: f32,
) {
    assert_eq!(dst.len(), m * n, "matmul dst");
    assert_eq!(a.len(), m * k, "matmul lhs");
    assert_eq!(b.len(), k * n, "matmul rhs");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            dst.fill(0.0);
        }
        return;
    }
    let (a_cs, a_rs) = if at { (m, 1) } else { (1, k) };
    let (b_cs, b_rs) = if bt { (k, 1) } else { (1, n) };
    let par = match threads {
        Some(t) => gemm::Parallelism::Rayon(t),
        None => gemm::Parallelism::None,
    };
    // SAFETY: the strides describe exactly the buffers whose lengths were checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// Applies `act` in place, in parallel chunks for large buffers: on rayon's pool, where the
/// f32 GEMMs before it (dense layers, training) run; the quantized forward pass applies it to
/// pieces below the parallel size from its own pool (`gated`).
pub fn activate(y: &mut [f32], act: Activation) {
    let f = |c: &mut [f32]| match act {
        Activation::Gelu => c.iter_mut().for_each(|v| *v = gelu_erf(*v)),
        Activation::Relu => c.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Silu => c.iter_mut().for_each(|v| *v /= 1.0 + exp(-*v)),
        Activation::GeluNew => c.iter_mut().for_each(|v| {
            let x = *v;
            let u = 0.797_884_6 * (x + 0.044715 * x * x * x);
            *v = 0.5 * x * (1.0 + tanh(u));
        }),
        Activation::Tanh => c.iter_mut().for_each(|v| *v = tanh(*v)),
    };
    if y.len() >= 1 << 15 {
        y.par_chunks_mut(1 << 13).for_each(f);
    } else {
        f(y);
    }
}

/// Splits a fused projection `[b, t, Σheads·hd]` into `N` head-major buffers
/// `[b, heads[p], t, hd]` (Q, K, V), in one pass.
pub fn split_heads<const N: usize>(
    y: &[f32],
    b: usize,
    t: usize,
    heads: [usize; N],
    hd: usize,
) -> [Vec<f32>; N] {
    let width: usize = heads.iter().sum::<usize>() * hd;
    assert_eq!(y.len(), b * t * width);
    let mut offset = 0;
    heads.map(|n| {
        let mut out = vec![0f32; b * n * t * hd];
        for s in 0..b {
            for h in 0..n {
                for i in 0..t {
                    let src = (s * t + i) * width + offset + h * hd;
                    let dst = ((s * n + h) * t + i) * hd;
                    out[dst..dst + hd].copy_from_slice(&y[src..src + hd]);
                }
            }
        }
        offset += n * hd;
        out
    })
}

/// `act(gate) * up` from a fused `[m, 2n]` projection (gate columns first), in one pass.
pub fn gated(gu: &[f32], n: usize, act: Activation) -> Vec<f32> {
    let len = gu.len() / 2;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: `gated_into` writes each of the `len` values before it reads it, so the buffer
    // need not be zeroed first.
    unsafe {
        gated_into(gu, n, act, &mut out.spare_capacity_mut()[..len]);
        out.set_len(len);
    }
    out
}

/// [`gated`] into `out` (`m × n` values, each written before it is read).
pub fn gated_into(gu: &[f32], n: usize, act: Activation, out: &mut [std::mem::MaybeUninit<f32>]) {
    // About 8k values a task, whole rows.
    let rows = (1usize << 13).div_ceil(n.max(1));
    pool::chunks_mut(out, rows * n, 1 << 15, |i, o| {
        let src = gu[i * rows * 2 * n..].chunks_exact(2 * n);
        for (orow, row) in o.chunks_exact_mut(n).zip(src.clone()) {
            orow.iter_mut().zip(&row[..n]).for_each(|(d, g)| {
                d.write(*g);
            });
        }
        // SAFETY: every value of the piece was written just above (the piece is whole rows).
        let o = unsafe { &mut *(o as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
        activate(o, act);
        for (orow, row) in o.chunks_exact_mut(n).zip(src) {
            orow.iter_mut().zip(&row[n..]).for_each(|(g, u)| *g *= u);
        }
    });
}

/// `exp` to ~1 ulp (Cephes' polynomial on a ln2 range reduction), written so that loops over
/// it vectorise: no libm call, no branches.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // SAFETY: after the clamp, n + 127 lies in [1, 254], a valid biased exponent.
    let bits = unsafe { (n + 127.0).to_int_unchecked::<i32>() } << 23;
    p * f32::from_bits(bits as u32)
}

#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    let e = exp(2.0 * x.clamp(-15.0, 15.0));
    (e - 1.0) / (e + 1.0)
}

/// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), branch-free.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = 1.061_405_4;
    let p = p * t - 1.453_152;
    let p = p * t + 1.421_413_8;
    let p = p * t - 0.284_496_74;
    let p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp(-a * a);
    y.copysign(x)
}

/// GELU with the exact (erf) form, as BERT's `gelu`.
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// RMS norm per row of `h` values, in candle's `rms_norm` arithmetic (a sequential sum of
/// squares, `x / rms · w`), so results are bit for bit candle's; on the forward pass's pool.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, h: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    rms_norm_into(x, w, eps, h, &mut y);
    y
}

/// [`rms_norm`] into `y` (as long as `x`).
pub fn rms_norm_into(x: &[f32], w: &[f32], eps: f32, h: usize, y: &mut [f32]) {
    pool::chunks_mut(y, h, 1 << 15, |i, row| {
        let src = &x[i * h..(i + 1) * h];
        let sum2: f32 = src.iter().map(|v| v * v).sum();
        let m = (sum2 / h as f32 + eps).sqrt();
        for ((d, s), g) in row.iter_mut().zip(src).zip(w) {
            *d = *s / m * *g;
        }
    });
}

/// `layer_norm(x + res)` per row of `h` values (`res` optional).
pub fn add_layer_norm(
    x: &[f32],
    res: Option<&[f32]>,
    w: &[f32],
    b: &[f32],
    eps: f32,
    h: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    add_layer_norm_into(x, res, w, b, eps, h, &mut y);
    y
}

/// [`add_layer_norm`] into `y` (as long as `x`).
pub fn add_layer_norm_into(
    x: &[f32],
    res: Option<&[f32]>,
    w: &[f32],
    b: &[f32],
    eps: f32,
    h: usize,
    y: &mut [f32],
) {
    match res {
        Some(r) => y
            .iter_mut()
            .zip(x.iter().zip(r))
            .for_each(|(d, (a, b))| *d = a + b),
        None => y.copy_from_slice(x),
    }
    let norm = |row: &mut [f32]| {
        let mean = row.iter().sum::<f32>() / h as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), bb) in row.iter_mut().zip(w).zip(b) {
            *v = (*v - mean) * inv * g + bb;
        }
    };
    pool::chunks_mut(y, h, 1 << 15, |_, row| norm(row));
}

/// Softmax of one row; returns the row's max and `Σ exp(x − max)`, so `log Σ exp(x)` costs no
/// second pass. Max and sum use lane-wise partial results so that every loop vectorises (a
/// plain fold is a serial dependency chain).
#[inline]
pub fn softmax_in_place(row: &mut [f32]) -> (f32, f32) {
    let mut m8 = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for l in 0..8 {
            m8[l] = m8[l].max(c[l]);
        }
    }
    max = m8.iter().fold(max, |m, &x| m.max(x));
    row.iter_mut().for_each(|x| *x = exp(*x - max));
    let mut s8 = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let mut sum: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            s8[l] += c[l];
        }
    }
    sum += s8.iter().sum::<f32>();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
    (max, sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_match_libm() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -20000..=20000 {
            let x = i as f32 * 0.004;
            let e = exp(x) as f64;
            let r = (x as f64).exp();
            worst_exp = worst_exp.max(((e - r) / r).abs());
            let ours = erf(x) as f64;
            let want = libm_erf(x as f64);
            worst_erf = worst_erf.max((ours - want).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 5e-7, "erf absolute error {worst_erf}");
        assert_eq!(exp(-1000.0), exp(-87.3));
    }

    /// erf by its Taylor series, in f64, as an independent reference for |x| ≤ 4.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 4.0 {
            return x.signum() * (1.0 - 1e-8);
        }
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0;
        while term.abs() > 1e-17 || n < 3 {
            sum += term / (2 * n + 1) as f64;
            n += 1;
            term *= -x * x / n as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn linear_matches_naive_product_with_bias() {
        let (m, k, n) = (5, 19, 7);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let mut y = vec![f32::NAN; m * n];
        linear_into(&x, m, k, &wt, n, Some(&b), None, &mut y);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = b[j] + (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum::<f32>();
                assert!((y[i * n + j] - want).abs() < 1e-4, "{i},{j}");
            }
        }
    }

    /// RMS norm bit for bit candle's, on few rows (one thread) and many (the pool).
    #[test]
    fn rms_norm_matches_candles() {
        for rows in [3, 100] {
            let h = 576;
            let x = Tensor::randn(0f32, 2.0, (rows, h), &Device::Cpu).unwrap();
            let w = Tensor::randn(1f32, 0.1, h, &Device::Cpu).unwrap();
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ws = w.to_vec1::<f32>().unwrap();
            let got = rms_norm(&xs, &ws, 1e-5, h);
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{rows} rows");
        }
    }
}
