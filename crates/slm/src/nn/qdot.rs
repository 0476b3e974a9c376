//! Dot products of block-quantized weight rows with 8-bit quantized activations, the inner loop
//! of [`super::qmatmul`]. The integer part is exact and the float part follows llama.cpp's
//! `ggml_vec_dot_*` order (eight 32-bit lanes of four products, one FMA per block, the same
//! horizontal sum), so greedy decoding tracks llama.cpp's as closely as float rounding allows.
//!
//! Weight blocks hold 32 values: Q8_0 signed bytes; Q4_0/Q5_0 unsigned 4/5-bit codes with an
//! implicit offset (8, 16), computed here as `Σ q·y − offset·Σ y` in integers; Q4_1/Q5_1
//! unsigned codes plus a float minimum `m`, whose contribution is `m · (d_y Σ y)` with the
//! activation sum rounded to f16 as llama.cpp's Q8_1 stores it.

use half::f16;

pub(crate) const QK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

/// Where a block's parts sit: scale at 0, then the minimum, the 5th bits and the codes.
#[derive(Clone, Copy)]
struct Layout {
    bytes: usize,
    min: Option<usize>,
    high_bits: Option<usize>,
    codes: usize,
    offset: i32,
}

impl Kind {
    fn layout(self) -> Layout {
        let l = |bytes, min, high_bits, codes, offset| Layout {
            bytes,
            min,
            high_bits,
            codes,
            offset,
        };
        match self {
            Kind::Q4_0 => l(18, None, None, 2, 8),
            Kind::Q4_1 => l(20, Some(2), None, 4, 0),
            Kind::Q5_0 => l(22, None, Some(2), 6, 16),
            Kind::Q5_1 => l(24, Some(2), Some(4), 8, 0),
            Kind::Q8_0 => l(34, None, None, 2, 0),
        }
    }

    pub(crate) fn block_bytes(self) -> usize {
        self.layout().bytes
    }

    /// Where a block's codes and (5-bit types) fifth bits start.
    pub(crate) fn codes_at(self) -> (usize, Option<usize>) {
        let l = self.layout();
        (l.codes, l.high_bits)
    }

    /// The unsigned code of element `j` (0..32) of a 4/5-bit block.
    fn code(self, blk: &[u8], j: usize) -> i32 {
        let l = self.layout();
        let byte = blk[l.codes + j % 16];
        let mut q = if j < 16 { byte & 0x0F } else { byte >> 4 } as i32;
        if let Some(h) = l.high_bits {
            let qh = u32::from_le_bytes([blk[h], blk[h + 1], blk[h + 2], blk[h + 3]]);
            q |= (((qh >> j) & 1) << 4) as i32;
        }
        q
    }

    /// Block `blk` in f32, `out` 32 values.
    pub(crate) fn dequantize(self, blk: &[u8], out: &mut [f32]) {
        let d = f16_at(blk, 0);
        if self == Kind::Q8_0 {
            for (v, &q) in out.iter_mut().zip(&blk[2..34]) {
                *v = d * (q as i8) as f32;
            }
            return;
        }
        // Unrolled by halves (elements j and j + 16 share a byte): this runs over every weight
        // of a matrix before each prefill GEMM.
        let l = self.layout();
        let min = l.min.map_or(-(l.offset as f32) * d, |m| f16_at(blk, m));
        let qh = l.high_bits.map_or(0, |h| {
            u32::from_le_bytes([blk[h], blk[h + 1], blk[h + 2], blk[h + 3]])
        });
        let qs = &blk[l.codes..l.codes + 16];
        let (lo, hi) = out.split_at_mut(16);
        for j in 0..16 {
            let b5 = ((qh >> j) & 1) << 4;
            let h5 = ((qh >> (j + 16)) & 1) << 4;
            lo[j] = d * ((qs[j] & 0x0F) as u32 | b5) as f32 + min;
            hi[j] = d * ((qs[j] >> 4) as u32 | h5) as f32 + min;
        }
    }
}

/// One block of quantized activations: `x ≈ d * qs`. `sum` is `d * Σqs` rounded to f16 (for
/// the types with a minimum), `isum` the exact `Σqs` (for the types with an offset), `isum_lo`
/// that of the first 16 (Q6_K's offset applies per 16 values, each with its own scale).
#[derive(Clone, Copy, Default)]
#[repr(C, align(32))]
pub struct BlockQ8 {
    pub(crate) qs: [i8; QK],
    pub(crate) d: f32,
    pub(crate) sum: f32,
    pub(crate) isum: i32,
    pub(crate) isum_lo: i32,
}

