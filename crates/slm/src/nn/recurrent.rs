//! Recurrent layers as PyTorch's `nn.LSTM` and `nn.GRU` compute them (gate order, where the
//! hidden bias sits), forward and back-propagation through time, on row-major f32 buffers.
//!
//! Both executors run a layer through here: inference without saving anything, training
//! saving what [`backward`] reads. The input projection `gx = x·W_ihᵀ + b_ih` of every
//! position is an ordinary linear op before the recurrence (one GEMM for all positions); only
//! `h·W_hhᵀ + b_hh` runs step by step, as one small GEMM over the batch's sequences per step.

use serde::{Deserialize, Serialize};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::kernels::{exp, matmul, matmul_on, tanh};

/// The recurrent cell, with PyTorch's gate order (`i, f, g, o`; `r, z, n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Cell {
    Lstm,
    Gru,
}

impl Cell {
    /// Gates per hidden unit: the rows of `W_ih` are `gates · hidden`.
    pub fn gates(self) -> usize {
        match self {
            Cell::Lstm => 4,
            Cell::Gru => 3,
        }
    }

    /// PyTorch's `rnn_type` name.
    pub fn name(self) -> &'static str {
        match self {
            Cell::Lstm => "LSTM",
            Cell::Gru => "GRU",
        }
    }
}

/// One direction of a recurrent layer.
#[derive(Debug, Clone, Copy)]
pub struct RecurrentSpec {
    pub cell: Cell,
    pub hidden: usize,
    /// Runs each sequence from its last position to its first (the `_reverse` direction).
    pub reverse: bool,
}

/// Where each sequence's rows are: sequence `s` holds rows `starts[s]..starts[s] + lengths[s]`.
pub struct Layout<'a> {
    pub starts: &'a [usize],
    pub lengths: &'a [usize],
    /// Rows of the whole buffer (padding rows stay zero in the output).
    pub rows: usize,
}

impl Layout<'_> {
    fn steps(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0)
    }

    /// The sequences still running at step `k`, into `out`; whether they are the first ones
    /// (then their state rows need no gathering).
    fn active(&self, k: usize, out: &mut Vec<usize>) -> bool {
        out.clear();
        out.extend((0..self.lengths.len()).filter(|&s| self.lengths[s] > k));
        out.iter().enumerate().all(|(i, &s)| i == s)
    }

    /// The row sequence `s` runs at step `k`, when it is still running.
    fn row(&self, s: usize, k: usize, reverse: bool) -> Option<usize> {
        let n = self.lengths[s];
        (k < n).then(|| self.starts[s] + if reverse { n - 1 - k } else { k })
    }
}

/// `h` (and `c` for an LSTM) of each sequence, `[b, hidden]`: where a layer starts and ends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub h: Vec<f32>,
    pub c: Vec<f32>,
}

impl State {
    pub fn zeros(cell: Cell, b: usize, hidden: usize) -> Self {
        Self {
            h: vec![0.0; b * hidden],
            c: if cell == Cell::Lstm {
                vec![0.0; b * hidden]
            } else {
                Vec::new()
            },
        }
    }
}

/// The hidden projection `W_hh` (`[gates·hidden, hidden]`, or stored transposed) and `b_hh`.
#[derive(Clone, Copy)]
pub struct Hidden<'a> {
    pub w: &'a [f32],
    /// `w` is stored `[hidden, gates·hidden]` (the inference layout).
    pub transposed: bool,
    pub b: Option<&'a [f32]>,
}

