//! Fused f32 CPU kernels for the dense (unquantized) path. candle runs a layer as a chain of
//! separate ops (matmul, broadcast bias add, libm `erf` per element, transposes for attention,
//! residual add, layer norm), each a full pass over memory; on two cores those passes cost as
//! much as the matmuls themselves. These kernels fold them: the bias is the GEMM's initial
//! value, activations run on the GEMM output in place with a vectorisable `erf`/`exp`,
//! attention reads Q/K/V straight from the fused projection, and the residual add is part of
//! the layer norm.

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;

use super::pool::{self, SharedMut};
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

/// `y[m, n] = x[m, k] · wt[k, n] + bias`, then `act` in place.
pub fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    wt: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    act: Option<Activation>,
) -> Vec<f32> {
    let mut y = match bias {
        Some(b) => b.repeat(m),
        None => vec![0f32; m * n],
    };
    matmul(&mut y, bias.is_some(), x, false, wt, false, (m, n, k), 1.0);
    if let Some(act) = act {
        activate(&mut y, act);
    }
    y
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
    // About 8k values a task, whole rows; each piece is written before it is read, so the
    // buffer is not zeroed first.
    let rows = (1usize << 13).div_ceil(n.max(1));
    pool::chunks_mut(
        &mut out.spare_capacity_mut()[..len],
        rows * n,
        1 << 15,
        |i, o| {
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
        },
    );
    // SAFETY: the pieces cover all `len` values, each written above.
    unsafe { out.set_len(len) };
    out
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
    pool::chunks_mut(&mut y, h, 1 << 15, |i, row| {
        let src = &x[i * h..(i + 1) * h];
        let sum2: f32 = src.iter().map(|v| v * v).sum();
        let m = (sum2 / h as f32 + eps).sqrt();
        for ((d, s), g) in row.iter_mut().zip(src).zip(w) {
            *d = *s / m * *g;
        }
    });
    y
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
    let mut y = match res {
        Some(r) => x.iter().zip(r).map(|(a, b)| a + b).collect(),
        None => x.to_vec(),
    };
    let norm = |row: &mut [f32]| {
        let mean = row.iter().sum::<f32>() / h as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), bb) in row.iter_mut().zip(w).zip(b) {
            *v = (*v - mean) * inv * g + bb;
        }
    };
    pool::chunks_mut(&mut y, h, 1 << 15, |_, row| norm(row));
    y
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

