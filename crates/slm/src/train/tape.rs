//! The training executor: runs a family's forward pass (the same `forward<E: Exec>` that
//! inference runs) with the ops of [`super::ops`], recording for each op exactly what its
//! hand-written backward needs. [`Record::backward`] (`record.rs`) walks the record in
//! reverse: a gradient flows only into nodes that lead to a trained parameter (no `dx` below
//! frozen layers), and each node's buffers are freed as soon as its backward has run.

use std::sync::Arc;

use super::ops::{self, AttnShape, NormCache};
use super::params::{dropout_mask, Lin, LinCache, Params};
pub use super::record::Record;
use super::record::{bias_of, gain};
use crate::error::{Error, Result};
use crate::nn::exec::{
    array, AttnSpec, Exec, NormKind, Parts, Pool, RelativePositions, Rows, Weights,
};
use crate::nn::recurrent::{self, Hidden, Layout, RecurrentSpec, Saved, State};
use crate::nn::{Activation, Rope};

pub use super::loader::{LoraSpec, ParamLoader};

/// Which dropout a training forward applies (HF applies the config's rates in `train()`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dropout {
    Off,
    /// The rates of the model's config.
    Config,
    /// This rate at every site where the model applies dropout.
    Rate(f32),
}

/// Training weights: indices into [`Params`].
pub struct TrainW;

/// A norm over parameters: RMS (`g`) or LayerNorm (`g`, `b`).
#[derive(Debug, Clone, Copy)]
pub struct NormP {
    pub kind: NormKind,
    pub g: usize,
    pub b: Option<usize>,
    pub eps: f32,
}

/// An embedding table parameter `[count, dim]`.
#[derive(Debug, Clone, Copy)]
pub struct EmbP {
    pub table: usize,
    pub dim: usize,
    /// `nn.Embedding(padding_idx=…)`: lookups of this id pass no gradient to its row.
    pub padding: Option<u32>,
}

impl Weights for TrainW {
    type Linear = Lin;
    type Norm = NormP;
    type Embedding = EmbP;
}

pub(super) enum Op {
    Embed {
        e: EmbP,
        ids: Vec<u32>,
    },
    Linear {
        l: Lin,
        x: usize,
        cache: LinCache,
    },
    Act {
        x: usize,
        act: Activation,
    },
    /// Columns `offset..offset + width` of a wider node.
    Part {
        x: usize,
        offset: usize,
    },
    Norm {
        n: NormP,
        x: usize,
        cache: NormCache,
    },
    Add {
        a: usize,
        b: usize,
    },
    Glu {
        gate: usize,
        up: usize,
        act: Activation,
    },
    Attention {
        /// Q and K after RoPE, V as given: what the backward reads.
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        probs: Vec<f32>,
        shape: AttnShape,
        rope: Option<Arc<Rope>>,
        inputs: [usize; 3],
        /// The node of a distance bias added to the scores (T5).
        bias: Option<usize>,
    },
    /// T5's bias table gathered by distance bucket, `[heads, 2·max_distance + 1]`: column
    /// `c` reads bucket `ids[c]`.
    RelBias {
        e: EmbP,
        ids: Vec<u32>,
    },
    Recurrent {
        spec: RecurrentSpec,
        hh: Lin,
        /// The input projection `gx`.
        x: usize,
        saved: Saved,
        starts: Vec<usize>,
        lengths: Vec<usize>,
    },
    Rows {
        x: usize,
        rows: Vec<usize>,
        /// Rows of `x`.
        total: usize,
    },
    Dropout {
        x: usize,
        mask: Vec<f32>,
    },
    /// `[a | b]`; `a` is `wa` wide.
    Concat {
        a: usize,
        b: usize,
        wa: usize,
    },
    Pool {
        x: usize,
        how: Pool,
        /// Mean: each sequence's length; max: the row each output value came from.
        lengths: Vec<usize>,
        argmax: Vec<u32>,
        /// Rows of `x`.
        total: usize,
    },
    Scale {
        x: usize,
        s: f32,
    },
    /// `cap·tanh(x/cap)`; the backward reads this node's own value.
    Softcap {
        x: usize,
        cap: f32,
    },
    /// A node whose buffers were freed.
    Done,
}

