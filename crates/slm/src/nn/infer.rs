//! The inference executor: a family's forward pass on the inference kernels (quantized
//! products, fused GEMMs, the cached-keys attention kernel), one sequence at a time, with the
//! KV cache held by the caller so one loaded model could serve several sessions.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::exec::{
    array, AttnSpec, Exec, Loader, NormKind, Parts, Pool, RelativePositions, Rows, Weights,
};
use super::recurrent::{self, Hidden, Layout, RecurrentSpec, State};
use super::{attention, kernels, Activation, Embedding, LayerNorm, Linear, Norm, RmsNorm, Vb};
use crate::error::{Error, Result};

/// Inference weights: dense or block-quantized `Linear`s, as loaded.
pub struct InferW;

impl Weights for InferW {
    type Linear = Linear;
    type Norm = Norm;
    type Embedding = Embedding;
}

/// An activation `[1, t, width]`.
#[derive(Clone)]
pub enum Act {
    Full(Tensor),
    /// Columns of a fused projection's output, not copied out yet: attention and GLU read
    /// Q|K|V and gate|up straight from the fused buffer, in one pass.
    Part {
        whole: Tensor,
        widths: Arc<[usize]>,
        index: usize,
    },
}

impl Act {
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Act::Full(t) => Ok(t.clone()),
            Act::Part {
                whole,
                widths,
                index,
            } => {
                let offset: usize = widths[..*index].iter().sum();
                let d = whole.rank() - 1;
                Ok(whole.narrow(d, offset, widths[*index])?.contiguous()?)
            }
        }
    }

    /// The fused output when `parts` are all its parts, in order.
    fn fused<'a>(parts: &[&'a Act]) -> Option<(&'a Tensor, &'a [usize])> {
        let mut found: Option<(&Tensor, &[usize])> = None;
        for (i, p) in parts.iter().enumerate() {
            let Act::Part {
                whole,
                widths,
                index,
            } = p
            else {
                return None;
            };
            if *index != i || widths.len() != parts.len() {
                return None;
            }
            match found {
                None => found = Some((whole, widths)),
                Some((w, _)) if w.id() == whole.id() => {}
                Some(_) => return None,
            }
        }
        found
    }
}

/// Keys and values of one layer, `[nkv, cap, hd]` with spare capacity that doubles when
/// full, so a decoded token writes its rows instead of copying the whole cache.
///
/// A recurrent layer keeps its state here instead: `h` in `k`, `c` in `v`, after `len`
/// positions.
#[derive(Clone, Default)]
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    cap: usize,
    len: usize,
    recurrent: bool,
    /// A cross-attention layer's keys and values of the encoder's states, made at the first
    /// decoding step and shared by every beam of that source.
    cross: Option<Arc<CrossKv>>,
}

/// Keys and values of a source, `[nkv, len, hd]` each.
struct CrossKv {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position from `len` on (a server reusing a cached prompt prefix); returns
    /// the positions kept. A recurrent state cannot forget its last positions: it is kept
    /// whole or cleared.
    pub fn truncate(&mut self, len: usize) -> usize {
        if len == 0 {
            self.cross = None;
        }
        self.len = if self.recurrent && len < self.len {
            0
        } else {
            self.len.min(len)
        };
        self.len
    }

    /// The `(h, c)` a recurrent layer left, None before the first position.
    fn recurrent_state(&self) -> Option<(&[f32], &[f32])> {
        (self.len > 0).then_some((&self.k[..], &self.v[..]))
    }

    fn set_recurrent_state(&mut self, h: &[f32], c: &[f32], t: usize) {
        self.k.clear();
        self.k.extend_from_slice(h);
        self.v.clear();
        self.v.extend_from_slice(c);
        self.len += t;
        self.recurrent = true;
    }

