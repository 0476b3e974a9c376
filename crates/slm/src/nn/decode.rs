//! The decode executor: one new token of one sequence through a family's `forward<E: Exec>`
//! (the same definition [`Infer`](super::infer::Infer) runs), every activation in a buffer
//! kept from one token to the next (llm.c's activation arena).
//!
//! A decoded token makes the same calls in the same order every time, so the `i`-th buffer
//! asked for has the same size each token: after the first token the pass allocates nothing
//! but the logits it hands back, where candle tensors between the products made 3,127
//! allocations a token (SmolLM2). The ops run the kernels `Infer` runs
//! (`Linear::forward_into`, `Norm::forward_into`, `gated_into`, `causal_attention_into`,
//! `Rope::rotate_one`), so the two give the same logits bit for bit (`tests/batch_decode.rs`,
//! `tests/gemma.rs`). Each op also writes its result once, in place of candle's separate passes
//! (residual adds, RoPE on a copy of the heads, the split of Q|K|V into head-major buffers,
//! which for a single token is the projection's row itself).

use candle_core::Tensor;

use super::exec::{AttnSpec, Exec, Parts, Pool, Rows};
use super::infer::{InferW, KvCache};
use super::qdot::BlockQ8;
use super::recurrent::RecurrentSpec;
use super::{attention, kernels, Activation, Embedding, Linear, Norm};
use crate::error::{Error, Result};

/// The buffers of a decoded token's activations, kept by the model between tokens.
#[derive(Default)]
pub struct Arena {
    bufs: Vec<Vec<f32>>,
    used: usize,
    /// The activations of the product under way, quantized to 8-bit blocks.
    xq: Vec<BlockQ8>,
}

impl Arena {
    /// The next buffer, `len` values long (contents unspecified).
    fn alloc(&mut self, len: usize) -> Slot {
        if self.used == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(len));
        }
        let i = self.used;
        self.used += 1;
        self.bufs[i].resize(len, 0.0);
        Slot {
            buf: i,
            start: 0,
            len,
        }
    }

    fn get(&self, s: Slot) -> &[f32] {
        &self.bufs[s.buf][s.start..s.start + s.len]
    }

    /// A new slot of `len` values filled by `f(arena, out)`: the output buffer is lent out of
    /// the arena meanwhile, so `f` reads the other slots through the arena.
    fn write(
        &mut self,
        len: usize,
        f: impl FnOnce(&mut Arena, &mut [f32]) -> Result<()>,
    ) -> Result<Slot> {
        let s = self.alloc(len);
        let mut out = std::mem::take(&mut self.bufs[s.buf]);
        let r = f(self, &mut out);
        self.bufs[s.buf] = out;
        r.map(|()| s)
    }
}

/// Values `start..start + len` of one arena buffer (a fused projection's part is a range of
/// its row).
#[derive(Clone, Copy, Debug, Default)]
pub struct Slot {
    buf: usize,
    start: usize,
    len: usize,
}

/// Runs one decoded token at position `pos` over `cache` (one entry per layer).
pub struct Decode<'a> {
    cache: &'a mut [KvCache],
    pos: usize,
    arena: &'a mut Arena,
}

impl<'a> Decode<'a> {
    pub fn new(cache: &'a mut [KvCache], arena: &'a mut Arena) -> Self {
        arena.used = 0;
        let pos = cache.first().map_or(0, KvCache::len);
        Self { cache, pos, arena }
    }

    /// The values of `x` as a `[1, len]` tensor: the logits the caller samples from.
    pub fn tensor(&self, x: Slot) -> Result<Tensor> {
        kernels::tensor(self.arena.get(x).to_vec(), vec![1, x.len])
    }

    fn product(&mut self, l: &Linear, x: Slot, act: Option<Activation>) -> Result<Slot> {
        self.arena.write(l.out_features(), |a, y| {
            let mut xq = std::mem::take(&mut a.xq);
            let r = l.forward_into(a.get(x), 1, y, act, &mut xq);
            a.xq = xq;
            r
        })
    }

    fn unsupported(what: &str) -> Error {
        Error::Unsupported(format!("{what} in the decode executor"))
    }
}