/// One head's attention: `S = scale·QKᵀ` (`t × nk`), a softmax of each row `i` over the keys
/// `keys(i)` only (the rest get probability 0), then `O = PV` written to `out` with row stride
/// `out_rs`. Q, K and V are read in place with row strides `q_rs`, `k_rs`, `v_rs`.
///
/// # Safety
/// Every pointer must address `t` (Q, out) or `nk` (K, V) rows of `hd` floats at the given
/// strides, and no other thread may write the `out` rows' `hd` columns meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn head_attention(
    (q, q_rs): (*const f32, usize),
    keys_at: KeysAt,
    (v, v_rs): (*const f32, usize),
    (out, out_rs): (*mut f32, usize),
    t: usize,
    nk: usize,
    hd: usize,
    sc: Scores,
    bias: Option<HeadBias>,
    keys: impl Fn(usize) -> std::ops::Range<usize>,
) {
    let scale = sc.scale;
    let mut scores = vec![0f32; t * nk];
    let mut rows = Vec::new();
    let (k, k_rs) = match keys_at {
        KeysAt::Tiles(tiles, k0) if t == 1 => {
            tile_scores(q, tiles, k0, nk, hd, scale, &mut scores);
            (std::ptr::null(), 0)
        }
        // A prompt's rows: the GEMM wants the keys as rows (it packs them anyway).
        KeysAt::Tiles(tiles, k0) => {
            rows = untile(tiles, k0, nk, hd);
            (rows.as_ptr(), hd)
        }
        KeysAt::Rows(k, k_rs) => (k, k_rs),
    };
    if !k.is_null() {
        gemm::gemm(
            t,
            nk,
            hd,
            scores.as_mut_ptr(),
            1,
            nk as isize,
            false,
            q,
            1,
            q_rs as isize,
            k,
            k_rs as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    drop(rows);
    for (i, row) in scores.chunks_mut(nk).enumerate() {
        let r = keys(i);
        row[..r.start].fill(0.0);
        row[r.end..].fill(0.0);
        if let Some(b) = &bias {
            b.add(&mut row[r.clone()], r.start, i);
        }
        if let Some(cap) = sc.softcap {
            row[r.clone()]
                .iter_mut()
                .for_each(|s| *s = cap * (*s / cap).tanh());
        }
        softmax_in_place(&mut row[r]);
    }
    if t == 1 && matches!(keys_at, KeysAt::Tiles(..)) {
        return row_values(&scores, keys(0), (v, v_rs), hd, out);
    }
    gemm::gemm(
        t,
        hd,
        nk,
        out,
        1,
        out_rs as isize,
        false,
        scores.as_ptr(),
        1,
        nk as isize,
        v,
        1,
        v_rs as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `out[j] = scale · q·k_(k0 + j)` for `nk` keys stored in tiles from `tiles` (one head).
///
/// # Safety
/// `q` must hold `hd` values and `tiles` every tile up to the one holding key `k0 + nk - 1`.
unsafe fn tile_scores(
    q: *const f32,
    tiles: *const f32,
    k0: usize,
    nk: usize,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    const L: usize = KEY_TILE;
    let q = std::slice::from_raw_parts(q, hd);
    for tile in k0 / L..(k0 + nk).div_ceil(L) {
        let base = tiles.add(tile * L * hd);
        // Four chains of multiply-adds over the dimensions, so that their latency overlaps.
        let mut acc = [[0f32; L]; 4];
        for (d, &qd) in q.iter().enumerate() {
            let keys = &*(base.add(d * L) as *const [f32; L]);
            let (qd, a) = (qd * scale, &mut acc[d % 4]);
            for l in 0..L {
                a[l] = qd.mul_add(keys[l], a[l]);
            }
        }
        let acc: [f32; L] =
            std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
        let (a, b) = ((tile * L).max(k0), ((tile + 1) * L).min(k0 + nk));
        out[a - k0..b - k0].copy_from_slice(&acc[a - tile * L..b - tile * L]);
    }
}

/// Keys `k0..k0 + nk` of one head's tiles as rows of `hd`.
///
/// # Safety
/// As [`tile_scores`].
unsafe fn untile(tiles: *const f32, k0: usize, nk: usize, hd: usize) -> Vec<f32> {
    const L: usize = KEY_TILE;
    let mut rows = vec![0f32; nk * hd];
    for (j, row) in rows.chunks_exact_mut(hd).enumerate() {
        let key = k0 + j;
        let base = tiles.add(key / L * L * hd + key % L);
        for (d, x) in row.iter_mut().enumerate() {
            *x = *base.add(d * L);
        }
    }
    rows
}

/// `out = Σ_j p_j v_j` over the keys `keys` (the others have probability 0), 64 columns at a
/// time so that the sums stay in registers across the keys.
///
/// # Safety
/// As [`head_attention`] for one query row.
unsafe fn row_values(
    p: &[f32],
    keys: std::ops::Range<usize>,
    (v, v_rs): (*const f32, usize),
    hd: usize,
    out: *mut f32,
) {
    const C: usize = 64;
    let out = std::slice::from_raw_parts_mut(out, hd);
    let mut c0 = 0;
    while c0 + C <= hd {
        let mut acc = [0f32; C];
        for j in keys.clone() {
            let vr = &*(v.add(j * v_rs + c0) as *const [f32; C]);
            for (a, x) in acc.iter_mut().zip(vr) {
                *a = p[j].mul_add(*x, *a);
            }
        }
        out[c0..c0 + C].copy_from_slice(&acc);
        c0 += C;
    }
    for (c, o) in out.iter_mut().enumerate().skip(c0) {
        *o = keys
            .clone()
            .fold(0f32, |a, j| p[j].mul_add(*v.add(j * v_rs + c), a));
    }
}

/// Bidirectional attention straight from a fused projection `qkv` (`[b, t, (nh + 2·nkv)·hd]`,
/// Q then K then V): row `i` of sequence `s` attends to keys `0..lengths[s]`, so padding is
/// excluded exactly as transformers' additive mask of the dtype minimum does. Returns
/// `[b, t, nh·hd]` with heads side by side, ready for the output projection. One task per
/// (sequence, head); no head is ever copied out of the projection.
#[allow(clippy::too_many_arguments)]
pub fn bidirectional_attention(
    qkv: &[f32],
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    lengths: &[usize],
    sc: Scores,
    bias: Option<RelBias>,
) -> Vec<f32> {
    let b = lengths.len();
    assert_eq!(qkv.len(), b * t * (nh + 2 * nkv) * hd);
    let width = (nh + 2 * nkv) * hd;
    let hidden = nh * hd;
    let groups = nh / nkv;
    let mut y = vec![0f32; b * t * hidden];
    let out = SharedMut(y.as_mut_ptr());
    pool::for_each(b * nh, |task| {
        let (s, h) = (task / nh, task % nh);
        let kvh = h / groups;
        let len = lengths[s].clamp(1, t);
        let base = s * t * width;
        // SAFETY: rows are `width` apart inside `qkv` (length checked above); this task alone
        // writes head h's columns of rows s·t.. of `y` (b·t × hidden).
        unsafe {
            head_attention(
                (qkv[base + h * hd..].as_ptr(), width),
                KeysAt::Rows(qkv[base + hidden + kvh * hd..].as_ptr(), width),
                (qkv[base + hidden + (nkv + kvh) * hd..].as_ptr(), width),
                (out.ptr().add(s * t * hidden + h * hd), hidden),
                t,
                len,
                hd,
                sc,
                bias.map(|b| b.head(h, 0, 0)),
                |_| 0..len,
            )
        }
    });
    y
}

/// How a head's attention scores are formed from `q·kᵀ`, and which keys a query sees.
#[derive(Debug, Clone, Copy)]
pub struct Scores {
    pub scale: f32,
    /// `cap·tanh(s/cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
    /// Sliding window: a query sees this many positions, itself included.
    pub window: Option<usize>,
}

impl Scores {
    /// `q·kᵀ/√hd` over every earlier key.
    pub fn standard(hd: usize) -> Self {
        Scores {
            scale: 1.0 / (hd as f32).sqrt(),
            softcap: None,
            window: None,
        }
    }
}

/// T5's learned relative position bias as the kernels read it: head `h` adds
/// `table[h·(2d+1) + clamp(key − query, −d, d) + d]` to each score, `d` being the distance from
/// which every bias is the same (T5's `max_distance`: its buckets saturate there).
#[derive(Clone, Copy)]
pub struct RelBias<'a> {
    pub table: &'a [f32],
    pub d: usize,
}

impl<'a> RelBias<'a> {
    /// Head `h`'s biases for queries whose first row sits at position `q0`, against keys
    /// whose first sits at `k0`.
    fn head(&self, h: usize, q0: usize, k0: usize) -> HeadBias<'a> {
        let n = 2 * self.d + 1;
        HeadBias {
            row: &self.table[h * n..(h + 1) * n],
            d: self.d as isize,
            q0,
            k0,
        }
    }
}

/// One head's relative biases (see [`RelBias`]).
struct HeadBias<'a> {
    row: &'a [f32],
    d: isize,
    q0: usize,
    k0: usize,
}

impl HeadBias<'_> {
    /// Adds the biases of keys `k0..k0 + scores.len()` (counted from the view's first key) to
    /// query row `i`'s scores.
    fn add(&self, scores: &mut [f32], k0: usize, i: usize) {
        let q = (self.q0 + i) as isize;
        for (j, s) in scores.iter_mut().enumerate() {
            let r = ((self.k0 + k0 + j) as isize - q).clamp(-self.d, self.d);
            *s += self.row[(r + self.d) as usize];
        }
    }
}