    /// The keys and values held, as the attention kernel reads them.
    pub(super) fn view(&self) -> attention::KeyView<'_> {
        attention::KeyView {
            k: &self.k,
            v: &self.v,
            cap: self.cap,
            len: self.len,
            k_tiled: true,
        }
    }

    /// Appends `t` positions of `k`, `v` (`[heads, t, hd]`). V keeps a row per position; K goes
    /// into tiles of 16 positions stored by dimension (see `attention::KeyView`).
    pub(super) fn append(&mut self, k: &[f32], v: &[f32], heads: usize, t: usize, hd: usize) {
        const L: usize = attention::KEY_TILE;
        if self.len == 0 {
            *self = KvCache::default();
        }
        let need = self.len + t;
        if need > self.cap {
            // Small first capacity: the reference tests then cross a growth step.
            let cap = need.max(2 * self.cap).max(16).next_multiple_of(L);
            // Each head's first positions (whole tiles of K) keep their place in the head.
            let n = self.len.next_multiple_of(L) * hd;
            let grow = |old: &[f32]| {
                let mut new = vec![0f32; heads * cap * hd];
                for h in 0..heads {
                    new[h * cap * hd..][..n].copy_from_slice(&old[h * self.cap * hd..][..n]);
                }
                new
            };
            self.k = grow(&self.k);
            self.v = grow(&self.v);
            self.cap = cap;
        }
        for h in 0..heads {
            let dst = (h * self.cap + self.len) * hd;
            let src = h * t * hd;
            self.v[dst..dst + t * hd].copy_from_slice(&v[src..src + t * hd]);
            let head = &mut self.k[h * self.cap * hd..][..self.cap * hd];
            for (i, row) in k[src..src + t * hd].chunks_exact(hd).enumerate() {
                let p = self.len + i;
                let tile = &mut head[p / L * L * hd..][..L * hd];
                for (d, &x) in row.iter().enumerate() {
                    tile[d * L + p % L] = x;
                }
            }
        }
        self.len = need;
    }
}

/// One sequence of a decoder batch: its new tokens run at positions `pos..pos + t` over its
/// own KV cache.
struct Seq<'a> {
    cache: &'a mut [KvCache],
    pos: usize,
    t: usize,
}

/// Runs a decoder's new tokens over their KV caches, or an encoder's batch of right-padded
/// sequences of `t` tokens. A decoder batch holds one or more sequences, their rows stacked
/// as `[1, Σt, width]` (llama.cpp's unified batch): every product reads its weights once for
/// all of them, and only attention and positions look at which sequence a row belongs to.
pub struct Infer<'a> {
    seqs: Vec<Seq<'a>>,
    /// Rows of the activations: Σt for a decoder batch, each sequence's length for an encoder.
    t: usize,
    /// Encoder batches: each sequence's length (keys past it are padding).
    lengths: Vec<usize>,
}

impl<'a> Infer<'a> {
    /// `cache` holds one entry per layer, each with exactly `pos` positions.
    pub fn new(cache: &'a mut [KvCache], pos: usize, t: usize) -> Result<Self> {
        Self::batch(vec![(cache, t)]).and_then(|e| {
            if e.seqs[0].pos != pos {
                return Err(Error::msg(format!(
                    "internal: the KV cache holds {} positions, forward called at {pos}",
                    e.seqs[0].pos
                )));
            }
            Ok(e)
        })
    }

    /// Several sequences at once, each `(cache, t)` running `t` new tokens after what its
    /// cache holds; the ids given to the family are the sequences' ids one after another.
    pub fn batch(seqs: Vec<(&'a mut [KvCache], usize)>) -> Result<Self> {
        let mut out = Vec::with_capacity(seqs.len());
        for (cache, t) in seqs {
            let pos = cache.first().map_or(0, |c| c.len);
            if let Some(c) = cache.iter().find(|c| c.cross.is_none() && c.len != pos) {
                return Err(Error::msg(format!(
                    "internal: the layers' KV caches hold {} and {pos} positions",
                    c.len
                )));
            }
            if t == 0 {
                return Err(Error::msg("internal: a sequence without new tokens"));
            }
            out.push(Seq { cache, pos, t });
        }
        let t = out.iter().map(|s| s.t).sum();
        Ok(Self {
            seqs: out,
            t,
            lengths: vec![t],
        })
    }

    /// An encoder batch: sequences of `lengths`, padded to `t`.
    pub fn encoder(lengths: &[usize], t: usize) -> Infer<'static> {
        Infer {
            seqs: Vec::new(),
            t,
            lengths: lengths.to_vec(),
        }
    }

