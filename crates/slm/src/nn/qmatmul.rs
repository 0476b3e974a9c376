//! Matrix products with block-quantized weights.
//!
//! For the legacy GGUF types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) we run our own kernels: the
//! activations are quantized once per call to 8-bit blocks (like llama.cpp's Q8_0/Q8_1), and each
//! weight row is dotted against them with integer multiply-adds, rows split across threads: on
//! VNNI CPUs over weights repacked at load into groups of eight interleaved rows (`qpack.rs`),
//! elsewhere with AVX2 over the file's row layout (`qdot.rs`), where from 32 tokens on the
//! weights are dequantized once and multiplied in f32 instead.
//! The k-quants (Q4_K, Q5_K, Q6_K) run on the same interleaved layout on VNNI CPUs
//! (`qpack_k.rs`, activations quantized per 256 values as llama.cpp's Q8_K) and through candle's
//! `QMatMul` elsewhere. candle's CPU path has no SIMD kernel for Q4_1/Q5_x, pays for a generic
//! dispatch per call, and keeps a second, f32-scaled copy of each k-quant matrix it repacks.

use candle_core::quantized::{GgmlDType, QMatMul as CandleQMatMul};
use candle_core::{Device, Module, Tensor};

use crate::error::Result;
use crate::io::pack_cache::PackCache;
use crate::io::QuantWeight;

use super::aligned::AlignedBytes;
use super::kernels;
use super::pool::{self, SharedMut};
use super::qdot::{
    dot, dot_xn, interleaved_isa, quantize_q8_into, quantize_q8k_into, BlockQ8, Isa, Kind, QK,
};
use super::qpack::{Groups, Packed, ROWS};
use super::qpack_k::{KKind, KPacked, QK_K};

pub enum QMatMul {
    Own(OwnQ),
    /// Q4_K, Q5_K, Q6_K repacked for the VNNI kernel (`qpack_k.rs`).
    OwnK(KPacked),
    Candle(CandleQMatMul),
}

pub struct OwnQ {
    kind: Kind,
    rows: usize,
    cols: usize,
    /// The first `packed.rows()` rows, interleaved for the VNNI kernel (None without VNNI).
    packed: Option<Packed>,
    /// The other rows in the file's layout: all of them without VNNI, else the last `rows % ROWS`.
    data: AlignedBytes,
}

fn own_kind(w: &QuantWeight) -> Option<Kind> {
    let kind = match w.dtype {
        GgmlDType::Q4_0 => Kind::Q4_0,
        GgmlDType::Q4_1 => Kind::Q4_1,
        GgmlDType::Q5_0 => Kind::Q5_0,
        GgmlDType::Q5_1 => Kind::Q5_1,
        GgmlDType::Q8_0 => Kind::Q8_0,
        _ => return None,
    };
    w.cols.is_multiple_of(QK).then_some(kind)
}

impl QMatMul {
    /// Whether slm's own kernels take this weight (else candle's do).
    pub fn is_own(w: &QuantWeight) -> bool {
        own_kind(w).is_some()
    }

    pub fn new(w: QuantWeight) -> Result<Self> {
        Ok(match Self::stacked(&[&w]) {
            Some(q) => q,
            None => QMatMul::Candle(CandleQMatMul::from_qtensor(w.to_qtensor()?)?),
        })
    }

