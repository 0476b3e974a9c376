//! Recurrent language models: PyTorch's `word_language_model` `RNNModel` (embedding, stacked
//! LSTM or GRU with dropout between layers, linear decoder, optionally tied).
//!
//! Its checkpoints are bare `state_dict`s (`encoder.weight`, `rnn.weight_ih_l{k}`,
//! `rnn.weight_hh_l{k}`, `rnn.bias_ih_l{k}`, `rnn.bias_hh_l{k}`, `decoder.weight`/`bias`) next
//! to a `vocab.txt`, with no config: every size, the layer count, the cell and the tying are
//! read from the tensors. slm writes a `config.json` (`model_type: rnn_lm`, the constructor's
//! argument names) beside its own, and checks it against the tensors when it is there.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::WeightStore;
use crate::nn::exec::{CausalFamily, Exec, Loader, Pool, Rows, Weights};
use crate::nn::recurrent::{Cell, RecurrentSpec};

/// `model_type` of the config.json slm writes.
pub const MODEL_TYPE: &str = "rnn_lm";

/// `RNNModel(rnn_type, ntoken, ninp, nhid, nlayers, dropout, tie_weights)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub rnn_type: Cell,
    pub ntoken: usize,
    pub ninp: usize,
    pub nhid: usize,
    pub nlayers: usize,
    #[serde(default)]
    pub dropout: f32,
    #[serde(default)]
    pub tie_weights: bool,
    /// `nn.LSTM(bias=...)`: PyTorch's default has both biases.
    #[serde(default = "yes")]
    pub bias: bool,
}

fn yes() -> bool {
    true
}

fn ih(k: usize) -> String {
    format!("rnn.weight_ih_l{k}")
}

impl Config {
    /// The config that the tensors imply; `dropout` is not stored in them and comes from
    /// `stated` (a config.json) when there is one. A stated config that disagrees with the
    /// tensors is an error naming both.
    pub fn from_store(store: &dyn WeightStore, stated: Option<Config>) -> Result<Self> {
        let origin = store.file_of("").to_path_buf();
        let shapes: std::collections::HashMap<String, Vec<usize>> = store
            .tensors()
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        let shape = |n: &str| {
            shapes
                .get(n)
                .ok_or_else(|| Error::file(&origin, format!("tensor '{n}' not found")))
        };
        let bad = |m: String| Error::file(&origin, m);
        let enc = shape("encoder.weight")?;
        let hh = shape("rnn.weight_hh_l0")?;
        let (&[ntoken, ninp], &[rows, nhid]) = (enc.as_slice(), hh.as_slice()) else {
            return Err(bad(format!(
                "encoder.weight {enc:?} and rnn.weight_hh_l0 {hh:?} must be matrices"
            )));
        };
        if nhid == 0 || ntoken == 0 || ninp == 0 {
            return Err(bad("a zero-sized embedding or hidden state".into()));
        }
        let rnn_type = match rows / nhid {
            4 if rows % nhid == 0 => Cell::Lstm,
            3 if rows % nhid == 0 => Cell::Gru,
            1 if rows == nhid => {
                return Err(bad(
                    "an Elman RNN (RNN_TANH / RNN_RELU) is not supported; use an LSTM or a GRU"
                        .into(),
                ))
            }
            _ => {
                return Err(bad(format!(
                    "rnn.weight_hh_l0 is {hh:?}: its rows are neither 4 (LSTM) nor 3 (GRU) times its columns"
                )))
            }
        };
        let nlayers = (0..).take_while(|&k| shapes.contains_key(&ih(k))).count();
        let g = rnn_type.gates() * nhid;
        for k in 0..nlayers {
            let din = if k == 0 { ninp } else { nhid };
            let want = |n: String, s: Vec<usize>| -> Result<()> {
                match shapes.get(&n) {
                    Some(got) if *got == s => Ok(()),
                    Some(got) => Err(bad(format!("tensor '{n}' is {got:?}, expected {s:?}"))),
                    None => Err(bad(format!("tensor '{n}' not found"))),
                }
            };
            want(ih(k), vec![g, din])?;
            want(format!("rnn.weight_hh_l{k}"), vec![g, nhid])?;
        }
        if shapes.contains_key("rnn.weight_ih_l0_reverse") {
            return Err(bad(
                "a bidirectional recurrent layer cannot be a language model".into(),
            ));
        }
        let bias = shapes.contains_key("rnn.bias_ih_l0");
        let tie_weights = match shapes.get("decoder.weight") {
            None => true,
            Some(s) if *s == [ntoken, nhid] => {
                nhid == ninp && {
                    let a = store.load("encoder.weight", false)?.into_dense()?;
                    let b = store.load("decoder.weight", false)?.into_dense()?;
                    a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?
                }
            }
            Some(s) => {
                return Err(bad(format!(
                    "decoder.weight is {s:?}, expected [{ntoken}, {nhid}] (ntoken, nhid)"
                )))
            }
        };
        let found = Config {
            rnn_type,
            ntoken,
            ninp,
            nhid,
            nlayers,
            dropout: stated.as_ref().map_or(0.0, |c| c.dropout),
            tie_weights,
            bias,
        };
        if let Some(s) = stated {
            let sizes = |c: &Config| (c.rnn_type, c.ntoken, c.ninp, c.nhid, c.nlayers, c.bias);
            // Untied weights may hold equal values; tied ones must.
            let untie_missing = !s.tie_weights && !shapes.contains_key("decoder.weight");
            if sizes(&s) != sizes(&found) || (s.tie_weights && !found.tie_weights) || untie_missing
            {
                return Err(bad(format!(
                    "config.json says {} but the weights are {}",
                    s.describe(),
                    found.describe()
                )));
            }
            return Ok(Config {
                tie_weights: s.tie_weights,
                ..found
            });
        }
        Ok(found)
    }

