//! BERT (MiniLM is a BERT), DistilBERT and RoBERTa: post-LayerNorm bidirectional encoders with
//! learned positions, and their task heads. The three differ only in weight names, segment
//! embeddings and the position offset, so one network serves all of them.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::exec::{AttnSpec, Exec, Loader, NormKind, Parts, Rows, Weights};
use crate::nn::infer::{stored_tensor, Act, Infer, InferW, VbLoader};
use crate::nn::{Activation, Vb};
use crate::tokenize::EncoderInput;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Bert,
    DistilBert,
    Roberta,
}

impl Flavor {
    /// The modules PEFT's LoRA targets by default for this model type.
    pub fn lora_targets(self) -> &'static [&'static str] {
        match self {
            Flavor::DistilBert => &["q_lin", "v_lin"],
            Flavor::Bert | Flavor::Roberta => &["query", "value"],
        }
    }
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
    /// Read by [`Config::from_json`] from each flavor's keys.
    #[serde(skip, default = "no_dropout")]
    pub dropout: DropoutRates,
}

fn no_dropout() -> DropoutRates {
    DropoutRates {
        hidden: 0.0,
        attention: 0.0,
        classifier: 0.0,
    }
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
        let rate = |k: &str, d: f32| json.get(k).and_then(|v| v.as_f64()).map_or(d, |v| v as f32);
        let dropout = match flavor {
            Flavor::DistilBert => DropoutRates {
                hidden: rate("dropout", 0.1),
                attention: rate("attention_dropout", 0.1),
                classifier: rate("seq_classif_dropout", 0.2),
            },
            _ => {
                let hidden = rate("hidden_dropout_prob", 0.1);
                DropoutRates {
                    hidden,
                    attention: rate("attention_probs_dropout_prob", 0.1),
                    // null: the hidden rate, as transformers does.
                    classifier: rate("classifier_dropout", hidden),
                }
            }
        };
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
                    dropout,
                }
            }
            _ => serde_json::from_value(json)?,
        };
        c.flavor = flavor;
        c.dropout = dropout;
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

/// Dropout rates as each flavor's config names them (transformers' defaults).
#[derive(Debug, Clone, Copy)]
pub struct DropoutRates {
    /// Embeddings and the residual branches.
    pub hidden: f32,
    pub attention: f32,
    /// Before the classifier.
    pub classifier: f32,
}

struct Embeddings<W: Weights> {
    word: W::Embedding,
    position: W::Embedding,
    token_type: Option<W::Embedding>,
    norm: W::Norm,
}

/// Post-LN block: `x = norm1(x + attn(x)); x = norm2(x + mlp(x))`.
struct Layer<W: Weights> {
    qkv: Parts<W::Linear>,
    o: W::Linear,
    attn_norm: W::Norm,
    fc: W::Linear,
    proj: W::Linear,
    out_norm: W::Norm,
}

enum Head<W: Weights> {
    None,
    /// `decoder(norm(act(dense(x))))`, the decoder tied to the word embeddings.
    MaskedLm {
        dense: W::Linear,
        norm: W::Norm,
        decoder: W::Linear,
    },
    /// On the first token: BERT's pooler + classifier, DistilBERT's pre_classifier + ReLU +
    /// classifier, RoBERTa's dense + tanh + out_proj.
    Sequence {
        dense: W::Linear,
        act: Activation,
        out: W::Linear,
    },
    Token(W::Linear),
}

