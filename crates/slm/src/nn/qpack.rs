//! Legacy block-quantized weights repacked at load for the integer kernels: eight rows
//! interleaved, so that each 32-bit lane of a `vpdpbusd` (AVX-512 VNNI; `vpmaddubsw` +
//! `vpmaddwd` on AVX2) accumulates one row (llama.cpp's repacked `Q4_0_8x8` idea, for every
//! legacy type). In GGUF's row layout a block of one row fills the eight lanes
//! and has to be summed across them, scaled and added once per row; interleaved, one
//! conversion, one scale multiply and one FMA serve eight rows, the activation bytes are
//! broadcast from memory, and the eight results land side by side with no horizontal sum.
//!
//! The layout is lossless (scales stay f16, codes keep their bits), so a packed matrix holds
//! exactly the bytes of the file, only reordered, in four planes that each start on a cache line:
//! - `codes`, per group of eight rows and block: operand `k` (0..8) holds values `4k..4k+4` of
//!   row `r` in lane `r`. 4/5-bit types store two operands per byte (operand `j` in the low
//!   nibbles of 32 bytes, operand `j + 4` in the high ones: 128 bytes); Q8_0 stores each operand
//!   as 32 bytes biased by 128 to unsigned (256 bytes), the bias taken back out with `128 Σy`.
//! - `high` (Q5_0, Q5_1): the fifth bits, byte `4r + i` holding bit `k` for value `4k + i`.
//! - `scales` (every type) and `mins` (Q4_1, Q5_1): eight f16 per group and block.

use rayon::prelude::*;

use super::aligned::AlignedBytes;
use super::qdot::{Isa, Kind, QK};

/// Rows per interleaved group: the eight 32-bit lanes of a 256-bit register.
pub(crate) const ROWS: usize = 8;

pub(crate) struct Packed {
    kind: Kind,
    /// The kernel it runs on (the layout is the same for both).
    isa: Isa,
    groups: usize,
    /// Blocks per row.
    nb: usize,
    codes: AlignedBytes,
    high: AlignedBytes,
    scales: AlignedBytes,
    mins: AlignedBytes,
}

/// Code bytes per group and block: each stored operand is four bytes for each of eight rows.
fn code_bytes(kind: Kind) -> usize {
    operands_stored(kind) * 4 * ROWS
}

/// A plane split into one slice per group (empty slices for a plane the type has not).
pub(crate) fn per_group(plane: &mut [u8], groups: usize) -> Vec<&mut [u8]> {
    if plane.is_empty() {
        return (0..groups).map(|_| Default::default()).collect();
    }
    let n = plane.len() / groups;
    plane.chunks_mut(n).collect()
}

/// The rows a packing reads: one weight in GGUF's row layout, or several stacked (Q, K and V
/// packed straight into one matrix, not packed apart and then copied together), counted in
/// groups of eight rows across them. `release(part, a, b)` is told when bytes `a..b` of a part
/// will not be read again.
pub(crate) struct Groups<'a> {
    /// Each part's bytes, its first group and its number of groups.
    parts: Vec<(&'a [u8], usize, usize)>,
    group_bytes: usize,
    release: &'a (dyn Fn(usize, usize, usize) + Sync),
}