    fn b(&self) -> usize {
        self.lengths.len()
    }

    fn table_rows(&self, e: &Embedding, ids: &[u32], b: usize) -> Result<Act> {
        let ids = Tensor::new(ids, &Device::Cpu)?.reshape((b, ids.len() / b.max(1)))?;
        Ok(Act::Full(e.forward(&ids)?))
    }
}

impl Act {
    /// Rows `start..start + len` of `[1, t, w]`, a fused output staying fused.
    fn rows(&self, start: usize, len: usize) -> Result<Act> {
        Ok(match self {
            Act::Full(t) => Act::Full(t.narrow(1, start, len)?),
            Act::Part {
                whole,
                widths,
                index,
            } => Act::Part {
                whole: whole.narrow(1, start, len)?,
                widths: widths.clone(),
                index: *index,
            },
        })
    }
}

impl Infer<'_> {
    /// Causal attention of each sequence over its cache, or an encoder's bidirectional one.
    fn self_attention(
        &mut self,
        a: &AttnSpec,
        layer: usize,
        q: Act,
        k: Act,
        v: Act,
        bias: Option<&Act>,
    ) -> Result<Act> {
        if !a.causal {
            return self.bidirectional(a, q, k, v, bias);
        }
        let bias = bias.map(|b| b.tensor()).transpose()?;
        if let [seq] = self.seqs.as_mut_slice() {
            return cached_attention(a, layer, seq, q, k, v, bias.as_ref());
        }
        let mut start = 0;
        let mut ys = Vec::with_capacity(self.seqs.len());
        for seq in self.seqs.iter_mut() {
            let n = seq.t;
            let part = |x: &Act| x.rows(start, n);
            let y = cached_attention(
                a,
                layer,
                seq,
                part(&q)?,
                part(&k)?,
                part(&v)?,
                bias.as_ref(),
            )?;
            ys.push(y.tensor()?);
            start += n;
        }
        Ok(Act::Full(Tensor::cat(&ys, 1)?))
    }

    /// Where each sequence's rows are: padded rows of `t` in an encoder batch, one after
    /// another in a decoder batch.
    fn spans(&self) -> (Vec<usize>, Vec<usize>) {
        if self.seqs.is_empty() {
            (
                (0..self.b()).map(|s| s * self.t).collect(),
                self.lengths.clone(),
            )
        } else {
            let mut start = 0;
            self.seqs
                .iter()
                .map(|s| {
                    start += s.t;
                    (start - s.t, s.t)
                })
                .unzip()
        }
    }

    /// Encoder self-attention: every query sees its sequence's non-padding keys. The kernel
    /// reads Q|K|V side by side from one `[b, t, (nh + 2·nkv)·hd]` buffer.
    fn bidirectional(
        &self,
        a: &AttnSpec,
        q: Act,
        k: Act,
        v: Act,
        bias: Option<&Act>,
    ) -> Result<Act> {
        let (nh, nkv, hd, t, b) = (a.n_heads, a.n_kv_heads, a.head_dim, self.t, self.b());
        if a.rope.is_some() {
            return Err(Error::msg("internal: rotary embeddings in an encoder"));
        }
        let widths = [nh * hd, nkv * hd, nkv * hd];
        let fused = match Act::fused(&[&q, &k, &v]).filter(|(_, w)| *w == widths) {
            Some((whole, _)) => whole.clone(),
            None => Tensor::cat(&[q.tensor()?, k.tensor()?, v.tensor()?], 2)?.contiguous()?,
        };
        let lengths = &self.lengths;
        let bias = bias.map(|b| b.tensor()).transpose()?;
        let y = with_bias(bias.as_ref(), |bias| {
            kernels::with_f32(&fused, |s| {
                attention::bidirectional_attention(s, t, nh, nkv, hd, lengths, a.scores(), bias)
            })
        })??;
        Ok(Act::Full(kernels::tensor(y, vec![b, t, nh * hd])?))
    }
}