/// Activations to 8-bit blocks as llama.cpp's `quantize_row_q8_0`/`q8_1` do on x86: scale
/// 127/amax, ties to even, the scale and the block sum stored as f16.
pub fn quantize_q8(x: &[f32]) -> Vec<BlockQ8> {
    let mut out = vec![BlockQ8::default(); x.len() / QK];
    quantize_q8_into(x, &mut out);
    out
}

/// [`quantize_q8`] into `out` (`x.len() / 32` blocks).
pub fn quantize_q8_into(x: &[f32], out: &mut [BlockQ8]) {
    assert_eq!(x.len(), out.len() * QK);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked).
            return unsafe { avx2::quantize_q8(x, out) };
        }
    }
    q8_blocks::<false>(x, out)
}

/// Activations for the k-quant products as llama.cpp's `quantize_row_q8_K` makes them: one
/// f32 scale per 256 values, `-max / 127` with the sign of the value of largest magnitude (the
/// first such), codes `min(127, round-to-even(x · -127 / max))`. Returned as the eight 32-value
/// blocks of each superblock, all with the superblock's scale, which the k-quant kernel reads
/// once per superblock.
pub fn quantize_q8k(x: &[f32]) -> Vec<BlockQ8> {
    let mut out = vec![BlockQ8::default(); x.len() / QK];
    quantize_q8k_into(x, &mut out);
    out
}

/// [`quantize_q8k`] into `out` (`x.len() / 32` blocks).
pub fn quantize_q8k_into(x: &[f32], out: &mut [BlockQ8]) {
    assert!(x.len().is_multiple_of(256) && x.len() == out.len() * QK);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked).
            return unsafe { avx2::quantize_q8k(x, out) };
        }
    }
    q8k_blocks::<false>(x, out)
}

/// The legacy types' blocks; `SIMD`: through [`avx2`]'s helpers (only from an AVX2 context).
/// With AVX2 the largest magnitude, the rounding and the sums run eight values per
/// instruction: the scalar loops took ~2.6 ns per value, a tenth of a prompt's time.
#[inline(always)]
fn q8_blocks<const SIMD: bool>(x: &[f32], out: &mut [BlockQ8]) {
    for (c, o) in x.chunks_exact(QK).zip(out) {
        let amax = abs_max::<SIMD>(c);
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let (s, lo) = round_codes::<SIMD>(c, id, &mut o.qs);
        let d = amax / 127.0;
        o.d = f16::from_f32(d).to_f32();
        o.sum = f16::from_f32(d * s as f32).to_f32();
        o.isum = s;
        o.isum_lo = lo;
    }
}

/// The k-quants' blocks (see [`q8_blocks`]).
#[inline(always)]
fn q8k_blocks<const SIMD: bool>(x: &[f32], out: &mut [BlockQ8]) {
    for (c, o) in x.chunks_exact(256).zip(out.chunks_exact_mut(256 / QK)) {
        let amax = abs_max::<SIMD>(c);
        // The first value of that magnitude gives the scale its sign.
        let max = c.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0);
        let iscale = if amax > 0.0 { -127.0 / max } else { 0.0 };
        let d = if amax > 0.0 { 1.0 / iscale } else { 0.0 };
        for (part, o) in c.chunks_exact(QK).zip(o) {
            let (s, lo) = round_codes::<SIMD>(part, iscale, &mut o.qs);
            o.d = d;
            o.sum = d * s as f32;
            o.isum = s;
            o.isum_lo = lo;
        }
    }
}

/// The largest `|v|` of `x` (a multiple of 32 values).
#[inline(always)]
fn abs_max<const SIMD: bool>(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: SIMD is only set from AVX2 contexts.
        return unsafe { avx2::abs_max(x) };
    }
    // Lane-wise max keeps this loop vectorised.
    let mut m8 = [0f32; 8];
    for part in x.chunks_exact(8) {
        for l in 0..8 {
            m8[l] = m8[l].max(part[l].abs());
        }
    }
    m8.iter().fold(0f32, |a, &v| a.max(v))
}