    /// The rows of several weights as one matrix (Q, K and V; gate and up), packed straight
    /// from each weight's bytes: packing the parts apart and then copying them together wrote
    /// (and faulted in) the fused planes twice at load. None unless slm's own kernels take
    /// them all alike (one block type, one width; eight-row groups where they meet).
    pub fn stacked(ws: &[&QuantWeight]) -> Option<Self> {
        let first = ws.first()?;
        if ws
            .iter()
            .any(|w| w.dtype != first.dtype || w.cols != first.cols || w.rows == 0)
        {
            return None;
        }
        let raws: Vec<&[u8]> = ws.iter().map(|w| &w.data[..]).collect();
        let release = |part: usize, a: usize, b: usize| ws[part].data.release(a, b);
        let isa = interleaved_isa();
        let cached = CacheSlot::of(ws);
        if let (Some(k), Some(isa)) = (KKind::of(first.dtype), isa) {
            if ws.iter().all(|w| w.rows.is_multiple_of(ROWS)) && first.cols.is_multiple_of(QK_K) {
                let nsb = first.cols / QK_K;
                let groups: Vec<usize> = ws.iter().map(|w| w.rows / ROWS).collect();
                let total = groups.iter().sum();
                if let Some(p) = cached
                    .take()
                    .and_then(|planes| KPacked::from_planes(k, total, nsb, isa, planes))
                {
                    return Some(QMatMul::OwnK(p));
                }
                let src = Groups::new(&raws, &groups, ROWS * nsb * k.block_bytes(), &release);
                let p = KPacked::new(k, &src, nsb, isa);
                cached.put(&p.planes());
                return Some(QMatMul::OwnK(p));
            }
        }
        let kind = own_kind(first)?;
        let last = ws.len() - 1;
        if isa.is_some() && !ws[..last].iter().all(|w| w.rows.is_multiple_of(ROWS)) {
            return None;
        }
        let rows: Vec<usize> = ws.iter().map(|w| w.rows).collect();
        if let Some(q) = cached
            .take()
            .and_then(|planes| OwnQ::from_planes(kind, first.cols, &rows, isa, planes))
        {
            return Some(QMatMul::Own(q));
        }
        let q = OwnQ::build(kind, first.cols, &raws, isa, &release);
        cached.put(&q.planes());
        Some(QMatMul::Own(q))
    }

    /// Row `r` in f32 into `out` (`cols` values), for our own block types: an embedding table
    /// that is also the output layer looks its tokens up in the product's bytes.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> bool {
        match self {
            QMatMul::Own(o) if r < o.rows && out.len() == o.cols => {
                o.dequantize_rows(r, r + 1, out);
                true
            }
            _ => false,
        }
    }

    /// Rows and columns of our own block types.
    pub fn own_shape(&self) -> Option<(usize, usize)> {
        match self {
            QMatMul::Own(o) => Some((o.rows, o.cols)),
            _ => None,
        }
    }

    /// The rows of several matrices as one (blocks never cross rows, so this is byte
    /// concatenation). Only for our own block types with equal widths.
    pub fn concat_rows(parts: &[&QMatMul]) -> Option<QMatMul> {
        let own: Vec<&OwnQ> = parts
            .iter()
            .map(|p| match p {
                QMatMul::Own(o) => Some(o),
                _ => None,
            })
            .collect::<Option<_>>()?;
        let first = own.first()?;
        if own
            .iter()
            .any(|o| o.kind != first.kind || o.cols != first.cols)
        {
            return None;
        }
        let last = own.len() - 1;
        let packed = match own
            .iter()
            .map(|o| o.packed.as_ref())
            .collect::<Option<Vec<_>>>()
        {
            // Groups concatenate; a part with rows outside its groups can only come last.
            Some(ps) if own[..last].iter().all(|o| o.data.is_empty()) => Some(Packed::concat(&ps)?),
            Some(_) => return None,
            None if own.iter().any(|o| o.packed.is_some()) => return None,
            None => None,
        };
        let tails: Vec<&[u8]> = if packed.is_some() {
            vec![&own[last].data[..]]
        } else {
            own.iter().map(|o| &o.data[..]).collect()
        };
        Some(QMatMul::Own(OwnQ {
            kind: first.kind,
            rows: own.iter().map(|o| o.rows).sum(),
            cols: first.cols,
            packed,
            data: AlignedBytes::from_slices(&tails),
        }))
    }

    /// `x` is `[.., cols]`; the result is `[.., rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, cols) = match self {
            QMatMul::Own(q) => (q.rows, q.cols),
            QMatMul::OwnK(p) => (p.rows(), p.cols()),
            QMatMul::Candle(q) => return Ok(q.forward(&x.contiguous()?)?),
        };
        // SAFETY: `matmul_with` writes all m × rows values, at a y with room for them that only
        // it uses.
        unsafe {
            own_forward(x, rows, cols, |xs, m, y| {
                self.matmul_with(xs, m, y, &mut Vec::new())
            })
        }
    }

    /// `y` (`m × rows`, overwritten) for the `m` rows of `x`, the activations quantized into
    /// `xq` (a buffer kept from call to call: a decoded token's products allocate nothing).
    pub fn forward_into(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        xq: &mut Vec<BlockQ8>,
    ) -> Result<()> {
        let rows = match self {
            QMatMul::Own(q) => q.rows,
            QMatMul::OwnK(p) => p.rows(),
            QMatMul::Candle(q) => {
                let cols = x.len() / m.max(1);
                let x = kernels::tensor(x.to_vec(), vec![m, cols])?;
                let out = q.forward(&x)?;
                return kernels::with_f32(&out, |o| y.copy_from_slice(o));
            }
        };
        assert_eq!(y.len(), m * rows, "product output");
        // SAFETY: y has room for m × rows values, and only this call uses it.
        unsafe { self.matmul_with(x, m, y.as_mut_ptr(), xq) };
        Ok(())
    }

    /// Slm's own kernels (not for `Candle`).
    ///
    /// # Safety
    /// As [`OwnQ::matmul_into`].
    unsafe fn matmul_with(&self, x: &[f32], m: usize, y: *mut f32, xq: &mut Vec<BlockQ8>) {
        match self {
            QMatMul::Own(q) => q.matmul_into(x, m, y, xq),
            QMatMul::OwnK(p) => {
                quantize_rows_into(x, p.cols(), m, quantize_q8k_into, xq);
                run_interleaved(p, xq, m, p.rows(), y, alone(m, p.rows(), p.cols()))
            }
            QMatMul::Candle(_) => unreachable!("candle's product runs through its own forward"),
        }
    }
}