pub(super) struct Node {
    pub(super) op: Op,
    pub(super) value: Vec<f32>,
    pub(super) width: usize,
    /// Leads to a trained parameter: gradients flow into it.
    pub(super) needs: bool,
    /// A backward reads this value (it is the input of a linear layer, an activation or a
    /// GLU); other values are freed as soon as the forward pass has consumed them.
    pub(super) keep: bool,
}

/// One batch of `b` right-padded sequences of `t` tokens.
pub struct Tape<'p> {
    p: &'p Params,
    b: usize,
    t: usize,
    lengths: Vec<usize>,
    /// The step's seed while training (dropout masks); `None` to evaluate.
    seed: Option<u64>,
    /// The model's own dropout (LoRA dropout applies whenever training).
    dropout: Dropout,
    /// PEFT's `lora_dropout` for every LoRA branch, when set here rather than at load.
    lora_dropout: Option<f32>,
    /// Recurrent layers' states by slot: where each starts, then where it ended.
    states: Vec<Option<State>>,
    /// An encoder-decoder's source, once its decoder runs: the encoder's `t` and lengths,
    /// what cross-attention's keys are masked by.
    source: Option<(usize, Vec<usize>)>,
    nodes: Vec<Node>,
}

impl<'p> Tape<'p> {
    pub fn new(p: &'p Params, b: usize, t: usize, lengths: &[usize], seed: Option<u64>) -> Self {
        Self {
            p,
            b,
            t,
            lengths: lengths.to_vec(),
            seed,
            dropout: Dropout::Off,
            lora_dropout: None,
            states: Vec::new(),
            source: None,
            nodes: Vec::new(),
        }
    }

    /// The ops that follow run on the decoder's `t` and `lengths` (the same sequences'
    /// targets), after the encoder ran on the sources the tape was made with.
    pub fn begin_decoder(&mut self, t: usize, lengths: &[usize]) {
        let source = (
            self.t,
            std::mem::replace(&mut self.lengths, lengths.to_vec()),
        );
        self.source = Some(source);
        self.t = t;
    }

    /// Recurrent layers start from these states (by slot) instead of zeros: the hidden state
    /// carried from the previous chunk of each sequence (truncated BPTT).
    pub fn with_states(mut self, states: Vec<Option<State>>) -> Self {
        self.states = states;
        self
    }

    /// The states the recurrent layers ended in, by slot, for the next chunk.
    pub fn take_states(&mut self) -> Vec<Option<State>> {
        std::mem::take(&mut self.states)
    }

    /// Each sequence's rows, `[s·t, s·t + length)`.
    fn layout_starts(&self) -> Vec<usize> {
        (0..self.b).map(|s| s * self.t).collect()
    }

    /// Every LoRA branch's dropout rate, overriding the layers' own.
    pub fn with_lora_dropout(mut self, p: f32) -> Self {
        self.lora_dropout = Some(p);
        self
    }

    /// The model's own dropout while training (with a seed).
    pub fn with_dropout(mut self, d: Dropout) -> Self {
        self.dropout = d;
        self
    }

