//! k-quant weights (Q4_K, Q5_K, Q6_K: 256-value superblocks) repacked at load for the integer
//! kernels (AVX-512 VNNI or AVX2), in the interleaved layout of `qpack.rs`: eight rows per
//! group, each 32-bit lane of a `vpdpbusd` accumulating one row, the 32-value sub-blocks meeting
//! the activations' 8-bit blocks one to one.
//!
//! The sub-block scales stay integers (6-bit for Q4_K/Q5_K, 8-bit per 16 values for Q6_K): the
//! integer dot product is scaled in integers, converted once per sub-block and multiplied by the
//! activation block's scale, and the superblock's `d` (and `dmin`) applies once per superblock.
//! So the packed matrix is the file's size plus the scales unpacked to bytes (+5%), where
//! candle's tiles keep f32 scales beside a second copy of the file's blocks.
//!
//! Planes, per group of eight rows, each starting on a cache line:
//! - `codes`: per sub-block 128 bytes, the low four bits as in `qpack.rs` (vector `v`, lane
//!   `r`, byte `i`: value `4v + i` in the low nibble, `16 + 4v + i` in the high one);
//! - `high`: Q5_K's fifth bits as Q5_0's (32 bytes per sub-block: byte `4r + i`, bit `k` for
//!   value `4k + i`); Q6_K's two high bits (64 bytes: vector `w`, lane `r`, byte `i`, bits
//!   `2k..2k+2` for value `4(4w + k) + i`);
//! - `scales` (and `mins`): one byte per row and sub-block (Q6_K: two signed bytes, one per
//!   half of 16 values);
//! - `d` (and `dmin`): f32 per row and superblock.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use super::aligned::AlignedBytes;
use super::qdot::{BlockQ8, Isa, QK};
use super::qmatmul::Interleaved;
use super::qpack::{per_group, Groups, ROWS};

pub(crate) const QK_K: usize = 256;
const SUB: usize = QK_K / QK;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KKind {
    Q4K,
    Q5K,
    Q6K,
}

impl KKind {
    pub(crate) fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4K => Some(KKind::Q4K),
            GgmlDType::Q5K => Some(KKind::Q5K),
            GgmlDType::Q6K => Some(KKind::Q6K),
            _ => None,
        }
    }

    pub(crate) fn block_bytes(self) -> usize {
        match self {
            KKind::Q4K => 144,
            KKind::Q5K => 176,
            KKind::Q6K => 210,
        }
    }

    fn high_bytes(self) -> usize {
        match self {
            KKind::Q4K => 0,
            KKind::Q5K => 32,
            KKind::Q6K => 64,
        }
    }

    /// Scale bytes per row and sub-block.
    fn scale_bytes(self) -> usize {
        if self == KKind::Q6K {
            2
        } else {
            1
        }
    }

    fn has_min(self) -> bool {
        self != KKind::Q6K
    }
}

/// One superblock as numbers: unsigned codes, integer scales (per 32 values; Q6_K per 16),
/// minimums per 32 values, and the two float factors. Value `v` is
/// `d * scale * (code - offset) - dmin * min` with offset 32 for Q6_K, 0 otherwise.
pub(crate) struct Unpacked {
    pub(crate) codes: [u8; QK_K],
    pub(crate) scales: [i32; 16],
    pub(crate) mins: [i32; SUB],
    pub(crate) d: f32,
    pub(crate) dmin: f32,
}

