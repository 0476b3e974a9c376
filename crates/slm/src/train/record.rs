//! The backward pass of a recorded forward ([`super::tape::Tape`]): each node's gradient,
//! from the loss back to the trained parameters, by the hand-written backward of its op.

use super::ops::{self, Bias};
use super::params::{Dx, Params};
use super::tape::{Node, NormP, Op};
use crate::nn::exec::{NormKind, Pool};
use crate::nn::recurrent::{self, Layout};

/// A finished forward pass: every node's value and what its backward needs.
pub struct Record {
    pub(super) nodes: Vec<Node>,
}

impl Record {
    pub fn value(&self, x: usize) -> &[f32] {
        &self.nodes[x].value
    }

    /// The value of node `x`, moved out where its own backward does not read it (the loss
    /// turns the logits into their gradient in place, sparing a buffer of `tokens × vocab`).
    pub fn take_value(&mut self, x: usize) -> Vec<f32> {
        let n = &mut self.nodes[x];
        if matches!(n.op, Op::Softcap { .. }) {
            n.value.clone()
        } else {
            std::mem::take(&mut n.value)
        }
    }

    /// Back-propagates `dout` (the loss gradient of node `out`) into the trained parameters.
    pub fn backward(mut self, out: usize, dout: Vec<f32>, p: &mut Params) {
        let n_nodes = self.nodes.len();
        let mut grads: Vec<Option<Vec<f32>>> = (0..n_nodes).map(|_| None).collect();
        grads[out] = Some(dout);
        for i in (0..n_nodes).rev() {
            let Some(dy) = grads[i].take() else {
                self.nodes[i] = Node {
                    op: Op::Done,
                    value: Vec::new(),
                    width: 0,
                    needs: false,
                    keep: false,
                };
                continue;
            };
            let node = std::mem::replace(
                &mut self.nodes[i],
                Node {
                    op: Op::Done,
                    value: Vec::new(),
                    width: 0,
                    needs: false,
                    keep: false,
                },
            );
            let (before, _) = grads.split_at_mut(i);
            let nodes = &self.nodes;
            let acc = |before: &mut [Option<Vec<f32>>], x: usize, g: Vec<f32>| {
                accumulate(before, nodes, x, g)
            };
            match node.op {
                Op::Embed { e, ids } => {
                    if let Some(g) = p.grad(e.table) {
                        for (row, &id) in dy.chunks(e.dim).zip(&ids) {
                            if e.padding == Some(id) {
                                continue;
                            }
                            g[id as usize * e.dim..][..e.dim]
                                .iter_mut()
                                .zip(row)
                                .for_each(|(g, d)| *g += d);
                        }
                    }
                }
                Op::Linear { l, x, cache } => {
                    let n = dy.len() / l.dout;
                    let xv = &nodes[x].value;
                    if !nodes[x].needs {
                        l.backward_to(p, &dy, xv, &cache, n, Dx::Skip);
                    } else if let Some(buf) = before[x].as_deref_mut() {
                        l.backward_to(p, &dy, xv, &cache, n, Dx::Add(buf));
                    } else {
                        before[x] = l.backward_to(p, &dy, xv, &cache, n, Dx::New);
                    }
                }
                Op::Act { x, act } => acc(before, x, ops::act_backward(&dy, &nodes[x].value, act)),
                Op::Part { x, offset } => {
                    if nodes[x].needs {
                        let (w, total) = (node.width, nodes[x].width);
                        let rows = dy.len() / w;
                        let g = before[x].get_or_insert_with(|| vec![0f32; rows * total]);
                        for (dst, src) in g.chunks_mut(total).zip(dy.chunks(w)) {
                            dst[offset..offset + w]
                                .iter_mut()
                                .zip(src)
                                .for_each(|(a, b)| *a += b);
                        }
                    }
                }
                Op::Norm { n, x, cache } => {
                    let g = &gain(p, &n);
                    let h = g.len();
                    let (dx, dg, db) = match n.kind {
                        NormKind::Rms | NormKind::RmsOffset => {
                            let mut dg = vec![0f32; h];
                            let dx = ops::rms_norm_backward(&dy, &cache, g, Some(&mut dg), h);
                            (dx, dg, None)
                        }
                        NormKind::Layer => {
                            let (mut dg, mut db) = (vec![0f32; h], vec![0f32; h]);
                            let dx = ops::layer_norm_backward(
                                &dy,
                                &cache,
                                g,
                                Some((&mut dg, &mut db)),
                                h,
                            );
                            (dx, dg, Some(db))
                        }
                    };
                    add_grad(p, n.g, &dg);
                    if let (Some(b), Some(db)) = (n.b, db) {
                        add_grad(p, b, &db);
                    }
                    acc(before, x, dx);
                }
                Op::Add { a, b } => {
                    acc(before, b, dy.clone());
                    acc(before, a, dy);
                }
                Op::Glu { gate, up, act } => {
                    let (dg, du) =
                        ops::glu_backward(&dy, &nodes[gate].value, &nodes[up].value, act);
                    acc(before, gate, dg);
                    acc(before, up, du);
                }
                Op::Attention {
                    q,
                    k,
                    v,
                    probs,
                    shape: s,
                    rope,
                    inputs: [qi, ki, vi],
                    bias,
                } => {
                    let table = bias.map(|x| bias_of(&nodes[x]));
                    let g = ops::attention_backward(&dy, &q, &k, &v, &probs, table, s);
                    let (mut dq, mut dk) = (g.dq, g.dk);
                    if let Some(r) = &rope {
                        let (cos, sin) = r.rows();
                        ops::rope(&mut dq, cos, sin, s.t, s.nh, s.hd, true);
                        ops::rope(&mut dk, cos, sin, s.t, s.nkv, s.hd, true);
                    }
                    acc(before, qi, dq);
                    acc(before, ki, dk);
                    acc(before, vi, g.dv);
                    if let (Some(x), Some(db)) = (bias, g.dbias) {
                        acc(before, x, db);
                    }
                }
                Op::RelBias { e, ids } => {
                    if let Some(g) = p.grad(e.table) {
                        let w = ids.len();
                        for (h, row) in dy.chunks(w).enumerate() {
                            for (&id, d) in ids.iter().zip(row) {
                                g[id as usize * e.dim + h] += d;
                            }
                        }
                    }
                }
                Op::Recurrent {
                    spec,
                    hh,
                    x,
                    saved,
                    starts,
                    lengths,
                } => {
                    let layout = Layout {
                        starts: &starts,
                        lengths: &lengths,
                        rows: dy.len() / spec.hidden,
                    };
                    let (w, dw) = p.split(hh.w);
                    let (dgx, db) = recurrent::backward(spec, &dy, &saved, w, &layout, dw);
                    if let Some(b) = hh.b {
                        add_grad(p, b, &db);
                    }
                    acc(before, x, dgx);
                }
                Op::Rows { x, rows, total } => {
                    if nodes[x].needs {
                        let w = node.width;
                        let g = before[x].get_or_insert_with(|| vec![0f32; total * w]);
                        for (src, &r) in dy.chunks(w).zip(&rows) {
                            g[r * w..][..w]
                                .iter_mut()
                                .zip(src)
                                .for_each(|(a, b)| *a += b);
                        }
                    }
                }
                Op::Dropout { x, mask } => {
                    acc(
                        before,
                        x,
                        dy.iter().zip(&mask).map(|(d, m)| d * m).collect(),
                    );
                }
                Op::Concat { a, b, wa } => {
                    let w = node.width;
                    let (da, db): (Vec<f32>, Vec<f32>) = if nodes[a].needs || nodes[b].needs {
                        let da = dy.chunks(w).flat_map(|r| &r[..wa]).copied().collect();
                        let db = dy.chunks(w).flat_map(|r| &r[wa..]).copied().collect();
                        (da, db)
                    } else {
                        (Vec::new(), Vec::new())
                    };
                    acc(before, a, da);
                    acc(before, b, db);
                }
                Op::Pool {
                    x,
                    how,
                    lengths,
                    argmax,
                    total,
                } => {
                    if nodes[x].needs {
                        let w = node.width;
                        let t = total / lengths.len().max(1);
                        let g = before[x].get_or_insert_with(|| vec![0f32; total * w]);
                        for (s, row) in dy.chunks(w).enumerate() {
                            match how {
                                Pool::Mean => {
                                    let n = lengths[s].max(1);
                                    for r in s * t..s * t + n {
                                        g[r * w..][..w]
                                            .iter_mut()
                                            .zip(row)
                                            .for_each(|(a, d)| *a += d / n as f32);
                                    }
                                }
                                Pool::Max => {
                                    for (j, d) in row.iter().enumerate() {
                                        g[argmax[s * w + j] as usize * w + j] += d;
                                    }
                                }
                            }
                        }
                    }
                }
                Op::Scale { x, s } => acc(before, x, dy.iter().map(|d| d * s).collect()),
                Op::Softcap { x, cap } => {
                    let g = dy
                        .iter()
                        .zip(&node.value)
                        .map(|(d, y)| d * (1.0 - (y / cap) * (y / cap)))
                        .collect();
                    acc(before, x, g);
                }
                Op::Done => {}
            }
        }
    }
}

