//! The interface a family's forward pass is written against, once, for inference and training.
//!
//! A family file (`models/llama.rs`, `models/gpt2.rs`) keeps its weights as the `Linear`,
//! `Norm` and `Embedding` of a [`Weights`] set, builds them through a [`Loader`] (the only code
//! that knows how and under which names weights are stored, and which of them are trained),
//! and writes `forward<E: Exec>` once. Two executors run it:
//! - [`super::infer::Infer`]: today's inference kernels (quantized products, fused GEMMs), with
//!   the KV cache held by the caller, not the model;
//! - `train::tape::Tape`: each op's forward from `train/ops.rs`, recorded with exactly what its
//!   hand-written backward needs, so the backward pass composes itself.
//!
//! Ops are layer-sized, the granularity of the fused kernels and of the backward passes.

use std::sync::Arc;

use super::recurrent::RecurrentSpec;
use super::{Activation, Rope};
use crate::error::Result;

/// The weight types of one executor.
pub trait Weights {
    type Linear;
    type Norm;
    type Embedding;
}

/// Several outputs computed side by side from one input: Q|K|V, gate|up.
pub enum Parts<L> {
    /// One stored matrix whose output columns are the parts, of these widths (Phi-3's
    /// `qkv_proj`, GPT-2's `c_attn`). LoRA, when trained, is on the whole matrix, as PEFT does.
    Fused(L, Vec<usize>),
    /// Separately stored matrices (Llama's `q_proj`, `k_proj`, `v_proj`).
    Separate(Vec<L>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    /// RMSNorm scaled by `1 + w` (Gemma): checkpoints store the offset from one.
    RmsOffset,
    Layer,
}

/// The facts of one self-attention layer.
#[derive(Clone)]
pub struct AttnSpec {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope: Option<Arc<Rope>>,
    /// Sliding window: a query sees this many positions, itself included.
    pub window: Option<usize>,
    /// Dropout on the attention probabilities while training (the config's rate).
    pub dropout: f32,
    /// Decoders see earlier positions only; encoders see every non-padding position.
    pub causal: bool,
    /// The scores' scale when it is not `1/√head_dim` (Gemma's `query_pre_attn_scalar^-½`).
    pub scale: Option<f32>,
    /// Scores soft-capped to `cap·tanh(s/cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

impl AttnSpec {
    /// How the scores are formed, as the kernels take it.
    pub fn scores(&self) -> super::attention::Scores {
        super::attention::Scores {
            scale: self.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt()),
            softcap: self.softcap,
            window: self.window,
        }
    }
}

/// T5's relative positions: a score's learned bias depends on the bucket of its key's
/// distance from the query, exact for near keys and logarithmic up to `max_distance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelativePositions {
    pub buckets: usize,
    pub max_distance: usize,
    /// Encoders tell earlier from later keys; decoders see earlier ones only.
    pub bidirectional: bool,
}

impl RelativePositions {
    /// transformers' `T5Attention._relative_position_bucket` of `key − query`, in the same
    /// f32 arithmetic (the truncation of its logarithm decides the larger buckets).
    pub fn bucket(&self, rel: isize) -> u32 {
        let (mut n, mut bucket) = (self.buckets, 0);
        let dist = if self.bidirectional {
            n /= 2;
            if rel > 0 {
                bucket += n;
            }
            rel.unsigned_abs()
        } else {
            (-rel.min(0)) as usize
        };
        let exact = n / 2;
        if dist < exact {
            return (bucket + dist) as u32;
        }
        let ratio = (self.max_distance as f64 / exact as f64).ln() as f32;
        let large =
            exact + ((dist as f32 / exact as f32).ln() / ratio * (n - exact) as f32) as usize;
        (bucket + large.min(n - 1)) as u32
    }

    /// The bucket of every distance `−d..=d`, `d` = `max_distance`: every farther key shares
    /// the bucket of distance ±d.
    pub fn ids(&self) -> Vec<u32> {
        let d = self.max_distance as isize;
        (-d..=d).map(|r| self.bucket(r)).collect()
    }
}

