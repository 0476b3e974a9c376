//! Recurrent layers as PyTorch's `nn.LSTM` and `nn.GRU` compute them (gate order, where the
//! hidden bias sits), forward and back-propagation through time, on row-major f32 buffers.
//!
//! Both executors run a layer through here: inference without saving anything, training
//! saving what [`backward`] reads. The input projection `gx = x·W_ihᵀ + b_ih` of every
//! position is an ordinary linear op before the recurrence (one GEMM for all positions); only
//! `h·W_hhᵀ + b_hh` runs step by step, as one small GEMM over the batch's sequences per step.

use serde::{Deserialize, Serialize};

use super::kernels::{exp, matmul, tanh};

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
    let (hd, g) = (spec.hidden, spec.cell.gates() * spec.hidden);
    let b = layout.lengths.len();
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
    let mut a = vec![0f32; b * g];
    // Only the sequences still running take part in a step's product (texts of different
    // lengths in one batch: the padding costs nothing), as PyTorch's packed sequences do.
    let (mut act, mut hbuf) = (Vec::with_capacity(b), Vec::new());
    for k in 0..layout.steps() {
        let prefix = layout.active(k, &mut act);
        let n = act.len();
        let a = &mut a[..n * g];
        match hh.b {
            Some(bias) => a.chunks_mut(g).for_each(|r| r.copy_from_slice(bias)),
            None => a.fill(0.0),
        }
        let hin: &[f32] = if prefix {
            &state.h[..n * hd]
        } else {
            hbuf.clear();
            for &s in &act {
                hbuf.extend_from_slice(&state.h[s * hd..][..hd]);
            }
            &hbuf
        };
        matmul(a, true, hin, false, hh.w, !hh.transposed, (n, g, hd), 1.0);
        for (i, &s) in act.iter().enumerate() {
            let Some(row) = layout.row(s, k, spec.reverse) else {
                continue;
            };
            let x = &gx[row * g..][..g];
            let ah = &a[i * g..][..g];
            let h = &mut state.h[s * hd..][..hd];
            let y = &mut out[row * hd..][..hd];
            match spec.cell {
                Cell::Lstm => {
                    let c = &mut state.c[s * hd..][..hd];
                    if let Some(sv) = saved.as_mut() {
                        sv.hprev[row * hd..][..hd].copy_from_slice(h);
                        sv.cprev[row * hd..][..hd].copy_from_slice(c);
                    }
                    let gates = saved.as_mut().map(|sv| &mut sv.gates[row * g..][..g]);
                    lstm_step(x, ah, h, c, y, hd, gates);
                }
                Cell::Gru => {
                    if let Some(sv) = saved.as_mut() {
                        sv.hprev[row * hd..][..hd].copy_from_slice(h);
                        sv.aux[row * hd..][..hd].copy_from_slice(&ah[2 * hd..]);
                    }
                    let gates = saved.as_mut().map(|sv| &mut sv.gates[row * g..][..g]);
                    gru_step(x, ah, h, y, hd, gates);
                }
            }
        }
    }
    (out, saved)
}

fn lstm_step(
    x: &[f32],
    ah: &[f32],
    h: &mut [f32],
    c: &mut [f32],
    y: &mut [f32],
    hd: usize,
    mut save: Option<&mut [f32]>,
) {
    for j in 0..hd {
        let i = sigmoid(x[j] + ah[j]);
        let f = sigmoid(x[hd + j] + ah[hd + j]);
        let gg = tanh(x[2 * hd + j] + ah[2 * hd + j]);
        let o = sigmoid(x[3 * hd + j] + ah[3 * hd + j]);
        c[j] = f * c[j] + i * gg;
        h[j] = o * tanh(c[j]);
        y[j] = h[j];
        if let Some(sv) = save.as_deref_mut() {
            sv[j] = i;
            sv[hd + j] = f;
            sv[2 * hd + j] = gg;
            sv[3 * hd + j] = o;
        }
    }
}