/// Where a product's planes sit in the packed-weights cache: under its parts' names, when
/// they all come from one file whose cache is on.
struct CacheSlot(Option<(std::sync::Arc<PackCache>, String)>);

impl CacheSlot {
    fn of(ws: &[&QuantWeight]) -> Self {
        let origins: Option<Vec<_>> = ws.iter().map(|w| w.origin.as_ref()).collect();
        Self(origins.and_then(|o| {
            let cache = &o.first()?.cache;
            o.iter()
                .all(|x| std::sync::Arc::ptr_eq(&x.cache, cache))
                .then(|| {
                    let names: Vec<&str> = o.iter().map(|x| x.name.as_str()).collect();
                    (cache.clone(), names.join("+"))
                })
        }))
    }

    fn take(&self) -> Option<Vec<AlignedBytes>> {
        let (cache, key) = self.0.as_ref()?;
        let planes = cache.take(key)?;
        Some(planes.into_iter().map(AlignedBytes::mapped).collect())
    }

    fn put(&self, planes: &[&[u8]]) {
        if let Some((cache, key)) = &self.0 {
            cache.put(key, planes);
        }
    }
}

/// What decides the bytes of a cached packing: the kernel chosen for this CPU and the code
/// that packs (its sources, hashed: any edit to them retires every cache made before it;
/// `gguf.rs` un-permutes Q and K rows before packing). The cache file's own format is
/// versioned by its magic bytes.
pub fn packed_layout() -> String {
    static LAYOUT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LAYOUT.get_or_init(layout_of_this_build).clone()
}

fn layout_of_this_build() -> String {
    use sha2::{Digest, Sha256};
    const SOURCES: [&str; 5] = [
        include_str!("qmatmul.rs"),
        include_str!("qpack.rs"),
        include_str!("qpack_k.rs"),
        include_str!("qdot.rs"),
        include_str!("../io/gguf.rs"),
    ];
    let mut h = Sha256::new();
    for s in SOURCES {
        h.update(s.as_bytes());
    }
    let hash: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let isa = interleaved_isa().map_or("rows".to_string(), |i| format!("{i:?}"));
    format!("{} {isa} {hash}", env!("CARGO_PKG_VERSION"))
}

/// `x` (`[.., cols]`) through `matmul(x, m, y)` into a `[.., rows]` tensor. The input is read
/// in place and the output is not zeroed first: a prompt's products wrote ~160 MB of zeros
/// and copied ~100 MB of inputs on the main thread while the pool waited.
///
/// # Safety
/// `matmul` must write every one of the `m × rows` values at `y`.
unsafe fn own_forward(
    x: &Tensor,
    rows: usize,
    cols: usize,
    matmul: impl FnOnce(&[f32], usize, *mut f32),
) -> Result<Tensor> {
    let mut out = x.dims().to_vec();
    let y = kernels::with_f32(x, |xs| {
        let m = xs.len() / cols;
        let mut y = Vec::<f32>::with_capacity(m * rows);
        matmul(xs, m, y.spare_capacity_mut().as_mut_ptr().cast());
        // SAFETY: matmul wrote all m × rows values (the caller's promise).
        unsafe { y.set_len(m * rows) };
        y
    })?;
    *out.last_mut().unwrap() = rows;
    Ok(Tensor::from_vec(y, out, &Device::Cpu)?)
}