/// Keys per tile of a KV cache's K (see [`KeyView`]).
pub const KEY_TILE: usize = 16;

/// A KV cache as the attention kernel reads it: per head `cap` positions of `hd` values, the
/// first `len` filled. V is a row per position. K is a row per position too, or (`k_tiled`)
/// tiles of [`KEY_TILE`] positions stored by dimension (`[heads, cap / 16, hd, 16]`, `cap` a
/// multiple of 16): a decoded token's scores for a tile are then one register of sums, one
/// broadcast multiply-add per dimension over one sequential read, with no sum across lanes
/// per key (SmolLM2's heads alone, as a row per dimension: 3.8 -> 1.4 µs at 256 keys, 17.0 ->
/// 5.7 at 1024; that layout read each head as 64 streams and was slower end to end).
pub struct KeyView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub cap: usize,
    pub len: usize,
    pub k_tiled: bool,
}

/// Where one head's keys start: rows (pointer at the first key, row stride), or tiles (the
/// head's first tile, and the first key wanted).
#[derive(Clone, Copy)]
enum KeysAt {
    Rows(*const f32, usize),
    Tiles(*const f32, usize),
}

impl KeyView<'_> {
    fn keys_of(&self, h: usize, k0: usize, hd: usize) -> KeysAt {
        if self.k_tiled {
            KeysAt::Tiles(self.k[h * self.cap * hd..].as_ptr(), k0)
        } else {
            KeysAt::Rows(self.k[(h * self.cap + k0) * hd..].as_ptr(), hd)
        }
    }
}