/// `f` given the relative biases of `bias` (`[heads, 2d + 1]`), if any.
fn with_bias<R>(
    bias: Option<&Tensor>,
    f: impl FnOnce(Option<attention::RelBias>) -> R,
) -> Result<R> {
    match bias {
        None => Ok(f(None)),
        Some(b) => {
            let d = (b.dim(1)? - 1) / 2;
            kernels::with_f32(b, |table| f(Some(attention::RelBias { table, d })))
        }
    }
}

/// `[1, t, n·hd]` to `[1, n, t, hd]`.
fn heads(x: &Act, n: usize, hd: usize) -> Result<Tensor> {
    let x = x.tensor()?;
    let t = x.dim(1)?;
    Ok(x.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()?)
}

impl Exec for Infer<'_> {
    type W = InferW;
    type X = Act;

    fn embed(&mut self, e: &Embedding, ids: &[u32]) -> Result<Act> {
        self.table_rows(e, ids, self.b())
    }

    fn positions(&mut self, e: &Embedding, offset: usize) -> Result<Act> {
        // One row per position, broadcast over an encoder batch by `add`.
        let positions: Vec<u32> = if self.seqs.is_empty() {
            (offset as u32..(offset + self.t) as u32).collect()
        } else {
            self.seqs
                .iter()
                .flat_map(|s| (s.pos + offset) as u32..(s.pos + offset + s.t) as u32)
                .collect()
        };
        self.table_rows(e, &positions, 1)
    }

    fn linear(&mut self, l: &Linear, x: &Act, act: Option<Activation>) -> Result<Act> {
        Ok(Act::Full(l.forward_act(&x.tensor()?, act)?))
    }

    fn parts<const N: usize>(&mut self, p: &Parts<Linear>, x: &Act) -> Result<[Act; N]> {
        let x = x.tensor()?;
        array(match p {
            Parts::Fused(l, widths) => {
                let whole = l.forward(&x)?;
                let widths: Arc<[usize]> = widths.clone().into();
                (0..widths.len())
                    .map(|index| Act::Part {
                        whole: whole.clone(),
                        widths: widths.clone(),
                        index,
                    })
                    .collect()
            }
            Parts::Separate(ls) => ls
                .iter()
                .map(|l| Ok(Act::Full(l.forward(&x)?)))
                .collect::<Result<_>>()?,
        })
    }

    fn norm(&mut self, n: &Norm, x: &Act) -> Result<Act> {
        Ok(Act::Full(n.forward(&x.tensor()?)?))
    }

    fn norm_heads(&mut self, n: &Norm, x: Act) -> Result<Act> {
        let x = x.tensor()?;
        let dims = x.dims().to_vec();
        let size = n.size()?;
        let rows = x.reshape((x.elem_count() / size, size))?;
        Ok(Act::Full(n.forward(&rows)?.reshape(dims)?))
    }

    fn scale(&mut self, x: Act, s: f32) -> Result<Act> {
        Ok(Act::Full(x.tensor()?.affine(s as f64, 0.0)?))
    }

    fn softcap(&mut self, x: Act, cap: f32) -> Result<Act> {
        let x = x.tensor()?;
        Ok(Act::Full(
            x.affine(1.0 / cap as f64, 0.0)?
                .tanh()?
                .affine(cap as f64, 0.0)?,
        ))
    }

    fn add(&mut self, a: Act, b: Act) -> Result<Act> {
        Ok(Act::Full(a.tensor()?.broadcast_add(&b.tensor()?)?))
    }

    fn add_norm(&mut self, n: &Norm, x: Act, residual: Act) -> Result<Act> {
        match n {
            // One pass: the residual is added inside the LayerNorm kernel.
            Norm::Layer(ln) => Ok(Act::Full(
                ln.forward_residual(&x.tensor()?, Some(&residual.tensor()?))?,
            )),
            Norm::Rms(_) => {
                let y = self.add(x, residual)?;
                self.norm(n, &y)
            }
        }
    }

    fn glu(&mut self, gate: &Act, up: &Act, act: Activation) -> Result<Act> {
        if let Some((whole, w)) = Act::fused(&[gate, up]).filter(|(_, w)| w[0] == w[1]) {
            let mut dims = whole.dims().to_vec();
            *dims.last_mut().unwrap_or(&mut 0) = w[0];
            let h = kernels::with_f32(whole, |s| kernels::gated(s, w[0], act))?;
            return Ok(Act::Full(kernels::tensor(h, dims)?));
        }
        // Separate gate and up: slm's activation kernels, as the fused path and the decode
        // executor apply them.
        let (g, u) = (gate.tensor()?, up.tensor()?);
        let mut y = kernels::with_f32(&g, |g| g.to_vec())?;
        kernels::activate(&mut y, act);
        kernels::with_f32(&u, |u| y.iter_mut().zip(u).for_each(|(d, v)| *d *= v))?;
        Ok(Act::Full(kernels::tensor(y, g.dims().to_vec())?))
    }

    fn attention(&mut self, a: &AttnSpec, layer: usize, q: Act, k: Act, v: Act) -> Result<Act> {
        self.self_attention(a, layer, q, k, v, None)
    }

    fn relative_bias(&mut self, table: &Embedding, rel: RelativePositions) -> Result<Act> {
        let rows = self.table_rows(table, &rel.ids(), 1)?.tensor()?;
        Ok(Act::Full(rows.squeeze(0)?.t()?.contiguous()?))
    }

    fn attention_biased(
        &mut self,
        a: &AttnSpec,
        layer: usize,
        q: Act,
        k: Act,
        v: Act,
        bias: &Act,
    ) -> Result<Act> {
        self.self_attention(a, layer, q, k, v, Some(bias))
    }

    fn cross_attention(
        &mut self,
        a: &AttnSpec,
        slot: usize,
        q: Act,
        k: &Linear,
        v: &Linear,
        memory: Option<&Act>,
    ) -> Result<Act> {
        let (nh, nkv, hd) = (a.n_heads, a.n_kv_heads, a.head_dim);
        if self.seqs.iter().any(|s| s.cache[slot].cross.is_none()) {
            let (Some(memory), [seq]) = (memory, self.seqs.as_mut_slice()) else {
                return Err(Error::msg(
                    "internal: cross-attention keys are made for one sequence, from its encoder states",
                ));
            };
            let m = memory.tensor()?;
            let len = m.dim(1)?;
            let kh = kernels::with_f32(
                &heads(&Act::Full(k.forward(&m)?), nkv, hd)?,
                <[f32]>::to_vec,
            )?;
            let vh = kernels::with_f32(
                &heads(&Act::Full(v.forward(&m)?), nkv, hd)?,
                <[f32]>::to_vec,
            )?;
            seq.cache[slot].cross = Some(Arc::new(CrossKv { k: kh, v: vh, len }));
        }
        let mut start = 0;
        let mut ys = Vec::with_capacity(self.seqs.len());
        for seq in &self.seqs {
            let Some(kv) = &seq.cache[slot].cross else {
                return Err(Error::msg("internal: no cross-attention keys"));
            };
            let qh = heads(&q.rows(start, seq.t)?, nh, hd)?;
            let keys = attention::KeyView {
                k: &kv.k,
                v: &kv.v,
                cap: kv.len,
                len: kv.len,
                k_tiled: false,
            };
            let y = kernels::with_f32(&qh, |q| {
                attention::cross_attention(q, keys, nh, nkv, hd, a.scores())
            })?;
            ys.push(kernels::tensor(y, vec![1, seq.t, nh * hd])?);
            start += seq.t;
        }
        Ok(Act::Full(Tensor::cat(&ys, 1)?))
    }

    fn rows(&mut self, x: &Act, which: Rows) -> Result<Act> {
        let x = x.tensor()?;
        let (b, t, w) = x.dims3()?;
        Ok(Act::Full(match which {
            Rows::First => x.narrow(1, 0, 1)?,
            Rows::Last if self.seqs.len() > 1 => {
                // Each sequence's last row, in order.
                let mut end = 0;
                let idx: Vec<u32> = self
                    .seqs
                    .iter()
                    .map(|s| {
                        end += s.t;
                        (end - 1) as u32
                    })
                    .collect();
                let idx = Tensor::new(idx.as_slice(), &Device::Cpu)?;
                x.reshape((b * t, w))?.index_select(&idx, 0)?.unsqueeze(0)?
            }
            // Decoding runs one unpadded sequence.
            Rows::Last => x.narrow(1, t - 1, 1)?,
            Rows::Pick(rows) => {
                let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                let idx = Tensor::new(idx.as_slice(), &Device::Cpu)?;
                x.reshape((b * t, w))?.index_select(&idx, 0)?.unsqueeze(0)?
            }
        }))
    }

    fn recurrent(&mut self, r: &RecurrentSpec, hh: &Linear, slot: usize, gx: Act) -> Result<Act> {
        let Some((w, bias)) = hh.dense() else {
            return Err(Error::msg(
                "a recurrent layer's hidden weights must be dense",
            ));
        };
        let gx = gx.tensor()?;
        let hd = r.hidden;
        let (starts, lengths) = self.spans();
        let b = lengths.len();
        let mut state = State::zeros(r.cell, b, hd);
        for (s, seq) in self.seqs.iter().enumerate() {
            if let Some((h, c)) = seq.cache[slot].recurrent_state() {
                if h.len() != hd || c.len() != state.c.len() / b {
                    return Err(Error::msg("internal: a recurrent state of another size"));
                }
                state.h[s * hd..][..hd].copy_from_slice(h);
                if !c.is_empty() {
                    state.c[s * hd..][..hd].copy_from_slice(c);
                }
            }
        }
        let layout = Layout {
            starts: &starts,
            lengths: &lengths,
            rows: gx.elem_count() / (r.cell.gates() * hd),
        };
        let bias = bias
            .map(|b| b.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        let (y, _) = kernels::with_f32(&gx, |g| {
            kernels::with_f32(w, |w| {
                let hh = Hidden {
                    w,
                    transposed: true,
                    b: bias.as_deref(),
                };
                recurrent::forward(*r, g, hh, &mut state, &layout, false)
            })
        })??;
        for (s, seq) in self.seqs.iter_mut().enumerate() {
            let c = if state.c.is_empty() {
                &[][..]
            } else {
                &state.c[s * hd..][..hd]
            };
            seq.cache[slot].set_recurrent_state(&state.h[s * hd..][..hd], c, seq.t);
        }
        let mut dims = gx.dims().to_vec();
        *dims.last_mut().unwrap() = hd;
        Ok(Act::Full(kernels::tensor(y, dims)?))
    }

    fn concat(&mut self, a: Act, b: Act) -> Result<Act> {
        Ok(Act::Full(Tensor::cat(&[a.tensor()?, b.tensor()?], 2)?))
    }

    fn pool(&mut self, x: Act, how: Pool) -> Result<Act> {
        let x = x.tensor()?;
        let w = x.dim(2)?;
        let (starts, lengths) = self.spans();
        let y = kernels::with_f32(&x, |v| {
            let mut out = vec![0f32; starts.len() * w];
            for ((o, &s0), &n) in out.chunks_mut(w).zip(&starts).zip(&lengths) {
                let n = n.max(1);
                let rows = v[s0 * w..(s0 + n) * w].chunks(w);
                match how {
                    Pool::Mean => {
                        rows.for_each(|r| o.iter_mut().zip(r).for_each(|(a, b)| *a += b));
                        o.iter_mut().for_each(|a| *a /= n as f32);
                    }
                    Pool::Max => {
                        o.fill(f32::NEG_INFINITY);
                        rows.for_each(|r| o.iter_mut().zip(r).for_each(|(a, &b)| *a = a.max(b)));
                    }
                }
            }
            out
        })?;
        let dims = if self.seqs.is_empty() {
            vec![starts.len(), 1, w]
        } else {
            vec![1, starts.len(), w]
        };
        Ok(Act::Full(kernels::tensor(y, dims)?))
    }

    fn dropout(&mut self, x: Act, _p: f32) -> Result<Act> {
        Ok(x)
    }
}