    /// The rate and seed of a dropout site whose config rate is `p`, when it applies.
    fn rate(&self, p: f32) -> Option<(f32, u64)> {
        let seed = self.seed?;
        let rate = match self.dropout {
            Dropout::Off => 0.0,
            Dropout::Config => p,
            Dropout::Rate(r) => r,
        };
        // Each site draws its own mask: the node's index keys the stream.
        let site = self.nodes.len() as u64;
        (rate > 0.0).then_some((rate, seed ^ site.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
    }

    pub fn value(&self, x: usize) -> &[f32] {
        &self.nodes[x].value
    }

    fn push(&mut self, op: Op, value: Vec<f32>, width: usize, needs: bool) -> usize {
        self.nodes.push(Node {
            op,
            value,
            width,
            needs,
            keep: false,
        });
        self.nodes.len() - 1
    }

    /// The value of a node an op consumes: moved out when no backward reads it, else copied.
    fn consume(&mut self, x: usize) -> Vec<f32> {
        if self.nodes[x].keep {
            self.nodes[x].value.clone()
        } else {
            std::mem::take(&mut self.nodes[x].value)
        }
    }

    fn n_rows(&self, x: usize) -> usize {
        self.nodes[x].value.len() / self.nodes[x].width.max(1)
    }

    fn lin_trained(&self, l: &Lin) -> bool {
        let p = self.p;
        p.trainable(l.w)
            || l.b.is_some_and(|b| p.trainable(b))
            || l.lora.is_some_and(|r| p.trainable(r.a) || p.trainable(r.b))
    }

    fn table_rows(&mut self, e: &EmbP, ids: Vec<u32>) -> Result<usize> {
        let table = self.p.value(e.table);
        let count = table.len() / e.dim;
        let mut x = Vec::with_capacity(ids.len() * e.dim);
        for &id in &ids {
            if id as usize >= count {
                return Err(Error::msg(format!(
                    "token id {id} is outside the embedding table ({count} rows)"
                )));
            }
            x.extend_from_slice(&table[id as usize * e.dim..][..e.dim]);
        }
        let needs = self.p.trainable(e.table);
        Ok(self.push(Op::Embed { e: *e, ids }, x, e.dim, needs))
    }

    /// Attention of `q` over `k`, `v`: self-attention, or (`cross`) the decoder's queries
    /// over the source's keys, every non-padding source position visible.
    fn attend(
        &mut self,
        a: &AttnSpec,
        [q, k, v]: [usize; 3],
        bias: Option<usize>,
        cross: bool,
    ) -> Result<usize> {
        let (tk, key_lengths) = match (&self.source, cross) {
            (Some((ts, lengths)), true) => (*ts, lengths.clone()),
            (None, true) => {
                return Err(Error::msg(
                    "internal: cross-attention before the decoder's sequences were set",
                ))
            }
            (_, false) => (self.t, self.lengths.clone()),
        };
        let shape = AttnShape {
            b: self.b,
            t: self.t,
            tk,
            nh: a.n_heads,
            nkv: a.n_kv_heads,
            hd: a.head_dim,
            causal: a.causal && !cross,
            window: a.window,
            dropout: self.rate(a.dropout),
            scale: a.scores().scale,
            softcap: a.softcap,
        };
        // Q, K and V have no other reader: the node takes their values.
        let mut qv = std::mem::take(&mut self.nodes[q].value);
        let mut kv = std::mem::take(&mut self.nodes[k].value);
        let vv = std::mem::take(&mut self.nodes[v].value);
        if let Some(r) = &a.rope {
            if self.t > r.max_positions() {
                return Err(Error::ContextOverflow {
                    tokens: self.t,
                    context: r.max_positions(),
                });
            }
            let (cos, sin) = r.rows();
            ops::rope(&mut qv, cos, sin, self.t, a.n_heads, a.head_dim, false);
            ops::rope(&mut kv, cos, sin, self.t, a.n_kv_heads, a.head_dim, false);
        }
        let table = bias.map(|x| bias_of(&self.nodes[x]));
        let (ctx, probs) = ops::attention(&qv, &kv, &vv, &key_lengths, table, shape);
        let needs = [q, k, v].iter().chain(&bias).any(|&x| self.nodes[x].needs);
        let op = Op::Attention {
            q: qv,
            k: kv,
            v: vv,
            probs,
            shape,
            rope: a.rope.clone(),
            inputs: [q, k, v],
            bias,
        };
        Ok(self.push(op, ctx, a.n_heads * a.head_dim, needs))
    }

    /// The recorded pass, no longer borrowing the parameters (so the backward can write
    /// their gradients).
    pub fn finish(self) -> Record {
        Record { nodes: self.nodes }
    }
}

impl Exec for Tape<'_> {
    type W = TrainW;
    type X = usize;

    fn embed(&mut self, e: &EmbP, ids: &[u32]) -> Result<usize> {
        self.table_rows(e, ids.to_vec())
    }

    fn positions(&mut self, e: &EmbP, offset: usize) -> Result<usize> {
        let (start, t) = (offset as u32, self.t as u32);
        let ids = (0..self.b).flat_map(|_| start..start + t).collect();
        self.table_rows(e, ids)
    }

    fn linear(&mut self, l: &Lin, x: &usize, act: Option<Activation>) -> Result<usize> {
        let (x, n) = (*x, self.n_rows(*x));
        self.nodes[x].keep = true;
        let mut l = *l;
        if let (Some(p), Some(r)) = (self.lora_dropout, l.lora.as_mut()) {
            r.dropout = p;
        }
        let l = &l;
        let (y, cache) = l.forward(self.p, &self.nodes[x].value, n, self.seed);
        let needs = self.nodes[x].needs || self.lin_trained(l);
        let y = self.push(Op::Linear { l: *l, x, cache }, y, l.dout, needs);
        match act {
            None => Ok(y),
            Some(act) => {
                self.nodes[y].keep = true;
                let v = ops::act_forward(&self.nodes[y].value, act);
                Ok(self.push(Op::Act { x: y, act }, v, l.dout, needs))
            }
        }
    }

    fn parts<const N: usize>(&mut self, p: &Parts<Lin>, x: &usize) -> Result<[usize; N]> {
        array(match p {
            Parts::Separate(ls) => ls
                .iter()
                .map(|l| self.linear(l, x, None))
                .collect::<Result<_>>()?,
            Parts::Fused(l, widths) => {
                let y = self.linear(l, x, None)?;
                let (total, needs) = (l.dout, self.nodes[y].needs);
                let mut offset = 0;
                let mut out = Vec::with_capacity(widths.len());
                for &w in widths {
                    let v: Vec<f32> = self.nodes[y]
                        .value
                        .chunks(total)
                        .flat_map(|r| &r[offset..offset + w])
                        .copied()
                        .collect();
                    out.push(self.push(Op::Part { x: y, offset }, v, w, needs));
                    offset += w;
                }
                // The parts are copies; the linear's backward reads its input, not this.
                self.nodes[y].value = Vec::new();
                out
            }
        })
    }

    fn norm(&mut self, n: &NormP, x: &usize) -> Result<usize> {
        let x = *x;
        let w = self.nodes[x].width;
        let g = &gain(self.p, n);
        // Each group of the gain's size on its own: rows, or heads within rows.
        let h = g.len();
        let (y, cache) = match n.kind {
            NormKind::Rms | NormKind::RmsOffset => ops::rms_norm(&self.nodes[x].value, g, n.eps, h),
            NormKind::Layer => {
                let b = self.p.value(n.b.expect("a LayerNorm has a bias"));
                ops::layer_norm(&self.nodes[x].value, g, b, n.eps, h)
            }
        };
        let needs = self.nodes[x].needs || self.p.trainable(n.g);
        Ok(self.push(Op::Norm { n: *n, x, cache }, y, w, needs))
    }

    fn norm_heads(&mut self, n: &NormP, x: usize) -> Result<usize> {
        self.norm(n, &x)
    }

    fn scale(&mut self, x: usize, s: f32) -> Result<usize> {
        let mut v = self.consume(x);
        v.iter_mut().for_each(|a| *a *= s);
        let (w, needs) = (self.nodes[x].width, self.nodes[x].needs);
        Ok(self.push(Op::Scale { x, s }, v, w, needs))
    }

    fn softcap(&mut self, x: usize, cap: f32) -> Result<usize> {
        let mut v = self.consume(x);
        v.iter_mut().for_each(|a| *a = cap * (*a / cap).tanh());
        let (w, needs) = (self.nodes[x].width, self.nodes[x].needs);
        let y = self.push(Op::Softcap { x, cap }, v, w, needs);
        self.nodes[y].keep = true;
        Ok(y)
    }

    fn add(&mut self, a: usize, b: usize) -> Result<usize> {
        let mut v = self.consume(a);
        v.iter_mut()
            .zip(&self.nodes[b].value)
            .for_each(|(x, y)| *x += y);
        if !self.nodes[b].keep {
            self.nodes[b].value = Vec::new();
        }
        let needs = self.nodes[a].needs || self.nodes[b].needs;
        let w = self.nodes[a].width;
        Ok(self.push(Op::Add { a, b }, v, w, needs))
    }

    fn glu(&mut self, gate: &usize, up: &usize, act: Activation) -> Result<usize> {
        let (gate, up) = (*gate, *up);
        self.nodes[gate].keep = true;
        self.nodes[up].keep = true;
        let v = ops::glu(&self.nodes[gate].value, &self.nodes[up].value, act);
        let needs = self.nodes[gate].needs || self.nodes[up].needs;
        let w = self.nodes[gate].width;
        Ok(self.push(Op::Glu { gate, up, act }, v, w, needs))
    }

    fn attention(
        &mut self,
        a: &AttnSpec,
        _layer: usize,
        q: usize,
        k: usize,
        v: usize,
    ) -> Result<usize> {
        self.attend(a, [q, k, v], None, false)
    }

    fn relative_bias(&mut self, e: &EmbP, rel: RelativePositions) -> Result<usize> {
        let ids = rel.ids();
        let table = self.p.value(e.table);
        let (heads, w) = (e.dim, ids.len());
        let count = table.len() / heads.max(1);
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= count) {
            return Err(Error::msg(format!(
                "relative position bucket {id} is outside the bias table ({count} rows)"
            )));
        }
        let mut v = vec![0f32; heads * w];
        for (c, &id) in ids.iter().enumerate() {
            for h in 0..heads {
                v[h * w + c] = table[id as usize * heads + h];
            }
        }
        let needs = self.p.trainable(e.table);
        let x = self.push(Op::RelBias { e: *e, ids }, v, w, needs);
        self.nodes[x].keep = true;
        Ok(x)
    }

