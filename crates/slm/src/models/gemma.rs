//! Gemma 2 and Gemma 3 text models: RMSNorm scaled by `1 + w`, norms before and after both
//! attention and MLP, embeddings scaled by √hidden, a GELU-tanh gated MLP, attention scaled by
//! `query_pre_attn_scalar`, interleaved sliding-window and global layers, tied head. Gemma 2
//! soft-caps attention scores and logits; Gemma 3 normalizes each head's queries and keys and
//! gives its sliding layers their own RoPE base.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::error::Result;
use crate::nn::exec::{AttnSpec, CausalFamily, Exec, Loader, NormKind, Parts, Rows, Weights};
use crate::nn::{Activation, Rope, RopeScaling};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Gemma2,
    Gemma3,
}

impl Variant {
    /// The modules PEFT's LoRA targets by default for this model type.
    pub fn lora_targets(self) -> &'static [&'static str] {
        &["q_proj", "v_proj"]
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// The global layers' RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// The sliding layers' RoPE base (Gemma 3; Gemma 2 uses `rope_theta` everywhere).
    pub rope_local_base_freq: Option<f64>,
    /// Scaling of the global layers' RoPE (Gemma 3 4B and larger: linear, factor 8).
    pub rope_scaling: Option<RopeScaling>,
    /// Gemma's own key; `hidden_act` is read when it is absent.
    pub hidden_activation: Option<Activation>,
    pub hidden_act: Option<Activation>,
    #[serde(default = "default_scalar")]
    pub query_pre_attn_scalar: f64,
    pub sliding_window: Option<usize>,
    /// `sliding_attention` or `full_attention` per layer (transformers ≥ 4.53).
    pub layer_types: Option<Vec<String>>,
    /// Every n-th layer global, the others sliding (Gemma 3 before `layer_types`).
    pub sliding_window_pattern: Option<usize>,
    pub final_logit_softcapping: Option<f32>,
    pub attn_logit_softcapping: Option<f32>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub attention_dropout: f32,
    #[serde(skip, default = "default_variant")]
    pub variant: Variant,
}

