//! BERT (MiniLM is a BERT), DistilBERT and RoBERTa: post-LayerNorm bidirectional encoders with
//! learned positions, and their task heads. The three differ only in weight names, segment
//! embeddings and the position offset, so one network serves all of them.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::Weight;
use crate::nn::{Activation, Attention, Embedding, LayerNorm, Linear, Mlp, QkvProj, Vb};
use crate::tokenize::EncoderInput;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Bert,
    DistilBert,
    Roberta,
}

/// What the checkpoint's head computes, from `architectures` (e.g. `BertForMaskedLM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// The bare encoder: hidden states (and BERT's pooler).
    Base,
    MaskedLm,
    SequenceClassification,
    TokenClassification,
}

impl Task {
    fn from_architecture(name: &str) -> Self {
        if name.ends_with("ForMaskedLM") || name.ends_with("ForPreTraining") {
            Task::MaskedLm
        } else if name.ends_with("ForSequenceClassification") {
            Task::SequenceClassification
        } else if name.ends_with("ForTokenClassification") {
            Task::TokenClassification
        } else {
            Task::Base
        }
    }
}

/// One config for the three flavors, in BERT's key names; DistilBERT's are mapped on reading.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub problem_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(skip, default = "bert")]
    pub flavor: Flavor,
}

fn gelu() -> Activation {
    Activation::Gelu
}
fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn bert() -> Flavor {
    Flavor::Bert
}

/// DistilBERT's config.json keys.
#[derive(Deserialize)]
struct DistilBertConfig {
    vocab_size: usize,
    dim: usize,
    n_layers: usize,
    n_heads: usize,
    hidden_dim: usize,
    #[serde(default = "gelu")]
    activation: Activation,
    max_position_embeddings: usize,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default)]
    id2label: Option<BTreeMap<String, String>>,
    #[serde(default)]
    problem_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
}

impl Config {
    pub fn from_json(json: serde_json::Value, flavor: Flavor) -> serde_json::Result<Self> {
        let mut c = match flavor {
            Flavor::DistilBert => {
                let d: DistilBertConfig = serde_json::from_value(json)?;
                Config {
                    vocab_size: d.vocab_size,
                    hidden_size: d.dim,
                    num_hidden_layers: d.n_layers,
                    num_attention_heads: d.n_heads,
                    intermediate_size: d.hidden_dim,
                    hidden_act: d.activation,
                    max_position_embeddings: d.max_position_embeddings,
                    type_vocab_size: 0,
                    layer_norm_eps: 1e-12,
                    pad_token_id: d.pad_token_id,
                    position_embedding_type: None,
                    id2label: d.id2label,
                    problem_type: d.problem_type,
                    architectures: d.architectures,
                    flavor,
                }
            }
            _ => serde_json::from_value(json)?,
        };
        c.flavor = flavor;
        Ok(c)
    }

    pub fn task(&self) -> Task {
        self.architectures
            .first()
            .map_or(Task::Base, |a| Task::from_architecture(a))
    }

    /// Positions a text may use: RoBERTa's first `pad_token_id + 1` rows are never used.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings - self.position_offset()
    }

    pub(crate) fn position_offset(&self) -> usize {
        match self.flavor {
            Flavor::Roberta => self.pad_token_id.unwrap_or(1) as usize + 1,
            _ => 0,
        }
    }

    fn eps(&self) -> f64 {
        self.layer_norm_eps
    }
}

/// A padded batch of encoder inputs, right-padded as transformers pads BERT.
pub struct EncoderBatch {
    /// `[b, t]` u32.
    pub ids: Tensor,
    pub type_ids: Tensor,
    /// `[b, t]` f32: 1 for tokens, 0 for padding.
    pub mask: Tensor,
    pub lengths: Vec<usize>,
}