    fn attention_biased(
        &mut self,
        a: &AttnSpec,
        _layer: usize,
        q: usize,
        k: usize,
        v: usize,
        bias: &usize,
    ) -> Result<usize> {
        self.attend(a, [q, k, v], Some(*bias), false)
    }

    fn cross_attention(
        &mut self,
        a: &AttnSpec,
        _slot: usize,
        q: usize,
        k: &Lin,
        v: &Lin,
        memory: Option<&usize>,
    ) -> Result<usize> {
        let Some(&m) = memory else {
            return Err(Error::msg(
                "internal: cross-attention in training is given the encoder states",
            ));
        };
        let k = self.linear(k, &m, None)?;
        let v = self.linear(v, &m, None)?;
        self.attend(a, [q, k, v], None, true)
    }

    fn recurrent(&mut self, r: &RecurrentSpec, hh: &Lin, slot: usize, gx: usize) -> Result<usize> {
        if hh.lora.is_some() {
            return Err(Error::Unsupported(
                "LoRA on a recurrent layer's hidden weights".into(),
            ));
        }
        let (b, hd) = (self.b, r.hidden);
        let mut state = match self.states.get_mut(slot).and_then(Option::take) {
            Some(s) => s,
            None => State::zeros(r.cell, b, hd),
        };
        let want = State::zeros(r.cell, b, hd);
        if state.h.len() != want.h.len() || state.c.len() != want.c.len() {
            return Err(Error::msg(format!(
                "internal: a carried recurrent state for {} sequences, the batch has {b}",
                state.h.len() / hd.max(1)
            )));
        }
        let needs = self.nodes[gx].needs || self.lin_trained(hh);
        // The backward reads the saved gates, not gx.
        let gxv = self.consume(gx);
        let starts = self.layout_starts();
        let layout = Layout {
            starts: &starts,
            lengths: &self.lengths,
            rows: self.b * self.t,
        };
        let p = self.p;
        let hidden = Hidden {
            w: p.value(hh.w),
            transposed: false,
            b: hh.b.map(|b| p.value(b)),
        };
        let (y, saved) = recurrent::forward(*r, &gxv, hidden, &mut state, &layout, needs);
        if self.states.len() <= slot {
            self.states.resize(slot + 1, None);
        }
        self.states[slot] = Some(state);
        let op = Op::Recurrent {
            spec: *r,
            hh: *hh,
            x: gx,
            saved: saved.unwrap_or_default(),
            starts,
            lengths: self.lengths.clone(),
        };
        Ok(self.push(op, y, hd, needs))
    }