    pub fn describe(&self) -> String {
        format!(
            "{} ntoken={} ninp={} nhid={} nlayers={}{}",
            self.rnn_type.name(),
            self.ntoken,
            self.ninp,
            self.nhid,
            self.nlayers,
            if self.tie_weights { " tied" } else { "" }
        )
    }

    /// A config.json's `RNNModel` arguments, when its `model_type` is [`MODEL_TYPE`].
    pub fn from_json(json: &serde_json::Value) -> Option<serde_json::Result<Config>> {
        (json.get("model_type").and_then(|v| v.as_str()) == Some(MODEL_TYPE))
            .then(|| serde_json::from_value(json.clone()))
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("a config serialises");
        v["model_type"] = MODEL_TYPE.into();
        v["architectures"] = serde_json::json!(["RNNModel"]);
        v
    }

    fn spec(&self) -> RecurrentSpec {
        RecurrentSpec {
            cell: self.rnn_type,
            hidden: self.nhid,
            reverse: false,
        }
    }
}

/// Named tensors with their shapes, as written to safetensors.
pub type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The tensors borrowed, as `write_safetensors` takes them.
pub fn tensor_refs(t: &Tensors) -> Vec<(String, Vec<usize>, &[f32])> {
    t.iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect()
}

/// A classifier's input: a text its tokenizer's preprocessing leaves empty (stop words only)
/// is one unknown word, in training and at inference alike.
pub fn unknown_if_empty(ids: &mut Vec<u32>, tok: &crate::tokenize::Tokenizer) -> bool {
    let empty = ids.is_empty();
    if empty {
        ids.push(tok.token_to_id("<unk>").unwrap_or(0));
    }
    empty
}