impl EncoderBatch {
    pub fn new(inputs: &[EncoderInput], pad_id: u32) -> Result<Self> {
        // Attention over zero positions has no defined output (and pooling divides by the
        // length): a text the tokenizer turns into nothing is the caller's error to report.
        if inputs.iter().any(|i| i.ids.is_empty()) {
            return Err(crate::Error::msg(
                "a text has no tokens at all (the tokenizer added no special tokens)",
            ));
        }
        let t = inputs.iter().map(|i| i.ids.len()).max().unwrap_or(0);
        let b = inputs.len();
        let (mut ids, mut types, mut mask) = (
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
        );
        for inp in inputs {
            let pad = t - inp.ids.len();
            ids.extend(
                inp.ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_id, pad)),
            );
            types.extend(
                inp.type_ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
            mask.extend(
                std::iter::repeat_n(1f32, inp.ids.len()).chain(std::iter::repeat_n(0.0, pad)),
            );
        }
        let dev = &Device::Cpu;
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), dev)?,
            type_ids: Tensor::from_vec(types, (b, t), dev)?,
            mask: Tensor::from_vec(mask, (b, t), dev)?,
            lengths: inputs.iter().map(|i| i.ids.len()).collect(),
        })
    }
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Option<Embedding>,
    norm: LayerNorm,
    offset: usize,
}

impl Embeddings {
    fn new(cfg: &Config, vb: &Vb) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word: Embedding::new(cfg.vocab_size, h, &vb.pp("word_embeddings"))?,
            position: Embedding::new(
                cfg.max_position_embeddings,
                h,
                &vb.pp("position_embeddings"),
            )?,
            token_type: (cfg.type_vocab_size > 0)
                .then(|| Embedding::new(cfg.type_vocab_size, h, &vb.pp("token_type_embeddings")))
                .transpose()?,
            norm: LayerNorm::new(h, cfg.eps(), &vb.pp("LayerNorm"))?,
            offset: cfg.position_offset(),
        })
    }

    fn forward(&self, batch: &EncoderBatch) -> Result<Tensor> {
        let t = batch.ids.dims()[1];
        let positions: Vec<u32> = (self.offset as u32..(self.offset + t) as u32).collect();
        let pos = Tensor::new(positions.as_slice(), &Device::Cpu)?;
        let mut x = self
            .word
            .forward(&batch.ids)?
            .broadcast_add(&self.position.forward(&pos)?)?;
        match &self.token_type {
            // RoBERTa has a single segment row, used for every token whatever the tokenizer says.
            Some(tt) if tt.table()?.dim(0)? == 1 => x = x.broadcast_add(&tt.table()?.get(0)?)?,
            Some(tt) => x = (x + tt.forward(&batch.type_ids)?)?,
            None => {}
        }
        self.norm.forward(&x)
    }
}

/// Post-LN block: `x = norm1(x + attn(x)); x = norm2(x + mlp(x))`.
struct Layer {
    attn: Attention,
    attn_norm: LayerNorm,
    mlp: Mlp,
    out_norm: LayerNorm,
}

impl Layer {
    fn new(cfg: &Config, vb: &Vb) -> Result<Self> {
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let lin = |i, o, name: &str| Linear::new(i, o, true, &vb.pp(name));
        let [q, k, v, o, attn_norm, fc, proj, out_norm] = match cfg.flavor {
            Flavor::DistilBert => [
                "attention.q_lin",
                "attention.k_lin",
                "attention.v_lin",
                "attention.out_lin",
                "sa_layer_norm",
                "ffn.lin1",
                "ffn.lin2",
                "output_layer_norm",
            ],
            _ => [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "attention.output.LayerNorm",
                "intermediate.dense",
                "output.dense",
                "output.LayerNorm",
            ],
        };
        // One GEMM for Q, K and V, read in place by the attention kernel.
        let (q, k, v) = (lin(h, h, q)?, lin(h, h, k)?, lin(h, h, v)?);
        let qkv = match Linear::try_concat(&[&q, &k, &v])? {
            Some(l) => QkvProj::Fused(l),
            None => QkvProj::Separate { q, k, v },
        };
        Ok(Self {
            attn: Attention::new(qkv, lin(h, h, o)?, heads, heads, h / heads, None),
            attn_norm: LayerNorm::new(h, cfg.eps(), &vb.pp(attn_norm))?,
            mlp: Mlp::Plain {
                fc: lin(h, cfg.intermediate_size, fc)?,
                proj: lin(cfg.intermediate_size, h, proj)?,
                act: cfg.hidden_act,
            },
            out_norm: LayerNorm::new(h, cfg.eps(), &vb.pp(out_norm))?,
        })
    }