    fn rows(&mut self, x: &usize, which: Rows) -> Result<usize> {
        let x = *x;
        let w = self.nodes[x].width;
        let rows: Vec<usize> = match which {
            Rows::First => (0..self.b).map(|s| s * self.t).collect(),
            Rows::Last => (0..self.b)
                .map(|s| s * self.t + self.lengths[s].max(1) - 1)
                .collect(),
            Rows::Pick(r) => r.to_vec(),
        };
        let v = rows
            .iter()
            .flat_map(|&r| &self.nodes[x].value[r * w..(r + 1) * w])
            .copied()
            .collect();
        let (needs, total) = (self.nodes[x].needs, self.n_rows(x));
        Ok(self.push(Op::Rows { x, rows, total }, v, w, needs))
    }

    fn concat(&mut self, a: usize, b: usize) -> Result<usize> {
        let (wa, wb) = (self.nodes[a].width, self.nodes[b].width);
        let (va, vb) = (self.consume(a), self.consume(b));
        let mut v = Vec::with_capacity(va.len() + vb.len());
        for (ra, rb) in va.chunks(wa).zip(vb.chunks(wb)) {
            v.extend_from_slice(ra);
            v.extend_from_slice(rb);
        }
        let needs = self.nodes[a].needs || self.nodes[b].needs;
        Ok(self.push(Op::Concat { a, b, wa }, v, wa + wb, needs))
    }