/// A new model's tensors as PyTorch initialises `RNNModel`: the embedding and decoder
/// uniform in ±0.1 with a zero bias (`init_weights`), every recurrent weight and bias uniform
/// in ±1/√nhid (`nn.LSTM`'s reset). Tied weights store the table once, as `encoder.weight`.
pub fn init_tensors(cfg: &Config, seed: u64) -> Tensors {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut uniform =
        |n: usize, k: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-k..k)).collect() };
    let (v, e, h) = (cfg.ntoken, cfg.ninp, cfg.nhid);
    let g = cfg.rnn_type.gates() * h;
    let k = 1.0 / (h as f32).sqrt();
    let mut out = vec![(
        "encoder.weight".to_string(),
        vec![v, e],
        uniform(v * e, 0.1),
    )];
    for l in 0..cfg.nlayers {
        let din = if l == 0 { e } else { h };
        out.push((ih(l), vec![g, din], uniform(g * din, k)));
        out.push((format!("rnn.weight_hh_l{l}"), vec![g, h], uniform(g * h, k)));
        if cfg.bias {
            out.push((format!("rnn.bias_ih_l{l}"), vec![g], uniform(g, k)));
            out.push((format!("rnn.bias_hh_l{l}"), vec![g], uniform(g, k)));
        }
    }
    if !cfg.tie_weights {
        out.push((
            "decoder.weight".to_string(),
            vec![v, h],
            uniform(v * h, 0.1),
        ));
    }
    out.push(("decoder.bias".to_string(), vec![v], vec![0.0; v]));
    out
}

struct Layer<W: Weights> {
    ih: W::Linear,
    hh: W::Linear,
}

pub struct RnnLm<W: Weights> {
    encoder: W::Embedding,
    layers: Vec<Layer<W>>,
    decoder: W::Linear,
    pub cfg: Config,
}

impl<W: Weights> RnnLm<W> {
    pub fn new(cfg: &Config, l: &mut impl Loader<W = W>) -> Result<Self> {
        let g = cfg.rnn_type.gates() * cfg.nhid;
        let encoder = l.embedding("encoder", cfg.ntoken, cfg.ninp)?;
        let layers = (0..cfg.nlayers)
            .map(|k| {
                let din = if k == 0 { cfg.ninp } else { cfg.nhid };
                let bias = |n: &str| cfg.bias.then(|| format!("rnn.bias_{n}_l{k}"));
                Ok(Layer {
                    ih: l.linear_named(&ih(k), bias("ih").as_deref(), din, g)?,
                    hh: l.linear_named(
                        &format!("rnn.weight_hh_l{k}"),
                        bias("hh").as_deref(),
                        cfg.nhid,
                        g,
                    )?,
                })
            })
            .collect::<Result<_>>()?;
        let decoder = if cfg.tie_weights {
            l.tied("encoder", cfg.ntoken, cfg.ninp, Some("decoder.bias"))?
        } else {
            l.linear("decoder", cfg.nhid, cfg.ntoken, true)?
        };
        Ok(Self {
            encoder,
            layers,
            decoder,
            cfg: cfg.clone(),
        })
    }
}

impl<W: Weights> CausalFamily<W> for RnnLm<W> {
    fn forward<E: Exec<W = W>>(&self, e: &mut E, ids: &[u32], last_only: bool) -> Result<E::X> {
        let p = self.cfg.dropout;
        let spec = self.cfg.spec();
        let x = e.embed(&self.encoder, ids)?;
        let mut x = e.dropout(x, p)?;
        for (k, layer) in self.layers.iter().enumerate() {
            if k > 0 {
                // nn.LSTM's dropout: on every layer's output but the last.
                x = e.dropout(x, p)?;
            }
            let gx = e.linear(&layer.ih, &x, None)?;
            x = e.recurrent(&spec, &layer.hh, k, gx)?;
        }
        let mut x = e.dropout(x, p)?;
        if last_only {
            x = e.rows(&x, Rows::Last)?;
        }
        e.linear(&self.decoder, &x, None)
    }

    fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// A recurrent model has no context limit; this bounds what one call may run.
    fn context_length(&self) -> usize {
        u32::MAX as usize
    }