/// Weights interleaved in groups of eight rows for the integer kernels (`qpack.rs`, `qpack_k.rs`).
pub(super) trait Interleaved: Sync {
    fn groups(&self) -> usize;
    /// Blocks of 32 per row.
    fn blocks(&self) -> usize;
    /// `y[t * ld + 8g + lane] = row (8g + lane) · x[t]` for the groups `g0..g1` and `N` (1 to
    /// 4) activation rows of `blocks()` blocks each.
    ///
    /// # Safety
    /// `y` must have room for `(N - 1) * ld + 8 * g1` values, and no other thread may write the
    /// slots this call writes.
    unsafe fn gemv<const N: usize>(
        &self,
        g0: usize,
        g1: usize,
        x: [&[BlockQ8]; N],
        y: *mut f32,
        ld: usize,
    );
}

/// `y[i, r]` for the `m` quantized activation rows of `xq` and every interleaved row (`ld`
/// values per row of `y`), split by groups across candle's barrier pool unless `alone`.
///
/// # Safety
/// `y` must have room for `(m - 1) * ld + p.groups() * 8` values that no one else reads or
/// writes meanwhile.
unsafe fn run_interleaved<P: Interleaved>(
    p: &P,
    xq: &[BlockQ8],
    m: usize,
    ld: usize,
    y: *mut f32,
    alone: bool,
) {
    let nb = p.blocks();
    let xr = |i: usize| &xq[i * nb..(i + 1) * nb];
    let out = SharedMut(y);
    let out = &out;
    // Tokens outer, groups inner: four tokens' activations and the chunk's weights both stay in
    // L1 while every pair of them meets once.
    let run = |g0: usize, g1: usize| {
        let mut i = 0;
        while i < m {
            // SAFETY: groups g0..g1 of each token's row belong to this task alone, and y has
            // m*ld slots.
            unsafe {
                let y = out.ptr().add(i * ld);
                match m - i {
                    1 => p.gemv(g0, g1, [xr(i)], y, ld),
                    2 => p.gemv(g0, g1, [xr(i), xr(i + 1)], y, ld),
                    3 => p.gemv(g0, g1, [xr(i), xr(i + 1), xr(i + 2)], y, ld),
                    // Eight tokens at a time measured slower (register pressure).
                    _ => p.gemv(g0, g1, [xr(i), xr(i + 1), xr(i + 2), xr(i + 3)], y, ld),
                }
            }
            i += (m - i).min(4);
        }
    };
    let groups = p.groups();
    if alone {
        run(0, groups);
    } else {
        // candle's barrier pool: its workers spin briefly between calls, so the ~200 small
        // products of one decoded token start without a futex wake-up each.
        pool::ranges(groups.div_ceil(2), |c| {
            run(2 * c.start, (2 * c.end).min(groups))
        });
    }
}

/// Activations as 8-bit blocks (`quantize`: the legacy types' `quantize_q8_into`, the
/// k-quants' `quantize_q8k_into`) in `out`, resized to them.
fn quantize_rows_into(
    x: &[f32],
    cols: usize,
    m: usize,
    quantize: fn(&[f32], &mut [BlockQ8]),
    out: &mut Vec<BlockQ8>,
) {
    let nb = cols / QK;
    out.resize(m * nb, BlockQ8::default());
    // Eight rows a task, in parallel from sixteen.
    pool::chunks_mut(out, 8 * nb, 16 * nb, |i, o| {
        quantize(&x[i * 8 * cols..][..o.len() / nb * cols], o)
    });
}

/// Whether a product this size is run on this thread alone: handing work to other threads costs
/// microseconds.
fn alone(m: usize, rows: usize, cols: usize) -> bool {
    rayon::current_num_threads() <= 1 || m * rows * cols < 1 << 18
}