/// Causal attention of one sequence's new rows over its cache, after appending their keys.
fn cached_attention(
    a: &AttnSpec,
    layer: usize,
    seq: &mut Seq<'_>,
    q: Act,
    k: Act,
    v: Act,
    bias: Option<&Tensor>,
) -> Result<Act> {
    let (nh, nkv, hd, t, pos) = (a.n_heads, a.n_kv_heads, a.head_dim, seq.t, seq.pos);
    let widths = [nh * hd, nkv * hd, nkv * hd];
    let (q, k, v) = match Act::fused(&[&q, &k, &v]).filter(|(_, w)| *w == widths) {
        Some((whole, _)) => {
            // One pass from [1, t, (nh + 2·nkv)·hd] to three head-major buffers.
            let [q, k, v] =
                kernels::with_f32(whole, |y| kernels::split_heads(y, 1, t, [nh, nkv, nkv], hd))?;
            (
                kernels::tensor(q, vec![1, nh, t, hd])?,
                kernels::tensor(k, vec![1, nkv, t, hd])?,
                kernels::tensor(v, vec![1, nkv, t, hd])?,
            )
        }
        None => (heads(&q, nh, hd)?, heads(&k, nkv, hd)?, heads(&v, nkv, hd)?),
    };
    let (q, k) = match &a.rope {
        Some(r) => (r.apply(&q, pos)?, r.apply(&k, pos)?),
        None => (q, k),
    };
    let cache = seq
        .cache
        .get_mut(layer)
        .ok_or_else(|| Error::msg(format!("internal: no KV cache for layer {layer}")))?;
    let mut attend = |k: &[f32], v: &[f32]| -> Result<Vec<f32>> {
        cache.append(k, v, nkv, t, hd);
        // A prompt from the first position sees only its own keys: read them as the rows they
        // are here, not copied back out of the cache's tiles.
        let keys = if pos == 0 {
            attention::KeyView {
                k,
                v,
                cap: t,
                len: t,
                k_tiled: false,
            }
        } else {
            cache.view()
        };
        with_bias(bias, |bias| {
            kernels::with_f32(&q, |q| {
                attention::causal_attention(q, keys, nh, nkv, hd, pos, a.scores(), bias)
            })
        })?
    };
    let y = kernels::with_f32(&k, |k| kernels::with_f32(&v, |v| attend(k, v)))???;
    Ok(Act::Full(kernels::tensor(y, vec![1, t, nh * hd])?))
}