/// `qs[i] = min(127, round-to-even(x[i] · mul))` for 32 values; returns the sum of the 32
/// codes and that of the first 16.
#[inline(always)]
fn round_codes<const SIMD: bool>(x: &[f32], mul: f32, qs: &mut [i8; QK]) -> (i32, i32) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: SIMD is only set from AVX2 contexts.
        return unsafe { avx2::round_codes(x, mul, qs) };
    }
    for (q, v) in qs.iter_mut().zip(x) {
        // llama.cpp's nearest_int: 1.5·2²³ added leaves round-to-even in the low bits.
        let r = (v * mul + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
        *q = r.min(127) as i8;
    }
    let lo: i32 = qs[..16].iter().map(|&q| q as i32).sum();
    (lo + qs[16..].iter().map(|&q| q as i32).sum::<i32>(), lo)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One weight row (`x.len()` blocks) against one activation row.
pub(crate) fn dot(kind: Kind, w: &[u8], x: &[BlockQ8]) -> f32 {
    assert!(w.len() >= x.len() * kind.block_bytes());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); the assert bounds the reads.
            return unsafe { avx2::dot(kind, w, x) };
        }
    }
    dot_scalar(kind, w, x)
}

/// One weight row against `N` activation rows (2 to 4), each result bit for bit what [`dot`]
/// gives for that row alone (same operations in the same order): the weight block is unpacked
/// once for all of them, which is what makes a batched decode step cheaper than single ones.
pub(crate) fn dot_xn<const N: usize>(kind: Kind, w: &[u8], x: [&[BlockQ8]; N]) -> [f32; N] {
    let nb = x[0].len();
    assert!(x.iter().all(|r| r.len() == nb) && w.len() >= nb * kind.block_bytes());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); the assert bounds the reads.
            return unsafe { avx2::dot_xn(kind, w, x) };
        }
    }
    x.map(|xr| dot_scalar(kind, w, xr))
}

pub(crate) fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static VNNI: OnceLock<bool> = OnceLock::new();
        *VNNI.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && has_avx2()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The instructions an interleaved kernel (`qpack.rs`, `qpack_k.rs`) multiplies bytes with.
/// Both give the same integers, so the same results bit for bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512 VNNI's `vpdpbusd` on 256-bit registers: four byte products summed per lane.
    Vnni,
    /// AVX2's `vpmaddubsw` + `vpmaddwd`, for CPUs without VNNI (Zen 2/3, Intel's client cores).
    Avx2,
}

impl Isa {
    pub(crate) fn available(self) -> bool {
        match self {
            Isa::Vnni => has_vnni(),
            Isa::Avx2 => has_avx2(),
        }
    }
}

/// The kernel quantized weights are packed for at load: the best the CPU has, unless
/// `SLM_KERNELS` caps it (`avx2`: the AVX2 kernel on a VNNI CPU; `rows`: no repacking, the
/// file's row layout; `vnni` or empty: the default), to compare kernels on one machine or to rule
/// one out. Another value is reported on stderr and ignored.
pub(crate) fn interleaved_isa() -> Option<Isa> {
    use std::sync::OnceLock;
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = [Isa::Vnni, Isa::Avx2].into_iter().find(|i| i.available());
        match std::env::var("SLM_KERNELS").as_deref() {
            Ok("rows") => None,
            Ok("avx2") => Isa::Avx2.available().then_some(Isa::Avx2),
            Ok("" | "vnni") | Err(_) => best,
            Ok(other) => {
                // A typo should not pass for a measurement of the kernel it meant.
                eprintln!("slm: ignoring SLM_KERNELS={other:?} (expected avx2 or rows)");
                best
            }
        }
    })
}