impl<'a> Groups<'a> {
    /// The first `groups[i]` groups of each part `raws[i]`, groups of `group_bytes`.
    pub(crate) fn new(
        raws: &[&'a [u8]],
        groups: &[usize],
        group_bytes: usize,
        release: &'a (dyn Fn(usize, usize, usize) + Sync),
    ) -> Self {
        let mut first = 0;
        let parts = raws
            .iter()
            .zip(groups)
            .map(|(&raw, &n)| {
                assert!(
                    raw.len() >= n * group_bytes,
                    "a part shorter than its groups"
                );
                first += n;
                (raw, first - n, n)
            })
            .collect();
        Self {
            parts,
            group_bytes,
            release,
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.parts.iter().map(|p| p.2).sum()
    }

    /// The eight rows of group `g`.
    pub(crate) fn group(&self, g: usize) -> &'a [u8] {
        let &(raw, first, _) = self
            .parts
            .iter()
            .find(|p| g < p.1 + p.2)
            .expect("a group within the parts");
        &raw[(g - first) * self.group_bytes..][..self.group_bytes]
    }

    /// Groups `g0..g1` are packed.
    pub(crate) fn done(&self, g0: usize, g1: usize) {
        for (i, &(_, first, n)) in self.parts.iter().enumerate() {
            let (a, b) = (g0.max(first), g1.min(first + n));
            if a < b {
                let gb = self.group_bytes;
                (self.release)(i, (a - first) * gb, (b - first) * gb);
            }
        }
    }
}

/// Lane `r` of stored operand `k` is row r's four code bytes at `4k` in the file's order:
/// Q8_0's values `4k..4k+4` (eight operands), or the 4-bit bytes `4k..4k+4`, whose low nibbles
/// are values `4k..` and high nibbles values `16 + 4k..` (operands k and k + 4 of the kernel).
fn operands_stored(kind: Kind) -> usize {
    if kind == Kind::Q8_0 {
        8
    } else {
        4
    }
}

fn has_high(kind: Kind) -> bool {
    matches!(kind, Kind::Q5_0 | Kind::Q5_1)
}

fn has_min(kind: Kind) -> bool {
    matches!(kind, Kind::Q4_1 | Kind::Q5_1)
}

/// Bits 0, 4, 8, .. 28 of `x` as bits 0..8: Q5's fifth bits regrouped per four values.
fn every_fourth_bit(x: u32) -> u8 {
    let x = x & 0x1111_1111;
    let x = (x | x >> 3) & 0x0303_0303;
    let x = (x | x >> 6) & 0x000F_000F;
    ((x | x >> 12) & 0xFF) as u8
}

/// The code bytes of one block of the eight rows (`rows[r]` from the block's first code byte)
/// into the interleaved operands: `ops` operands, operand `k` holding row r's bytes `4k..4k + 4`
/// in lane `r` (an 8 × `ops` transpose of 32-bit words), Q8_0's biased to unsigned (`flip`).
fn transpose_codes(rows: [&[u8]; ROWS], ops: usize, flip: bool, dst: &mut [u8]) {
    assert!(dst.len() >= ops * 4 * ROWS && rows.iter().all(|r| r.len() >= 4 * ops));
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.available() && (ops == 4 || ops == 8) {
        // SAFETY: AVX2 is there (checked) and the assert bounds every read and write.
        unsafe { simd::transpose_codes(rows.map(<[u8]>::as_ptr), ops, flip, dst.as_mut_ptr()) };
        return;
    }
    transpose_codes_scalar(rows, ops, flip, dst)
}

fn transpose_codes_scalar(rows: [&[u8]; ROWS], ops: usize, flip: bool, dst: &mut [u8]) {
    let bias = if flip { 0x80 } else { 0 };
    for (lane, row) in rows.iter().enumerate() {
        for k in 0..ops {
            for i in 0..4 {
                dst[k * 32 + lane * 4 + i] = row[4 * k + i] ^ bias;
            }
        }
    }
}

impl Packed {
    /// The rows of `src` (GGUF row layout, `nb` blocks per row), packed a few MB at a time
    /// and released after each stretch.
    pub(crate) fn new(kind: Kind, src: &Groups, nb: usize, isa: Isa) -> Self {
        let bb = kind.block_bytes();
        let row_bytes = nb * bb;
        let groups = src.count();
        let cb = code_bytes(kind);
        let [mut codes, mut high, mut scales, mut mins] =
            Self::plane_lens(kind, groups, nb).map(AlignedBytes::zeroed);
        let (at, high_at) = kind.codes_at();
        let ops = operands_stored(kind);
        let (c, h, s, m) = (
            per_group(&mut codes, groups),
            per_group(&mut high, groups),
            per_group(&mut scales, groups),
            per_group(&mut mins, groups),
        );
        let group_bytes = ROWS * row_bytes;
        let step = (8 << 20) / group_bytes.max(1) + 1;
        let mut parts = c.into_iter().zip(h).zip(s).zip(m).enumerate().peekable();
        while parts.peek().is_some() {
            let chunk: Vec<_> = parts.by_ref().take(step).collect();
            let (g0, g1) = (chunk[0].0, chunk[chunk.len() - 1].0 + 1);
            chunk.into_par_iter().for_each(|(g, (((c, h), s), m))| {
                let rows = src.group(g);
                for b in 0..nb {
                    let blk = |lane: usize| &rows[lane * row_bytes + b * bb..][..bb];
                    for lane in 0..ROWS {
                        let blk = blk(lane);
                        let sc = b * 2 * ROWS + 2 * lane;
                        s[sc..sc + 2].copy_from_slice(&blk[..2]);
                        if has_min(kind) {
                            m[sc..sc + 2].copy_from_slice(&blk[2..4]);
                        }
                        if let Some(hat) = high_at {
                            let qh = u32::from_le_bytes(blk[hat..hat + 4].try_into().unwrap());
                            for i in 0..4 {
                                h[b * 32 + lane * 4 + i] = every_fourth_bit(qh >> i);
                            }
                        }
                    }
                    let codes: [&[u8]; ROWS] = std::array::from_fn(|l| &blk(l)[at..]);
                    transpose_codes(codes, ops, kind == Kind::Q8_0, &mut c[b * cb..][..cb]);
                }
            });
            src.done(g0, g1);
        }
        Self::assemble(kind, isa, groups, nb, [codes, high, scales, mins])
    }