/// Query rows per attention task of a long prompt.
const QUERY_BLOCK: usize = 64;

/// Causal attention of `t` new queries at positions `pos..pos+t` (`q`: `[nh, t, hd]`) over the
/// cached keys, with an optional sliding window. Returns `[t, nh·hd]`.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: &[f32],
    kv: KeyView,
    nh: usize,
    nkv: usize,
    hd: usize,
    pos: usize,
    sc: Scores,
    bias: Option<RelBias>,
) -> Vec<f32> {
    let t = q.len() / (nh * hd);
    assert!(pos + t <= kv.len);
    let keys = |i: usize| {
        let qpos = pos + i;
        let lo = sc.window.map_or(0, |w| (qpos + 1).saturating_sub(w));
        lo..qpos + 1
    };
    cached_attention(q, kv, nh, nkv, hd, sc, bias.map(|b| (b, pos)), keys)
}

/// Cross-attention of `t` decoder queries (`[nh, t, hd]`) over every key of the encoder's
/// (`kv`, computed once per source). Returns `[t, nh·hd]`.
pub fn cross_attention(
    q: &[f32],
    kv: KeyView,
    nh: usize,
    nkv: usize,
    hd: usize,
    sc: Scores,
) -> Vec<f32> {
    let len = kv.len;
    cached_attention(q, kv, nh, nkv, hd, sc, None, |_| 0..len)
}