/// Which rows of `[tokens, width]` an op picks, per sequence or overall.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// Each sequence's first position (`[CLS]`).
    First,
    /// Each sequence's last position (its length − 1).
    Last,
    /// These rows of the whole batch (`sequence · t + position`): masked positions.
    Pick(&'a [usize]),
}

/// How a sequence's positions become one row (a classifier's input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    Mean,
    Max,
}

/// What a family's forward pass can do. The executor knows the batch (its sequences, lengths
/// and positions); the family only wires layers.
pub trait Exec {
    type W: Weights;
    type X: Clone;

    /// Rows of the table for the batch's tokens, `[tokens, dim]`.
    fn embed(&mut self, e: &<Self::W as Weights>::Embedding, ids: &[u32]) -> Result<Self::X>;
    /// Rows of a learned position table for the positions of the batch's tokens, the first
    /// position being row `offset` (RoBERTa skips its padding rows).
    fn positions(&mut self, e: &<Self::W as Weights>::Embedding, offset: usize) -> Result<Self::X>;
    /// `act(x·Wᵀ + b)`.
    fn linear(
        &mut self,
        l: &<Self::W as Weights>::Linear,
        x: &Self::X,
        act: Option<Activation>,
    ) -> Result<Self::X>;
    fn parts<const N: usize>(
        &mut self,
        p: &Parts<<Self::W as Weights>::Linear>,
        x: &Self::X,
    ) -> Result<[Self::X; N]>;
    fn norm(&mut self, n: &<Self::W as Weights>::Norm, x: &Self::X) -> Result<Self::X>;
    /// The norm applied to each head's `n.size` values of `[tokens, heads·size]` on its own
    /// (Gemma 3's and Qwen 3's q/k norms).
    fn norm_heads(&mut self, n: &<Self::W as Weights>::Norm, x: Self::X) -> Result<Self::X>;
    /// `s·x` (Gemma's embeddings, scaled by √hidden).
    fn scale(&mut self, x: Self::X, s: f32) -> Result<Self::X>;
    /// `cap·tanh(x/cap)` (Gemma 2's final logits).
    fn softcap(&mut self, x: Self::X, cap: f32) -> Result<Self::X>;
    /// `norm(x + residual)`: the post-LN block of encoders, fused where it can be.
    fn add_norm(
        &mut self,
        n: &<Self::W as Weights>::Norm,
        x: Self::X,
        residual: Self::X,
    ) -> Result<Self::X> {
        let y = self.add(x, residual)?;
        self.norm(n, &y)
    }
    /// `a + b`. Consumes both (the residual stream is updated in place where it can be).
    fn add(&mut self, a: Self::X, b: Self::X) -> Result<Self::X>;
    /// `act(gate) ⊙ up`.
    fn glu(&mut self, gate: &Self::X, up: &Self::X, act: Activation) -> Result<Self::X>;
    /// Self-attention of layer `layer` (`[tokens, heads·hd]` in, the same out, before the
    /// output projection): RoPE, GQA, causal mask, padding and window. Takes Q, K and V by
    /// value: an executor may rotate them in place.
    fn attention(
        &mut self,
        a: &AttnSpec,
        layer: usize,
        q: Self::X,
        k: Self::X,
        v: Self::X,
    ) -> Result<Self::X>;
    /// One direction of a recurrent layer (PyTorch's LSTM or GRU) over `gx`, the input
    /// projection `x·W_ihᵀ + b_ih` of every position, with `hh` as `W_hh` and `b_hh`. Each
    /// sequence starts from the state the executor holds in `slot` (a new sequence from zeros)
    /// and leaves its final state there, so a stream can be run chunk after chunk. Returns
    /// `h` of every position.
    fn recurrent(
        &mut self,
        r: &RecurrentSpec,
        hh: &<Self::W as Weights>::Linear,
        slot: usize,
        gx: Self::X,
    ) -> Result<Self::X>;
    /// T5's position bias: the learned bias of each head (`table`: `[buckets, heads]`) for
    /// every key-minus-query distance, as [`Exec::attention_biased`] reads it.
    fn relative_bias(
        &mut self,
        _table: &<Self::W as Weights>::Embedding,
        _rel: RelativePositions,
    ) -> Result<Self::X> {
        Err(crate::error::Error::Unsupported(
            "relative position biases in this executor".into(),
        ))
    }
    /// Self-attention with `bias` (from [`Exec::relative_bias`]) added to the scores.
    fn attention_biased(
        &mut self,
        _a: &AttnSpec,
        _layer: usize,
        _q: Self::X,
        _k: Self::X,
        _v: Self::X,
        _bias: &Self::X,
    ) -> Result<Self::X> {
        Err(crate::error::Error::Unsupported(
            "relative position biases in this executor".into(),
        ))
    }
    /// A decoder's attention over the encoder's states `memory`: keys and values are `k` and
    /// `v` of `memory`, every source position visible. The executor may keep them in cache
    /// slot `slot` from one decoding step to the next, and is then given no `memory`.
    fn cross_attention(
        &mut self,
        _a: &AttnSpec,
        _slot: usize,
        _q: Self::X,
        _k: &<Self::W as Weights>::Linear,
        _v: &<Self::W as Weights>::Linear,
        _memory: Option<&Self::X>,
    ) -> Result<Self::X> {
        Err(crate::error::Error::Unsupported(
            "cross-attention in this executor".into(),
        ))
    }
    fn rows(&mut self, x: &Self::X, which: Rows) -> Result<Self::X>;
    /// `[a | b]`, row by row (the two directions of a bidirectional layer).
    fn concat(&mut self, a: Self::X, b: Self::X) -> Result<Self::X>;
    /// One row per sequence: the mean or the element-wise maximum of its positions, padding
    /// left out.
    fn pool(&mut self, x: Self::X, how: Pool) -> Result<Self::X>;
    /// Dropout with probability `p` while training; the identity otherwise.
    fn dropout(&mut self, x: Self::X, p: f32) -> Result<Self::X>;
}