    fn vocab_size(&self) -> usize {
        self.cfg.ntoken
    }

    fn recurrent(&self) -> bool {
        true
    }
}

/// `model_type` of an RNN text classifier's config.json.
pub const CLASSIFIER_TYPE: &str = "rnn_classifier";

/// A recurrent text classifier: embedding → dropout → stacked (bi)LSTM or GRU with dropout
/// between layers → mean or max over the positions → dropout → linear head. The weights keep
/// PyTorch's names (`encoder.weight` as in `RNNModel`, so a language model's embedding can seed
/// it; `nn.LSTM`'s `rnn.weight_ih_l{k}[_reverse]`; `classifier.weight`/`bias`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    pub rnn_type: Cell,
    pub ntoken: usize,
    pub ninp: usize,
    pub nhid: usize,
    pub nlayers: usize,
    pub bidirectional: bool,
    pub pooling: Pool,
    #[serde(default)]
    pub dropout: f32,
    /// Class names by id.
    pub labels: Vec<String>,
}

impl ClassifierConfig {
    /// A config.json's classifier, when its `model_type` is [`CLASSIFIER_TYPE`].
    pub fn from_json(json: &serde_json::Value) -> Option<serde_json::Result<Self>> {
        (json.get("model_type").and_then(|v| v.as_str()) == Some(CLASSIFIER_TYPE))
            .then(|| serde_json::from_value(json.clone()))
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("a config serialises");
        v["model_type"] = CLASSIFIER_TYPE.into();
        v
    }

    fn dirs(&self) -> usize {
        if self.bidirectional {
            2
        } else {
            1
        }
    }

    /// The features the head reads.
    pub fn pooled_size(&self) -> usize {
        self.dirs() * self.nhid
    }

    pub fn describe(&self) -> String {
        format!(
            "{}{} ntoken={} ninp={} nhid={} nlayers={} {} pooling, {} labels",
            if self.bidirectional { "bi" } else { "" },
            self.rnn_type.name(),
            self.ntoken,
            self.ninp,
            self.nhid,
            self.nlayers,
            match self.pooling {
                Pool::Mean => "mean",
                Pool::Max => "max",
            },
            self.labels.len()
        )
    }

    /// `nn.LSTM`'s name of layer `k`'s tensor `kind` (`weight_ih`, `bias_hh`, ...).
    fn name(k: usize, kind: &str, reverse: bool) -> String {
        format!("rnn.{kind}_l{k}{}", if reverse { "_reverse" } else { "" })
    }

    /// A new classifier's tensors as PyTorch initialises its modules: the embedding N(0, 1),
    /// every recurrent weight and bias U(±1/√nhid), the head U(±1/√fan_in) (`nn.Linear`'s
    /// Kaiming-uniform with a = √5).
    pub fn init_tensors(&self, seed: u64) -> Tensors {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut uniform =
            |n: usize, k: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-k..k)).collect() };
        let (v, e, h) = (self.ntoken, self.ninp, self.nhid);
        let g = self.rnn_type.gates() * h;
        let k = 1.0 / (h as f32).sqrt();
        let mut normal_rng = crate::train::params::seeded(seed ^ 0x656d_6265);
        let mut out = vec![(
            "encoder.weight".to_string(),
            vec![v, e],
            crate::train::params::normal(v * e, 1.0, &mut normal_rng),
        )];
        for l in 0..self.nlayers {
            let din = if l == 0 { e } else { self.pooled_size() };
            for reverse in [false, true].into_iter().take(self.dirs()) {
                out.push((
                    Self::name(l, "weight_ih", reverse),
                    vec![g, din],
                    uniform(g * din, k),
                ));
                out.push((
                    Self::name(l, "weight_hh", reverse),
                    vec![g, h],
                    uniform(g * h, k),
                ));
                out.push((Self::name(l, "bias_ih", reverse), vec![g], uniform(g, k)));
                out.push((Self::name(l, "bias_hh", reverse), vec![g], uniform(g, k)));
            }
        }
        let (f, c) = (self.pooled_size(), self.labels.len());
        let kf = 1.0 / (f as f32).sqrt();
        out.push(("classifier.weight".into(), vec![c, f], uniform(c * f, kf)));
        out.push(("classifier.bias".into(), vec![c], uniform(c, kf)));
        out
    }
}