/// The distance bias a [`Op::RelBias`] node holds, as the attention kernels read it.
pub(super) fn bias_of(n: &Node) -> Bias<'_> {
    Bias {
        table: &n.value,
        max_distance: n.width / 2,
    }
}

/// Adds `g` to the gradient of input `x`, when it leads to a trained parameter.
fn accumulate(before: &mut [Option<Vec<f32>>], nodes: &[Node], x: usize, g: Vec<f32>) {
    if !nodes[x].needs {
        return;
    }
    match &mut before[x] {
        Some(a) => a.iter_mut().zip(&g).for_each(|(a, g)| *a += g),
        slot => *slot = Some(g),
    }
}

/// The gain a norm multiplies by: its weight, or one plus it (Gemma). The gradient with
/// respect to the weight is the gradient with respect to this gain.
pub(super) fn gain<'a>(p: &'a Params, n: &NormP) -> std::borrow::Cow<'a, [f32]> {
    let g = p.value(n.g);
    match n.kind {
        NormKind::RmsOffset => g.iter().map(|w| 1.0 + w).collect::<Vec<_>>().into(),
        _ => g.into(),
    }
}

fn add_grad(p: &mut Params, i: usize, g: &[f32]) {
    if let Some(pg) = p.grad(i) {
        pg.iter_mut().zip(g).for_each(|(a, b)| *a += b);
    }
}