/// How a family gets its weights: by Hugging Face name, with the shape the config implies.
/// `name` is a module's prefix (`model.layers.0.self_attn.q_proj`); the loader adds
/// `.weight` / `.bias` and knows the stored layout.
pub trait Loader {
    type W: Weights;
    fn contains(&self, tensor: &str) -> bool;
    /// `nn.Linear`: weight `[dout, din]`.
    fn linear(
        &mut self,
        name: &str,
        din: usize,
        dout: usize,
        bias: bool,
    ) -> Result<<Self::W as Weights>::Linear>;
    /// A linear layer whose tensors are named on their own, weight `[dout, din]` (PyTorch's
    /// `rnn.weight_ih_l0` and `rnn.bias_ih_l0`).
    fn linear_named(
        &mut self,
        weight: &str,
        bias: Option<&str>,
        din: usize,
        dout: usize,
    ) -> Result<<Self::W as Weights>::Linear>;
    /// GPT-2's `Conv1D`: weight stored `[din, dout]`, always with a bias.
    fn conv1d(
        &mut self,
        name: &str,
        din: usize,
        dout: usize,
    ) -> Result<<Self::W as Weights>::Linear>;
    /// Separately stored projections of one input; an executor may fuse them.
    fn parts(
        &mut self,
        names: &[&str],
        din: usize,
        douts: &[usize],
        bias: bool,
    ) -> Result<Parts<<Self::W as Weights>::Linear>> {
        Ok(Parts::Separate(self.each(names, din, douts, bias)?))
    }
    /// Each of `names` as its own linear layer.
    fn each(
        &mut self,
        names: &[&str],
        din: usize,
        douts: &[usize],
        bias: bool,
    ) -> Result<Vec<<Self::W as Weights>::Linear>> {
        names
            .iter()
            .zip(douts)
            .map(|(n, &d)| self.linear(n, din, d, bias))
            .collect()
    }
    fn norm(
        &mut self,
        kind: NormKind,
        name: &str,
        size: usize,
        eps: f64,
    ) -> Result<<Self::W as Weights>::Norm>;
    fn embedding(
        &mut self,
        name: &str,
        count: usize,
        dim: usize,
    ) -> Result<<Self::W as Weights>::Embedding>;
    /// A token table whose `padding` row gets no gradient from lookups, as PyTorch's
    /// `nn.Embedding(padding_idx=…)` (BART's, Marian's); to inference, a table like any other.
    fn padded_embedding(
        &mut self,
        name: &str,
        count: usize,
        dim: usize,
        _padding: u32,
    ) -> Result<<Self::W as Weights>::Embedding> {
        self.embedding(name, count, dim)
    }
    /// A table the checkpoint does not store because the family computes it (Marian's
    /// sinusoidal positions), `[count, dim]` row-major; never trained.
    fn computed(
        &mut self,
        name: &str,
        count: usize,
        dim: usize,
        values: Vec<f32>,
    ) -> Result<<Self::W as Weights>::Embedding>;
    /// An output layer reading the embedding table `name` (tied weights), with the bias
    /// tensor `bias` (a masked-LM decoder's).
    fn tied(
        &mut self,
        name: &str,
        count: usize,
        dim: usize,
        bias: Option<&str>,
    ) -> Result<<Self::W as Weights>::Linear>;
    /// A task head's linear layer (with bias). Training makes a new one (transformers' init:
    /// N(0, 0.02²), zero bias) when the checkpoint has none of this shape, and trains it
    /// with LoRA too when `saved` (PEFT's `modules_to_save`).
    fn head(
        &mut self,
        name: &str,
        din: usize,
        dout: usize,
        saved: bool,
    ) -> Result<<Self::W as Weights>::Linear>;
    /// A task head's LayerNorm: new (ones, zeros) in training when the checkpoint has none.
    fn head_norm(
        &mut self,
        name: &str,
        size: usize,
        eps: f64,
    ) -> Result<<Self::W as Weights>::Norm>;
}