/// The model's weight names: `body` is the task model's prefix (`bert`, `distilbert`,
/// `roberta`); a bare checkpoint stores them without it (the loaders find both).
struct Names {
    body: &'static str,
    layers: &'static str,
    /// q, k, v, attention output, its norm, fc, proj, output norm.
    layer: [&'static str; 8],
}

impl Names {
    fn of(flavor: Flavor) -> Self {
        match flavor {
            Flavor::DistilBert => Names {
                body: "distilbert",
                layers: "transformer.layer",
                layer: [
                    "attention.q_lin",
                    "attention.k_lin",
                    "attention.v_lin",
                    "attention.out_lin",
                    "sa_layer_norm",
                    "ffn.lin1",
                    "ffn.lin2",
                    "output_layer_norm",
                ],
            },
            _ => Names {
                body: if flavor == Flavor::Roberta {
                    "roberta"
                } else {
                    "bert"
                },
                layers: "encoder.layer",
                layer: [
                    "attention.self.query",
                    "attention.self.key",
                    "attention.self.value",
                    "attention.output.dense",
                    "attention.output.LayerNorm",
                    "intermediate.dense",
                    "output.dense",
                    "output.LayerNorm",
                ],
            },
        }
    }
}

/// BERT, DistilBERT or RoBERTa with one task head, over inference or training weights.
pub struct Bert<W: Weights = InferW> {
    embeddings: Embeddings<W>,
    layers: Vec<Layer<W>>,
    /// BERT's pooler, when the checkpoint has one and no other head uses it.
    pooler: Option<W::Linear>,
    head: Head<W>,
    attn: AttnSpec,
    pub config: Config,
    pub task: Task,
    /// `id2label`, or `LABEL_i` for every output of a classifier without it.
    pub labels: Vec<String>,
    pub dropout: DropoutRates,
}

impl<W: Weights> Bert<W> {
    /// The encoder with the head of `task`; `labels` name a classifier's outputs.
    pub fn new(
        cfg: &Config,
        l: &mut impl Loader<W = W>,
        task: Task,
        labels: Vec<String>,
    ) -> Result<Self> {
        let n = Names::of(cfg.flavor);
        let body = n.body;
        let (h, heads, eps) = (cfg.hidden_size, cfg.num_attention_heads, cfg.eps());
        let emb = |m: &str| format!("{body}.embeddings.{m}");
        let embeddings = Embeddings {
            word: l.embedding(&emb("word_embeddings"), cfg.vocab_size, h)?,
            position: l.embedding(&emb("position_embeddings"), cfg.max_position_embeddings, h)?,
            token_type: (cfg.type_vocab_size > 0)
                .then(|| l.embedding(&emb("token_type_embeddings"), cfg.type_vocab_size, h))
                .transpose()?,
            norm: l.norm(NormKind::Layer, &emb("LayerNorm"), h, eps)?,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let m = |k: usize| format!("{body}.{}.{i}.{}", n.layers, n.layer[k]);
            let inter = cfg.intermediate_size;
            layers.push(Layer {
                qkv: l.parts(&[&m(0), &m(1), &m(2)], h, &[h, h, h], true)?,
                o: l.linear(&m(3), h, h, true)?,
                attn_norm: l.norm(NormKind::Layer, &m(4), h, eps)?,
                fc: l.linear(&m(5), h, inter, true)?,
                proj: l.linear(&m(6), inter, h, true)?,
                out_norm: l.norm(NormKind::Layer, &m(7), h, eps)?,
            });
        }
        let pooler_name = format!("{body}.pooler.dense");
        let has_pooler = cfg.flavor == Flavor::Bert && l.contains(&format!("{pooler_name}.weight"));
        let mut pooler = None;
        let head = match task {
            Task::Base => {
                if has_pooler {
                    pooler = Some(l.linear(&pooler_name, h, h, true)?);
                }
                Head::None
            }
            Task::MaskedLm => {
                let [dense, norm, bias] = match cfg.flavor {
                    Flavor::Bert => [
                        "cls.predictions.transform.dense",
                        "cls.predictions.transform.LayerNorm",
                        "cls.predictions.bias",
                    ],
                    Flavor::DistilBert => [
                        "vocab_transform",
                        "vocab_layer_norm",
                        "vocab_projector.bias",
                    ],
                    Flavor::Roberta => ["lm_head.dense", "lm_head.layer_norm", "lm_head.bias"],
                };
                Head::MaskedLm {
                    dense: l.head(dense, h, h, true)?,
                    norm: l.head_norm(norm, h, eps)?,
                    // transformers ties the decoder to the word embeddings on load.
                    decoder: l.tied(&emb("word_embeddings"), cfg.vocab_size, h, Some(bias))?,
                }
            }
            Task::SequenceClassification => {
                let k = labels.len();
                match cfg.flavor {
                    // The pooler is the model's: frozen in LoRA runs, as PEFT leaves it.
                    Flavor::Bert => Head::Sequence {
                        dense: l.head(&pooler_name, h, h, false)?,
                        act: Activation::Tanh,
                        out: l.head("classifier", h, k, true)?,
                    },
                    Flavor::DistilBert => Head::Sequence {
                        dense: l.head("pre_classifier", h, h, true)?,
                        act: Activation::Relu,
                        out: l.head("classifier", h, k, true)?,
                    },
                    Flavor::Roberta => Head::Sequence {
                        dense: l.head("classifier.dense", h, h, true)?,
                        act: Activation::Tanh,
                        out: l.head("classifier.out_proj", h, k, true)?,
                    },
                }
            }
            Task::TokenClassification => {
                Head::Token(l.head("classifier", h, labels.len(), true)?)
            }
        };
        Ok(Self {
            embeddings,
            layers,
            pooler,
            head,
            attn: AttnSpec {
                n_heads: heads,
                n_kv_heads: heads,
                head_dim: h / heads,
                rope: None,
                window: None,
                dropout: cfg.dropout.attention,
                causal: false,
                scale: None,
                softcap: None,
            },
            dropout: cfg.dropout,
            config: cfg.clone(),
            task,
            labels,
        })
    }