/// From this many tokens on, a product over the file's row layout (CPUs without VNNI)
/// dequantizes its weights to f32 and runs an f32 GEMM: unpacking once is amortized over the
/// tokens, and the GEMM microkernel does 16 multiply-adds per instruction against the AVX2 dot
/// product's few per instruction after scaling.
pub const GEMM_FROM_TOKENS: usize = 32;

impl OwnQ {
    /// Each part's rows packed in groups of eight: all its whole groups when packing.
    fn groups(rows: &[usize], pack: Option<Isa>) -> Vec<usize> {
        rows.iter()
            .map(|r| if pack.is_some() { r / ROWS } else { 0 })
            .collect()
    }

    /// The planes, in the order [`OwnQ::from_planes`] takes them: the packed ones, if any,
    /// then the rows in the file's layout.
    fn planes(&self) -> Vec<&[u8]> {
        let mut planes: Vec<&[u8]> = self.packed.iter().flat_map(|p| p.planes()).collect();
        planes.push(&self.data);
        planes
    }

    /// The weights of parts of `rows` rows as an earlier load packed them (the packed-weights
    /// cache); None unless the planes are the ones [`OwnQ::build`] makes for this shape.
    fn from_planes(
        kind: Kind,
        cols: usize,
        rows: &[usize],
        pack: Option<Isa>,
        mut planes: Vec<AlignedBytes>,
    ) -> Option<Self> {
        let nb = cols / QK;
        let row_bytes = nb * kind.block_bytes();
        let groups = Self::groups(rows, pack);
        let total: usize = groups.iter().sum();
        let data = planes.pop()?;
        let tail_rows: usize = rows.iter().zip(&groups).map(|(r, g)| r - g * ROWS).sum();
        if data.len() != tail_rows * row_bytes {
            return None;
        }
        let packed = match pack.filter(|_| total > 0) {
            Some(isa) => Some(Packed::from_planes(kind, total, nb, isa, planes)?),
            None if planes.is_empty() => None,
            None => return None,
        };
        Some(Self {
            kind,
            rows: rows.iter().sum(),
            cols,
            packed,
            data,
        })
    }

    /// The rows of `parts` stacked (each part whole rows of `cols`; every part but the last a
    /// whole number of eight-row groups when packing). `pack`: interleave the rows for that
    /// kernel (tests also run the others). `release(part, a, b)`: bytes `a..b` of a part are
    /// repacked and will not be read again.
    fn build(
        kind: Kind,
        cols: usize,
        parts: &[&[u8]],
        pack: Option<Isa>,
        release: &(dyn Fn(usize, usize, usize) + Sync),
    ) -> Self {
        let nb = cols / QK;
        let row_bytes = nb * kind.block_bytes();
        let rows: Vec<usize> = parts.iter().map(|p| p.len() / row_bytes).collect();
        let groups = Self::groups(&rows, pack);
        let last = parts.len() - 1;
        assert!(pack.is_none() || rows[..last].iter().all(|r| r.is_multiple_of(ROWS)));
        let src = Groups::new(parts, &groups, ROWS * row_bytes, release);
        let packed = pack
            .filter(|_| src.count() > 0)
            .map(|isa| Packed::new(kind, &src, nb, isa));
        // Rows outside the groups keep the file's layout: all of them without packing, else
        // the last part's last `rows % 8`.
        let tails: Vec<&[u8]> = parts
            .iter()
            .zip(&groups)
            .map(|(p, g)| &p[g * ROWS * row_bytes..])
            .collect();
        Self {
            kind,
            rows: rows.iter().sum(),
            cols,
            packed,
            data: AlignedBytes::from_slices(&tails),
        }
    }

    fn packed_rows(&self) -> usize {
        self.packed.as_ref().map_or(0, Packed::rows)
    }

