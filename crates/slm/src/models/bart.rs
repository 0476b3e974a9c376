//! BART and Marian: encoder-decoders of post-norm layers (`norm(x + sublayer(x))`) with
//! biased projections and a head tied to the shared embeddings plus a fixed
//! `final_logits_bias`. BART learns its positions (offset by 2) and norms its embeddings;
//! Marian (the `opus-mt` translators) adds sinusoidal positions that checkpoints do not store,
//! scales its embeddings by √d_model and has no embedding norm.

use serde::Deserialize;

use crate::error::Result;
use crate::nn::exec::{AttnSpec, Exec, Loader, NormKind, Parts, Rows, Seq2SeqFamily, Weights};
use crate::nn::Activation;

const EPS: f64 = 1e-5;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Variant {
    #[default]
    Bart,
    Marian,
}

impl Variant {
    /// The row of position 0: BART's learned table starts at row 2 (fairseq kept two rows
    /// for padding).
    fn position_offset(self) -> usize {
        match self {
            Variant::Bart => 2,
            Variant::Marian => 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub activation_function: Activation,
    #[serde(default = "default_dropout")]
    pub dropout: f32,
    #[serde(default)]
    pub attention_dropout: f32,
    #[serde(default)]
    pub activation_dropout: f32,
    /// Embeddings multiplied by √d_model.
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "default_pad")]
    pub pad_token_id: u32,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// BART's decoder starts from EOS.
    pub decoder_start_token_id: Option<u32>,
    /// The token generation must end with when it reaches its length limit (transformers'
    /// `ForcedEOSTokenLogitsProcessor`; BART and opus-mt configs set it).
    #[serde(default)]
    pub forced_eos_token_id: Option<u32>,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Marian: one table for source and target tokens (a separate decoder table is not
    /// supported).
    #[serde(default = "default_true")]
    pub share_encoder_decoder_embeddings: bool,
    #[serde(skip)]
    pub variant: Variant,
}

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_dropout() -> f32 {
    0.1
}
fn default_pad() -> u32 {
    1
}
fn default_eos() -> u32 {
    2
}
fn default_true() -> bool {
    true
}

impl Config {
    /// Reads config.json of either variant.
    pub fn from_json(json: serde_json::Value, variant: Variant) -> serde_json::Result<Self> {
        let mut c: Self = serde_json::from_value(json)?;
        c.variant = variant;
        Ok(c)
    }

    /// BART's decoder starts from EOS, Marian's from padding.
    pub fn decoder_start(&self) -> u32 {
        self.decoder_start_token_id.unwrap_or(match self.variant {
            Variant::Bart => self.eos_token_id,
            Variant::Marian => self.pad_token_id,
        })
    }

    /// `MarianSinusoidalPositionalEmbedding`'s table: position `p`, feature `j` is
    /// `p / 10000^(2⌊j/2⌋/d)`, the sines of the even features first, then the cosines of the
    /// odd ones (computed in f64 as NumPy does, then rounded).
    fn sinusoids(&self) -> Vec<f32> {
        let (n, d) = (self.max_position_embeddings, self.d_model);
        let half = d.div_ceil(2);
        let mut out = vec![0f32; n * d];
        for (p, row) in out.chunks_mut(d).enumerate() {
            let angle = |j: usize| p as f64 / 10000f64.powf((2 * (j / 2)) as f64 / d as f64);
            for (k, j) in (0..d).step_by(2).enumerate() {
                row[k] = angle(j).sin() as f32;
            }
            for (k, j) in (1..d).step_by(2).enumerate() {
                row[half + k] = angle(j).cos() as f32;
            }
        }
        out
    }