fn gru_step(
    x: &[f32],
    ah: &[f32],
    h: &mut [f32],
    y: &mut [f32],
    hd: usize,
    mut save: Option<&mut [f32]>,
) {
    for j in 0..hd {
        let r = sigmoid(x[j] + ah[j]);
        let z = sigmoid(x[hd + j] + ah[hd + j]);
        let n = tanh(x[2 * hd + j] + r * ah[2 * hd + j]);
        h[j] = (1.0 - z) * n + z * h[j];
        y[j] = h[j];
        if let Some(sv) = save.as_deref_mut() {
            sv[j] = r;
            sv[hd + j] = z;
            sv[2 * hd + j] = n;
        }
    }
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
    let (hd, g) = (spec.hidden, spec.cell.gates() * spec.hidden);
    let b = layout.lengths.len();
    let mut dgx = vec![0f32; layout.rows * g];
    // For a GRU the hidden side's gradient differs from the input side's in the n gate.
    let mut dah_all = if spec.cell == Cell::Gru {
        vec![0f32; layout.rows * g]
    } else {
        Vec::new()
    };
    let mut dh = vec![0f32; b * hd];
    let mut dc = vec![0f32; b * hd];
    let mut dah = vec![0f32; b * g];
    let (mut act, mut dhbuf) = (Vec::with_capacity(b), Vec::new());
    for k in (0..layout.steps()).rev() {
        let prefix = layout.active(k, &mut act);
        let n = act.len();
        for (i, &s) in act.iter().enumerate() {
            let Some(row) = layout.row(s, k, spec.reverse) else {
                continue;
            };
            let dhs = &mut dh[s * hd..][..hd];
            dhs.iter_mut()
                .zip(&dy[row * hd..][..hd])
                .for_each(|(a, d)| *a += d);
            let gates = &saved.gates[row * g..][..g];
            let da = &mut dah[i * g..][..g];
            match spec.cell {
                Cell::Lstm => {
                    let dcs = &mut dc[s * hd..][..hd];
                    let cprev = &saved.cprev[row * hd..][..hd];
                    for j in 0..hd {
                        let (i, f, gg, o) = (
                            gates[j],
                            gates[hd + j],
                            gates[2 * hd + j],
                            gates[3 * hd + j],
                        );
                        let c = f * cprev[j] + i * gg;
                        let tc = tanh(c);
                        let dct = dcs[j] + dhs[j] * o * (1.0 - tc * tc);
                        da[j] = dct * gg * i * (1.0 - i);
                        da[hd + j] = dct * cprev[j] * f * (1.0 - f);
                        da[2 * hd + j] = dct * i * (1.0 - gg * gg);
                        da[3 * hd + j] = dhs[j] * tc * o * (1.0 - o);
                        dcs[j] = dct * f;
                        dhs[j] = 0.0;
                    }
                    dgx[row * g..][..g].copy_from_slice(da);
                }
                Cell::Gru => {
                    let hprev = &saved.hprev[row * hd..][..hd];
                    let ahn = &saved.aux[row * hd..][..hd];
                    let dx = &mut dgx[row * g..][..g];
                    for j in 0..hd {
                        let (r, z, n) = (gates[j], gates[hd + j], gates[2 * hd + j]);
                        let d = dhs[j];
                        let dan = d * (1.0 - z) * (1.0 - n * n);
                        let dar = dan * ahn[j] * r * (1.0 - r);
                        let daz = d * (hprev[j] - n) * z * (1.0 - z);
                        dx[j] = dar;
                        dx[hd + j] = daz;
                        dx[2 * hd + j] = dan;
                        da[j] = dar;
                        da[hd + j] = daz;
                        da[2 * hd + j] = dan * r;
                        dhs[j] = d * z;
                    }
                    dah_all[row * g..][..g].copy_from_slice(da);
                }
            }
        }
        // dh of the previous step: what flows back through W_hh (running sequences only).
        let dah = &dah[..n * g];
        if prefix {
            matmul(
                &mut dh[..n * hd],
                true,
                dah,
                false,
                w,
                false,
                (n, hd, g),
                1.0,
            );
        } else {
            dhbuf.resize(n * hd, 0.0);
            matmul(&mut dhbuf, false, dah, false, w, false, (n, hd, g), 1.0);
            for (i, &s) in act.iter().enumerate() {
                dh[s * hd..][..hd]
                    .iter_mut()
                    .zip(&dhbuf[i * hd..][..hd])
                    .for_each(|(a, d)| *a += d);
            }
        }
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

    /// Σ y·r for the given gx and W_hh, from a fixed nonzero state.
    fn loss(spec: RecurrentSpec, gx: &[f32], w: &[f32], bh: &[f32], l: &Layout, r: &[f32]) -> f64 {
        let b = l.lengths.len();
        let mut st = State {
            h: rand(b * spec.hidden, 5),
            c: if spec.cell == Cell::Lstm {
                rand(b * spec.hidden, 6)
            } else {
                Vec::new()
            },
        };
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
                let mut st = State {
                    h: rand(2 * hd, 5),
                    c: if cell == Cell::Lstm {
                        rand(2 * hd, 6)
                    } else {
                        Vec::new()
                    },
                };
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