/// Inference weights from a weight store, quantized ones kept quantized when the `Vb` says so.
pub struct VbLoader {
    pub vb: Vb,
    /// Tables loaded so far: a tied output layer reads the embedding's bytes, not a copy.
    embeddings: std::collections::HashMap<String, Embedding>,
}

/// Where a module named as in a task model (`bert.encoder…`) is stored: under that name, or
/// without the body's prefix in a bare encoder checkpoint (`encoder…`).
pub fn stored_module(vb: &Vb, name: &str) -> String {
    let has = |m: &str| {
        ["weight", "gamma"]
            .iter()
            .any(|t| vb.contains(&format!("{m}.{t}")))
    };
    match name.split_once('.') {
        Some((_, rest)) if !has(name) && has(rest) => rest.to_string(),
        _ => name.to_string(),
    }
}

/// A tensor's stored name, by the same rule.
pub fn stored_tensor(vb: &Vb, name: &str) -> String {
    match name.split_once('.') {
        Some((_, rest)) if !vb.contains(name) && vb.contains(rest) => rest.to_string(),
        _ => name.to_string(),
    }
}

impl VbLoader {
    pub fn new(vb: Vb) -> Self {
        Self {
            vb,
            embeddings: Default::default(),
        }
    }

    fn at(&self, name: &str) -> Vb {
        self.vb.pp(stored_module(&self.vb, name))
    }
}