    fn attn(&self, heads: usize, causal: bool) -> AttnSpec {
        AttnSpec {
            n_heads: heads,
            n_kv_heads: heads,
            head_dim: self.d_model / heads,
            rope: None,
            window: None,
            dropout: self.attention_dropout,
            causal,
            scale: None,
            softcap: None,
        }
    }
}

/// The modules PEFT's LoRA targets by default for BART and Marian.
pub const LORA_TARGETS: &[&str] = &["q_proj", "v_proj"];

/// `BartAttention` as self-attention: fused where the executor can.
struct SelfAttn<W: Weights> {
    qkv: Parts<W::Linear>,
    out: W::Linear,
    norm: W::Norm,
}

/// `BartAttention` over the encoder's states.
struct CrossAttn<W: Weights> {
    q: W::Linear,
    k: W::Linear,
    v: W::Linear,
    out: W::Linear,
    norm: W::Norm,
}

struct Ffn<W: Weights> {
    fc1: W::Linear,
    fc2: W::Linear,
    norm: W::Norm,
}

struct Layer<W: Weights> {
    attn: SelfAttn<W>,
    cross: Option<CrossAttn<W>>,
    ffn: Ffn<W>,
}

/// The embeddings of one stack: its tokens (the shared table), positions and their norm.
struct Embeddings<W: Weights> {
    positions: W::Embedding,
    norm: Option<W::Norm>,
}

pub struct Bart<W: Weights> {
    shared: W::Embedding,
    encoder_embed: Embeddings<W>,
    decoder_embed: Embeddings<W>,
    encoder: Vec<Layer<W>>,
    decoder: Vec<Layer<W>>,
    lm_head: W::Linear,
    pub cfg: Config,
}

impl<W: Weights> Bart<W> {
    pub fn new(cfg: &Config, l: &mut impl Loader<W = W>) -> Result<Self> {
        let d = cfg.d_model;
        let table = ["model.shared", "model.encoder.embed_tokens"]
            .into_iter()
            .find(|n| l.contains(&format!("{n}.weight")))
            .unwrap_or("model.shared");
        let shared = l.padded_embedding(table, cfg.vocab_size, d, cfg.pad_token_id)?;
        if !cfg.share_encoder_decoder_embeddings {
            return Err(crate::Error::Unsupported(
                "a Marian model with separate source and target embeddings (share_encoder_decoder_embeddings: false)".into(),
            ));
        }
        let embeddings = |l: &mut _, stack: &str| -> Result<Embeddings<W>> {
            let positions = format!("model.{stack}.embed_positions");
            Ok(match cfg.variant {
                Variant::Bart => Embeddings {
                    positions: Loader::embedding(
                        l,
                        &positions,
                        cfg.max_position_embeddings + 2,
                        d,
                    )?,
                    norm: Some(Loader::norm(
                        l,
                        NormKind::Layer,
                        &format!("model.{stack}.layernorm_embedding"),
                        d,
                        EPS,
                    )?),
                },
                Variant::Marian => Embeddings {
                    positions: Loader::computed(
                        l,
                        &positions,
                        cfg.max_position_embeddings,
                        d,
                        cfg.sinusoids(),
                    )?,
                    norm: None,
                },
            })
        };
        let encoder_embed = embeddings(l, "encoder")?;
        let decoder_embed = embeddings(l, "decoder")?;
        let layer =
            |l: &mut _, stack: &str, i: usize, ffn: usize, cross: bool| -> Result<Layer<W>> {
                let b = format!("model.{stack}.layers.{i}");
                let names = ["q_proj", "k_proj", "v_proj"].map(|p| format!("{b}.self_attn.{p}"));
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let cross = if cross {
                    let c = format!("{b}.encoder_attn");
                    Some(CrossAttn {
                        q: Loader::linear(l, &format!("{c}.q_proj"), d, d, true)?,
                        k: Loader::linear(l, &format!("{c}.k_proj"), d, d, true)?,
                        v: Loader::linear(l, &format!("{c}.v_proj"), d, d, true)?,
                        out: Loader::linear(l, &format!("{c}.out_proj"), d, d, true)?,
                        norm: Loader::norm(l, NormKind::Layer, &format!("{c}_layer_norm"), d, EPS)?,
                    })
                } else {
                    None
                };
                Ok(Layer {
                    attn: SelfAttn {
                        qkv: Loader::parts(l, &names, d, &[d; 3], true)?,
                        out: Loader::linear(l, &format!("{b}.self_attn.out_proj"), d, d, true)?,
                        norm: Loader::norm(
                            l,
                            NormKind::Layer,
                            &format!("{b}.self_attn_layer_norm"),
                            d,
                            EPS,
                        )?,
                    },
                    cross,
                    ffn: Ffn {
                        fc1: Loader::linear(l, &format!("{b}.fc1"), d, ffn, true)?,
                        fc2: Loader::linear(l, &format!("{b}.fc2"), ffn, d, true)?,
                        norm: Loader::norm(
                            l,
                            NormKind::Layer,
                            &format!("{b}.final_layer_norm"),
                            d,
                            EPS,
                        )?,
                    },
                })
            };
        let encoder = (0..cfg.encoder_layers)
            .map(|i| layer(l, "encoder", i, cfg.encoder_ffn_dim, false))
            .collect::<Result<_>>()?;
        let decoder = (0..cfg.decoder_layers)
            .map(|i| layer(l, "decoder", i, cfg.decoder_ffn_dim, true))
            .collect::<Result<_>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            l.tied(table, cfg.vocab_size, d, Some("final_logits_bias"))?
        } else {
            l.linear("lm_head", d, cfg.vocab_size, false)?
        };
        Ok(Self {
            shared,
            encoder_embed,
            decoder_embed,
            encoder,
            decoder,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    /// Token embeddings (scaled when the config says so) plus positions, normed.
    fn embed<E: Exec<W = W>>(&self, e: &mut E, emb: &Embeddings<W>, ids: &[u32]) -> Result<E::X> {
        let c = &self.cfg;
        let mut x = e.embed(&self.shared, ids)?;
        if c.scale_embedding {
            x = e.scale(x, (c.d_model as f32).sqrt())?;
        }
        let p = e.positions(&emb.positions, c.variant.position_offset())?;
        let mut x = e.add(x, p)?;
        if let Some(n) = &emb.norm {
            x = e.norm(n, &x)?;
        }
        e.dropout(x, c.dropout)
    }

    /// One post-norm layer: self-attention, cross-attention (decoders), feed-forward.
    fn layer<E: Exec<W = W>>(
        &self,
        e: &mut E,
        (layer, i, slot): (&Layer<W>, usize, usize),
        spec: &AttnSpec,
        memory: Option<&E::X>,
        x: E::X,
    ) -> Result<E::X> {
        let c = &self.cfg;
        let [q, k, v] = e.parts(&layer.attn.qkv, &x)?;
        let a = e.attention(spec, i, q, k, v)?;
        let a = e.linear(&layer.attn.out, &a, None)?;
        let a = e.dropout(a, c.dropout)?;
        let mut x = e.add_norm(&layer.attn.norm, a, x)?;
        if let Some(ca) = &layer.cross {
            let q = e.linear(&ca.q, &x, None)?;
            let cross = AttnSpec {
                causal: false,
                ..spec.clone()
            };
            let a = e.cross_attention(&cross, slot, q, &ca.k, &ca.v, memory)?;
            let a = e.linear(&ca.out, &a, None)?;
            let a = e.dropout(a, c.dropout)?;
            x = e.add_norm(&ca.norm, a, x)?;
        }
        let h = e.linear(&layer.ffn.fc1, &x, Some(c.activation_function))?;
        let h = e.dropout(h, c.activation_dropout)?;
        let h = e.linear(&layer.ffn.fc2, &h, None)?;
        let h = e.dropout(h, c.dropout)?;
        e.add_norm(&layer.ffn.norm, h, x)
    }
}

impl<W: Weights> Seq2SeqFamily<W> for Bart<W> {
    fn encode<E: Exec<W = W>>(&self, e: &mut E, ids: &[u32]) -> Result<E::X> {
        let spec = self.cfg.attn(self.cfg.encoder_attention_heads, false);
        let mut x = self.embed(e, &self.encoder_embed, ids)?;
        for (i, l) in self.encoder.iter().enumerate() {
            x = self.layer(e, (l, i, 0), &spec, None, x)?;
        }
        Ok(x)
    }

    fn decode<E: Exec<W = W>>(
        &self,
        e: &mut E,
        ids: &[u32],
        memory: Option<&E::X>,
        last_only: bool,
    ) -> Result<E::X> {
        let spec = self.cfg.attn(self.cfg.decoder_attention_heads, true);
        let n = self.decoder.len();
        let mut x = self.embed(e, &self.decoder_embed, ids)?;
        for (i, l) in self.decoder.iter().enumerate() {
            x = self.layer(e, (l, i, n + i), &spec, memory, x)?;
        }
        if last_only {
            x = e.rows(&x, Rows::Last)?;
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
        self.cfg.max_position_embeddings
    }
}
