//! Matrix products with block-quantized weights.
//!
//! For the GGUF types small models ship in (Q4_0, Q4_1, Q8_0) we run our own kernels: the
//! activations are quantized once per call to 8-bit blocks (like llama.cpp's Q8_1), and each
//! weight row is dotted against them with AVX2 integer multiply-adds, rows split across threads.
//! candle's CPU path has no SIMD kernel for Q4_1 and pays for a generic dispatch per call; other
//! types still go through candle's `QMatMul`.

use candle_core::quantized::{GgmlDType, QMatMul as CandleQMatMul};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::Result;
use crate::io::QuantWeight;

const QK: usize = 32;

pub enum QMatMul {
    Own(OwnQ),
    Candle(CandleQMatMul),
}

pub struct OwnQ {
    kind: Kind,
    rows: usize,
    cols: usize,
    data: AlignedBytes,
}

/// Weight bytes starting on a cache line. The 20-byte Q4_1 blocks straddle lines anyway, but
/// where the buffer starts decides how many of the kernel's loads split; measured: prefill ran
/// 15% slower from an allocation at 16 mod 64 than from one on a line.
struct AlignedBytes {
    buf: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl AlignedBytes {
    fn from_slices(parts: &[&[u8]]) -> Self {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut buf = vec![Line([0; 64]); len.div_ceil(64)];
        // SAFETY: `buf` holds at least `len` bytes and Line is plain bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, len) };
        let mut at = 0;
        for p in parts {
            bytes[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        Self { buf, len }
    }
}

impl std::ops::Deref for AlignedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: as in from_slices.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr() as *const u8, self.len) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        }
    }
}

/// One block of quantized activations: `x ≈ d * qs`, with `sum = d * Σqs` precomputed for the
/// weight types that carry an offset.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub struct BlockQ8 {
    qs: [i8; QK],
    d: f32,
    sum: f32,
}

impl QMatMul {
    pub fn new(w: QuantWeight) -> Result<Self> {
        let kind = match w.dtype {
            GgmlDType::Q4_0 => Some(Kind::Q4_0),
            GgmlDType::Q4_1 => Some(Kind::Q4_1),
            GgmlDType::Q8_0 => Some(Kind::Q8_0),
            _ => None,
        };
        Ok(match kind {
            Some(kind) if w.cols.is_multiple_of(QK) => QMatMul::Own(OwnQ {
                kind,
                rows: w.rows,
                cols: w.cols,
                data: AlignedBytes::from_slices(&[&w.data]),
            }),
            _ => QMatMul::Candle(CandleQMatMul::from_qtensor(w.to_qtensor()?)?),
        })
    }

    /// The rows of several matrices as one (blocks never cross rows, so this is byte
    /// concatenation). Only for our own block types with equal widths.
    pub fn concat_rows(parts: &[&QMatMul]) -> Option<QMatMul> {
        let own: Vec<&OwnQ> = parts
            .iter()
            .map(|p| match p {
                QMatMul::Own(o) => Some(o),
                QMatMul::Candle(_) => None,
            })
            .collect::<Option<_>>()?;
        let first = own.first()?;
        if own
            .iter()
            .any(|o| o.kind != first.kind || o.cols != first.cols)
        {
            return None;
        }
        Some(QMatMul::Own(OwnQ {
            kind: first.kind,
            rows: own.iter().map(|o| o.rows).sum(),
            cols: first.cols,
            data: AlignedBytes::from_slices(&own.iter().map(|o| &o.data[..]).collect::<Vec<_>>()),
        }))
    }

    /// `x` is `[.., cols]`; the result is `[.., rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            QMatMul::Candle(q) => Ok(q.forward(&x.contiguous()?)?),
            QMatMul::Own(q) => {
                let dims = x.dims().to_vec();
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let m = xs.len() / q.cols;
                let mut y = vec![0f32; m * q.rows];
                q.matmul(&xs, m, &mut y);
                let mut out = dims;
                *out.last_mut().unwrap() = q.rows;
                Ok(Tensor::from_vec(y, out, &Device::Cpu)?)
            }
        }
    }
}

