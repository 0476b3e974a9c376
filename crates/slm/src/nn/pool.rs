//! The set of worker threads a forward pass's steps between its products run on: the pool its
//! products run on. Quantized products run on candle's barrier pool, whose workers spin briefly
//! after each task so that the ~200 small products of a decoded token start without a futex
//! wake-up each, and in which the calling thread takes a share of the work; dense f32 products
//! run on rayon's pool (the `gemm` crate's parallelism). Each product says which it used
//! ([`products_on_rayon`]), and attention, norms, RoPE and the other steps follow it.
//!
//! With the two pools mixed, a barrier worker still spinning after a quantized product took a
//! core from rayon's threads running the attention, norms or activations that followed (three
//! runnable threads on two cores): a 256-token prefill ran 10-25% faster with the spin cut
//! short, before these steps moved to the barrier pool; and a dense model's prefill lost 9%
//! when they ran on the barrier pool beside its rayon GEMMs. (Training runs on rayon's pool
//! throughout and does not come here.)

/// A raw pointer that tasks share to write disjoint parts of one buffer.
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: every user writes through it only to regions no other task touches.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Through a method, so closures capture the Send wrapper rather than the bare pointer.
    pub(crate) fn ptr(&self) -> *mut T {
        self.0
    }
}

thread_local! {
    /// Whether this thread's last product ran on rayon's pool (a dense GEMM).
    static ON_RAYON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set on a thread while it hands out pool work: the pool takes one caller at a time (a
    /// lock the caller holds while it works its own share), so a task that asks for the pool
    /// again runs its work inline. The pool's own workers are marked by candle.
    static HANDING_OUT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f(range)` over pieces of `0..n` taken from a shared cursor (about eight per thread, so
/// uneven pieces balance).
pub fn ranges(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if HANDING_OUT.get() {
        return f(0..n);
    }
    if ON_RAYON.get() {
        use rayon::prelude::*;
        let chunk = n.div_ceil(8 * rayon::current_num_threads()).max(1);
        return (0..n.div_ceil(chunk))
            .into_par_iter()
            .for_each(|c| f(c * chunk..n.min((c + 1) * chunk)));
    }
    HANDING_OUT.set(true);
    // Cleared on unwinding too, so a caught panic leaves the thread able to use the pool.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            HANDING_OUT.set(false);
        }
    }
    let _reset = Reset;
    candle_core::utils::barrier_pool().execute_chunked(n, f);
}

/// Records which pool the calling thread's products run on: `true` for rayon's (dense GEMMs),
/// `false` for candle's barrier pool (quantized products).
pub fn products_on_rayon(on: bool) {
    ON_RAYON.set(on);
}

/// `f(i)` for every `i` in `0..n`, spread over the pool.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    ranges(n, |r| r.for_each(&f));
}

/// `f(i, chunk)` for every `chunk`-long piece `i` of `y` (the last may be shorter), in
/// parallel once `y` holds `min_len` items or more.
pub fn chunks_mut<T: Send>(
    y: &mut [T],
    chunk: usize,
    min_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    if y.len() < min_len || y.len() <= chunk {
        y.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
        return;
    }
    let len = y.len();
    let base = SharedMut(y.as_mut_ptr());
    for_each(len.div_ceil(chunk), |i| {
        let (a, b) = (i * chunk, ((i + 1) * chunk).min(len));
        // SAFETY: pieces a..b of distinct i never overlap, and each is within y.
        f(i, unsafe {
            std::slice::from_raw_parts_mut(base.ptr().add(a), b - a)
        })
    });
}