    fn assemble(kind: Kind, isa: Isa, groups: usize, nb: usize, planes: [AlignedBytes; 4]) -> Self {
        let [codes, high, scales, mins] = planes;
        Self {
            kind,
            isa,
            groups,
            nb,
            codes,
            high,
            scales,
            mins,
        }
    }

    /// Bytes of each plane: codes, fifth bits, scales, minimums.
    fn plane_lens(kind: Kind, groups: usize, nb: usize) -> [usize; 4] {
        let per = |on: bool, unit: usize| if on { groups * nb * unit } else { 0 };
        [
            groups * nb * code_bytes(kind),
            per(has_high(kind), 32),
            groups * nb * 2 * ROWS,
            per(has_min(kind), 2 * ROWS),
        ]
    }

    /// The planes, in the order [`Packed::from_planes`] takes them.
    pub(crate) fn planes(&self) -> [&[u8]; 4] {
        [&self.codes, &self.high, &self.scales, &self.mins]
    }

    /// A packing made earlier (the packed-weights cache), None unless every plane has the
    /// length this shape needs.
    pub(crate) fn from_planes(
        kind: Kind,
        groups: usize,
        nb: usize,
        isa: Isa,
        planes: Vec<AlignedBytes>,
    ) -> Option<Self> {
        let p = Self::assemble(kind, isa, groups, nb, planes.try_into().ok()?);
        let lens = Self::plane_lens(kind, groups, nb);
        (p.planes().iter().zip(lens).all(|(p, n)| p.len() == n)).then_some(p)
    }

    #[cfg(test)]
    pub(crate) fn planes_mapped(&self) -> Vec<bool> {
        [&self.codes, &self.high, &self.scales, &self.mins]
            .iter()
            .map(|p| p.is_mapped())
            .collect()
    }

    pub(crate) fn rows(&self) -> usize {
        self.groups * ROWS
    }

    /// Block `b` of row `r` as the file stores it (the inverse of the packing).
    fn file_block(&self, r: usize, b: usize, out: &mut [u8]) {
        let (g, lane) = (r / ROWS, r % ROWS);
        let kind = self.kind;
        let u = g * self.nb + b;
        let sc = u * 2 * ROWS + 2 * lane;
        out[..2].copy_from_slice(&self.scales[sc..sc + 2]);
        if has_min(kind) {
            out[2..4].copy_from_slice(&self.mins[sc..sc + 2]);
        }
        let cb = code_bytes(kind);
        let codes = &self.codes[u * cb..(u + 1) * cb];
        let (at, high_at) = kind.codes_at();
        let ops = operands_stored(kind);
        for k in 0..ops {
            let src = &codes[k * 32 + lane * 4..][..4];
            let dst = &mut out[at + 4 * k..at + 4 * k + 4];
            if kind == Kind::Q8_0 {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s ^ 0x80;
                }
            } else {
                dst.copy_from_slice(src);
            }
        }
        if let Some(hat) = high_at {
            let h = &self.high[u * 32 + lane * 4..][..4];
            let mut qh = 0u32;
            for (i, &hb) in h.iter().enumerate() {
                for k in 0..8 {
                    qh |= (((hb >> k) & 1) as u32) << (4 * k + i);
                }
            }
            out[hat..hat + 4].copy_from_slice(&qh.to_le_bytes());
        }
    }

