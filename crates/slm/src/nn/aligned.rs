//! Memory for repacked weights: byte planes that start on a cache line, the larger ones carved
//! from huge-page slabs.

use std::sync::Arc;

use crate::io::pack_cache::Plane;

/// Weight bytes starting on a cache line. The 20-byte Q4_1 blocks straddle lines anyway, but
/// where the buffer starts decides how many of the kernel's loads split; measured: prefill ran
/// 15% slower from an allocation at 16 mod 64 than from one on a line.
pub(crate) struct AlignedBytes {
    buf: Storage,
    len: usize,
}

enum Storage {
    Lines(Vec<Line>),
    /// Planes of 64 kB and more: a piece of a shared anonymous mapping (see [`Slab`]).
    Slab(Arc<Slab>, usize),
    /// A plane of the packed-weights cache file, read-only.
    Mapped(Plane),
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

const HUGE: usize = 2 << 20;

/// Planes from this size on are carved from slabs.
const SLAB_FROM: usize = 64 << 10;

/// An anonymous mapping on 2 MB boundaries with transparent huge pages asked for, from which
/// the planes of a model are carved one after another, so that writing them at load faults
/// once per 2 MB instead of once per 4 kB, and decode walks the weights on fewer TLB entries.
/// SmolLM2 Q8_0, alternating runs against planes from the allocator: load 0.12-0.13 →
/// 0.08-0.09 s (36k fresh 4 kB pages before, their faults and zeroing 40% of a load), decode
/// 143-152 → 165-179 tok/s. A piece's pages go back to the system when the piece is dropped,
/// the mapping when its last piece is.
struct Slab {
    /// Kept for the mapping's lifetime.
    map: memmap2::MmapMut,
    /// The 2 MB-aligned start of the part pieces are carved from, taken from the mapping
    /// while it was still borrowed mutably.
    base: *mut u8,
}

// SAFETY: `base` points into `map`, which lives as long as the slab; pieces never overlap, and
// each piece's bytes are reached only through its one `AlignedBytes`.
unsafe impl Send for Slab {}
unsafe impl Sync for Slab {}

/// The slab new pieces are carved from, and how much of it is taken.
static CURRENT: std::sync::Mutex<Option<(Arc<Slab>, usize)>> = std::sync::Mutex::new(None);

/// New slabs hold at least this much.
const SLAB_BYTES: usize = 32 << 20;

impl Slab {
    /// `len` zeroed bytes (never handed out before) on a cache line: the slab and the
    /// piece's offset in it, or None where the system has no mapping to give.
    fn piece(len: usize) -> Option<(Arc<Slab>, usize)> {
        let len = len.next_multiple_of(64);
        let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((slab, used)) = cur.as_mut() {
            if *used + len <= slab.capacity() {
                let at = *used;
                *used += len;
                return Some((slab.clone(), at));
            }
        }
        let size = len.max(SLAB_BYTES).next_multiple_of(HUGE);
        let mut map = memmap2::MmapMut::map_anon(size + HUGE).ok()?;
        let start = (map.as_ptr() as usize).next_multiple_of(HUGE) - map.as_ptr() as usize;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        // SAFETY: start < HUGE, within the mapping's size + HUGE bytes.
        let base = unsafe { map.as_mut_ptr().add(start) };
        let slab = Arc::new(Slab { map, base });
        *cur = Some((slab.clone(), len));
        Some((slab, 0))
    }

    fn capacity(&self) -> usize {
        self.map.len() - (self.base as usize - self.map.as_ptr() as usize)
    }

    /// Where the piece at `at` starts.
    fn at(&self, at: usize) -> *mut u8 {
        self.base.wrapping_add(at)
    }
}

/// `n` zeroed lines straight from the allocator (`vec![Line(..); n]` would write every byte: a
/// pass over the whole plane before packing writes it again).
fn zeroed_lines(n: usize) -> Vec<Line> {
    if n == 0 {
        return Vec::new();
    }
    let layout = std::alloc::Layout::array::<Line>(n).expect("weights fit in memory");
    // SAFETY: a non-zero-sized layout; zero bytes are a valid `Line`; the Vec owns an allocation
    // of exactly `n` Lines made by the global allocator with Line's layout.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut Line;
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(p, n, n)
    }
}