    fn pool(&mut self, x: usize, how: Pool) -> Result<usize> {
        let (w, t, total) = (self.nodes[x].width, self.t, self.n_rows(x));
        let xv = &self.nodes[x].value;
        let lengths = self.lengths.clone();
        let mut out = vec![0f32; self.b * w];
        let mut argmax = Vec::new();
        for (s, o) in out.chunks_mut(w).enumerate() {
            let n = lengths[s].max(1);
            let rows = (s * t..s * t + n).map(|r| &xv[r * w..][..w]);
            match how {
                Pool::Mean => {
                    for r in rows {
                        o.iter_mut().zip(r).for_each(|(a, b)| *a += b);
                    }
                    o.iter_mut().for_each(|a| *a /= n as f32);
                }
                Pool::Max => {
                    let mut best = vec![(s * t) as u32; w];
                    o.copy_from_slice(&xv[s * t * w..][..w]);
                    for (k, r) in rows.enumerate().skip(1) {
                        for j in 0..w {
                            if r[j] > o[j] {
                                o[j] = r[j];
                                best[j] = (s * t + k) as u32;
                            }
                        }
                    }
                    argmax.extend(best);
                }
            }
        }
        let needs = self.nodes[x].needs;
        if !self.nodes[x].keep {
            self.nodes[x].value = Vec::new();
        }
        let op = Op::Pool {
            x,
            how,
            lengths,
            argmax,
            total,
        };
        Ok(self.push(op, out, w, needs))
    }

    fn dropout(&mut self, x: usize, p: f32) -> Result<usize> {
        let Some((p, seed)) = self.rate(p) else {
            return Ok(x);
        };
        let mask = dropout_mask(self.nodes[x].value.len(), p, seed);
        let mut v = self.consume(x);
        v.iter_mut().zip(&mask).for_each(|(a, m)| *a *= m);
        let (w, needs) = (self.nodes[x].width, self.nodes[x].needs);
        Ok(self.push(Op::Dropout { x, mask }, v, w, needs))
    }
}