    fn forward(&self, x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let a = self.attn.forward_bidirectional(x, lengths)?;
        let x = self.attn_norm.forward_residual(&a, Some(x))?;
        self.out_norm
            .forward_residual(&self.mlp.forward(&x)?, Some(&x))
    }
}

/// `out(act(dense(x)))` on the first token: BERT's pooler + classifier, DistilBERT's
/// pre_classifier + ReLU + classifier, RoBERTa's classification head.
struct ClsHead {
    dense: Linear,
    act: Activation,
    out: Option<Linear>,
}

impl ClsHead {
    fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let x = self.act.forward(&self.dense.forward(&first)?)?;
        match &self.out {
            Some(out) => out.forward(&x),
            None => Ok(x),
        }
    }
}

/// `decoder(norm(act(dense(x))))`, the decoder usually tied to the word embeddings.
struct MlmHead {
    dense: Linear,
    act: Activation,
    norm: LayerNorm,
    decoder: Linear,
}

impl MlmHead {
    /// `names`: dense, norm, decoder, bias.
    fn new(cfg: &Config, vb: &Vb, names: [&str; 4], tied: &Tensor) -> Result<Self> {
        let h = cfg.hidden_size;
        let [dense, norm, decoder, bias] = names;
        let decoder_w = if vb.contains(&format!("{decoder}.weight")) {
            vb.pp(decoder).get_weight("weight", &[cfg.vocab_size, h])?
        } else {
            Weight::Dense(tied.clone())
        };
        Ok(Self {
            dense: Linear::new(h, h, true, &vb.pp(dense))?,
            act: cfg.hidden_act,
            norm: LayerNorm::new(h, cfg.eps(), &vb.pp(norm))?,
            decoder: Linear::from_weight(decoder_w, Some(vb.get(bias, &[cfg.vocab_size])?))?,
        })
    }

    fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = self.act.forward(&self.dense.forward(hidden)?)?;
        self.decoder.forward(&self.norm.forward(&x)?)
    }
}

enum Head {
    None,
    MaskedLm(MlmHead),
    Sequence(ClsHead),
    Token(Linear),
}

pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// BERT's pooler, when the checkpoint has one and no other head uses it.
    pooler: Option<ClsHead>,
    head: Head,
    pub config: Config,
    pub task: Task,
    /// `id2label`, or `LABEL_i` for every output of a classifier without it.
    pub labels: Vec<String>,
}