    /// The last hidden states `[tokens, hidden]` of a right-padded batch.
    pub fn hidden<E: Exec<W = W>>(&self, e: &mut E, ids: &[u32], types: &[u32]) -> Result<E::X> {
        let (em, d) = (&self.embeddings, self.dropout.hidden);
        let words = e.embed(&em.word, ids)?;
        let positions = e.positions(&em.position, self.config.position_offset())?;
        let mut x = e.add(words, positions)?;
        if let Some(tt) = &em.token_type {
            // RoBERTa has a single segment row, used for every token whatever the tokenizer says.
            let zeros;
            let types = if self.config.type_vocab_size == 1 {
                zeros = vec![0; ids.len()];
                &zeros
            } else {
                types
            };
            let t = e.embed(tt, types)?;
            x = e.add(x, t)?;
        }
        let x = e.norm(&em.norm, &x)?;
        let mut x = e.dropout(x, d)?;
        // DistilBERT drops only after its feed-forward block.
        let attn_drop = if self.config.flavor == Flavor::DistilBert {
            0.0
        } else {
            d
        };
        for (i, l) in self.layers.iter().enumerate() {
            let [q, k, v] = e.parts(&l.qkv, &x)?;
            let a = e.attention(&self.attn, i, q, k, v)?;
            let a = e.linear(&l.o, &a, None)?;
            let a = e.dropout(a, attn_drop)?;
            x = e.add_norm(&l.attn_norm, a, x)?;
            let m = e.linear(&l.fc, &x, Some(self.config.hidden_act))?;
            let m = e.linear(&l.proj, &m, None)?;
            let m = e.dropout(m, d)?;
            x = e.add_norm(&l.out_norm, m, x)?;
        }
        Ok(x)
    }

    /// BERT's pooler output (`tanh(dense(h[CLS]))`), for checkpoints that have one.
    pub fn pool<E: Exec<W = W>>(&self, e: &mut E, hidden: &E::X) -> Result<Option<E::X>> {
        let Some(p) = &self.pooler else {
            return Ok(None);
        };
        let first = e.rows(hidden, Rows::First)?;
        Ok(Some(e.linear(p, &first, Some(Activation::Tanh))?))
    }

    /// The head's logits: vocabulary logits of every position (or of the rows `rows`, the
    /// masked ones), one row of class logits per sequence, or class logits per token.
    pub fn head<E: Exec<W = W>>(
        &self,
        e: &mut E,
        hidden: E::X,
        rows: Option<&[usize]>,
    ) -> Result<E::X> {
        let d = self.dropout.classifier;
        match &self.head {
            Head::None => Err(Error::msg(
                "this checkpoint is a bare encoder with no task head (architectures: BertModel or similar)",
            )),
            Head::MaskedLm {
                dense,
                norm,
                decoder,
            } => {
                // Only the masked positions go through the vocabulary-sized output.
                let x = match rows {
                    Some(r) => e.rows(&hidden, Rows::Pick(r))?,
                    None => hidden,
                };
                let x = e.linear(dense, &x, Some(self.config.hidden_act))?;
                let x = e.norm(norm, &x)?;
                e.linear(decoder, &x, None)
            }
            Head::Sequence { dense, act, out } => {
                let first = e.rows(&hidden, Rows::First)?;
                let x = match self.config.flavor {
                    // BERT: dropout on the pooled output.
                    Flavor::Bert => {
                        let p = e.linear(dense, &first, Some(*act))?;
                        e.dropout(p, d)?
                    }
                    Flavor::DistilBert => {
                        let p = e.linear(dense, &first, Some(*act))?;
                        e.dropout(p, d)?
                    }
                    Flavor::Roberta => {
                        let first = e.dropout(first, d)?;
                        let p = e.linear(dense, &first, Some(*act))?;
                        e.dropout(p, d)?
                    }
                };
                e.linear(out, &x, None)
            }
            Head::Token(l) => {
                let x = e.dropout(hidden, d)?;
                e.linear(l, &x, None)
            }
        }
    }