/// Each head of `q` over the keys `keys(i)` of its K/V head in `kv`, rows `i` of query
/// positions `q0 + i` when biased.
#[allow(clippy::too_many_arguments)]
fn cached_attention(
    q: &[f32],
    kv: KeyView,
    nh: usize,
    nkv: usize,
    hd: usize,
    sc: Scores,
    bias: Option<(RelBias, usize)>,
    keys: impl Fn(usize) -> std::ops::Range<usize> + Sync,
) -> Vec<f32> {
    let t = q.len() / (nh * hd);
    assert_eq!(q.len(), nh * t * hd);
    assert!(kv.k.len() == nkv * kv.cap * hd && kv.v.len() == kv.k.len());
    assert!(kv.len <= kv.cap);
    let hidden = nh * hd;
    let groups = nh / nkv;
    let mut y = vec![0f32; t * hidden];
    let out = SharedMut(y.as_mut_ptr());
    // A long prompt's queries go in blocks, so that a causal block computes the scores of the
    // keys it can see and no more (5/8 of the full square for four blocks, not all of it), and
    // the pool gets more tasks than heads to balance.
    let block = if t >= 2 * QUERY_BLOCK {
        QUERY_BLOCK
    } else {
        t.max(1)
    };
    let blocks = t.div_ceil(block);
    let run = |task: usize| {
        let (h, i0) = (task / blocks, task % blocks * block);
        let i1 = (i0 + block).min(t);
        let kvh = h / groups;
        // Keys' ranges only move forward with the query (causal, sliding window, or all).
        let (k0, k1) = (keys(i0).start, keys(i1 - 1).end);
        // SAFETY: q is [nh, t, hd] and each head of the cache holds `cap >= len >= k1` rows of
        // hd (checked above); this call alone writes rows i0..i1 of head h's columns of `y`
        // (t × hidden).
        unsafe {
            head_attention(
                (q[(h * t + i0) * hd..].as_ptr(), hd),
                kv.keys_of(kvh, k0, hd),
                (kv.v[(kvh * kv.cap + k0) * hd..].as_ptr(), hd),
                (out.ptr().add(i0 * hidden + h * hd), hidden),
                i1 - i0,
                k1 - k0,
                hd,
                sc,
                bias.map(|(b, q0)| b.head(h, q0 + i0, k0)),
                |i| {
                    let r = keys(i0 + i);
                    r.start - k0..r.end - k0
                },
            )
        }
    };
    // A decoded token's heads go to the pool from 256 keys on: reading the cache is then what
    // attention waits for, and two threads read it faster (SmolLM2 at 1024 keys: decode
    // 97-108 -> 116-125 tok/s); below that, handing out the heads costs more than it saves.
    if t * kv.len >= 256 {
        pool::for_each(nh * blocks, run);
    } else {
        (0..nh * blocks).for_each(run);
    }
    y
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
        let y = linear(&x, m, k, &wt, n, Some(&b), None);
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

    /// Against a naive softmax, short (one task per head) and long (query blocks, each over
    /// the keys it can see), with and without a sliding window and relative position biases.
    #[test]
    fn causal_attention_matches_a_naive_softmax() {
        // Two query heads per K/V head, and four on one (Gemma 3's shape).
        for (nh, nkv) in [(4, 2), (4, 1)] {
            causal_attention_case(nh, nkv);
        }
    }

    fn causal_attention_case(nh: usize, nkv: usize) {
        let hd = 3;
        let f = |n: usize, m: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * m % 17) as f32 - 8.0) / 7.0).collect()
        };
        let d = 5;
        let table = f(nh * (2 * d + 1), 13);
        // Decoded tokens too (t = 1), alone and on the pool (from 256 keys); the cache holds
        // more rows than are filled, as it does while decoding.
        for (pos, t) in [(2, 3), (7, 150), (9, 1), (300, 1)] {
            let total = pos + t;
            let cap = (total + 3usize).next_multiple_of(KEY_TILE);
            let (q, k, v) = (
                f(nh * t * hd, 5),
                f(nkv * cap * hd, 3),
                f(nkv * cap * hd, 11),
            );
            // The same keys in tiles, as the KV cache holds them.
            let mut tiled = vec![0f32; k.len()];
            for (h, j, d) in
                (0..nkv).flat_map(|h| (0..cap).flat_map(move |j| (0..hd).map(move |d| (h, j, d))))
            {
                let at = h * cap * hd + j / KEY_TILE * KEY_TILE * hd + d * KEY_TILE + j % KEY_TILE;
                tiled[at] = k[(h * cap + j) * hd + d];
            }
            let cases = [None, Some(2), Some(70)]
                .into_iter()
                .flat_map(|w| [(w, false), (w, true)])
                .flat_map(|(w, b)| [(w, b, false), (w, b, true)]);
            for (window, biased, tiles) in cases {
                let kv = KeyView {
                    k: if tiles { &tiled } else { &k },
                    v: &v,
                    cap,
                    len: total,
                    k_tiled: tiles,
                };
                let bias = biased.then_some(RelBias { table: &table, d });
                let y = causal_attention(
                    &q,
                    kv,
                    nh,
                    nkv,
                    hd,
                    pos,
                    Scores {
                        window,
                        ..Scores::standard(hd)
                    },
                    bias,
                );
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    for i in 0..t {
                        let qp = pos + i;
                        let lo = window.map_or(0, |w| (qp + 1).saturating_sub(w));
                        let s: Vec<f32> = (lo..=qp)
                            .map(|j| {
                                let dot = (0..hd)
                                    .map(|c| q[(h * t + i) * hd + c] * k[(kvh * cap + j) * hd + c])
                                    .sum::<f32>()
                                    / (hd as f32).sqrt();
                                let r = (j as isize - qp as isize).clamp(-5, 5) + 5;
                                dot + if biased {
                                    table[h * (2 * d + 1) + r as usize]
                                } else {
                                    0.0
                                }
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f32::MIN, f32::max);
                        let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
                        for c in 0..hd {
                            let want: f32 = (lo..=qp)
                                .map(|j| (s[j - lo] - m).exp() / z * v[(kvh * cap + j) * hd + c])
                                .sum();
                            let got = y[i * nh * hd + h * hd + c];
                            assert!(
                                (got - want).abs() < 1e-5,
                                "t {t} {window:?} bias {biased} tiles {tiles} h{h} i{i} c{c}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_ignores_padded_keys() {
        // One head, hd 2, a sequence of length 2 padded to 3: the padding row's K/V are huge
        // and must not change the real rows.
        let (t, hd) = (3, 2);
        let mut qkv = vec![
            1.0, 0.0, 1.0, 0.0, 1.0, 2.0, //
            0.0, 1.0, 0.0, 1.0, 3.0, 4.0, //
            0.0, 0.0, 9e3, 9e3, 9e3, 9e3,
        ];
        let y = bidirectional_attention(&qkv, t, 1, 1, hd, &[2], Scores::standard(hd), None);
        let s = 1.0 / 2f32.sqrt();
        let (e1, e0) = (s.exp(), 1.0f32);
        let p = e1 / (e1 + e0);
        assert!((y[0] - (p * 1.0 + (1.0 - p) * 3.0)).abs() < 1e-5);
        assert!((y[1] - (p * 2.0 + (1.0 - p) * 4.0)).abs() < 1e-5);
        qkv[14] = -5.0;
        assert_eq!(
            bidirectional_attention(&qkv, t, 1, 1, hd, &[2], Scores::standard(hd), None)[..4],
            y[..4]
        );
    }
}
