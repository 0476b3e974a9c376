//! T5, T5 v1.1, Flan-T5 and mT5: an encoder-decoder with RMS pre-norms, learned relative
//! position biases (one table per stack, in its first layer, shared by every layer), unscaled
//! attention, ReLU or gated-GELU feed-forward blocks, and a head tied to the embeddings
//! (scaled by `d_model^-½`) or untied (v1.1, Flan-T5, mT5).

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::exec::{
    AttnSpec, Exec, Loader, NormKind, Parts, RelativePositions, Rows, Seq2SeqFamily, Weights,
};
use crate::nn::Activation;

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Each head's width: `num_heads · d_kv` need not be `d_model`.
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    /// The decoder's depth when it differs from the encoder's.
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_dropout")]
    pub dropout_rate: f32,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu`, `gelu`, `gated-gelu` (T5 v1.1, Flan-T5, mT5), `gated-silu`…
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// The first decoder input; T5 starts from the padding id.
    pub decoder_start_token_id: Option<u32>,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_dropout() -> f32 {
    0.1
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}
fn default_true() -> bool {
    true
}
fn default_eos() -> u32 {
    1
}

impl Config {
    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// The feed-forward block `feed_forward_proj` names, as `T5Config` reads it: `gated-ACT`
    /// or `ACT`, where gated GELU is the tanh approximation (`gelu_new`).
    pub fn feed_forward(&self) -> Result<(bool, Activation)> {
        let p = self.feed_forward_proj.as_str();
        let (gated, act) = match p.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, p),
            Some(_) => return Err(self.bad_ff()),
        };
        let act = match (gated, act) {
            (true, "gelu") => Activation::GeluNew,
            _ => serde_json::from_value(serde_json::Value::String(act.into()))
                .map_err(|_| self.bad_ff())?,
        };
        Ok((gated, act))
    }

    fn bad_ff(&self) -> Error {
        Error::msg(format!(
            "feed_forward_proj '{}' is not supported (expected relu, gelu, gated-gelu, gated-silu…)",
            self.feed_forward_proj
        ))
    }

    /// transformers' `T5PreTrainedModel._init_weights` (`initializer_factor` 1): embeddings
    /// and an untied head from N(0, 1), every projection from N(0, 1/fan-in) (the query's
    /// fan-in counting `d_kv` too, which stands in for attention's missing `1/√d_kv`).
    pub fn init_rule(&self) -> crate::train::loader::InitRule {
        let (d, kv, inner) = (
            self.d_model as f32,
            self.d_kv as f32,
            (self.num_heads * self.d_kv) as f32,
        );
        let r = |x: f32| x.powf(-0.5);
        crate::train::loader::InitRule {
            std: 1.0,
            scaled: vec![
                (".q.weight", r(d * kv)),
                (".k.weight", r(d)),
                (".v.weight", r(d)),
                (".o.weight", r(inner)),
                ("relative_attention_bias.weight", r(d)),
                (".wi.weight", r(d)),
                (".wi_0.weight", r(d)),
                (".wi_1.weight", r(d)),
                (".wo.weight", r(self.d_ff as f32)),
            ],
            tied: self.tie_word_embeddings,
        }
    }

    pub fn decoder_start(&self) -> u32 {
        self.decoder_start_token_id.unwrap_or(self.pad_token_id)
    }

    fn relative(&self, bidirectional: bool) -> RelativePositions {
        RelativePositions {
            buckets: self.relative_attention_num_buckets,
            max_distance: self.relative_attention_max_distance,
            bidirectional,
        }
    }

    fn attn(&self, causal: bool) -> AttnSpec {
        AttnSpec {
            n_heads: self.num_heads,
            n_kv_heads: self.num_heads,
            head_dim: self.d_kv,
            rope: None,
            window: None,
            dropout: self.dropout_rate,
            causal,
            // T5 folds the 1/√d_kv into its initialisation instead.
            scale: Some(1.0),
            softcap: None,
        }
    }
}

/// The modules PEFT's LoRA targets by default for T5.
pub const LORA_TARGETS: &[&str] = &["q", "v"];

enum FeedForward<W: Weights> {
    Dense(W::Linear),
    Gated(Parts<W::Linear>),
}

/// `T5LayerFF`: a pre-norm feed-forward block.
struct Ff<W: Weights> {
    norm: W::Norm,
    wi: FeedForward<W>,
    act: Activation,
    wo: W::Linear,
}

impl<W: Weights> Ff<W> {
    fn new(cfg: &Config, l: &mut impl Loader<W = W>, base: &str) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        let (gated, act) = cfg.feed_forward()?;
        let m = format!("{base}.DenseReluDense");
        let wi = if gated {
            let names = [format!("{m}.wi_0"), format!("{m}.wi_1")];
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            FeedForward::Gated(l.parts(&names, d, &[f, f], false)?)
        } else {
            FeedForward::Dense(l.linear(&format!("{m}.wi"), d, f, false)?)
        };
        Ok(Self {
            norm: l.norm(
                NormKind::Rms,
                &format!("{base}.layer_norm"),
                d,
                cfg.layer_norm_epsilon,
            )?,
            wi,
            act,
            wo: l.linear(&format!("{m}.wo"), f, d, false)?,
        })
    }

    fn forward<E: Exec<W = W>>(&self, e: &mut E, cfg: &Config, x: E::X) -> Result<E::X> {
        let act = self.act;
        let h = e.norm(&self.norm, &x)?;
        let h = match &self.wi {
            FeedForward::Dense(wi) => e.linear(wi, &h, Some(act))?,
            FeedForward::Gated(p) => {
                let [g, u] = e.parts(p, &h)?;
                e.glu(&g, &u, act)?
            }
        };
        let h = e.dropout(h, cfg.dropout_rate)?;
        let y = e.linear(&self.wo, &h, None)?;
        let y = e.dropout(y, cfg.dropout_rate)?;
        e.add(x, y)
    }
}

/// `T5LayerSelfAttention`.
struct SelfAttn<W: Weights> {
    norm: W::Norm,
    qkv: Parts<W::Linear>,
    o: W::Linear,
}

impl<W: Weights> SelfAttn<W> {
    fn new(cfg: &Config, l: &mut impl Loader<W = W>, base: &str) -> Result<Self> {
        let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
        let m = format!("{base}.SelfAttention");
        let names = ["q", "k", "v"].map(|p| format!("{m}.{p}"));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Ok(Self {
            norm: l.norm(
                NormKind::Rms,
                &format!("{base}.layer_norm"),
                d,
                cfg.layer_norm_epsilon,
            )?,
            qkv: l.parts(&names, d, &[inner; 3], false)?,
            o: l.linear(&format!("{m}.o"), inner, d, false)?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward<E: Exec<W = W>>(
        &self,
        e: &mut E,
        cfg: &Config,
        spec: &AttnSpec,
        layer: usize,
        bias: &E::X,
        x: E::X,
    ) -> Result<E::X> {
        let h = e.norm(&self.norm, &x)?;
        let [q, k, v] = e.parts(&self.qkv, &h)?;
        let a = e.attention_biased(spec, layer, q, k, v, bias)?;
        let a = e.linear(&self.o, &a, None)?;
        let a = e.dropout(a, cfg.dropout_rate)?;
        e.add(x, a)
    }
}

/// `T5LayerCrossAttention`.
struct CrossAttn<W: Weights> {
    norm: W::Norm,
    q: W::Linear,
    k: W::Linear,
    v: W::Linear,
    o: W::Linear,
}

struct DecoderBlock<W: Weights> {
    attn: SelfAttn<W>,
    cross: CrossAttn<W>,
    ff: Ff<W>,
}

struct EncoderBlock<W: Weights> {
    attn: SelfAttn<W>,
    ff: Ff<W>,
}

pub struct T5<W: Weights> {
    shared: W::Embedding,
    encoder_bias: W::Embedding,
    decoder_bias: W::Embedding,
    encoder: Vec<EncoderBlock<W>>,
    encoder_norm: W::Norm,
    decoder: Vec<DecoderBlock<W>>,
    decoder_norm: W::Norm,
    lm_head: W::Linear,
    pub cfg: Config,
}

impl<W: Weights> T5<W> {
    pub fn new(cfg: &Config, l: &mut impl Loader<W = W>) -> Result<Self> {
        let (d, inner, eps) = (
            cfg.d_model,
            cfg.num_heads * cfg.d_kv,
            cfg.layer_norm_epsilon,
        );
        // The one table is `shared`; checkpoints that kept only a stack's copy name it there.
        let table = ["shared", "encoder.embed_tokens", "decoder.embed_tokens"]
            .into_iter()
            .find(|n| l.contains(&format!("{n}.weight")))
            .unwrap_or("shared");
        let shared = l.embedding(table, cfg.vocab_size, d)?;
        let rel =
            |stack: &str| format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias");
        let buckets = cfg.relative_attention_num_buckets;
        let encoder_bias = l.embedding(&rel("encoder"), buckets, cfg.num_heads)?;
        let decoder_bias = l.embedding(&rel("decoder"), buckets, cfg.num_heads)?;
        let encoder = (0..cfg.num_layers)
            .map(|i| {
                let b = format!("encoder.block.{i}.layer");
                Ok(EncoderBlock {
                    attn: SelfAttn::new(cfg, l, &format!("{b}.0"))?,
                    ff: Ff::new(cfg, l, &format!("{b}.1"))?,
                })
            })
            .collect::<Result<_>>()?;
        let decoder = (0..cfg.decoder_layers())
            .map(|i| {
                let b = format!("decoder.block.{i}.layer");
                let m = format!("{b}.1.EncDecAttention");
                Ok(DecoderBlock {
                    attn: SelfAttn::new(cfg, l, &format!("{b}.0"))?,
                    cross: CrossAttn {
                        norm: l.norm(NormKind::Rms, &format!("{b}.1.layer_norm"), d, eps)?,
                        q: l.linear(&format!("{m}.q"), d, inner, false)?,
                        k: l.linear(&format!("{m}.k"), d, inner, false)?,
                        v: l.linear(&format!("{m}.v"), d, inner, false)?,
                        o: l.linear(&format!("{m}.o"), inner, d, false)?,
                    },
                    ff: Ff::new(cfg, l, &format!("{b}.2"))?,
                })
            })
            .collect::<Result<_>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            l.tied(table, cfg.vocab_size, d, None)?
        } else {
            l.linear("lm_head", d, cfg.vocab_size, false)?
        };
        Ok(Self {
            shared,
            encoder_bias,
            decoder_bias,
            encoder,
            encoder_norm: l.norm(NormKind::Rms, "encoder.final_layer_norm", d, eps)?,
            decoder,
            decoder_norm: l.norm(NormKind::Rms, "decoder.final_layer_norm", d, eps)?,
            lm_head,
            cfg: cfg.clone(),
        })
    }
}

impl<W: Weights> Seq2SeqFamily<W> for T5<W> {
    fn encode<E: Exec<W = W>>(&self, e: &mut E, ids: &[u32]) -> Result<E::X> {
        let c = &self.cfg;
        let spec = c.attn(false);
        let x = e.embed(&self.shared, ids)?;
        let mut x = e.dropout(x, c.dropout_rate)?;
        let bias = e.relative_bias(&self.encoder_bias, c.relative(true))?;
        for (i, b) in self.encoder.iter().enumerate() {
            x = b.attn.forward(e, c, &spec, i, &bias, x)?;
            x = b.ff.forward(e, c, x)?;
        }
        let x = e.norm(&self.encoder_norm, &x)?;
        e.dropout(x, c.dropout_rate)
    }

    fn decode<E: Exec<W = W>>(
        &self,
        e: &mut E,
        ids: &[u32],
        memory: Option<&E::X>,
        last_only: bool,
    ) -> Result<E::X> {
        let c = &self.cfg;
        let (spec, cross) = (c.attn(true), c.attn(false));
        let x = e.embed(&self.shared, ids)?;
        let mut x = e.dropout(x, c.dropout_rate)?;
        let bias = e.relative_bias(&self.decoder_bias, c.relative(false))?;
        let n = self.decoder.len();
        for (i, b) in self.decoder.iter().enumerate() {
            x = b.attn.forward(e, c, &spec, i, &bias, x)?;
            let ca = &b.cross;
            let h = e.norm(&ca.norm, &x)?;
            let q = e.linear(&ca.q, &h, None)?;
            let a = e.cross_attention(&cross, n + i, q, &ca.k, &ca.v, memory)?;
            let a = e.linear(&ca.o, &a, None)?;
            let a = e.dropout(a, c.dropout_rate)?;
            x = e.add(x, a)?;
            x = b.ff.forward(e, c, x)?;
        }
        if last_only {
            x = e.rows(&x, Rows::Last)?;
        }
        let x = e.norm(&self.decoder_norm, &x)?;
        let mut x = e.dropout(x, c.dropout_rate)?;
        if c.tie_word_embeddings {
            // Mesh TensorFlow's rescaling before the tied projection.
            x = e.scale(x, (c.d_model as f64).powf(-0.5) as f32)?;
        }
        e.linear(&self.lm_head, &x, None)
    }

    fn n_slots(&self) -> usize {
        2 * self.decoder.len()
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn context_length(&self) -> usize {
        // Relative positions set no bound.
        u32::MAX as usize
    }
}