impl Loader for VbLoader {
    type W = InferW;

    fn contains(&self, tensor: &str) -> bool {
        self.vb.contains(&stored_tensor(&self.vb, tensor))
    }

    fn linear(&mut self, name: &str, din: usize, dout: usize, bias: bool) -> Result<Linear> {
        Linear::new(din, dout, bias, &self.at(name))
    }

    fn conv1d(&mut self, name: &str, din: usize, dout: usize) -> Result<Linear> {
        Linear::conv1d(din, dout, &self.at(name))
    }

    fn linear_named(
        &mut self,
        weight: &str,
        bias: Option<&str>,
        din: usize,
        dout: usize,
    ) -> Result<Linear> {
        let w = self.vb.get_weight(weight, &[dout, din])?;
        let b = bias.map(|b| self.vb.get(b, &[dout])).transpose()?;
        Linear::from_weight(w, b)
    }

    fn parts(
        &mut self,
        names: &[&str],
        din: usize,
        douts: &[usize],
        bias: bool,
    ) -> Result<Parts<Linear>> {
        let ls = if bias {
            self.each(names, din, douts, bias)?
        } else {
            let ws = names
                .iter()
                .zip(douts)
                .map(|(n, &d)| self.at(n).get_weight("weight", &[d, din]))
                .collect::<Result<Vec<_>>>()?;
            if let Some(l) = Linear::stacked(&ws) {
                return Ok(Parts::Fused(l, douts.to_vec()));
            }
            ws.into_iter()
                .map(|w| Linear::from_weight(w, None))
                .collect::<Result<Vec<_>>>()?
        };
        // One product (and one quantization of x) instead of several.
        Ok(match Linear::try_concat(&ls.iter().collect::<Vec<_>>())? {
            Some(l) => Parts::Fused(l, douts.to_vec()),
            None => Parts::Separate(ls),
        })
    }