fn default_head_dim() -> usize {
    256
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_scalar() -> f64 {
    256.0
}
fn default_variant() -> Variant {
    Variant::Gemma3
}

impl Config {
    /// Reads config.json as transformers 4.x (`rope_theta`, `rope_local_base_freq`,
    /// `rope_scaling`) or 5.x writes it (`rope_parameters`, per layer type for Gemma 3).
    pub fn from_json(mut json: Value, variant: Variant) -> std::result::Result<Self, String> {
        read_rope(&mut json)?;
        let mut c: Config = serde_json::from_value(json).map_err(|e| e.to_string())?;
        c.variant = variant;
        if let Some(t) = &c.layer_types {
            if t.len() != c.num_hidden_layers {
                return Err(format!(
                    "layer_types has {} entries for {} layers",
                    t.len(),
                    c.num_hidden_layers
                ));
            }
            if let Some(bad) = t
                .iter()
                .find(|t| !matches!(t.as_str(), "sliding_attention" | "full_attention"))
            {
                return Err(format!(
                    "layer type '{bad}' is not supported (supported: sliding_attention, full_attention)"
                ));
            }
        }
        if c.sliding_window_pattern == Some(0) {
            return Err("sliding_window_pattern is 0".into());
        }
        Ok(c)
    }

    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn activation(&self) -> Activation {
        self.hidden_activation
            .or(self.hidden_act)
            .unwrap_or(Activation::GeluNew)
    }

    /// Whether layer `i` attends within the sliding window: as `layer_types` says, else all but
    /// every `sliding_window_pattern`-th layer (Gemma 2: every other, the even ones sliding;
    /// Gemma 3: every sixth global).
    pub fn is_sliding(&self, i: usize) -> bool {
        let default = match self.variant {
            Variant::Gemma2 => 2,
            Variant::Gemma3 => 6,
        };
        match &self.layer_types {
            Some(t) => t[i] == "sliding_attention",
            None => !(i + 1).is_multiple_of(self.sliding_window_pattern.unwrap_or(default)),
        }
    }

    /// The sliding layers' RoPE base.
    pub fn local_theta(&self) -> f64 {
        match self.variant {
            Variant::Gemma2 => self.rope_theta,
            Variant::Gemma3 => self.rope_local_base_freq.unwrap_or(10000.0),
        }
    }
}

/// The query scalar llama.cpp uses for a Gemma model (it keeps no key for it): hidden/heads
/// for the 27B models (46 layers for Gemma 2, 62 for Gemma 3), the head size for every other.
pub fn llama_cpp_query_scalar(
    variant: Variant,
    layers: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
) -> usize {
    match (variant, layers) {
        (Variant::Gemma2, 46) | (Variant::Gemma3, 62) => hidden / heads,
        _ => head_dim,
    }
}

/// Gemma 3's 5.x `rope_parameters` hold one entry per layer type; they become the 4.x keys
/// (`full_attention` → `rope_theta` and `rope_scaling`, `sliding_attention` →
/// `rope_local_base_freq`). One entry for all layers (Gemma 2) is read as for every family.
fn read_rope(json: &mut Value) -> std::result::Result<(), String> {
    let per_type = json
        .get("rope_parameters")
        .and_then(Value::as_object)
        .filter(|p| !p.is_empty() && p.values().all(Value::is_object))
        .cloned();
    let Some(p) = per_type else {
        return crate::nn::rope::read_rope_parameters(json);
    };
    if let Some(k) = p
        .keys()
        .find(|k| !matches!(k.as_str(), "full_attention" | "sliding_attention"))
    {
        return Err(format!(
            "rope_parameters for layer type '{k}' are not supported (supported: full_attention, sliding_attention)"
        ));
    }
    let obj = json.as_object_mut().ok_or("config.json is not an object")?;
    if let Some(full) = p.get("full_attention") {
        let mut g = serde_json::json!({ "rope_parameters": full });
        for k in ["rope_theta", "rope_scaling"] {
            if let Some(v) = obj.get(k) {
                g[k] = v.clone();
            }
        }
        crate::nn::rope::read_rope_parameters(&mut g)
            .map_err(|e| format!("full_attention: {e}"))?;
        for k in ["rope_theta", "rope_scaling"] {
            if let Some(v) = g.get(k) {
                obj.insert(k.into(), v.clone());
            }
        }
    }
    if let Some(local) = p.get("sliding_attention") {
        let mut l = serde_json::json!({ "rope_parameters": local });
        crate::nn::rope::read_rope_parameters(&mut l)
            .map_err(|e| format!("sliding_attention: {e}"))?;
        if l.get("rope_scaling").is_some_and(|s| !s.is_null()) {
            return Err("scaled RoPE on the sliding layers is not supported".into());
        }
        let theta = l["rope_theta"].clone();
        match obj.get("rope_local_base_freq") {
            Some(old) if !old.is_null() && *old != theta => {
                return Err(format!(
                    "rope_local_base_freq ({old}) and rope_parameters.sliding_attention ({theta}) disagree"
                ))
            }
            _ => obj.insert("rope_local_base_freq".into(), theta),
        };
    }
    obj.remove("rope_parameters");
    Ok(())
}

struct Layer<W: Weights> {
    input_layernorm: W::Norm,
    qkv: Parts<W::Linear>,
    /// Gemma 3's per-head query and key norms.
    qk_norm: Option<(W::Norm, W::Norm)>,
    o_proj: W::Linear,
    post_attention_layernorm: W::Norm,
    pre_feedforward_layernorm: W::Norm,
    gate_up: Parts<W::Linear>,
    down_proj: W::Linear,
    post_feedforward_layernorm: W::Norm,
    attn: AttnSpec,
}

impl<W: Weights> Layer<W> {
    fn new(
        cfg: &Config,
        l: &mut impl Loader<W = W>,
        i: usize,
        ropes: &(Arc<Rope>, Arc<Rope>),
    ) -> Result<Self> {
        let base = format!("model.layers.{i}");
        let (h, hd, m) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
        let eps = cfg.rms_norm_eps;
        let att = |n: &str| format!("{base}.self_attn.{n}");
        let mlp = |n: &str| format!("{base}.mlp.{n}");
        let mut norm = |n: &str, size| l.norm(NormKind::RmsOffset, n, size, eps);
        let input_layernorm = norm(&format!("{base}.input_layernorm"), h)?;
        let post_attention_layernorm = norm(&format!("{base}.post_attention_layernorm"), h)?;
        let pre_feedforward_layernorm = norm(&format!("{base}.pre_feedforward_layernorm"), h)?;
        let post_feedforward_layernorm = norm(&format!("{base}.post_feedforward_layernorm"), h)?;
        let qk_norm = match cfg.variant {
            Variant::Gemma3 => Some((norm(&att("q_norm"), hd)?, norm(&att("k_norm"), hd)?)),
            Variant::Gemma2 => None,
        };
        let sliding = cfg.is_sliding(i);
        Ok(Self {
            input_layernorm,
            qkv: l.parts(
                &[&att("q_proj"), &att("k_proj"), &att("v_proj")],
                h,
                &[nh * hd, nkv * hd, nkv * hd],
                cfg.attention_bias,
            )?,
            qk_norm,
            o_proj: l.linear(&att("o_proj"), nh * hd, h, cfg.attention_bias)?,
            post_attention_layernorm,
            pre_feedforward_layernorm,
            gate_up: l.parts(&[&mlp("gate_proj"), &mlp("up_proj")], h, &[m, m], false)?,
            down_proj: l.linear(&mlp("down_proj"), m, h, false)?,
            post_feedforward_layernorm,
            attn: AttnSpec {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                rope: Some(if sliding { &ropes.1 } else { &ropes.0 }.clone()),
                window: cfg.sliding_window.filter(|_| sliding),
                dropout: cfg.attention_dropout,
                causal: true,
                scale: Some(cfg.query_pre_attn_scalar.powf(-0.5) as f32),
                softcap: cfg.attn_logit_softcapping,
            },
        })
    }
}

pub struct Gemma<W: Weights> {
    embed_tokens: W::Embedding,
    layers: Vec<Layer<W>>,
    norm: W::Norm,
    lm_head: W::Linear,
    pub cfg: Config,
}

impl<W: Weights> Gemma<W> {
    pub fn new(cfg: &Config, l: &mut impl Loader<W = W>) -> Result<Self> {
        let (h, n) = (cfg.hidden_size, cfg.max_position_embeddings);
        let global = Rope::new(cfg.head_dim, cfg.rope_theta, n, cfg.rope_scaling.as_ref())?;
        let local = Rope::new(cfg.head_dim, cfg.local_theta(), n, None)?;
        let ropes = (Arc::new(global), Arc::new(local));
        let embed_tokens = l.embedding("model.embed_tokens", cfg.vocab_size, h)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, l, i, &ropes))
            .collect::<Result<_>>()?;
        let norm = l.norm(NormKind::RmsOffset, "model.norm", h, cfg.rms_norm_eps)?;
        // Gemma ties its head to the embeddings; a checkpoint with its own head uses it.
        let lm_head = if l.contains("lm_head.weight") {
            l.linear("lm_head", h, cfg.vocab_size, false)?
        } else {
            l.tied("model.embed_tokens", cfg.vocab_size, h, None)?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            cfg: cfg.clone(),
        })
    }
}