/// The classifier config of a folder whose config.json says `rnn_classifier`.
pub fn classifier_config(files: &crate::io::ModelFiles) -> Result<Option<ClassifierConfig>> {
    let Some(p) = &files.config else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(p, e))?;
    ClassifierConfig::from_json(&json)
        .transpose()
        .map_err(|e| Error::file(p, e))
}

/// One direction of a layer.
struct Direction<W: Weights> {
    ih: W::Linear,
    hh: W::Linear,
    spec: RecurrentSpec,
}

pub struct RnnClassifier<W: Weights> {
    encoder: W::Embedding,
    /// Per layer, the forward direction and the backward one when bidirectional.
    layers: Vec<Vec<Direction<W>>>,
    classifier: W::Linear,
    pub cfg: ClassifierConfig,
}

impl<W: Weights> RnnClassifier<W> {
    pub fn new(cfg: &ClassifierConfig, l: &mut impl Loader<W = W>) -> Result<Self> {
        let g = cfg.rnn_type.gates() * cfg.nhid;
        let encoder = l.embedding("encoder", cfg.ntoken, cfg.ninp)?;
        let mut layers = Vec::with_capacity(cfg.nlayers);
        for k in 0..cfg.nlayers {
            let din = if k == 0 { cfg.ninp } else { cfg.pooled_size() };
            let mut dirs = Vec::new();
            for reverse in [false, true].into_iter().take(cfg.dirs()) {
                let n = |kind: &str| ClassifierConfig::name(k, kind, reverse);
                dirs.push(Direction {
                    ih: l.linear_named(&n("weight_ih"), Some(&n("bias_ih")), din, g)?,
                    hh: l.linear_named(&n("weight_hh"), Some(&n("bias_hh")), cfg.nhid, g)?,
                    spec: RecurrentSpec {
                        cell: cfg.rnn_type,
                        hidden: cfg.nhid,
                        reverse,
                    },
                });
            }
            layers.push(dirs);
        }
        let classifier = l.head("classifier", cfg.pooled_size(), cfg.labels.len(), true)?;
        Ok(Self {
            encoder,
            layers,
            classifier,
            cfg: cfg.clone(),
        })
    }

    /// Logits, one row per sequence of the executor's batch.
    pub fn forward<E: Exec<W = W>>(&self, e: &mut E, ids: &[u32]) -> Result<E::X> {
        let pooled = self.pooled(e, ids)?;
        let pooled = e.dropout(pooled, self.cfg.dropout)?;
        e.linear(&self.classifier, &pooled, None)
    }

    /// Each sequence's pooled recurrent states, what the head reads: the text's embedding.
    pub fn pooled<E: Exec<W = W>>(&self, e: &mut E, ids: &[u32]) -> Result<E::X> {
        let p = self.cfg.dropout;
        let x = e.embed(&self.encoder, ids)?;
        let mut x = e.dropout(x, p)?;
        for (k, dirs) in self.layers.iter().enumerate() {
            if k > 0 {
                x = e.dropout(x, p)?;
            }
            let mut outs = Vec::with_capacity(2);
            for (d, dir) in dirs.iter().enumerate() {
                let gx = e.linear(&dir.ih, &x, None)?;
                outs.push(e.recurrent(&dir.spec, &dir.hh, 2 * k + d, gx)?);
            }
            let mut outs = outs.into_iter();
            let first = outs.next().expect("a layer has a direction");
            x = match outs.next() {
                Some(back) => e.concat(first, back)?,
                None => first,
            };
        }
        e.pool(x, self.cfg.pooling)
    }
}