impl AlignedBytes {
    pub(crate) fn zeroed(len: usize) -> Self {
        let buf = match (len >= SLAB_FROM).then(|| Slab::piece(len)).flatten() {
            Some((slab, at)) => Storage::Slab(slab, at),
            None => Storage::Lines(zeroed_lines(len.div_ceil(64))),
        };
        Self { buf, len }
    }

    /// A plane of the packed-weights cache, as it was written (on a cache line: the cache
    /// places planes so).
    pub(crate) fn mapped(plane: Plane) -> Self {
        Self {
            len: plane.len(),
            buf: Storage::Mapped(plane),
        }
    }

    #[cfg(test)]
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self.buf, Storage::Mapped(_))
    }

    pub(crate) fn from_slices(parts: &[&[u8]]) -> Self {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut out = Self::zeroed(len);
        let mut at = 0;
        for p in parts {
            out[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        out
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Storage::Slab(slab, at) = &self.buf {
            // The whole pages inside the piece (its ends may share pages with neighbours).
            let map = slab.map.as_ptr() as usize;
            let a = (slab.at(*at) as usize).next_multiple_of(4096) - map;
            let b = (slab.at(*at) as usize + self.len) / 4096 * 4096 - map;
            if a < b {
                // SAFETY: private anonymous memory that only this piece uses: dropping its
                // pages loses nothing anyone reads again (they read back as zeros).
                let _ = unsafe {
                    slab.map
                        .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
                };
            }
        }
    }
}

impl std::ops::Deref for AlignedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.buf {
            // SAFETY: the lines hold at least `len` bytes and Line is plain bytes.
            Storage::Lines(v) => unsafe {
                std::slice::from_raw_parts(v.as_ptr() as *const u8, self.len)
            },
            // SAFETY: the piece lies within the slab and no other piece overlaps it.
            Storage::Slab(slab, at) => unsafe {
                std::slice::from_raw_parts(slab.at(*at), self.len)
            },
            Storage::Mapped(p) => p,
        }
    }
}

impl std::ops::DerefMut for AlignedBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.buf {
            // SAFETY: as in deref.
            Storage::Lines(v) => unsafe {
                std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, self.len)
            },
            // SAFETY: as in deref; `&mut self` is the only access to this piece.
            Storage::Slab(slab, at) => unsafe {
                std::slice::from_raw_parts_mut(slab.at(*at), self.len)
            },
            // Planes are written only between `zeroed` and the end of packing; a cached plane
            // replaces the packing, so nothing ever writes one.
            Storage::Mapped(_) => unreachable!("a cached weight plane is read-only"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slab pieces start zeroed on cache lines, never overlap, and dropping one (its pages
    /// handed back) leaves its neighbours' bytes alone, including on the pages they share.
    #[test]
    fn slab_pieces_are_zeroed_aligned_and_independent() {
        let lens = [100_003, SLAB_FROM, 3 << 20, 70_001];
        let mut pieces: Vec<AlignedBytes> = lens.iter().map(|&n| AlignedBytes::zeroed(n)).collect();
        for (i, p) in pieces.iter_mut().enumerate() {
            assert!(matches!(p.buf, Storage::Slab(..)), "piece {i} from a slab");
            assert_eq!(p.as_ptr() as usize % 64, 0, "piece {i} on a cache line");
            assert!(p.iter().all(|&b| b == 0), "piece {i} zeroed");
            p.fill(i as u8 + 1);
        }
        let dropped = pieces.remove(1);
        drop(dropped);
        for (i, p) in pieces.iter().enumerate() {
            let v = [1u8, 3, 4][i];
            assert!(p.iter().all(|&b| b == v), "piece {i} kept its bytes");
        }
        let fresh = AlignedBytes::zeroed(200_000);
        assert!(fresh.iter().all(|&b| b == 0));
    }
}