    /// Row `r` in f32: each block put back as the file stores it and dequantized as such, so the
    /// values are bit for bit those of the file's layout.
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let mut blk = [0u8; 34];
        let bb = self.kind.block_bytes();
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            self.file_block(r, b, &mut blk[..bb]);
            self.kind.dequantize(&blk[..bb], o);
        }
    }

    /// Several packed matrices as one, group after group (each plane concatenated).
    pub(crate) fn concat(parts: &[&Packed]) -> Option<Packed> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.kind != first.kind || p.nb != first.nb || p.isa != first.isa)
        {
            return None;
        }
        let plane = |f: fn(&Packed) -> &AlignedBytes| {
            AlignedBytes::from_slices(&parts.iter().map(|p| &f(p)[..]).collect::<Vec<_>>())
        };
        Some(Packed {
            kind: first.kind,
            isa: first.isa,
            groups: parts.iter().map(|p| p.groups).sum(),
            nb: first.nb,
            codes: plane(|p| &p.codes),
            high: plane(|p| &p.high),
            scales: plane(|p| &p.scales),
            mins: plane(|p| &p.mins),
        })
    }
}

impl super::qmatmul::Interleaved for Packed {
    fn groups(&self) -> usize {
        self.groups
    }

    fn blocks(&self) -> usize {
        self.nb
    }