/// A causal LM family, written once over any executor.
pub trait CausalFamily<W: Weights> {
    /// Logits of every position (`last_only`: of each sequence's last position).
    fn forward<E: Exec<W = W>>(&self, e: &mut E, ids: &[u32], last_only: bool) -> Result<E::X>;
    /// Cache slots: the layers (one per direction of a recurrent layer).
    fn n_layers(&self) -> usize;
    fn context_length(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// The model carries a recurrent state instead of attending over a window: a text is run
    /// as one stream, however long.
    fn recurrent(&self) -> bool {
        false
    }
}

/// An encoder-decoder family (T5, BART, Marian), written once over any executor.
pub trait Seq2SeqFamily<W: Weights> {
    /// The encoder's final states of the source `ids`, `[tokens, d_model]`.
    fn encode<E: Exec<W = W>>(&self, e: &mut E, ids: &[u32]) -> Result<E::X>;
    /// Logits of the decoder's rows `ids` (`last_only`: of each sequence's last one) over the
    /// encoder states `memory` (None once the executor holds them in cache).
    fn decode<E: Exec<W = W>>(
        &self,
        e: &mut E,
        ids: &[u32],
        memory: Option<&E::X>,
        last_only: bool,
    ) -> Result<E::X>;
    /// Cache slots of the decoder: its self-attention layers, then its cross-attention ones.
    fn n_slots(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// The longest source and target, where learned positions bound them.
    fn context_length(&self) -> usize;
}

/// The `N` parts an executor computed as a list, as an array.
pub fn array<X, const N: usize>(v: Vec<X>) -> Result<[X; N]> {
    <[X; N]>::try_from(v).map_err(|v| {
        crate::error::Error::msg(format!("internal: expected {N} parts, got {}", v.len()))
    })
}