/// ggml's 6-bit scale and minimum of sub-block `j` (Q4_K, Q5_K).
fn scale_min(j: usize, q: &[u8]) -> (i32, i32) {
    if j < 4 {
        ((q[j] & 63) as i32, (q[j + 4] & 63) as i32)
    } else {
        (
            ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as i32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as i32,
        )
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

pub(crate) fn unpack(kind: KKind, blk: &[u8]) -> Unpacked {
    let mut u = Unpacked {
        codes: [0; QK_K],
        scales: [0; 16],
        mins: [0; SUB],
        d: 0.0,
        dmin: 0.0,
    };
    match kind {
        KKind::Q4K | KKind::Q5K => {
            u.d = f16_at(blk, 0);
            u.dmin = f16_at(blk, 2);
            let sc = &blk[4..16];
            for j in 0..SUB {
                (u.scales[j], u.mins[j]) = scale_min(j, sc);
            }
            let (qh, qs) = if kind == KKind::Q5K {
                (Some(&blk[16..48]), &blk[48..176])
            } else {
                (None, &blk[16..144])
            };
            for c in 0..4 {
                for l in 0..32 {
                    let b = qs[32 * c + l];
                    let (mut lo, mut hi) = (b & 0xF, b >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    }
                    u.codes[64 * c + l] = lo;
                    u.codes[64 * c + 32 + l] = hi;
                }
            }
        }
        KKind::Q6K => {
            let (ql, qh, sc) = (&blk[..128], &blk[128..192], &blk[192..208]);
            u.d = f16_at(blk, 208);
            for (s, &b) in u.scales.iter_mut().zip(sc) {
                *s = b as i8 as i32;
            }
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                for l in 0..32 {
                    let v = &mut u.codes[128 * n..];
                    v[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    v[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    v[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    v[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
    }
    u
}

/// The reference the kernel is tested against: one row against one activation row (from
/// [`super::qdot::quantize_q8k`]), in llama.cpp's arithmetic for these types: integer sums over
/// each superblock, then `d_w d_y Σ − dmin_w d_y Σmin` (in f64 here).
#[cfg(test)]
pub(crate) fn dot_scalar(kind: KKind, w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f64;
    for (s, blk) in w.chunks_exact(kind.block_bytes()).enumerate() {
        let u = unpack(kind, blk);
        let dy = x[s * SUB].d as f64;
        let (mut sb, mut sbm) = (0i64, 0i64);
        for j in 0..SUB {
            let xb = &x[s * SUB + j];
            let code = |i: usize| u.codes[32 * j + i] as i32;
            let y = |i: usize| xb.qs[i] as i32;
            let p: i32 = if kind == KKind::Q6K {
                (0..2)
                    .map(|h| {
                        let r = 16 * h..16 * h + 16;
                        u.scales[2 * j + h] * r.map(|i| (code(i) - 32) * y(i)).sum::<i32>()
                    })
                    .sum()
            } else {
                u.scales[j] * (0..QK).map(|i| code(i) * y(i)).sum::<i32>()
            };
            sb += p as i64;
            sbm += (u.mins[j] * xb.isum) as i64;
        }
        acc += u.d as f64 * dy * sb as f64 - u.dmin as f64 * dy * sbm as f64;
    }
    acc as f32
}

pub struct KPacked {
    kind: KKind,
    /// The kernel it runs on (the layout is the same for both).
    isa: Isa,
    groups: usize,
    /// Superblocks per row.
    nsb: usize,
    codes: AlignedBytes,
    high: AlignedBytes,
    scales: AlignedBytes,
    mins: AlignedBytes,
    d: AlignedBytes,
    dmin: AlignedBytes,
}

impl KPacked {
    /// The rows of `src` in GGUF's layout, `nsb` superblocks each, packed a few MB at a time
    /// and released after each stretch.
    pub(crate) fn new(kind: KKind, src: &Groups, nsb: usize, isa: Isa) -> Self {
        let groups = src.count();
        let zeroed = Self::plane_lens(kind, groups, nsb).map(AlignedBytes::zeroed);
        let mut p = Self::assemble(kind, isa, groups, nsb, zeroed);
        let row_bytes = nsb * kind.block_bytes();
        let group_bytes = ROWS * row_bytes;
        let (c, h, s) = (
            per_group(&mut p.codes, groups),
            per_group(&mut p.high, groups),
            per_group(&mut p.scales, groups),
        );
        let (m, d, dm) = (
            per_group(&mut p.mins, groups),
            per_group(&mut p.d, groups),
            per_group(&mut p.dmin, groups),
        );
        let step = (8 << 20) / group_bytes.max(1) + 1;
        let mut parts = c
            .into_iter()
            .zip(h)
            .zip(s)
            .zip(m)
            .zip(d)
            .zip(dm)
            .enumerate()
            .peekable();
        while parts.peek().is_some() {
            let chunk: Vec<_> = parts.by_ref().take(step).collect();
            let (g0, g1) = (chunk[0].0, chunk[chunk.len() - 1].0 + 1);
            chunk
                .into_par_iter()
                .for_each(|(g, (((((c, h), s), m), d), dm))| {
                    let rows = src.group(g);
                    for lane in 0..ROWS {
                        let row = &rows[lane * row_bytes..][..row_bytes];
                        for (sb, blk) in row.chunks_exact(kind.block_bytes()).enumerate() {
                            let u = unpack(kind, blk);
                            pack_superblock(kind, &u, sb, lane, [c, h, s, m, d, dm]);
                        }
                    }
                });
            src.done(g0, g1);
        }
        p
    }

    /// Bytes of each plane: codes, high bits, scales, minimums, d, dmin.
    fn plane_lens(kind: KKind, groups: usize, nsb: usize) -> [usize; 6] {
        let min = |n: usize| if kind.has_min() { n } else { 0 };
        [
            SUB * 128,
            SUB * kind.high_bytes(),
            SUB * ROWS * kind.scale_bytes(),
            min(SUB * ROWS),
            4 * ROWS,
            min(4 * ROWS),
        ]
        .map(|n| groups * nsb * n)
    }

    fn assemble(
        kind: KKind,
        isa: Isa,
        groups: usize,
        nsb: usize,
        planes: [AlignedBytes; 6],
    ) -> Self {
        let [codes, high, scales, mins, d, dmin] = planes;
        Self {
            kind,
            isa,
            groups,
            nsb,
            codes,
            high,
            scales,
            mins,
            d,
            dmin,
        }
    }

    /// The planes, in the order [`KPacked::from_planes`] takes them.
    pub(crate) fn planes(&self) -> [&[u8]; 6] {
        [
            &self.codes,
            &self.high,
            &self.scales,
            &self.mins,
            &self.d,
            &self.dmin,
        ]
    }

    /// A packing made earlier (the packed-weights cache), None unless every plane has the
    /// length this shape needs.
    pub(crate) fn from_planes(
        kind: KKind,
        groups: usize,
        nsb: usize,
        isa: Isa,
        planes: Vec<AlignedBytes>,
    ) -> Option<Self> {
        let p = Self::assemble(kind, isa, groups, nsb, planes.try_into().ok()?);
        let lens = Self::plane_lens(kind, groups, nsb);
        (p.planes().iter().zip(lens).all(|(p, n)| p.len() == n)).then_some(p)
    }

    #[cfg(test)]
    pub(crate) fn planes_mapped(&self) -> Vec<bool> {
        [
            &self.codes,
            &self.high,
            &self.scales,
            &self.mins,
            &self.d,
            &self.dmin,
        ]
        .iter()
        .map(|p| p.is_mapped())
        .collect()
    }

    pub(crate) fn rows(&self) -> usize {
        self.groups * ROWS
    }

    pub(crate) fn cols(&self) -> usize {
        self.nsb * QK_K
    }
}

impl Interleaved for KPacked {
    fn groups(&self) -> usize {
        self.groups
    }

    fn blocks(&self) -> usize {
        self.nsb * SUB
    }

    unsafe fn gemv<const N: usize>(
        &self,
        g0: usize,
        g1: usize,
        x: [&[BlockQ8]; N],
        y: *mut f32,
        ld: usize,
    ) {
        assert!(g1 <= self.groups && x.iter().all(|r| r.len() == self.nsb * SUB));
        #[cfg(target_arch = "x86_64")]
        match self.isa {
            Isa::Vnni => simd::gemv_vnni(self, g0, g1, x, y, ld),
            Isa::Avx2 => simd::gemv_avx2(self, g0, g1, x, y, ld),
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!()
    }
}

/// Superblock `sb` of one row (`lane` of its group) into the group's planes.
fn pack_superblock(kind: KKind, u: &Unpacked, sb: usize, lane: usize, planes: [&mut [u8]; 6]) {
    let [c, h, s, m, d, dm] = planes;
    d[(sb * ROWS + lane) * 4..][..4].copy_from_slice(&u.d.to_le_bytes());
    if kind.has_min() {
        dm[(sb * ROWS + lane) * 4..][..4].copy_from_slice(&u.dmin.to_le_bytes());
    }
    for j in 0..SUB {
        let unit = sb * SUB + j;
        let q = &u.codes[32 * j..32 * j + 32];
        let codes = &mut c[unit * 128..(unit + 1) * 128];
        for v in 0..4 {
            for i in 0..4 {
                codes[32 * v + 4 * lane + i] =
                    (q[4 * v + i] & 0xF) | ((q[16 + 4 * v + i] & 0xF) << 4);
            }
        }
        match kind {
            KKind::Q4K => {}
            KKind::Q5K => {
                let hb = &mut h[unit * 32..(unit + 1) * 32];
                for i in 0..4 {
                    hb[4 * lane + i] = (0..8).fold(0, |a, k| a | ((q[4 * k + i] >> 4) & 1) << k);
                }
            }
            KKind::Q6K => {
                let hb = &mut h[unit * 64..(unit + 1) * 64];
                for w in 0..2 {
                    for i in 0..4 {
                        hb[32 * w + 4 * lane + i] = (0..4)
                            .fold(0, |a, k| a | ((q[4 * (4 * w + k) + i] >> 4) & 3) << (2 * k));
                    }
                }
            }
        }
        if kind == KKind::Q6K {
            for half in 0..2 {
                s[(unit * 2 + half) * ROWS + lane] = u.scales[2 * j + half] as i8 as u8;
            }
        } else {
            s[unit * ROWS + lane] = u.scales[j] as u8;
            m[unit * ROWS + lane] = u.mins[j] as u8;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{KKind, KPacked, ROWS, SUB};
    use crate::nn::qdot::BlockQ8;
    use crate::nn::qpack::simd::{fifth_bits, nibbles, Avx2, Dot, Vnni};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub(super) unsafe fn gemv_vnni<const N: usize>(
        p: &KPacked,
        g0: usize,
        g1: usize,
        x: [&[BlockQ8]; N],
        y: *mut f32,
        ld: usize,
    ) {
        gemv::<N, Vnni>(p, g0, g1, x, y, ld)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv_avx2<const N: usize>(
        p: &KPacked,
        g0: usize,
        g1: usize,
        x: [&[BlockQ8]; N],
        y: *mut f32,
        ld: usize,
    ) {
        gemv::<N, Avx2>(p, g0, g1, x, y, ld)
    }

    /// Inlined into each instruction set's entry point above, which compiles it for that set.
    // `t` and `k` index several arrays alike.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn gemv<const N: usize, D: Dot>(
        p: &KPacked,
        g0: usize,
        g1: usize,
        x: [&[BlockQ8]; N],
        y: *mut f32,
        ld: usize,
    ) {
        let kind = p.kind;
        let nsb = p.nsb;
        let two = _mm256_set1_epi8(0x30);
        let zero = _mm256_setzero_si256();
        let (codes, high) = (p.codes.as_ptr(), p.high.as_ptr());
        for g in g0..g1 {
            let mut acc = [_mm256_setzero_ps(); N];
            for sb in 0..nsb {
                let su = g * nsb + sb;
                // Integer sums over the superblock, as llama.cpp's k-quant dot products keep
                // them: the activations share one scale per superblock.
                let mut isacc = [zero; N];
                let mut imacc = [zero; N];
                for j in 0..SUB {
                    let u = su * SUB + j;
                    let mut a = nibbles(codes.add(u * 128));
                    if kind == KKind::Q5K {
                        // As Q5_0's fifth bits in qpack.rs.
                        fifth_bits(&mut a, high.add(u * 32));
                    } else if kind == KKind::Q6K {
                        // Bits 2k, 2k + 1 of vector w to bits 4, 5 of operand 4w + k (16-bit
                        // shifts by at most four never carry a bit into bits 4-5 of the
                        // neighbouring byte).
                        for w in 0..2 {
                            let h = _mm256_load_si256(high.add(u * 64 + 32 * w) as *const __m256i);
                            let hs = [
                                _mm256_slli_epi16::<4>(h),
                                _mm256_slli_epi16::<2>(h),
                                h,
                                _mm256_srli_epi16::<2>(h),
                            ];
                            for k in 0..4 {
                                let o = 4 * w + k;
                                a[o] = _mm256_or_si256(a[o], _mm256_and_si256(hs[k], two));
                            }
                        }
                    }
                    if kind == KKind::Q6K {
                        let sp = p.scales.as_ptr().add(u * 2 * ROWS);
                        let lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64(sp as *const __m128i));
                        let hi =
                            _mm256_cvtepi8_epi32(_mm_loadl_epi64(sp.add(ROWS) as *const __m128i));
                        for t in 0..N {
                            let xb = &x[t][sb * SUB + j];
                            let q = xb.qs.as_ptr() as *const i32;
                            let bc = |k: usize| _mm256_set1_epi32(q.add(k).read_unaligned());
                            let s0 = D::dot2(zero, a[0], bc(0), a[1], bc(1));
                            let s1 = D::dot2(zero, a[4], bc(4), a[5], bc(5));
                            let mut s0 = D::dot2(s0, a[2], bc(2), a[3], bc(3));
                            let mut s1 = D::dot2(s1, a[6], bc(6), a[7], bc(7));
                            let hi_sum = xb.isum - xb.isum_lo;
                            s0 = _mm256_sub_epi32(s0, _mm256_set1_epi32(32 * xb.isum_lo));
                            s1 = _mm256_sub_epi32(s1, _mm256_set1_epi32(32 * hi_sum));
                            let s = _mm256_add_epi32(
                                _mm256_mullo_epi32(s0, lo),
                                _mm256_mullo_epi32(s1, hi),
                            );
                            isacc[t] = _mm256_add_epi32(isacc[t], s);
                        }
                    } else {
                        let sp = p.scales.as_ptr().add(u * ROWS) as *const __m128i;
                        let sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(sp));
                        let mp = p.mins.as_ptr().add(u * ROWS) as *const __m128i;
                        let mn = _mm256_cvtepu8_epi32(_mm_loadl_epi64(mp));
                        for t in 0..N {
                            let xb = &x[t][sb * SUB + j];
                            let q = xb.qs.as_ptr() as *const i32;
                            let bc = |k: usize| _mm256_set1_epi32(q.add(k).read_unaligned());
                            // Two chains keep the multiply-adds' latency hidden.
                            let s0 = D::dot2(zero, a[0], bc(0), a[2], bc(2));
                            let s1 = D::dot2(zero, a[1], bc(1), a[3], bc(3));
                            let s0 = D::dot2(s0, a[4], bc(4), a[6], bc(6));
                            let s1 = D::dot2(s1, a[5], bc(5), a[7], bc(7));
                            let s = _mm256_mullo_epi32(_mm256_add_epi32(s0, s1), sc);
                            isacc[t] = _mm256_add_epi32(isacc[t], s);
                            let m = _mm256_mullo_epi32(mn, _mm256_set1_epi32(xb.isum));
                            imacc[t] = _mm256_add_epi32(imacc[t], m);
                        }
                    }
                }
                let dv = _mm256_load_ps(p.d.as_ptr().add(su * ROWS * 4) as *const f32);
                for t in 0..N {
                    let dy = _mm256_set1_ps(x[t][sb * SUB].d);
                    let d = _mm256_mul_ps(dv, dy);
                    acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isacc[t]), acc[t]);
                }
                if kind.has_min() {
                    let mv = _mm256_load_ps(p.dmin.as_ptr().add(su * ROWS * 4) as *const f32);
                    for t in 0..N {
                        let dmin = _mm256_mul_ps(mv, _mm256_set1_ps(x[t][sb * SUB].d));
                        acc[t] = _mm256_fnmadd_ps(dmin, _mm256_cvtepi32_ps(imacc[t]), acc[t]);
                    }
                }
            }
            for t in 0..N {
                _mm256_storeu_ps(y.add(t * ld + g * ROWS), acc[t]);
            }
        }
    }
}