/// The reference each SIMD path is tested against.
pub(crate) fn dot_scalar(kind: Kind, w: &[u8], x: &[BlockQ8]) -> f32 {
    let l = kind.layout();
    let mut acc = 0f32;
    let mut extra = 0f32;
    for (blk, xb) in w.chunks_exact(l.bytes).zip(x) {
        let d = f16_at(blk, 0);
        let s: i32 = if kind == Kind::Q8_0 {
            blk[2..34]
                .iter()
                .zip(&xb.qs)
                .map(|(&q, &y)| q as i8 as i32 * y as i32)
                .sum()
        } else {
            (0..QK)
                .map(|j| kind.code(blk, j) * xb.qs[j] as i32)
                .sum::<i32>()
                - l.offset * xb.isum
        };
        acc += d * xb.d * s as f32;
        if let Some(m) = l.min {
            extra += f16_at(blk, m) * xb.sum;
        }
    }
    acc + extra
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{f16_at, BlockQ8, Kind, Layout, QK};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
        super::q8_blocks::<true>(x, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8k(x: &[f32], out: &mut [BlockQ8]) {
        super::q8k_blocks::<true>(x, out)
    }

    /// [`super::abs_max`]: the same maximum in any order.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn abs_max(x: &[f32]) -> f32 {
        let abs = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        for c in x.chunks_exact(8) {
            m = _mm256_max_ps(m, _mm256_andnot_ps(abs, _mm256_loadu_ps(c.as_ptr())));
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
    }

    /// [`super::round_codes`]: the same products, rounded to even by `cvtps2dq` in the default
    /// rounding mode; packing saturates at 127 as the `min` does.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn round_codes(x: &[f32], mul: f32, qs: &mut [i8; QK]) -> (i32, i32) {
        assert_eq!(x.len(), QK);
        let p = x.as_ptr();
        let mul = _mm256_set1_ps(mul);
        let q = [0, 8, 16, 24]
            .map(|i| _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(i)), mul)));
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        // packs interleaves the two 128-bit lanes; this puts the bytes back in order.
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, bytes);
        // Sums of the saturated codes, as the scalar path sums what it stored.
        let wide = |b: __m128i| _mm256_cvtepi8_epi32(b);
        let lo128 = _mm256_castsi256_si128(bytes);
        let hi128 = _mm256_extracti128_si256(bytes, 1);
        let lo = hsum_i32(_mm256_add_epi32(
            wide(lo128),
            wide(_mm_srli_si128(lo128, 8)),
        ));
        let hi = hsum_i32(_mm256_add_epi32(
            wide(hi128),
            wide(_mm_srli_si128(hi128, 8)),
        ));
        (lo + hi, lo)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// The sum of the eight lanes, in llama.cpp's `hsum_float_8` order.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The 32 unsigned codes of a 4/5-bit block, element j in byte j.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn codes(l: Layout, blk: *const u8) -> __m256i {
        let q = _mm_loadu_si128(blk.add(l.codes) as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, m);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m);
        let mut v = _mm256_set_m128i(hi, lo);
        if let Some(h) = l.high_bits {
            // Bit j of qh to 0x10 in byte j (llama.cpp's bytes_from_bits_32).
            let qh = (blk.add(h) as *const u32).read_unaligned();
            let shuf = _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0,
            );
            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
            let bit = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
            let set = _mm256_cmpeq_epi8(bit, _mm256_set1_epi64x(-1));
            v = _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
        }
        v
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(kind: Kind, w: &[u8], x: &[BlockQ8]) -> f32 {
        let l = kind.layout();
        let ones = _mm256_set1_epi16(1);
        let offset = _mm256_set1_epi8(l.offset as i8);
        let mut acc = _mm256_setzero_ps();
        let mut extra = 0f32;
        let p = w.as_ptr();
        for (b, xb) in x.iter().enumerate() {
            let blk = p.add(b * l.bytes);
            let y = _mm256_load_si256(xb.qs.as_ptr() as *const __m256i);
            let d = f16_at(w, b * l.bytes);
            let pairs = if kind == Kind::Q8_0 {
                let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                // maddubs needs an unsigned left operand: move the signs onto y.
                _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q))
            } else {
                let pairs = _mm256_maddubs_epi16(codes(l, blk), y);
                if let Some(m) = l.min {
                    extra += f16_at(w, b * l.bytes + m) * xb.sum;
                    pairs
                } else {
                    // (q − offset)·y, pairwise: fits i16 (|2·31·127| < 2¹⁵).
                    _mm256_sub_epi16(pairs, _mm256_maddubs_epi16(offset, y))
                }
            };
            let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), s, acc);
        }
        hsum(acc) + extra
    }

    /// [`dot`] for `N` activation rows at once, each row's work in `dot`'s order.
    // `b` indexes the weight blocks and each row's activation blocks alike.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_xn<const N: usize>(kind: Kind, w: &[u8], x: [&[BlockQ8]; N]) -> [f32; N] {
        let l = kind.layout();
        let ones = _mm256_set1_epi16(1);
        let offset = _mm256_set1_epi8(l.offset as i8);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut extra = [0f32; N];
        let p = w.as_ptr();
        for b in 0..x[0].len() {
            let blk = p.add(b * l.bytes);
            let d = f16_at(w, b * l.bytes);
            let (q8, codes) = if kind == Kind::Q8_0 {
                let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                (q, _mm256_sign_epi8(q, q))
            } else {
                (_mm256_setzero_si256(), codes(l, blk))
            };
            let min = l.min.map(|m| f16_at(w, b * l.bytes + m));
            for t in 0..N {
                let xb = &x[t][b];
                let y = _mm256_load_si256(xb.qs.as_ptr() as *const __m256i);
                let pairs = if kind == Kind::Q8_0 {
                    _mm256_maddubs_epi16(codes, _mm256_sign_epi8(y, q8))
                } else {
                    let pairs = _mm256_maddubs_epi16(codes, y);
                    if let Some(m) = min {
                        extra[t] += m * xb.sum;
                        pairs
                    } else {
                        _mm256_sub_epi16(pairs, _mm256_maddubs_epi16(offset, y))
                    }
                };
                let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), s, acc[t]);
            }
        }
        let mut out = [0f32; N];
        for t in 0..N {
            out[t] = hsum(acc[t]) + extra[t];
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 quantization against the scalar loops, block for block and bit for bit: rows
    /// with exact ties after scaling (round to even), a negative largest magnitude, zeros, a
    /// block whose largest value repeats with both signs, and tiny and huge ranges.
    #[test]
    fn simd_activation_quantization_matches_scalar() {
        let n = 8 * 256;
        let x: Vec<f32> = (0..n)
            .map(|i| match i / 256 {
                0 => ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0,
                // 127 in the block makes the scale 1: every x.5 value is a tie.
                1 if i % 32 == 0 => 127.0,
                1 => (i % 64) as f32 - 31.5,
                2 => 0.0,
                3 if i % 32 == 5 => -9.0,
                3 if i % 32 == 9 => 9.0,
                3 => (i as f32 * 0.37).sin() * 9.0,
                4 => (i as f32 * 0.11).cos() * 1e-30,
                5 => (i as f32 * 0.7).sin() * 3e37,
                _ => -((i * 104729 % 997) as f32) / 100.0,
            })
            .collect();
        for k in [false, true] {
            let mut scalar = vec![BlockQ8::default(); n / QK];
            let ours = if k {
                q8k_blocks::<false>(&x, &mut scalar);
                quantize_q8k(&x)
            } else {
                q8_blocks::<false>(&x, &mut scalar);
                quantize_q8(&x)
            };
            for (b, (o, s)) in ours.iter().zip(&scalar).enumerate() {
                let bits = |v: &BlockQ8| (v.qs, v.d.to_bits(), v.sum.to_bits(), v.isum, v.isum_lo);
                assert_eq!(bits(o), bits(s), "q8k {k}, block {b}");
            }
            // The ties really are there, and rounded to even.
            if !k {
                assert_eq!(scalar[8].qs[1..5], [-30, -30, -28, -28], "x.5 to even");
            }
        }
    }

    /// The k-quants' activation blocks against candle's `Q8K` quantization of the same values
    /// (scale, codes and 16-value sums as its bytes hold them), over superblocks of different
    /// ranges, with the largest magnitude negative and positive (the scale takes its sign), and
    /// an all-zero one.
    #[test]
    fn q8k_activations_match_candles_q8k_blocks() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let n = 4 * 256;
        let x: Vec<f32> = (0..n)
            .map(|i| match i / 256 {
                0 => ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0,
                1 => {
                    ((i * 104729 % 997) as f32 / 498.5 - 1.0) * 0.01
                        - if i == 300 { 0.5 } else { 0.0 }
                }
                2 => 0.0,
                _ => (i as f32 * 0.37).sin() * 40.0 + if i == 900 { 50.0 } else { 0.0 },
            })
            .collect();
        let ours = quantize_q8k(&x);
        let t = Tensor::from_vec(x.clone(), (1, n), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8K).unwrap();
        let raw = q.data().unwrap().to_vec();
        assert_eq!(raw.len(), 4 * (4 + 256 + 32), "candle's Q8K blocks");
        // candle's block: d (f32), 256 codes, 16 sums of 16 (i16).
        for (s, b) in raw.chunks_exact(4 + 256 + 32).enumerate() {
            let d = f32::from_le_bytes(b[..4].try_into().unwrap());
            for j in 0..8 {
                let ob = &ours[s * 8 + j];
                assert_eq!(ob.d.to_bits(), d.to_bits(), "superblock {s}");
                for i in 0..32 {
                    // candle rounds halves away from zero, llama.cpp (and slm) to even.
                    let v = x[s * 256 + 32 * j + i] * if d == 0.0 { 0.0 } else { 1.0 / d };
                    let tie = (v.abs().fract() - 0.5).abs() < 1e-6;
                    let theirs = b[4 + 32 * j + i] as i8;
                    assert!(
                        ob.qs[i] == theirs || tie,
                        "superblock {s} value {}",
                        32 * j + i
                    );
                }
                let sum16 = |h: usize| {
                    let at = 4 + 256 + 2 * (2 * j + h);
                    i16::from_le_bytes([b[at], b[at + 1]]) as i32
                };
                assert_eq!((ob.isum_lo, ob.isum), (sum16(0), sum16(0) + sum16(1)));
            }
        }
    }
}