    /// Rows `r0..r1` of the weights in f32, written to `out` (`(r1 - r0) * cols`).
    fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let bb = self.kind.block_bytes();
        let nb = self.cols / QK;
        let pr = self.packed_rows();
        for (r, o) in (r0..r1).zip(out.chunks_exact_mut(self.cols)) {
            match &self.packed {
                Some(p) if r < pr => p.dequantize_row(r, o),
                _ => {
                    let raw = &self.data[(r - pr) * nb * bb..(r - pr + 1) * nb * bb];
                    for (blk, o) in raw.chunks_exact(bb).zip(o.chunks_exact_mut(QK)) {
                        self.kind.dequantize(blk, o);
                    }
                }
            }
        }
    }

    /// The prefill path: dequantize (in parallel), then one f32 GEMM.
    /// # Safety
    /// As [`Self::matmul_into`].
    unsafe fn matmul_f32(&self, x: &[f32], m: usize, y: *mut f32) {
        let (rows, cols) = (self.rows, self.cols);
        let mut w = vec![0f32; rows * cols];
        let dst = SharedMut(w.as_mut_ptr());
        let dst = &dst;
        pool::ranges(rows.div_ceil(16), |blocks| {
            let (r0, r1) = (blocks.start * 16, (blocks.end * 16).min(rows));
            // SAFETY: rows r0..r1 of w belong to this task alone.
            let out = unsafe {
                std::slice::from_raw_parts_mut(dst.ptr().add(r0 * cols), (r1 - r0) * cols)
            };
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
                y,
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
        assert!(y.len() == m * self.rows);
        // SAFETY: y has room for m × rows values.
        unsafe { self.matmul_into(x, m, y.as_mut_ptr(), &mut Vec::new()) }
    }

    /// [`Self::matmul`] into `m × rows` values at `y`, every one of them written; the
    /// activations are quantized into `xq`.
    ///
    /// # Safety
    /// `y` must have room for `m * rows` values that no one else reads or writes meanwhile.
    unsafe fn matmul_into(&self, x: &[f32], m: usize, y: *mut f32, xq: &mut Vec<BlockQ8>) {
        assert!(x.len() == m * self.cols);
        // Interleaved weights stay on the integer kernel at every length: four tokens per
        // unpacked block beat dequantizing plus the f32 GEMM by 1.8-2.5x in prefill here.
        if m >= GEMM_FROM_TOKENS && self.packed.is_none() {
            return self.matmul_f32(x, m, y);
        }
        let nb = self.cols / QK;
        quantize_rows_into(x, self.cols, m, quantize_q8_into, xq);
        let xq = &*xq;
        let row_bytes = nb * self.kind.block_bytes();
        let rows = self.rows;
        let xr = |i: usize| &xq[i * nb..(i + 1) * nb];
        let alone = alone(m, rows, self.cols);
        if let Some(p) = &self.packed {
            // SAFETY: y has room for m × rows values (the caller's promise).
            run_interleaved(p, xq, m, rows, y, alone);
        }
        let r_off = self.packed_rows();
        let out = SharedMut(y);
        let out = &out;
        let run = |r0: usize, wchunk: &[u8]| {
            // SAFETY (all writes below): each (i, r) of y is written by exactly one task, and
            // y has m*rows slots.
            let put = |i: usize, r: usize, v: f32| unsafe { *out.ptr().add(i * rows + r0 + r) = v };
            for (r, wrow) in wchunk.chunks_exact(row_bytes).enumerate() {
                // Up to four tokens share each unpacked weight block.
                let mut i = 0;
                while i < m {
                    let k = self.kind;
                    match m - i {
                        1 => put(i, r, dot(k, wrow, xr(i))),
                        2 => {
                            let v = dot_xn(k, wrow, [xr(i), xr(i + 1)]);
                            v.into_iter()
                                .enumerate()
                                .for_each(|(j, vj)| put(i + j, r, vj));
                        }
                        3 => {
                            let v = dot_xn(k, wrow, [xr(i), xr(i + 1), xr(i + 2)]);
                            v.into_iter()
                                .enumerate()
                                .for_each(|(j, vj)| put(i + j, r, vj));
                        }
                        _ => {
                            let v = dot_xn(k, wrow, [xr(i), xr(i + 1), xr(i + 2), xr(i + 3)]);
                            v.into_iter()
                                .enumerate()
                                .for_each(|(j, vj)| put(i + j, r, vj));
                        }
                    }
                    i += (m - i).min(4);
                }
            }
        };
        let tail_rows = rows - r_off;
        if alone || tail_rows < 16 {
            run(r_off, &self.data);
            return;
        }
        let data = &self.data;
        pool::ranges(tail_rows.div_ceil(16), |blocks| {
            let (r0, r1) = (blocks.start * 16, (blocks.end * 16).min(tail_rows));
            run(r_off + r0, &data[r0 * row_bytes..r1 * row_bytes]);
        });
    }
}

#[cfg(test)]
#[path = "qmatmul_tests.rs"]
mod tests;