    unsafe fn gemv<const N: usize>(
        &self,
        g0: usize,
        g1: usize,
        x: [&[super::qdot::BlockQ8]; N],
        y: *mut f32,
        ld: usize,
    ) {
        assert!(g1 <= self.groups && x.iter().all(|r| r.len() == self.nb));
        #[cfg(target_arch = "x86_64")]
        match self.isa {
            Isa::Vnni => simd::gemv_vnni(self, g0, g1, x, y, ld),
            Isa::Avx2 => simd::gemv_avx2(self, g0, g1, x, y, ld),
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD transpose against the scalar one, for the four- and eight-operand block types,
    /// biased and not; and the fifth-bit regrouping against its definition.
    #[test]
    fn packing_transpose_matches_scalar() {
        let bytes: Vec<u8> = (0..8 * 40).map(|i| (i * 151 % 256) as u8).collect();
        let rows: [&[u8]; ROWS] = std::array::from_fn(|r| &bytes[r * 40 + r % 3..]);
        for (ops, flip) in [(4, false), (8, true), (8, false)] {
            let mut fast = vec![0u8; ops * 32];
            let mut slow = vec![0u8; ops * 32];
            transpose_codes(rows, ops, flip, &mut fast);
            transpose_codes_scalar(rows, ops, flip, &mut slow);
            assert_eq!(fast, slow, "{ops} operands");
            assert_eq!(
                slow[32 + 4 * 3 + 2],
                rows[3][6] ^ if flip { 0x80 } else { 0 }
            );
        }
        for x in [0u32, u32::MAX, 0x1234_5678, 0x8000_0001, 0x1111_1111] {
            let want = (0..8).fold(0u8, |a, k| a | (((x >> (4 * k)) & 1) as u8) << k);
            assert_eq!(every_fourth_bit(x), want, "{x:#x}");
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod simd {
    use super::{has_high, has_min, Packed, ROWS};
    use crate::nn::qdot::{BlockQ8, Kind};
    use std::arch::x86_64::*;

    /// Unsigned code bytes times signed activation bytes, summed in fours into the 32-bit
    /// lanes of `acc`: two operand pairs at a time. The instruction sets give the same
    /// integers: AVX2's pairwise 16-bit sums cannot saturate for codes of at most six bits
    /// (4 · 63 · 127 < 2¹⁵; activations are at most 127 in magnitude). Q8_0's full bytes do
    /// not fit, so on AVX2 they take [`q8_dot`] instead.
    pub(in crate::nn) trait Dot {
        const VNNI: bool;
        unsafe fn dot2(acc: __m256i, a0: __m256i, b0: __m256i, a1: __m256i, b1: __m256i)
            -> __m256i;
    }

    pub(in crate::nn) struct Vnni;
    pub(in crate::nn) struct Avx2;

    impl Dot for Vnni {
        const VNNI: bool = true;
        #[inline(always)]
        unsafe fn dot2(
            acc: __m256i,
            a0: __m256i,
            b0: __m256i,
            a1: __m256i,
            b1: __m256i,
        ) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, a0, b0), a1, b1)
        }
    }

    impl Dot for Avx2 {
        const VNNI: bool = false;
        #[inline(always)]
        unsafe fn dot2(
            acc: __m256i,
            a0: __m256i,
            b0: __m256i,
            a1: __m256i,
            b1: __m256i,
        ) -> __m256i {
            let p = _mm256_add_epi16(_mm256_maddubs_epi16(a0, b0), _mm256_maddubs_epi16(a1, b1));
            _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
        }
    }

    /// Q8_0 on AVX2, the signed weights `w` (the stored bytes with their bias removed) and their
    /// magnitudes `wabs`: `|w| · (y with w's sign)`, whose pairwise sums fit 16 bits
    /// (2 · 128 · 127 < 2¹⁵). No bias to take out after.
    #[inline(always)]
    unsafe fn q8_dot(acc: __m256i, w: __m256i, wabs: __m256i, y: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(y, w));
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }

    /// The eight operands of a 4-bit unit (128 bytes at `c`): low nibbles of vector `j` are
    /// operand `j`, high nibbles operand `j + 4`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(in crate::nn) unsafe fn nibbles(c: *const u8) -> [__m256i; 8] {
        let nib = _mm256_set1_epi8(0x0F);
        let mut a = [_mm256_setzero_si256(); 8];
        for j in 0..4 {
            let v = _mm256_load_si256(c.add(32 * j) as *const __m256i);
            a[j] = _mm256_and_si256(v, nib);
            a[j + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
        }
        a
    }

    /// Bit k of each byte of the 32 bytes at `h` to bit 4 of operand k (16-bit shifts by at
    /// most four never carry a bit that lands on bit 4 across the byte boundary).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(in crate::nn) unsafe fn fifth_bits(a: &mut [__m256i; 8], h: *const u8) {
        let bit5 = _mm256_set1_epi8(0x10);
        let h = _mm256_load_si256(h as *const __m256i);
        let hs = [
            _mm256_slli_epi16::<4>(h),
            _mm256_slli_epi16::<3>(h),
            _mm256_slli_epi16::<2>(h),
            _mm256_slli_epi16::<1>(h),
            h,
            _mm256_srli_epi16::<1>(h),
            _mm256_srli_epi16::<2>(h),
            _mm256_srli_epi16::<3>(h),
        ];
        for k in 0..8 {
            a[k] = _mm256_or_si256(a[k], _mm256_and_si256(hs[k], bit5));
        }
    }