/// What [`backward`] reads, per row: the gate activations, the state the step started from,
/// and for an LSTM the new cell state (for a GRU, `h·W_hn + b_hn`, which `r` multiplies).
#[derive(Default)]
pub struct Saved {
    gates: Vec<f32>,
    hprev: Vec<f32>,
    cprev: Vec<f32>,
    aux: Vec<f32>,
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Below this many multiply-adds per step the recurrence runs on one thread: splitting a
/// step costs a barrier, which small layers do not pay back.
const PAR_STEP_MACS: usize = 1 << 17;

/// How many workers split a layer's hidden units. A step is a small GEMM (tens of
/// microseconds), so handing each one to the pool as a parallel GEMM spends most of it waking
/// threads and packing `W_hh` again; instead each worker keeps its own slice of `W_hh` for the
/// whole sequence and the workers meet once per step. One worker when the pool has one thread,
/// when the caller is itself a pool worker (the pool is busy), or for small layers.
fn workers(spec: RecurrentSpec, layout: &Layout) -> usize {
    let hd = spec.hidden;
    let step_macs = layout.lengths.len() * spec.cell.gates() * hd * hd;
    let threads = rayon::current_num_threads();
    if threads < 2 || step_macs < PAR_STEP_MACS || rayon::current_thread_index().is_some() {
        return 1;
    }
    threads.min(hd / 16).max(1)
}

/// The hidden units `j0..j1` that worker `t` of `parts` owns (every gate of each).
fn units(hidden: usize, parts: usize, t: usize) -> (usize, usize) {
    (hidden * t / parts, hidden * (t + 1) / parts)
}

/// The workers' meeting point between steps. A step's work is tens of microseconds, less
/// than sleeping on a futex and waking again costs, so it spins; it yields after a while so
/// that an oversubscribed machine still makes progress.
struct SpinBarrier {
    parts: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl SpinBarrier {
    fn new(parts: usize) -> Self {
        Self {
            parts,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        }
    }

    fn wait(&self) {
        if self.parts == 1 {
            return;
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.parts {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation
                .store(generation.wrapping_add(1), Ordering::Release);
        } else {
            let mut spins = 0u32;
            while self.generation.load(Ordering::Acquire) == generation {
                if spins < 1 << 14 {
                    std::hint::spin_loop();
                    spins += 1;
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// Set while a recurrence runs on the pool. Two at once could deadlock: each broadcast reaches
/// the workers in its own order, so worker 0 could wait at one's barrier for worker 1, which
/// waits at the other's for worker 0. A caller that finds the pool taken runs alone.
static POOL_TAKEN: AtomicBool = AtomicBool::new(false);

/// Frees the pool when the broadcast ends, a panicking one included.
struct PoolGuard;

impl Drop for PoolGuard {
    fn drop(&mut self) {
        POOL_TAKEN.store(false, Ordering::Release);
    }
}

/// Runs `f(worker, workers, barrier)` on `parts` pool threads at once, or on the caller alone
/// (`workers` = 1) when `parts` is 1 or another recurrence holds the pool.
fn run_workers(parts: usize, f: impl Fn(usize, usize, &SpinBarrier) + Sync) {
    let taken = parts > 1
        && POOL_TAKEN
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok();
    if !taken {
        return f(0, 1, &SpinBarrier::new(1));
    }
    let _guard = PoolGuard;
    let barrier = SpinBarrier::new(parts);
    rayon::broadcast(|ctx| {
        if ctx.index() < parts {
            f(ctx.index(), parts, &barrier)
        }
    });
}

/// A buffer that the workers write at disjoint places: each its own hidden units of each row.
#[derive(Clone, Copy)]
struct Shared(*mut f32, usize);

// SAFETY: the workers touch disjoint elements between barriers (see each use).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn new(v: &mut [f32]) -> Self {
        Self(v.as_mut_ptr(), v.len())
    }

    /// SAFETY: no other worker reads or writes `start..start + len` until the next barrier.
    #[inline(always)]
    unsafe fn range<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        assert!(start + len <= self.1);
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }

    /// SAFETY: no worker writes the first `len` elements until the next barrier.
    unsafe fn head<'a>(self, len: usize) -> &'a [f32] {
        assert!(len <= self.1);
        std::slice::from_raw_parts(self.0, len)
    }
}

/// Runs the recurrence over every sequence of `gx` (`[rows, gates·hidden]`) from `state`, which
/// ends holding each sequence's final state. Returns `h` of every row, and with `save` what
/// the backward needs.
pub fn forward(
    spec: RecurrentSpec,
    gx: &[f32],
    hh: Hidden,
    state: &mut State,
    layout: &Layout,
    save: bool,
) -> (Vec<f32>, Option<Saved>) {
    let parts = workers(spec, layout);
    forward_on(parts, spec, gx, hh, state, layout, save)
}

/// [`forward`] on `parts` workers.
fn forward_on(
    parts: usize,
    spec: RecurrentSpec,
    gx: &[f32],
    hh: Hidden,
    state: &mut State,
    layout: &Layout,
    save: bool,
) -> (Vec<f32>, Option<Saved>) {
    let (hd, gates) = (spec.hidden, spec.cell.gates());
    let g = gates * hd;
    let b = layout.lengths.len();
    let steps = layout.steps();
    let mut out = vec![0f32; layout.rows * hd];
    let mut saved = save.then(|| Saved {
        gates: vec![0.0; layout.rows * g],
        hprev: vec![0.0; layout.rows * hd],
        cprev: vec![0.0; layout.rows * hd],
        aux: if spec.cell == Cell::Gru {
            vec![0.0; layout.rows * hd]
        } else {
            Vec::new()
        },
    });
    // `h` is double-buffered: during step k every worker reads buffer k % 2 (all units) and
    // writes its own units of the other.
    let mut h_next = state.h.clone();
    {
        let hs = [Shared::new(&mut state.h), Shared::new(&mut h_next)];
        let c = Shared::new(&mut state.c);
        let y = Shared::new(&mut out);
        let sv = saved.as_mut().map(|s| {
            [
                Shared::new(&mut s.gates),
                Shared::new(&mut s.hprev),
                Shared::new(&mut s.cprev),
                Shared::new(&mut s.aux),
            ]
        });
        run_workers(parts, |t, parts, barrier| {
            let (j0, j1) = units(hd, parts, t);
            let w = j1 - j0;
            let gw = gates * w;
            // This worker's rows of W_hh (units j0..j1 of every gate), `[gates·w, hd]`, and b_hh.
            let mut wt = Vec::with_capacity(gw * hd);
            for q in 0..gates {
                for r in q * hd + j0..q * hd + j1 {
                    if hh.transposed {
                        wt.extend((0..hd).map(|k| hh.w[k * g + r]));
                    } else {
                        wt.extend_from_slice(&hh.w[r * hd..][..hd]);
                    }
                }
            }
            let bias: Option<Vec<f32>> = hh.b.map(|bias| {
                (0..gates)
                    .flat_map(|q| bias[q * hd + j0..q * hd + j1].iter().copied())
                    .collect()
            });
            let mut a = vec![0f32; b * gw];
            let mut gbuf = vec![0f32; gw];
            // Only the sequences still running take part in a step's product (texts of
            // different lengths in one batch: the padding costs nothing), as PyTorch's packed
            // sequences do.
            let (mut act, mut hbuf) = (Vec::with_capacity(b), Vec::new());
            for k in 0..steps {
                let prefix = layout.active(k, &mut act);
                let n = act.len();
                let hnext = hs[(k + 1) % 2];
                // SAFETY: nobody writes buffer k % 2 during step k.
                let h = unsafe { hs[k % 2].head(b * hd) };
                let a = &mut a[..n * gw];
                match &bias {
                    Some(bias) => a.chunks_mut(gw).for_each(|r| r.copy_from_slice(bias)),
                    None => a.fill(0.0),
                }
                let hin: &[f32] = if prefix {
                    &h[..n * hd]
                } else {
                    hbuf.clear();
                    for &s in &act {
                        hbuf.extend_from_slice(&h[s * hd..][..hd]);
                    }
                    &hbuf
                };
                matmul_on(None, a, true, hin, false, &wt, true, (n, gw, hd), 1.0);
                for s in (0..b).filter(|&s| layout.lengths[s] <= k) {
                    // A sequence that has ended carries its state over (SAFETY: as below).
                    unsafe { hnext.range(s * hd + j0, w) }.copy_from_slice(&h[s * hd + j0..][..w]);
                }
                for (i, &s) in act.iter().enumerate() {
                    let row = layout.row(s, k, spec.reverse).expect("a running sequence");
                    let (x, ah) = (&gx[row * g..][..g], &a[i * gw..][..gw]);
                    // Gate q of this worker's units: its input part and its hidden part.
                    let pre = |q: usize| (&x[q * hd + j0..][..w], &ah[q * w..][..w]);
                    let gv = &mut gbuf[..gw];
                    for (q, out) in gv.chunks_exact_mut(w).enumerate() {
                        let (xq, aq) = pre(q);
                        // The LSTM's g gate and the GRU's n gate are tanh (the GRU's takes r first).
                        match (spec.cell, q) {
                            (Cell::Gru, 2) => out.copy_from_slice(aq),
                            (Cell::Lstm, 2) => out
                                .iter_mut()
                                .zip(xq.iter().zip(aq))
                                .for_each(|(o, (a, b))| *o = tanh(a + b)),
                            _ => out
                                .iter_mut()
                                .zip(xq.iter().zip(aq))
                                .for_each(|(o, (a, b))| *o = sigmoid(a + b)),
                        }
                    }
                    let hp = &h[s * hd + j0..][..w];
                    // SAFETY: these units of sequence s and of its row are this worker's
                    // alone, and `hnext` is not read before the barrier.
                    let (hn, yv) =
                        unsafe { (hnext.range(s * hd + j0, w), y.range(row * hd + j0, w)) };
                    if let Some(sv) = sv {
                        unsafe { sv[1].range(row * hd + j0, w) }.copy_from_slice(hp);
                    }
                    match spec.cell {
                        Cell::Lstm => {
                            let c = unsafe { c.range(s * hd + j0, w) };
                            let (ig, rest) = gv.split_at(w);
                            let (f, rest) = rest.split_at(w);
                            let (gg, o) = rest.split_at(w);
                            if let Some(sv) = sv {
                                unsafe { sv[2].range(row * hd + j0, w) }.copy_from_slice(c);
                            }
                            for jj in 0..w {
                                let cn = f[jj] * c[jj] + ig[jj] * gg[jj];
                                c[jj] = cn;
                                hn[jj] = o[jj] * tanh(cn);
                            }
                        }
                        Cell::Gru => {
                            let (r, rest) = gv.split_at_mut(w);
                            let (z, n) = rest.split_at_mut(w);
                            let xn = &x[2 * hd + j0..][..w];
                            if let Some(sv) = sv {
                                // `h·W_hn + b_hn`, which r multiplies: the backward needs it.
                                unsafe { sv[3].range(row * hd + j0, w) }.copy_from_slice(n);
                            }
                            for jj in 0..w {
                                n[jj] = tanh(xn[jj] + r[jj] * n[jj]);
                                hn[jj] = (1.0 - z[jj]) * n[jj] + z[jj] * hp[jj];
                            }
                        }
                    }
                    yv.copy_from_slice(hn);
                    if let Some(sv) = sv {
                        for (q, v) in gv.chunks_exact(w).enumerate() {
                            unsafe { sv[0].range(row * g + q * hd + j0, w) }.copy_from_slice(v);
                        }
                    }
                }
                barrier.wait();
            }
        });
    }
    if steps % 2 == 1 {
        state.h = h_next;
    }
    (out, saved)
}

/// Back-propagation through time of [`forward`]: from `dy` (`[rows, hidden]`, the loss
/// gradient of every output) returns `dgx` and `b_hh`'s gradient, and adds `W_hh`'s to `dw`
/// (in its `[gates·hidden, hidden]` layout, which `w` has too). The initial state gets no
/// gradient: truncated BPTT detaches it, as `repackage_hidden` does.
pub fn backward(
    spec: RecurrentSpec,
    dy: &[f32],
    saved: &Saved,
    w: &[f32],
    layout: &Layout,
    dw: Option<&mut [f32]>,
) -> (Vec<f32>, Vec<f32>) {
    backward_on(workers(spec, layout), spec, dy, saved, w, layout, dw)
}

/// [`backward`] on `parts` workers.
fn backward_on(
    parts: usize,
    spec: RecurrentSpec,
    dy: &[f32],
    saved: &Saved,
    w: &[f32],
    layout: &Layout,
    dw: Option<&mut [f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let (hd, gates) = (spec.hidden, spec.cell.gates());
    let g = gates * hd;
    let b = layout.lengths.len();
    let steps = layout.steps();
    let mut dgx = vec![0f32; layout.rows * g];
    // For a GRU the hidden side's gradient differs from the input side's in the n gate.
    let mut dah_all = if spec.cell == Cell::Gru {
        vec![0f32; layout.rows * g]
    } else {
        Vec::new()
    };
    let mut dh = vec![0f32; b * hd];
    let mut dc = vec![0f32; b * hd];
    // The gate gradients of a step, double-buffered: a worker fills step k − 1's while the
    // others still read step k's (all units) for their share of dh.
    let mut dah = [vec![0f32; b * g], vec![0f32; b * g]];
    {
        let (dgx_p, dall_p) = (Shared::new(&mut dgx), Shared::new(&mut dah_all));
        let (dh_p, dc_p) = (Shared::new(&mut dh), Shared::new(&mut dc));
        let [d0, d1] = &mut dah;
        let das = [Shared::new(d0), Shared::new(d1)];
        run_workers(parts, |t, parts, barrier| {
            let (j0, j1) = units(hd, parts, t);
            let wd = j1 - j0;
            // W_hh's columns j0..j1 (every gate row), `[g, wd]`: these units' dh is da·W[:, j0..j1].
            let wc: Vec<f32> = w
                .chunks_exact(hd)
                .flat_map(|r| r[j0..j1].iter().copied())
                .collect();
            let mut dhbuf = vec![0f32; b * wd];
            let mut act = Vec::with_capacity(b);
            for k in (0..steps).rev() {
                layout.active(k, &mut act);
                let n = act.len();
                let da = das[k % 2];
                // SAFETY (every access through a `Shared` below): unit j of sequence s, and of
                // its row, is this worker's alone until the barrier.
                for (ai, &s) in act.iter().enumerate() {
                    let row = layout.row(s, k, spec.reverse).expect("a running sequence");
                    let gq = |q: usize| &saved.gates[row * g + q * hd + j0..][..wd];
                    let dhs = unsafe { dh_p.range(s * hd + j0, wd) };
                    dhs.iter_mut()
                        .zip(&dy[row * hd + j0..][..wd])
                        .for_each(|(a, d)| *a += d);
                    // This step's gate gradients of these units, gate by gate.
                    let mut das = [0, 1, 2, 3].map(|q| match q < gates {
                        true => unsafe { da.range(ai * g + q * hd + j0, wd) },
                        false => &mut [][..],
                    });
                    match spec.cell {
                        Cell::Lstm => {
                            let (ig, f, gg, o) = (gq(0), gq(1), gq(2), gq(3));
                            let cprev = &saved.cprev[row * hd + j0..][..wd];
                            let dcs = unsafe { dc_p.range(s * hd + j0, wd) };
                            let [d0, d1, d2, d3] = &mut das;
                            for jj in 0..wd {
                                let tc = tanh(f[jj] * cprev[jj] + ig[jj] * gg[jj]);
                                let d = dhs[jj];
                                let dct = dcs[jj] + d * o[jj] * (1.0 - tc * tc);
                                d0[jj] = dct * gg[jj] * ig[jj] * (1.0 - ig[jj]);
                                d1[jj] = dct * cprev[jj] * f[jj] * (1.0 - f[jj]);
                                d2[jj] = dct * ig[jj] * (1.0 - gg[jj] * gg[jj]);
                                d3[jj] = d * tc * o[jj] * (1.0 - o[jj]);
                                dcs[jj] = dct * f[jj];
                                dhs[jj] = 0.0;
                            }
                            for (q, d) in das.iter().enumerate() {
                                unsafe { dgx_p.range(row * g + q * hd + j0, wd) }
                                    .copy_from_slice(d);
                            }
                        }
                        Cell::Gru => {
                            let (r, z, nv) = (gq(0), gq(1), gq(2));
                            let hprev = &saved.hprev[row * hd + j0..][..wd];
                            let ahn = &saved.aux[row * hd + j0..][..wd];
                            let [dx0, dx1, dx2] = [0, 1, 2]
                                .map(|q| unsafe { dgx_p.range(row * g + q * hd + j0, wd) });
                            let [d0, d1, d2, _] = &mut das;
                            for jj in 0..wd {
                                let d = dhs[jj];
                                let dan = d * (1.0 - z[jj]) * (1.0 - nv[jj] * nv[jj]);
                                let dar = dan * ahn[jj] * r[jj] * (1.0 - r[jj]);
                                let daz = d * (hprev[jj] - nv[jj]) * z[jj] * (1.0 - z[jj]);
                                (dx0[jj], dx1[jj], dx2[jj]) = (dar, daz, dan);
                                (d0[jj], d1[jj], d2[jj]) = (dar, daz, dan * r[jj]);
                                dhs[jj] = d * z[jj];
                            }
                            for (q, d) in das[..3].iter().enumerate() {
                                unsafe { dall_p.range(row * g + q * hd + j0, wd) }
                                    .copy_from_slice(d);
                            }
                        }
                    }
                }
                barrier.wait();
                // dh of the previous step: what flows back through W_hh to this worker's units
                // (running sequences only).
                let dbuf = &mut dhbuf[..n * wd];
                // SAFETY: after the barrier nobody writes this step's gate gradients.
                let dak = unsafe { da.head(n * g) };
                matmul_on(None, dbuf, false, dak, false, &wc, false, (n, wd, g), 1.0);
                for (i, &s) in act.iter().enumerate() {
                    unsafe { dh_p.range(s * hd + j0, wd) }
                        .iter_mut()
                        .zip(&dbuf[i * wd..][..wd])
                        .for_each(|(a, d)| *a += d);
                }
            }
        });
    }
    let dah_all = if spec.cell == Cell::Gru {
        &dah_all
    } else {
        &dgx
    };
    if let Some(dw) = dw {
        matmul(
            dw,
            true,
            dah_all,
            true,
            &saved.hprev,
            false,
            (g, hd, layout.rows),
            1.0,
        );
    }
    let mut db = vec![0f32; g];
    for row in dah_all.chunks_exact(g) {
        db.iter_mut().zip(row).for_each(|(a, d)| *a += d);
    }
    (dgx, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Split across workers (each its own units, meeting once per step) the recurrence gives
    /// what one worker gives: forward outputs, final states and every gradient, for both
    /// cells and directions, with sequences ending at different steps.
    #[test]
    fn workers_agree_with_one_worker() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for cell in [Cell::Lstm, Cell::Gru] {
            for reverse in [false, true] {
                let (hd, b) = (40, 5);
                let g = cell.gates() * hd;
                let spec = RecurrentSpec {
                    cell,
                    hidden: hd,
                    reverse,
                };
                let lengths = [7, 3, 7, 0, 5];
                let starts: Vec<usize> = (0..b).map(|s| s * 7).collect();
                let l = Layout {
                    starts: &starts,
                    lengths: &lengths,
                    rows: b * 7,
                };
                let gx = rand(l.rows * g, 1);
                let w = rand(g * hd, 2).iter().map(|v| v * 0.3).collect::<Vec<_>>();
                let bh = rand(g, 3);
                let dy = rand(l.rows * hd, 4);
                // W_hh as training stores it, and transposed as inference stores it.
                let wt: Vec<f32> = (0..hd * g).map(|i| w[(i % g) * hd + i / g]).collect();
                let run = |parts: usize, transposed: bool| {
                    let mut st = start_state(cell, b, hd);
                    let hh = Hidden {
                        w: if transposed { &wt } else { &w },
                        transposed,
                        b: Some(&bh),
                    };
                    let (y, saved) = forward_on(parts, spec, &gx, hh, &mut st, &l, true);
                    let mut dw = vec![0f32; g * hd];
                    let (dgx, db) =
                        backward_on(parts, spec, &dy, &saved.unwrap(), &w, &l, Some(&mut dw));
                    [y, st.h, st.c, dgx, db, dw]
                };
                let one = run(1, false);
                for (parts, transposed) in [(2, false), (3, false), (2, true)] {
                    let many = pool.install(|| run(parts, transposed));
                    for (k, (a, b)) in one.iter().zip(&many).enumerate() {
                        assert_eq!(a.len(), b.len());
                        for (i, (x, y)) in a.iter().zip(b).enumerate() {
                            assert!(
                                (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                                "{cell:?} reverse={reverse} parts={parts} transposed={transposed} \
                                 output {k}[{i}]: {x} vs {y}"
                            );
                        }
                    }
                }
            }
        }
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1.6
            })
            .collect()
    }

    /// A fixed nonzero state for `b` sequences.
    fn start_state(cell: Cell, b: usize, hd: usize) -> State {
        State {
            h: rand(b * hd, 5),
            c: if cell == Cell::Lstm {
                rand(b * hd, 6)
            } else {
                Vec::new()
            },
        }
    }

    /// Σ y·r for the given gx and W_hh, from a fixed nonzero state.
    fn loss(spec: RecurrentSpec, gx: &[f32], w: &[f32], bh: &[f32], l: &Layout, r: &[f32]) -> f64 {
        let mut st = start_state(spec.cell, l.lengths.len(), spec.hidden);
        let hh = Hidden {
            w,
            transposed: false,
            b: Some(bh),
        };
        let (y, _) = forward(spec, gx, hh, &mut st, l, false);
        y.iter().zip(r).map(|(a, b)| (a * b) as f64).sum()
    }

    /// BPTT against central differences, both directions, sequences of different lengths
    /// (padding rows carry no gradient).
    #[test]
    fn bptt_matches_finite_differences() {
        for cell in [Cell::Lstm, Cell::Gru] {
            for reverse in [false, true] {
                let hd = 3;
                let g = cell.gates() * hd;
                let spec = RecurrentSpec {
                    cell,
                    hidden: hd,
                    reverse,
                };
                let (starts, lengths) = ([0, 5], [5, 3]);
                let l = Layout {
                    starts: &starts,
                    lengths: &lengths,
                    rows: 10,
                };
                let gx = rand(10 * g, 1);
                let w = rand(g * hd, 2);
                let bh = rand(g, 3);
                let r = rand(10 * hd, 4);
                let mut st = start_state(cell, 2, hd);
                let hh = Hidden {
                    w: &w,
                    transposed: false,
                    b: Some(&bh),
                };
                let (_, saved) = forward(spec, &gx, hh, &mut st, &l, true);
                let mut dw = vec![0f32; g * hd];
                let (dgx, db) = backward(spec, &r, &saved.unwrap(), &w, &l, Some(&mut dw));
                let eps = 1e-2f32;
                let fd = |f: &dyn Fn(f32) -> f64| ((f(eps) - f(-eps)) / (2.0 * eps as f64)) as f32;
                let check = |what: &str, i: usize, got: f32, want: f32| {
                    assert!(
                        (got - want).abs() <= 2e-3 + 2e-2 * want.abs(),
                        "{cell:?} reverse={reverse} d{what}[{i}]: {got} vs finite difference {want}"
                    );
                };
                for i in 0..gx.len() {
                    let want = fd(&|e| {
                        let mut x = gx.clone();
                        x[i] += e;
                        loss(spec, &x, &w, &bh, &l, &r)
                    });
                    // Rows 8 and 9 are the second sequence's padding.
                    if i / g >= 8 {
                        assert_eq!(dgx[i], 0.0);
                    }
                    check("gx", i, dgx[i], want);
                }
                for i in 0..w.len() {
                    let want = fd(&|e| {
                        let mut w2 = w.clone();
                        w2[i] += e;
                        loss(spec, &gx, &w2, &bh, &l, &r)
                    });
                    check("W_hh", i, dw[i], want);
                }
                for i in 0..bh.len() {
                    let want = fd(&|e| {
                        let mut b2 = bh.clone();
                        b2[i] += e;
                        loss(spec, &gx, &w, &b2, &l, &r)
                    });
                    check("b_hh", i, db[i], want);
                }
            }
        }
    }
}