    /// Whether a classifier's outputs are independent sigmoids rather than one softmax.
    pub fn multi_label(&self) -> bool {
        self.config.problem_type.as_deref() == Some("multi_label_classification")
    }
}

impl Bert<InferW> {
    /// The checkpoint's own head, as its `architectures` names it.
    pub fn load(cfg: &Config, vb: &Vb) -> Result<Self> {
        let task = cfg.task();
        let n_labels = |name: &str| -> Result<usize> {
            match (
                &cfg.id2label,
                vb.shape_of(&stored_tensor(vb, &format!("{name}.weight"))),
            ) {
                (_, Some(shape)) => Ok(shape[0]),
                (Some(m), None) => Ok(m.len()),
                (None, None) => Err(Error::file(
                    vb.store_path(),
                    format!("the classifier weight '{name}.weight' is missing"),
                )),
            }
        };
        let labels = match task {
            Task::SequenceClassification => {
                let out = match cfg.flavor {
                    Flavor::Roberta => "classifier.out_proj",
                    _ => "classifier",
                };
                if cfg.flavor == Flavor::Bert
                    && !vb.contains(&stored_tensor(vb, "bert.pooler.dense.weight"))
                {
                    return Err(Error::file(
                        vb.store_path(),
                        "BertForSequenceClassification needs the pooler weights 'bert.pooler.dense.*'",
                    ));
                }
                label_names(cfg, n_labels(out)?)
            }
            Task::TokenClassification => label_names(cfg, n_labels("classifier")?),
            _ => Vec::new(),
        };
        Self::new(cfg, &mut VbLoader::new(vb.clone()), task, labels)
    }

    fn run<R>(
        &self,
        batch: &EncoderBatch,
        f: impl FnOnce(&mut Infer, Act) -> Result<R>,
    ) -> Result<R> {
        let (b, t) = batch.ids.dims2()?;
        let ids = batch.ids.flatten_all()?.to_vec1::<u32>()?;
        let types = batch.type_ids.flatten_all()?.to_vec1::<u32>()?;
        debug_assert_eq!(ids.len(), b * t);
        let mut e = Infer::encoder(&batch.lengths, t);
        let x = self.hidden(&mut e, &ids, &types)?;
        f(&mut e, x)
    }

    /// The last hidden states, `[b, t, hidden]`.
    pub fn hidden_states(&self, batch: &EncoderBatch) -> Result<Tensor> {
        self.run(batch, |_, x| x.tensor())
    }

    /// BERT's pooler output `[b, hidden]`, for checkpoints that have one.
    pub fn pooled(&self, hidden: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, _) = hidden.dims3()?;
        let mut e = Infer::encoder(&vec![t; b], t);
        match self.pool(&mut e, &Act::Full(hidden.clone()))? {
            Some(p) => Ok(Some(p.tensor()?.squeeze(1)?)),
            None => Ok(None),
        }
    }

    /// The head's logits: `[b, t, vocab]` (masked LM), `[b, labels]` (sequence) or
    /// `[b, t, labels]` (token classification).
    pub fn logits(&self, batch: &EncoderBatch) -> Result<Tensor> {
        let y = self.run(batch, |e, x| self.head(e, x, None))?.tensor()?;
        match self.task {
            Task::SequenceClassification => Ok(y.squeeze(1)?),
            _ => Ok(y),
        }
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
