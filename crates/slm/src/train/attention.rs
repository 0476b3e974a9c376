//! Multi-head attention for training: the forward pass keeping the probabilities, and its
//! hand-written backward, over `[b·t, heads·hd]` row-major buffers. One kernel serves every
//! family: causal or not, grouped-query heads, sliding windows, Gemma's scale and soft-cap,
//! T5's distance bias, and cross-attention (queries and keys of different lengths).

use rayon::prelude::*;

use crate::nn::kernels::softmax_in_place;

/// A raw pointer tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every task writes a region no other task touches (one sequence and head each).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}
impl Shared {
    fn at(self, off: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the buffer the pointer came from.
        unsafe { self.0.add(off) }
    }
}

/// Shapes of a multi-head attention of `b` sequences of `t` queries over `tk` keys (`t` for
/// self-attention, the source length for cross-attention); K/V heads are shared by `nh / nkv`
/// query heads (grouped-query attention).
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub tk: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub causal: bool,
    /// Sliding window (causal only): a query sees this many positions, itself included.
    pub window: Option<usize>,
    /// Dropout on the attention probabilities: rate and the step's seed. The mask is drawn
    /// again in the backward pass from the same counter-based stream, so it costs no memory.
    pub dropout: Option<(f32, u64)>,
    /// The scores' scale (`1/√hd` unless the family says otherwise).
    pub scale: f32,
    /// Scores soft-capped to `cap·tanh(s/cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

/// A learned bias added to the scores by key-minus-query distance (T5): `table` is
/// `[nh, 2·max_distance + 1]`, every farther key reading the entry of ±`max_distance`.
#[derive(Clone, Copy, Debug)]
pub struct Bias<'a> {
    pub table: &'a [f32],
    pub max_distance: usize,
}

impl Bias<'_> {
    fn width(&self) -> usize {
        2 * self.max_distance + 1
    }

    /// The column of the table for query `i`, key `j`.
    fn at(&self, i: usize, j: usize) -> usize {
        let d = self.max_distance as isize;
        ((j as isize - i as isize).clamp(-d, d) + d) as usize
    }

    /// Adds head `h`'s bias to the scores `[t, tk]` of one sequence.
    fn add(&self, h: usize, scores: &mut [f32], tk: usize) {
        let row = &self.table[h * self.width()..][..self.width()];
        for (i, s) in scores.chunks_mut(tk).enumerate() {
            s.iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v += row[self.at(i, j)]);
        }
    }
}

/// The dropout mask of the probabilities of sequence-and-head `i`, `[t, tk]`.
fn probs_mask(n: usize, (p, seed): (f32, u64), i: usize) -> Vec<f32> {
    super::params::dropout_mask(
        n,
        p,
        seed ^ (i as u64 + 1).wrapping_mul(0xd134_2543_de82_ef95),
    )
}