    /// [`super::transpose_codes`] for four or eight operands: rows r and r + 4 share a register
    /// (one per 128-bit half), and two rounds of unpacking transpose each half's 4 × 4 words.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose_codes(
        rows: [*const u8; 8],
        ops: usize,
        flip: bool,
        dst: *mut u8,
    ) {
        let bias = _mm256_set1_epi8(if flip { -128 } else { 0 });
        // Halves 0 and 1 hold words 0..4 and 4..8 of each row.
        for half in 0..ops / 4 {
            let r: [__m256i; 4] = std::array::from_fn(|i| {
                let lo = _mm_loadu_si128(rows[i].add(16 * half) as *const __m128i);
                let hi = _mm_loadu_si128(rows[i + 4].add(16 * half) as *const __m128i);
                _mm256_set_m128i(hi, lo)
            });
            let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
            let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
            let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
            let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
            let out = [
                _mm256_unpacklo_epi64(t0, t2),
                _mm256_unpackhi_epi64(t0, t2),
                _mm256_unpacklo_epi64(t1, t3),
                _mm256_unpackhi_epi64(t1, t3),
            ];
            for (k, o) in out.into_iter().enumerate() {
                let at = dst.add(32 * (4 * half + k)) as *mut __m256i;
                _mm256_storeu_si256(at, _mm256_xor_si256(o, bias));
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn gemv_vnni<const N: usize>(
        p: &Packed,
        g0: usize,
        g1: usize,
        x: [&[BlockQ8]; N],
        y: *mut f32,
        ld: usize,
    ) {
        gemv::<N, Vnni>(p, g0, g1, x, y, ld)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_avx2<const N: usize>(
        p: &Packed,
        g0: usize,
        g1: usize,
        x: [&[BlockQ8]; N],
        y: *mut f32,
        ld: usize,
    ) {
        gemv::<N, Avx2>(p, g0, g1, x, y, ld)
    }

    /// Inlined into each instruction set's entry point above, which compiles it for that set.
    // `b` and `t` index several arrays alike.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn gemv<const N: usize, D: Dot>(
        p: &Packed,
        g0: usize,
        g1: usize,
        x: [&[BlockQ8]; N],
        y: *mut f32,
        ld: usize,
    ) {
        let kind = p.kind;
        let nb = p.nb;
        let (high, min) = (has_high(kind), has_min(kind));
        // Q8_0's signed products on AVX2 need no bias taken out.
        let sign_trick = kind == Kind::Q8_0 && !D::VNNI;
        let offset = match kind {
            Kind::Q4_0 => 8,
            Kind::Q5_0 => 16,
            Kind::Q8_0 if !sign_trick => 128,
            _ => 0,
        };
        let zero = _mm256_setzero_si256();
        let codes = p.codes.as_ptr();
        for g in g0..g1 {
            let mut acc = [_mm256_setzero_ps(); N];
            let mut accm = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let u = g * nb + b;
                let mut a = [zero; 8];
                let mut wabs = [zero; 8];
                if kind == Kind::Q8_0 {
                    let c = codes.add(u * 256);
                    for k in 0..8 {
                        a[k] = _mm256_load_si256(c.add(32 * k) as *const __m256i);
                        if sign_trick {
                            a[k] = _mm256_xor_si256(a[k], _mm256_set1_epi8(-128));
                            wabs[k] = _mm256_abs_epi8(a[k]);
                        }
                    }
                } else {
                    a = nibbles(codes.add(u * 128));
                    if high {
                        fifth_bits(&mut a, p.high.as_ptr().add(u * 32));
                    }
                }
                let sp = p.scales.as_ptr().add(u * 2 * ROWS) as *const __m128i;
                let dw = _mm256_cvtph_ps(_mm_load_si128(sp));
                let mw = if min {
                    let mp = p.mins.as_ptr().add(u * 2 * ROWS) as *const __m128i;
                    _mm256_cvtph_ps(_mm_load_si128(mp))
                } else {
                    _mm256_setzero_ps()
                };
                for t in 0..N {
                    let xb = &x[t][b];
                    let q = xb.qs.as_ptr() as *const i32;
                    let bc = |k: usize| _mm256_set1_epi32(q.add(k).read_unaligned());
                    let mut s = if sign_trick {
                        // Two chains of four keep the multiply-adds' latency hidden.
                        let mut s0 = q8_dot(zero, a[0], wabs[0], bc(0));
                        let mut s1 = q8_dot(zero, a[1], wabs[1], bc(1));
                        for k in (2..8).step_by(2) {
                            s0 = q8_dot(s0, a[k], wabs[k], bc(k));
                            s1 = q8_dot(s1, a[k + 1], wabs[k + 1], bc(k + 1));
                        }
                        _mm256_add_epi32(s0, s1)
                    } else {
                        let s0 = D::dot2(zero, a[0], bc(0), a[2], bc(2));
                        let s1 = D::dot2(zero, a[1], bc(1), a[3], bc(3));
                        let s0 = D::dot2(s0, a[4], bc(4), a[6], bc(6));
                        let s1 = D::dot2(s1, a[5], bc(5), a[7], bc(7));
                        _mm256_add_epi32(s0, s1)
                    };
                    if offset != 0 {
                        s = _mm256_sub_epi32(s, _mm256_set1_epi32(offset * xb.isum));
                    }
                    let d = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d));
                    acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[t]);
                    if min {
                        accm[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xb.sum), accm[t]);
                    }
                }
            }
            for t in 0..N {
                let out = y.add(t * ld + g * ROWS);
                _mm256_storeu_ps(out, _mm256_add_ps(acc[t], accm[t]));
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Lane sums of `a[i] · b[i]` over the 32 bytes, as i32 (unsigned codes, signed bytes).
        fn lanes(a: &[u8; 32], b: &[i8; 32]) -> [i32; 8] {
            std::array::from_fn(|l| {
                (0..4)
                    .map(|i| a[4 * l + i] as i32 * b[4 * l + i] as i32)
                    .sum()
            })
        }

        fn vec<T: Copy>(v: &[T; 32]) -> __m256i {
            // SAFETY: 32 bytes read unaligned.
            unsafe { _mm256_loadu_si256(v.as_ptr() as *const __m256i) }
        }

        fn ints(v: __m256i) -> [i32; 8] {
            let mut out = [0i32; 8];
            // SAFETY: 32 bytes written unaligned.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, v) };
            out
        }

        /// AVX2's 16-bit pair sums at their largest: six-bit codes against ±127 (and Q8_0's
        /// full bytes, -128 included, through the sign trick) give the exact integers, as
        /// VNNI does; a seventh code bit would saturate.
        #[test]
        fn avx2_byte_products_are_exact_at_the_extremes() {
            if !crate::nn::qdot::Isa::Avx2.available() {
                return;
            }
            let ys: [[i8; 32]; 3] = [
                [127; 32],
                [-127; 32],
                std::array::from_fn(|i| if i % 3 == 0 { -127 } else { 127 - i as i8 }),
            ];
            for max in [15u8, 31, 63] {
                for (ya, yb) in ys.iter().zip(ys.iter().rev()) {
                    let a0: [u8; 32] = std::array::from_fn(|i| max - (i % 2) as u8);
                    let a1 = [max; 32];
                    let want: Vec<i32> = (0..8)
                        .map(|l| 5 + lanes(&a0, ya)[l] + lanes(&a1, yb)[l])
                        .collect();
                    // SAFETY: the CPU has AVX2 (checked above); the helpers inline into this call.
                    let got = ints(unsafe {
                        let five = _mm256_set1_epi32(5);
                        Avx2::dot2(five, vec(&a0), vec(ya), vec(&a1), vec(yb))
                    });
                    assert_eq!(got.to_vec(), want, "codes up to {max}");
                    if crate::nn::qdot::Isa::Vnni.available() {
                        // SAFETY: the CPU has AVX-512 VNNI (checked).
                        let v = ints(unsafe {
                            let five = _mm256_set1_epi32(5);
                            Vnni::dot2(five, vec(&a0), vec(ya), vec(&a1), vec(yb))
                        });
                        assert_eq!(v, got);
                    }
                }
            }
            let ws: [[i8; 32]; 3] = [
                [-128; 32],
                [127; 32],
                std::array::from_fn(|i| (i as i8).wrapping_mul(37)),
            ];
            for w in &ws {
                for y in &ys {
                    let wabs: [u8; 32] = std::array::from_fn(|i| w[i].unsigned_abs());
                    let want: [i32; 8] = std::array::from_fn(|l| {
                        (0..4)
                            .map(|i| w[4 * l + i] as i32 * y[4 * l + i] as i32)
                            .sum()
                    });
                    // SAFETY: the CPU has AVX2 (checked above).
                    let got =
                        ints(unsafe { q8_dot(_mm256_setzero_si256(), vec(w), vec(&wabs), vec(y)) });
                    assert_eq!(got, want, "Q8_0 bytes {w:?} · {y:?}");
                }
            }
        }
    }
}