pub fn quantize_q8(x: &[f32]) -> Vec<BlockQ8> {
    x.chunks_exact(QK)
        .map(|c| {
            // Lane-wise max and ties-to-even rounding (as llama.cpp's SIMD quantizers round)
            // keep this loop vectorised.
            let mut m8 = [0f32; 8];
            for part in c.chunks_exact(8) {
                for l in 0..8 {
                    m8[l] = m8[l].max(part[l].abs());
                }
            }
            let amax = m8.iter().fold(0f32, |a, &v| a.max(v));
            // As llama.cpp's quantize_row_q8_0/q8_1: scale by 127/amax, store the scale (and
            // the block sum) rounded to f16, so greedy decoding follows llama.cpp's arithmetic.
            let d = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let mut qs = [0i8; QK];
            for (q, v) in qs.iter_mut().zip(c) {
                // Adding 1.5·2²³ leaves round-to-even(v·id) in the low mantissa bits.
                let r = (v * id + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
                *q = r as i8;
            }
            let s: i32 = qs.iter().map(|&q| q as i32).sum();
            BlockQ8 {
                qs,
                d: f16::from_f32(d).to_f32(),
                sum: f16::from_f32(d * s as f32).to_f32(),
            }
        })
        .collect()
}

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// From this many tokens on, a product dequantizes its weights to f32 and runs an f32 GEMM:
/// unpacking once is amortized over the tokens, and the GEMM microkernel does 16 multiply-adds per
/// instruction against the integer dot product's ~8 per instruction after scaling.
const GEMM_FROM_TOKENS: usize = 32;

impl OwnQ {
    /// Rows `r0..r1` of the weights in f32, written to `out` (`(r1 - r0) * cols`).
    fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let bb = self.kind.block_bytes();
        let nb = self.cols / QK;
        let data = &self.data[r0 * nb * bb..r1 * nb * bb];
        for (blk, o) in data.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
            let d = f16_at(blk, 0);
            match self.kind {
                Kind::Q8_0 => {
                    for (v, &q) in o.iter_mut().zip(&blk[2..34]) {
                        *v = d * (q as i8) as f32;
                    }
                }
                Kind::Q4_0 | Kind::Q4_1 => {
                    let (qs, min) = match self.kind {
                        Kind::Q4_0 => (&blk[2..18], -8.0 * d),
                        _ => (&blk[4..20], f16_at(blk, 2)),
                    };
                    let (lo, hi) = o.split_at_mut(16);
                    for j in 0..16 {
                        lo[j] = d * (qs[j] & 0x0F) as f32 + min;
                        hi[j] = d * (qs[j] >> 4) as f32 + min;
                    }
                }
            }
        }
    }

    /// The prefill path: dequantize (in parallel), then one f32 GEMM.
    fn matmul_f32(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        let mut w = vec![0f32; rows * cols];
        let dst = SendPtr(w.as_mut_ptr());
        let dst = &dst;
        candle_core::utils::barrier_pool().execute_chunked(rows.div_ceil(16), |blocks| {
            let (r0, r1) = (blocks.start * 16, (blocks.end * 16).min(rows));
            // SAFETY: rows r0..r1 of w belong to this task alone.
            let out =
                unsafe { std::slice::from_raw_parts_mut(dst.0.add(r0 * cols), (r1 - r0) * cols) };
            self.dequantize_rows(r0, r1, out);
        });
        let threads = rayon::current_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: y is m×rows, x is m×cols and w is rows×cols, all row-major (w read as the
        // cols×rows right-hand side with column stride cols).
        unsafe {
            gemm::gemm(
                m,
                rows,
                cols,
                y.as_mut_ptr(),
                1,
                rows as isize,
                false,
                x.as_ptr(),
                1,
                cols as isize,
                w.as_ptr(),
                cols as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }

    /// `y[i, r] = Σ_k x[i, k] * W[r, k]` for `m` rows of `x`.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        assert!(x.len() == m * self.cols && y.len() == m * self.rows);
        if m >= GEMM_FROM_TOKENS {
            return self.matmul_f32(x, m, y);
        }
        let nb = self.cols / QK;
        let xq: Vec<BlockQ8> = if m >= 4 {
            x.par_chunks(self.cols).flat_map_iter(quantize_q8).collect()
        } else {
            quantize_q8(x)
        };
        let row_bytes = nb * self.kind.block_bytes();
        let rows = self.rows;
        let vnni = has_vnni();
        let xr = |i: usize| &xq[i * nb..(i + 1) * nb];
        let run = |r0: usize, wchunk: &[u8], out: &SendPtr| {
            let n = wchunk.len() / row_bytes;
            // SAFETY (all writes below): each (i, r) of y is written by exactly one task, and
            // y has m*rows slots.
            let put = |i: usize, r: usize, v: f32| unsafe { *out.0.add(i * rows + r0 + r) = v };
            let groups = if vnni { n / 4 } else { 0 };
            let w4 = |g: usize| &wchunk[4 * g * row_bytes..4 * (g + 1) * row_bytes];
            // Tokens outer, row groups inner: four tokens' activations and the chunk's weight
            // rows both stay in L1 while every pair of them meets once.
            let mut i = 0;
            while groups > 0 && i + 4 <= m {
                for g in 0..groups {
                    let xs = [xr(i), xr(i + 1), xr(i + 2), xr(i + 3)];
                    let t = dot4x4(self.kind, w4(g), row_bytes, xs);
                    for (j, row) in t.iter().enumerate() {
                        for (ii, &v) in row.iter().enumerate() {
                            put(i + ii, 4 * g + j, v);
                        }
                    }
                }
                i += 4;
            }
            for i in i..m {
                for g in 0..groups {
                    // Four rows share each activation block: four independent chains in flight.
                    let v = dot4(self.kind, w4(g), row_bytes, xr(i));
                    for (j, vj) in v.into_iter().enumerate() {
                        put(i, 4 * g + j, vj);
                    }
                }
            }
            let tail = &wchunk[4 * groups * row_bytes..];
            for (ri, wrow) in tail.chunks_exact(row_bytes).enumerate() {
                for i in 0..m {
                    put(i, 4 * groups + ri, dot(self.kind, wrow, xr(i)));
                }
            }
        };
        let out = SendPtr(y.as_mut_ptr());
        let threads = rayon::current_num_threads().max(1);
        // Handing work to other threads costs microseconds; small products stay on this one.
        if threads == 1 || m * rows * self.cols < 1 << 18 {
            run(0, &self.data, &out);
            return;
        }
        // candle's barrier pool: its workers spin briefly between calls, so the ~200 small
        // products of one decoded token start without a futex wake-up each.
        let data = &self.data;
        let out = &out;
        candle_core::utils::barrier_pool().execute_chunked(rows.div_ceil(16), |blocks| {
            let (r0, r1) = (blocks.start * 16, (blocks.end * 16).min(rows));
            run(r0, &data[r0 * row_bytes..r1 * row_bytes], out);
        });
    }
}

fn dot(kind: Kind, w: &[u8], x: &[BlockQ8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { avx2::dot(kind, w, x) };
        }
    }
    dot_scalar(kind, w, x)
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static VNNI: OnceLock<bool> = OnceLock::new();
        *VNNI.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Dots of four consecutive weight rows (`row_bytes` apart in `w4`) with the same activations.
/// Only called when [`has_vnni`] is true.
fn dot4(kind: Kind, w4: &[u8], row_bytes: usize, x: &[BlockQ8]) -> [f32; 4] {
    assert!(w4.len() >= 4 * row_bytes && row_bytes >= x.len() * kind.block_bytes());
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: has_vnni() checked the CPU features; the assert bounds every block read.
        unsafe { vnni::dot4(kind, w4, row_bytes, x) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// Four weight rows against four activation rows; only called when [`has_vnni`] is true.
fn dot4x4(kind: Kind, w4: &[u8], row_bytes: usize, x: [&[BlockQ8]; 4]) -> [[f32; 4]; 4] {
    let nb = x[0].len();
    assert!(x.iter().all(|r| r.len() == nb));
    assert!(w4.len() >= 4 * row_bytes && row_bytes >= nb * kind.block_bytes());
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: has_vnni() checked the CPU features; the asserts bound every block read.
        unsafe { vnni::dot4x4(kind, w4, row_bytes, x) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The reference each SIMD path is tested against.
fn dot_scalar(kind: Kind, w: &[u8], x: &[BlockQ8]) -> f32 {
    let bb = kind.block_bytes();
    let mut acc = 0f32;
    for (blk, xb) in w.chunks_exact(bb).zip(x) {
        let d = f16_at(blk, 0);
        match kind {
            Kind::Q8_0 => {
                let s: i32 = blk[2..34]
                    .iter()
                    .zip(&xb.qs)
                    .map(|(&q, &y)| q as i8 as i32 * y as i32)
                    .sum();
                acc += d * xb.d * s as f32;
            }
            Kind::Q4_0 | Kind::Q4_1 => {
                let qs = if kind == Kind::Q4_0 {
                    &blk[2..18]
                } else {
                    &blk[4..20]
                };
                let mut s = 0i32;
                for (j, &q) in qs.iter().enumerate() {
                    s += (q & 0x0F) as i32 * xb.qs[j] as i32;
                    s += (q >> 4) as i32 * xb.qs[j + 16] as i32;
                }
                if kind == Kind::Q4_0 {
                    // Weights are q - 8.
                    acc += d * (xb.d * s as f32 - 8.0 * xb.sum);
                } else {
                    acc += d * xb.d * s as f32 + f16_at(blk, 2) * xb.sum;
                }
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{f16_at, BlockQ8, Kind};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 32 unsigned nibbles of a Q4 block: low nibbles are elements 0..16, high ones 16..32.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibbles(qs: *const u8) -> __m256i {
        let q = _mm_loadu_si128(qs as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, m);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m);
        _mm256_set_m128i(hi, lo)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(kind: Kind, w: &[u8], x: &[BlockQ8]) -> f32 {
        let bb = kind.block_bytes();
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut extra = 0f32;
        let p = w.as_ptr();
        for (b, xb) in x.iter().enumerate() {
            let blk = p.add(b * bb);
            let y = _mm256_load_si256(xb.qs.as_ptr() as *const __m256i);
            let d = f16_at(w, b * bb);
            let prod = match kind {
                Kind::Q8_0 => {
                    let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    // maddubs needs an unsigned left operand: move the signs onto y.
                    _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q))
                }
                Kind::Q4_0 => {
                    extra -= 8.0 * d * xb.sum;
                    _mm256_maddubs_epi16(nibbles(blk.add(2)), y)
                }
                Kind::Q4_1 => {
                    extra += f16_at(w, b * bb + 2) * xb.sum;
                    _mm256_maddubs_epi16(nibbles(blk.add(4)), y)
                }
            };
            let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
            acc = _mm256_fmadd_ps(s, _mm256_set1_ps(d * xb.d), acc);
        }
        hsum(acc) + extra
    }
}

/// AVX-512 VNNI on 256-bit registers: `vpdpbusd` multiplies unsigned by signed bytes and sums
/// groups of four into 32-bit lanes in one instruction, where AVX2 needs `maddubs` + `madd`.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{BlockQ8, Kind};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn f16(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (p as *const u16).read_unaligned() as i32,
        )))
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn nibbles(qs: *const u8) -> __m256i {
        let q = _mm_loadu_si128(qs as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, m);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m);
        _mm256_set_m128i(hi, lo)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn dot4(kind: Kind, w4: &[u8], row_bytes: usize, x: &[BlockQ8]) -> [f32; 4] {
        let bb = kind.block_bytes();
        let base = w4.as_ptr();
        let zero = _mm256_setzero_si256();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut extra = [0f32; 4];
        for (b, xb) in x.iter().enumerate() {
            let y = _mm256_load_si256(xb.qs.as_ptr() as *const __m256i);
            for r in 0..4 {
                let blk = base.add(r * row_bytes + b * bb);
                let d = f16(blk);
                let s = match kind {
                    Kind::Q8_0 => {
                        let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                        // vpdpbusd needs an unsigned left operand: move the signs onto y.
                        _mm256_dpbusd_epi32(zero, _mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q))
                    }
                    Kind::Q4_0 => {
                        extra[r] -= 8.0 * d * xb.sum;
                        _mm256_dpbusd_epi32(zero, nibbles(blk.add(2)), y)
                    }
                    Kind::Q4_1 => {
                        extra[r] += f16(blk.add(2)) * xb.sum;
                        _mm256_dpbusd_epi32(zero, nibbles(blk.add(4)), y)
                    }
                };
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xb.d), acc[r]);
            }
        }
        [
            hsum(acc[0]) + extra[0],
            hsum(acc[1]) + extra[1],
            hsum(acc[2]) + extra[2],
            hsum(acc[3]) + extra[3],
        ]
    }

    /// A 4×4 tile for prefill: four weight rows against four activation rows, so each weight
    /// block is unpacked once for four tokens. Result `[row][token]`. (A 512-bit form with two
    /// blocks per register measured 25% slower here: 16 accumulators plus operands spill.)
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    #[allow(clippy::needless_range_loop)]
    // b indexes four slices and the weight rows alike
    // Kept out of line: inlined into the caller's loop it measured 10% slower (spills).
    #[inline(never)]
    pub unsafe fn dot4x4(
        kind: Kind,
        w4: &[u8],
        row_bytes: usize,
        x: [&[BlockQ8]; 4],
    ) -> [[f32; 4]; 4] {
        let bb = kind.block_bytes();
        let base = w4.as_ptr();
        let zero = _mm256_setzero_si256();
        let mut acc = [[_mm256_setzero_ps(); 4]; 4];
        let mut extra = [[0f32; 4]; 4];
        for b in 0..x[0].len() {
            let mut q = [zero; 4];
            let mut d = [0f32; 4];
            for r in 0..4 {
                let blk = base.add(r * row_bytes + b * bb);
                d[r] = f16(blk);
                q[r] = match kind {
                    Kind::Q8_0 => _mm256_loadu_si256(blk.add(2) as *const __m256i),
                    Kind::Q4_0 => nibbles(blk.add(2)),
                    Kind::Q4_1 => nibbles(blk.add(4)),
                };
                let off = match kind {
                    Kind::Q8_0 => 0.0,
                    Kind::Q4_0 => -8.0 * d[r],
                    Kind::Q4_1 => f16(blk.add(2)),
                };
                for i in 0..4 {
                    extra[r][i] += off * x[i][b].sum;
                }
            }
            for i in 0..4 {
                let xb = &x[i][b];
                let y = _mm256_load_si256(xb.qs.as_ptr() as *const __m256i);
                for r in 0..4 {
                    let s = match kind {
                        Kind::Q8_0 => _mm256_dpbusd_epi32(
                            zero,
                            _mm256_sign_epi8(q[r], q[r]),
                            _mm256_sign_epi8(y, q[r]),
                        ),
                        _ => _mm256_dpbusd_epi32(zero, q[r], y),
                    };
                    acc[r][i] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(s),
                        _mm256_set1_ps(d[r] * xb.d),
                        acc[r][i],
                    );
                }
            }
        }
        let mut out = [[0f32; 4]; 4];
        for r in 0..4 {
            for i in 0..4 {
                out[r][i] = hsum(acc[r][i]) + extra[r][i];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    /// Each kernel against the f32 product with candle's dequantized weights: the only
    /// difference allowed is the 8-bit quantization of the activations.
    #[test]
    fn own_kernels_match_dequantized_matmul() {
        let (rows, cols, m) = (70, 256, 6);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let x: Vec<f32> = (0..m * cols)
            .map(|i| (i * 104729 % 997) as f32 / 498.0 - 1.0)
            .collect();
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let deq = q.dequantize(&Device::Cpu).unwrap();
            let want = xt
                .matmul(&deq.t().unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let qw = QuantWeight {
                dtype,
                rows,
                cols,
                data: q.data().unwrap().to_vec(),
            };
            let QMatMul::Own(own) = QMatMul::new(qw).unwrap() else {
                panic!("{dtype:?} not own")
            };
            let mut got = vec![0f32; m * rows];
            own.matmul(&x, m, &mut got);
            let xq = quantize_q8(&x[..cols]);
            let bb = own.kind.block_bytes() * cols / QK;
            for i in 0..m {
                for r in 0..rows {
                    let (g, w) = (got[i * rows + r], want[i][r]);
                    assert!(
                        (g - w).abs() < 0.02 * (1.0 + w.abs()),
                        "{dtype:?} [{i},{r}]: {g} vs {w}"
                    );
                }
            }
            // From GEMM_FROM_TOKENS rows on, the dequantize + f32 GEMM path: no activation
            // quantization, so it agrees with the dequantized product to f32 rounding.
            let mb = GEMM_FROM_TOKENS + 3;
            let xb: Vec<f32> = (0..mb * cols)
                .map(|i| ((i * 31 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let want_b = Tensor::from_vec(xb.clone(), (mb, cols), &Device::Cpu)
                .unwrap()
                .matmul(&deq.t().unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut got_b = vec![0f32; mb * rows];
            own.matmul(&xb, mb, &mut got_b);
            for i in 0..mb {
                for r in 0..rows {
                    let (g, w) = (got_b[i * rows + r], want_b[i][r]);
                    assert!(
                        (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "{dtype:?} gemm [{i},{r}]: {g} vs {w}"
                    );
                }
            }
            // SIMD and scalar agree to rounding.
            if has_vnni() {
                for r in (0..rows - 3).step_by(4) {
                    let got = dot4(own.kind, &own.data[r * bb..], bb, &xq);
                    for (j, g) in got.iter().enumerate() {
                        let want =
                            dot_scalar(own.kind, &own.data[(r + j) * bb..(r + j + 1) * bb], &xq);
                        assert!(
                            (g - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{dtype:?} row {}: {g} vs {want}",
                            r + j
                        );
                    }
                }
            }
            for r in 0..rows {
                let wr = &own.data[r * bb..(r + 1) * bb];
                let (a, b) = (dot(own.kind, wr, &xq), dot_scalar(own.kind, wr, &xq));
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{dtype:?} row {r}: {a} vs {b}"
                );
            }
        }
    }
}