impl<W: Weights> CausalFamily<W> for Gemma<W> {
    fn forward<E: Exec<W = W>>(&self, e: &mut E, ids: &[u32], last_only: bool) -> Result<E::X> {
        let x = e.embed(&self.embed_tokens, ids)?;
        // transformers multiplies by √hidden cast to the activations' dtype (f32 here).
        let mut x = e.scale(x, (self.cfg.hidden_size as f64).sqrt() as f32)?;
        for (i, l) in self.layers.iter().enumerate() {
            let h = e.norm(&l.input_layernorm, &x)?;
            let [mut q, mut k, v] = e.parts(&l.qkv, &h)?;
            if let Some((qn, kn)) = &l.qk_norm {
                q = e.norm_heads(qn, q)?;
                k = e.norm_heads(kn, k)?;
            }
            let a = e.attention(&l.attn, i, q, k, v)?;
            let a = e.linear(&l.o_proj, &a, None)?;
            let a = e.norm(&l.post_attention_layernorm, &a)?;
            x = e.add(x, a)?;
            let h = e.norm(&l.pre_feedforward_layernorm, &x)?;
            let [gate, up] = e.parts(&l.gate_up, &h)?;
            let m = e.glu(&gate, &up, self.cfg.activation())?;
            let m = e.linear(&l.down_proj, &m, None)?;
            let m = e.norm(&l.post_feedforward_layernorm, &m)?;
            x = e.add(x, m)?;
        }
        if last_only {
            x = e.rows(&x, Rows::Last)?;
        }
        let x = e.norm(&self.norm, &x)?;
        let logits = e.linear(&self.lm_head, &x, None)?;
        match self.cfg.final_logit_softcapping {
            Some(cap) => e.softcap(logits, cap),
            None => Ok(logits),
        }
    }

    fn n_layers(&self) -> usize {
        self.layers.len()
    }

    fn context_length(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}