impl Exec for Decode<'_> {
    type W = InferW;
    type X = Slot;

    fn embed(&mut self, e: &Embedding, ids: &[u32]) -> Result<Slot> {
        self.arena
            .write(ids.len() * e.dim(), |_, y| e.rows_into(ids, y))
    }

    fn positions(&mut self, e: &Embedding, offset: usize) -> Result<Slot> {
        let row = (self.pos + offset) as u32;
        self.arena.write(e.dim(), |_, y| e.rows_into(&[row], y))
    }

    fn linear(&mut self, l: &Linear, x: &Slot, act: Option<Activation>) -> Result<Slot> {
        self.product(l, *x, act)
    }

    fn parts<const N: usize>(&mut self, p: &Parts<Linear>, x: &Slot) -> Result<[Slot; N]> {
        let mut out = [Slot::default(); N];
        match p {
            Parts::Fused(l, widths) if widths.len() == N => {
                let whole = self.product(l, *x, None)?;
                let mut start = whole.start;
                for (s, &len) in out.iter_mut().zip(widths) {
                    *s = Slot {
                        buf: whole.buf,
                        start,
                        len,
                    };
                    start += len;
                }
            }
            Parts::Separate(ls) if ls.len() == N => {
                for (s, l) in out.iter_mut().zip(ls) {
                    *s = self.product(l, *x, None)?;
                }
            }
            _ => return Err(Error::msg(format!("internal: expected {N} parts"))),
        }
        Ok(out)
    }

    fn norm(&mut self, n: &Norm, x: &Slot) -> Result<Slot> {
        let x = *x;
        self.arena
            .write(x.len, |a, y| n.forward_into(a.get(x), None, y))
    }

    fn norm_heads(&mut self, n: &Norm, x: Slot) -> Result<Slot> {
        self.norm(n, &x)
    }

    fn scale(&mut self, x: Slot, s: f32) -> Result<Slot> {
        self.arena.write(x.len, |a, y| {
            y.iter_mut().zip(a.get(x)).for_each(|(d, v)| *d = v * s);
            Ok(())
        })
    }

    fn softcap(&mut self, x: Slot, cap: f32) -> Result<Slot> {
        // As candle's `affine` takes it: the reciprocal in f64.
        let inv = (1.0 / cap as f64) as f32;
        self.arena.write(x.len, |a, y| {
            y.iter_mut()
                .zip(a.get(x))
                .for_each(|(d, v)| *d = (v * inv).tanh() * cap);
            Ok(())
        })
    }

    fn add(&mut self, a: Slot, b: Slot) -> Result<Slot> {
        if b.len == 0 || !a.len.is_multiple_of(b.len) {
            return Err(Error::msg(format!(
                "internal: adding {} values to {}",
                b.len, a.len
            )));
        }
        self.arena.write(a.len, |ar, y| {
            let (xa, xb) = (ar.get(a), ar.get(b));
            for (row, src) in y.chunks_exact_mut(b.len).zip(xa.chunks_exact(b.len)) {
                row.iter_mut()
                    .zip(src.iter().zip(xb))
                    .for_each(|(d, (u, v))| *d = u + v);
            }
            Ok(())
        })
    }

    fn add_norm(&mut self, n: &Norm, x: Slot, residual: Slot) -> Result<Slot> {
        match n {
            Norm::Layer(_) => self.arena.write(x.len, |a, y| {
                n.forward_into(a.get(x), Some(a.get(residual)), y)
            }),
            Norm::Rms(_) => {
                let y = self.add(x, residual)?;
                self.norm(n, &y)
            }
        }
    }

    fn glu(&mut self, gate: &Slot, up: &Slot, act: Activation) -> Result<Slot> {
        let (g, u, n) = (*gate, *up, gate.len);
        if u.len != n {
            return Err(Error::msg(format!(
                "internal: a gate of {n} values over {}",
                u.len
            )));
        }
        self.arena.write(n, |a, y| {
            if g.buf == u.buf && u.start == g.start + n {
                // One pass over the fused gate|up row, as `Infer` runs it.
                let gu = &a.bufs[g.buf][g.start..g.start + 2 * n];
                // SAFETY (the cast): f32 and MaybeUninit<f32> share their layout, and every
                // value is initialised already.
                let out = unsafe { &mut *(y as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
                kernels::gated_into(gu, n, act, out);
            } else {
                y.copy_from_slice(a.get(g));
                kernels::activate(y, act);
                y.iter_mut().zip(a.get(u)).for_each(|(d, v)| *d *= v);
            }
            Ok(())
        })
    }

    fn attention(&mut self, a: &AttnSpec, layer: usize, q: Slot, k: Slot, v: Slot) -> Result<Slot> {
        let (nh, nkv, hd, pos) = (a.n_heads, a.n_kv_heads, a.head_dim, self.pos);
        if !a.causal || q.len != nh * hd || k.len != nkv * hd || v.len != nkv * hd {
            return Err(Self::unsupported("this attention"));
        }
        // One token: its projection's row is already head-major ([heads, 1, hd]).
        let rotated = |s: &mut Self, x: Slot| -> Result<Slot> {
            s.arena.write(x.len, |ar, y| {
                y.copy_from_slice(ar.get(x));
                match &a.rope {
                    Some(r) => r.rotate_one(y, pos),
                    None => Ok(()),
                }
            })
        };
        let (q, k) = (rotated(self, q)?, rotated(self, k)?);
        let cache = self
            .cache
            .get_mut(layer)
            .ok_or_else(|| Error::msg(format!("internal: no KV cache for layer {layer}")))?;
        let arena = &mut *self.arena;
        cache.append(arena.get(k), arena.get(v), nkv, 1, hd);
        arena.write(nh * hd, |ar, y| {
            let keys = if pos == 0 {
                // As `Infer` reads a prompt's own keys: the rows just projected.
                attention::KeyView {
                    k: ar.get(k),
                    v: ar.get(v),
                    cap: 1,
                    len: 1,
                    k_tiled: false,
                }
            } else {
                cache.view()
            };
            attention::causal_attention_into(
                ar.get(q),
                keys,
                nh,
                nkv,
                hd,
                pos,
                a.scores(),
                None,
                y,
            );
            Ok(())
        })
    }

    fn recurrent(
        &mut self,
        _r: &RecurrentSpec,
        _hh: &Linear,
        _slot: usize,
        _gx: Slot,
    ) -> Result<Slot> {
        Err(Self::unsupported("a recurrent layer"))
    }

    fn rows(&mut self, x: &Slot, which: Rows) -> Result<Slot> {
        match which {
            Rows::First | Rows::Last => Ok(*x),
            Rows::Pick([0]) => Ok(*x),
            Rows::Pick(_) => Err(Self::unsupported("picked rows")),
        }
    }

    fn concat(&mut self, _a: Slot, _b: Slot) -> Result<Slot> {
        Err(Self::unsupported("concatenation"))
    }

    fn pool(&mut self, _x: Slot, _how: Pool) -> Result<Slot> {
        Err(Self::unsupported("pooling"))
    }

    fn dropout(&mut self, x: Slot, _p: f32) -> Result<Slot> {
        Ok(x)
    }
}
