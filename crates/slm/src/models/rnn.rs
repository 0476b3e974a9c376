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
use crate::nn::exec::{CausalFamily, Exec, Loader, Rows, Weights};
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