impl Bert {
    pub fn new(cfg: &Config, vb: &Vb) -> Result<Self> {
        let body_name = match cfg.flavor {
            Flavor::Bert => "bert",
            Flavor::DistilBert => "distilbert",
            Flavor::Roberta => "roberta",
        };
        // Task checkpoints nest the encoder under "bert." (etc.); base checkpoints do not.
        let body = if vb.contains(&format!("{body_name}.embeddings.word_embeddings.weight")) {
            vb.pp(body_name)
        } else {
            vb.clone()
        };
        let embeddings = Embeddings::new(cfg, &body.pp("embeddings"))?;
        let layer_root = match cfg.flavor {
            Flavor::DistilBert => body.pp("transformer.layer"),
            _ => body.pp("encoder.layer"),
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, &layer_root.pp(i)))
            .collect::<Result<_>>()?;
        let h = cfg.hidden_size;
        let task = cfg.task();
        let n_labels = |name: &str| -> Result<usize> {
            match (&cfg.id2label, vb.shape_of(&format!("{name}.weight"))) {
                (_, Some(shape)) => Ok(shape[0]),
                (Some(m), None) => Ok(m.len()),
                (None, None) => Err(Error::file(
                    vb.store_path(),
                    format!("the classifier weight '{name}.weight' is missing"),
                )),
            }
        };
        let bert_pooler = || -> Result<Option<ClsHead>> {
            if cfg.flavor != Flavor::Bert || !body.contains("pooler.dense.weight") {
                return Ok(None);
            }
            Ok(Some(ClsHead {
                dense: Linear::new(h, h, true, &body.pp("pooler.dense"))?,
                act: Activation::Tanh,
                out: None,
            }))
        };
        let mut labels = Vec::new();
        let mut pooler = None;
        let head = match task {
            Task::Base => {
                pooler = bert_pooler()?;
                Head::None
            }
            Task::MaskedLm => {
                let names = match cfg.flavor {
                    Flavor::Bert => [
                        "cls.predictions.transform.dense",
                        "cls.predictions.transform.LayerNorm",
                        "cls.predictions.decoder",
                        "cls.predictions.bias",
                    ],
                    Flavor::DistilBert => [
                        "vocab_transform",
                        "vocab_layer_norm",
                        "vocab_projector",
                        "vocab_projector.bias",
                    ],
                    Flavor::Roberta => [
                        "lm_head.dense",
                        "lm_head.layer_norm",
                        "lm_head.decoder",
                        "lm_head.bias",
                    ],
                };
                Head::MaskedLm(MlmHead::new(cfg, vb, names, &embeddings.word.table()?)?)
            }
            Task::SequenceClassification => {
                let (dense, act, out) = match cfg.flavor {
                    Flavor::Bert => ("", Activation::Tanh, "classifier"),
                    Flavor::DistilBert => ("pre_classifier", Activation::Relu, "classifier"),
                    Flavor::Roberta => {
                        ("classifier.dense", Activation::Tanh, "classifier.out_proj")
                    }
                };
                let n = n_labels(out)?;
                labels = label_names(cfg, n);
                let dense = match bert_pooler()? {
                    Some(p) if dense.is_empty() => p.dense,
                    _ if dense.is_empty() => {
                        return Err(Error::file(
                            vb.store_path(),
                            "BertForSequenceClassification needs the pooler weights 'bert.pooler.dense.*'",
                        ))
                    }
                    _ => Linear::new(h, h, true, &vb.pp(dense))?,
                };
                Head::Sequence(ClsHead {
                    dense,
                    act,
                    out: Some(Linear::new(h, n, true, &vb.pp(out))?),
                })
            }
            Task::TokenClassification => {
                let n = n_labels("classifier")?;
                labels = label_names(cfg, n);
                Head::Token(Linear::new(h, n, true, &vb.pp("classifier"))?)
            }
        };
        Ok(Self {
            embeddings,
            layers,
            pooler,
            head,
            config: cfg.clone(),
            task,
            labels,
        })
    }

    /// The last hidden states, `[b, t, hidden]`.
    pub fn hidden_states(&self, batch: &EncoderBatch) -> Result<Tensor> {
        let mut x = self.embeddings.forward(batch)?;
        for l in &self.layers {
            x = l.forward(&x, &batch.lengths)?;
        }
        Ok(x)
    }

    /// BERT's pooler output (`tanh(dense(h[:, 0]))`), for checkpoints that have one.
    pub fn pooled(&self, hidden: &Tensor) -> Result<Option<Tensor>> {
        self.pooler.as_ref().map(|p| p.forward(hidden)).transpose()
    }

    /// The head's logits: `[b, t, vocab]` (masked LM), `[b, labels]` (sequence) or
    /// `[b, t, labels]` (token classification).
    pub fn logits(&self, batch: &EncoderBatch) -> Result<Tensor> {
        let hidden = self.hidden_states(batch)?;
        match &self.head {
            Head::None => Err(Error::msg(
                "this checkpoint is a bare encoder with no task head (architectures: BertModel or similar)",
            )),
            Head::MaskedLm(h) => h.forward(&hidden),
            Head::Sequence(h) => h.forward(&hidden),
            Head::Token(l) => l.forward(&hidden),
        }
    }

    /// Whether a classifier's outputs are independent sigmoids rather than one softmax.
    pub fn multi_label(&self) -> bool {
        self.config.problem_type.as_deref() == Some("multi_label_classification")
    }
}

fn label_names(cfg: &Config, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            cfg.id2label
                .as_ref()
                .and_then(|m| m.get(&i.to_string()).cloned())
                .unwrap_or_else(|| format!("LABEL_{i}"))
        })
        .collect()
}

/// Softmax (or sigmoid for multi-label heads) over the last dimension, as probabilities.
pub fn probabilities(logits: &Tensor, multi_label: bool) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    Ok(if multi_label {
        candle_nn::ops::sigmoid(&logits)?
    } else {
        candle_nn::ops::softmax(&logits, D::Minus1)?
    })
}