    fn norm(&mut self, kind: NormKind, name: &str, size: usize, eps: f64) -> Result<Norm> {
        let vb = self.at(name);
        Ok(match kind {
            NormKind::Rms => Norm::Rms(RmsNorm::new(size, eps, &vb)?),
            NormKind::RmsOffset => Norm::Rms(RmsNorm::offset(size, eps, &vb)?),
            NormKind::Layer => Norm::Layer(LayerNorm::new(size, eps, &vb)?),
        })
    }

    fn embedding(&mut self, name: &str, count: usize, dim: usize) -> Result<Embedding> {
        let e = Embedding::new(count, dim, &self.at(name))?;
        self.embeddings.insert(name.to_string(), e.clone());
        Ok(e)
    }

    fn computed(
        &mut self,
        _name: &str,
        count: usize,
        dim: usize,
        values: Vec<f32>,
    ) -> Result<Embedding> {
        let t = Tensor::from_vec(values, (count, dim), &candle_core::Device::Cpu)?;
        Embedding::from_tensor(t)
    }

    fn tied(&mut self, name: &str, count: usize, dim: usize, bias: Option<&str>) -> Result<Linear> {
        let shared = self.embeddings.get(name).and_then(Embedding::tied_linear);
        if let Some(l) = shared.filter(|l| bias.is_none() && l.out_features() == count) {
            return Ok(l);
        }
        let w = self.at(name).get_weight("weight", &[count, dim])?;
        let b = match bias {
            // BART's `final_logits_bias` is stored `[1, count]`.
            Some(b) => {
                let name = stored_tensor(&self.vb, b);
                let shape = match self.vb.shape_of(&name) {
                    Some(s) if s == [1, count] => s,
                    _ => vec![count],
                };
                Some(self.vb.get(&name, &shape)?.reshape(count)?)
            }
            None => None,
        };
        Linear::from_weight(w, b)
    }

    fn head(&mut self, name: &str, din: usize, dout: usize, _saved: bool) -> Result<Linear> {
        self.linear(name, din, dout, true)
    }

    fn head_norm(&mut self, name: &str, size: usize, eps: f64) -> Result<Norm> {
        self.norm(NormKind::Layer, name, size, eps)
    }
}