/// `scores = scale·q·kᵀ` of query head `h` and key head `kh` of sequence `sq`, `[t, tk]`.
///
/// # Safety
/// `q`, `k` must hold the `[b·t, nh·hd]` and `[b·tk, nkv·hd]` buffers `s` describes.
unsafe fn scores(out: &mut [f32], q: &[f32], k: &[f32], s: &AttnShape, sq: usize, h: usize) {
    let (qw, kw, kh) = (s.nh * s.hd, s.nkv * s.hd, h / (s.nh / s.nkv));
    gemm::gemm(
        s.t,
        s.tk,
        s.hd,
        out.as_mut_ptr(),
        1,
        s.tk as isize,
        false,
        q.as_ptr().add(sq * s.t * qw + h * s.hd),
        1,
        qw as isize,
        k.as_ptr().add(sq * s.tk * kw + kh * s.hd),
        kw as isize,
        1,
        0.0,
        s.scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `ctx = softmax(scale·q·kᵀ + bias + mask)·v` for every sequence and head. `q` is
/// `[b·t, nh·hd]`, `k` and `v` `[b·tk, nkv·hd]`; keys at positions ≥ `lengths[s]` are masked
/// (padding), and with `causal` keys after the query too. Returns `ctx` and the
/// probabilities `[b, nh, t, tk]`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lengths: &[usize],
    bias: Option<Bias>,
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>) {
    let AttnShape {
        b,
        t,
        tk,
        nh,
        nkv,
        hd,
        causal,
        window,
        dropout,
        softcap,
        ..
    } = s;
    let (qw, kw) = (nh * hd, nkv * hd);
    let mut probs = vec![0f32; b * nh * t * tk];
    let mut ctx = vec![0f32; b * t * qw];
    let out = Shared(ctx.as_mut_ptr());
    probs.par_chunks_mut(t * tk).enumerate().for_each(|(i, p)| {
        let (sq, h) = (i / nh, i % nh);
        let kh = h / (nh / nkv);
        let len = lengths[sq];
        // SAFETY: the views address sequence `sq`, head `h` (or its K/V head) inside the
        // buffers; each task writes only its own head's columns of `ctx`.
        unsafe {
            scores(p, q, k, &s, sq, h);
            if let Some(bias) = &bias {
                bias.add(h, p, tk);
            }
            for (r, row) in p.chunks_mut(tk).enumerate() {
                let end = if causal {
                    (r + 1).min(len.max(1))
                } else {
                    len.max(1)
                };
                let start = match window {
                    Some(w) if causal => (r + 1).saturating_sub(w).min(end - 1),
                    _ => 0,
                };
                row[end..].fill(0.0);
                row[..start].fill(0.0);
                if let Some(cap) = softcap {
                    row[start..end]
                        .iter_mut()
                        .for_each(|s| *s = cap * (*s / cap).tanh());
                }
                softmax_in_place(&mut row[start..end]);
            }
            let dropped: Option<Vec<f32>> = dropout.map(|d| {
                let m = probs_mask(t * tk, d, i);
                p.iter().zip(&m).map(|(a, b)| a * b).collect()
            });
            let pv = dropped.as_deref().unwrap_or(p);
            gemm::gemm(
                t,
                hd,
                tk,
                out.at(sq * t * qw + h * hd),
                1,
                qw as isize,
                false,
                pv.as_ptr(),
                1,
                tk as isize,
                v.as_ptr().add(sq * tk * kw + kh * hd),
                1,
                kw as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    (ctx, probs)
}

/// The gradients of one attention: of Q, K, V and, with a bias, of its table.
pub struct AttnGrads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub dbias: Option<Vec<f32>>,
}

/// Backward of [`attention`]. K/V heads shared by several query heads sum their gradients;
/// the tasks of one K/V group run together so no two write the same rows. Each task sums
/// its own bias gradient, added up in task order afterwards (repeatable).
pub fn attention_backward(
    dctx: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    bias: Option<Bias>,
    s: AttnShape,
) -> AttnGrads {
    let AttnShape {
        b,
        t,
        tk,
        nh,
        nkv,
        hd,
        dropout,
        scale,
        softcap,
        ..
    } = s;
    let (qw, kw) = (nh * hd, nkv * hd);
    let group = nh / nkv;
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    let (pq, pk, pv) = (
        Shared(dq.as_mut_ptr()),
        Shared(dk.as_mut_ptr()),
        Shared(dv.as_mut_ptr()),
    );
    let partial: Vec<Vec<f32>> = (0..b * nkv)
        .into_par_iter()
        .map(|i| {
            let (sq, kh) = (i / nkv, i % nkv);
            let mut dbias = bias.map_or(Vec::new(), |bs| vec![0f32; nh * bs.width()]);
            let mut dp = vec![0f32; t * tk];
            for h in kh * group..(kh + 1) * group {
                let p = &probs[(sq * nh + h) * t * tk..][..t * tk];
                let mask = dropout.map(|d| probs_mask(t * tk, d, sq * nh + h));
                let dropped: Option<Vec<f32>> = mask
                    .as_ref()
                    .map(|m| p.iter().zip(m).map(|(a, b)| a * b).collect());
                let p_used = dropped.as_deref().unwrap_or(p);
                let (qo, ko) = (sq * t * qw + h * hd, sq * tk * kw + kh * hd);
                // SAFETY: task (sq, kh) alone writes the rows of sequence sq in K/V head kh
                // and in its query heads; every view stays inside its buffer.
                unsafe {
                    // dP = dctx · vᵀ
                    gemm::gemm(
                        t,
                        tk,
                        hd,
                        dp.as_mut_ptr(),
                        1,
                        tk as isize,
                        false,
                        dctx.as_ptr().add(qo),
                        1,
                        qw as isize,
                        v.as_ptr().add(ko),
                        kw as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    // dv += Pᵀ · dctx
                    gemm::gemm(
                        tk,
                        hd,
                        t,
                        pv.at(ko),
                        1,
                        kw as isize,
                        true,
                        p_used.as_ptr(),
                        tk as isize,
                        1,
                        dctx.as_ptr().add(qo),
                        1,
                        qw as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                // Through the dropout: dP = dP' ⊙ mask.
                if let Some(m) = &mask {
                    dp.iter_mut().zip(m).for_each(|(d, m)| *d *= m);
                }
                // dS = P ⊙ (dP − Σ dP⊙P), the gradient of the scores the softmax read.
                for (dr, pr) in dp.chunks_mut(tk).zip(p.chunks(tk)) {
                    let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    dr.iter_mut().zip(pr).for_each(|(d, p)| *d = p * (*d - dot));
                }
                // Through the soft-cap: × (1 − tanh²), from the scores computed again.
                if let Some(cap) = softcap {
                    let mut raw = vec![0f32; t * tk];
                    // SAFETY: the same views of q and k as the forward pass.
                    unsafe { scores(&mut raw, q, k, &s, sq, h) };
                    if let Some(bias) = &bias {
                        bias.add(h, &mut raw, tk);
                    }
                    dp.iter_mut().zip(&raw).for_each(|(d, r)| {
                        let c = (r / cap).tanh();
                        *d *= 1.0 - c * c;
                    });
                }
                if let Some(bs) = &bias {
                    let row = &mut dbias[h * bs.width()..][..bs.width()];
                    for (i, dr) in dp.chunks(tk).enumerate() {
                        dr.iter()
                            .enumerate()
                            .for_each(|(j, d)| row[bs.at(i, j)] += d);
                    }
                }
                // SAFETY: as above.
                unsafe {
                    // dq = scale · dS · k
                    gemm::gemm(
                        t,
                        hd,
                        tk,
                        pq.at(qo),
                        1,
                        qw as isize,
                        false,
                        dp.as_ptr(),
                        1,
                        tk as isize,
                        k.as_ptr().add(ko),
                        1,
                        kw as isize,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    // dk += scale · dSᵀ · q
                    gemm::gemm(
                        tk,
                        hd,
                        t,
                        pk.at(ko),
                        1,
                        kw as isize,
                        true,
                        dp.as_ptr(),
                        tk as isize,
                        1,
                        q.as_ptr().add(qo),
                        1,
                        qw as isize,
                        1.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            dbias
        })
        .collect();
    let dbias = bias.map(|_| {
        let mut sum = partial[0].clone();
        for p in &partial[1..] {
            sum.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        sum
    });
    AttnGrads { dq, dk, dv, dbias }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::ops::tests::{check, dot, rand};

    /// Checks the gradients of one attention against finite differences of `⟨ctx, r⟩`.
    fn check_attention(s: AttnShape, lengths: &[usize], table: Option<(Vec<f32>, usize)>) {
        let (qn, kn) = (s.b * s.t * s.nh * s.hd, s.b * s.tk * s.nkv * s.hd);
        let (mut q, mut k, mut v) = (rand(qn, 13), rand(kn, 14), rand(kn, 15));
        let mut r = rand(qn, 16);
        // Padded query rows of the self-attention's second sequence feed nothing downstream.
        if s.t == s.tk {
            r[(s.t + 3) * s.nh * s.hd..(s.t + 4) * s.nh * s.hd].fill(0.0);
        }
        let mut tb = table.as_ref().map(|t| t.0.clone()).unwrap_or_default();
        let d = table.as_ref().map_or(0, |t| t.1);
        let on = table.is_some();
        fn bias(tb: &[f32], d: usize, on: bool) -> Option<Bias<'_>> {
            on.then_some(Bias {
                table: tb,
                max_distance: d,
            })
        }
        let (_, probs) = attention(&q, &k, &v, lengths, bias(&tb, d, on), s);
        let g = attention_backward(&r, &q, &k, &v, &probs, bias(&tb, d, on), s);
        let (q0, k0, v0, t0) = (q.clone(), k.clone(), v.clone(), tb.clone());
        check("dq", &mut q, &g.dq, |q| {
            dot(&attention(q, &k0, &v0, lengths, bias(&t0, d, on), s).0, &r)
        });
        check("dk", &mut k, &g.dk, |k| {
            dot(&attention(&q0, k, &v0, lengths, bias(&t0, d, on), s).0, &r)
        });
        check("dv", &mut v, &g.dv, |v| {
            dot(&attention(&q0, &k0, v, lengths, bias(&t0, d, on), s).0, &r)
        });
        if let Some(db) = &g.dbias {
            check("dbias", &mut tb, db, |tb| {
                dot(&attention(&q0, &k0, &v0, lengths, bias(tb, d, on), s).0, &r)
            });
        }
    }

    fn shape(t: usize, tk: usize, nkv: usize, causal: bool) -> AttnShape {
        AttnShape {
            b: 2,
            t,
            tk,
            nh: 2,
            nkv,
            hd: 3,
            causal,
            window: None,
            dropout: None,
            scale: 1.0 / 3f32.sqrt(),
            softcap: None,
        }
    }

    #[test]
    fn attention_gradients_match_finite_differences() {
        // The last two: Gemma's own scale, and Gemma 2's soft-capped scores (a cap small
        // enough to bend them).
        for (causal, nkv, window, dropout, scale, softcap) in [
            (false, 2, None, None, None, None),
            (true, 1, None, None, None, None),
            (true, 2, Some(2), None, None, None),
            (true, 2, None, Some((0.3, 7)), None, None),
            (true, 2, Some(3), None, Some(0.8), None),
            (true, 1, Some(2), None, Some(0.9), Some(0.7)),
        ] {
            let s = AttnShape {
                window,
                dropout,
                scale: scale.unwrap_or(1.0 / 3f32.sqrt()),
                softcap,
                ..shape(4, 4, nkv, causal)
            };
            check_attention(s, &[4, 3], None);
        }
    }

    #[test]
    fn biased_and_cross_attention_gradients_match_finite_differences() {
        // T5: unscaled scores plus a distance bias (max distance 2, so far keys share the
        // clamped entries), causal and not.
        for causal in [false, true] {
            let s = AttnShape {
                scale: 1.0,
                ..shape(4, 4, 2, causal)
            };
            check_attention(s, &[4, 3], Some((rand(2 * 5, 21), 2)));
        }
        // With a soft-cap over biased scores too.
        let s = AttnShape {
            softcap: Some(0.6),
            ..shape(4, 4, 1, true)
        };
        check_attention(s, &[4, 3], Some((rand(2 * 5, 22), 2)));
        // Cross-attention: 3 decoder queries over 5 source keys, the second source padded.
        check_attention(shape(3, 5, 2, false), &[5, 2], None);
    }
}
