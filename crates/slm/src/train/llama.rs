//! Llama-architecture causal LMs (SmolLM2, TinyLlama, Qwen2), trainable: the network of
//! `models/llama.rs` as forward passes that keep their activations and hand-written backward
//! passes. Parameters carry transformers' names, so LoRA factors are saved under PEFT's keys.

use std::path::Path;

use super::ops::{self, AttnShape, NormCache};
use super::params::{add_lora, seeded, step_seed, Lin, LinCache, Params};
use super::{TrainError, TrainResult};
use crate::io::{open_weights, ModelFiles};
use crate::models::llama::{Config, Variant};
use crate::models::{config_of, ModelConfig};
use crate::nn::Vb;

/// Token ids `[b, t]` with the id each position must predict (`None`: no loss there, as for
/// prompts, padding and the last position).
#[derive(Debug, Clone)]
pub struct CausalBatch {
    pub ids: Vec<u32>,
    pub targets: Vec<Option<u32>>,
    pub lengths: Vec<usize>,
    pub t: usize,
}

impl CausalBatch {
    pub fn size(&self) -> usize {
        self.lengths.len()
    }
}

struct Layer {
    in_norm: usize,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    post_norm: usize,
    gate: Lin,
    up: Lin,
    down: Lin,
}

struct LayerCache {
    hn: Vec<f32>,
    c1: NormCache,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    lin: [LinCache; 4],
    probs: Vec<f32>,
    ctx: Vec<f32>,
    hn2: Vec<f32>,
    c2: NormCache,
    g: Vec<f32>,
    u: Vec<f32>,
    a: Vec<f32>,
    lin_mlp: [LinCache; 3],
}

pub struct LlamaLm {
    pub cfg: Config,
    pub params: Params,
    /// LoRA rank, alpha and target modules, when training LoRA.
    pub lora: Option<(usize, f32, Vec<String>)>,
    pub lora_dropout: f32,
    seed: u64,
    embed: usize,
    layers: Vec<Layer>,
    norm: usize,
    /// `None`: tied to the embeddings.
    lm_head: Option<Lin>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl LlamaLm {
    /// Loads a Llama-family checkpoint (a HF folder or a GGUF file, dequantized to f32).
    /// With `lora`, only LoRA factors on the `targets` modules are trained.
    pub fn load(
        path: &Path,
        lora: Option<(usize, f32, Vec<String>)>,
        seed: u64,
    ) -> TrainResult<Self> {
        let files = ModelFiles::locate(path)?;
        let ModelConfig::Llama(cfg) = config_of(&files)? else {
            return Err(TrainError::Unsupported(format!(
                "{}: causal-LM fine-tuning supports the Llama family (Llama, SmolLM2, TinyLlama, Qwen2)",
                path.display()
            )));
        };
        // The backward pass below is SwiGLU's; another activation would train a different model.
        if cfg.hidden_act != crate::nn::Activation::Silu {
            return Err(TrainError::Unsupported(format!(
                "{}: hidden_act {:?} is not trainable yet (causal-LM training implements silu)",
                path.display(),
                cfg.hidden_act
            )));
        }
        if cfg.variant == Variant::Phi3 {
            return Err(TrainError::Unsupported(format!(
                "{}: Phi-3's fused projections are not trainable yet",
                path.display()
            )));
        }
        let vb = Vb::new(open_weights(&files)?, false);
        let full = lora.is_none();
        let mut rng = seeded(seed ^ 0x4c6f_5241);
        let mut p = Params::default();
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.n_kv_heads(), cfg.head_dim());
        let get =
            |p: &mut Params, name: &str, shape: &[usize], trainable: bool| -> TrainResult<usize> {
                let v = vb.get(name, shape)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(p.add(name.to_string(), shape.to_vec(), v, trainable))
            };
        let embed = get(
            &mut p,
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            full,
        )?;
        let bias = cfg.attention_bias || cfg.variant == Variant::Qwen2;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let base = format!("model.layers.{i}");
            let mut lin = |p: &mut Params,
                           name: &str,
                           din: usize,
                           dout: usize,
                           has_bias: bool|
             -> TrainResult<Lin> {
                let full_name = format!("{base}.{name}");
                let mut l = Lin {
                    w: get(p, &format!("{full_name}.weight"), &[dout, din], full)?,
                    b: if has_bias {
                        Some(get(p, &format!("{full_name}.bias"), &[dout], full)?)
                    } else {
                        None
                    },
                    din,
                    dout,
                    lora: None,
                };
                if let Some((r, alpha, targets)) = &lora {
                    let module = name.rsplit('.').next().unwrap_or(name);
                    if targets.iter().any(|t| t == module || t == name) {
                        add_lora(p, &mut l, &full_name, *r, *alpha, &mut rng);
                    }
                }
                Ok(l)
            };
            let q = lin(&mut p, "self_attn.q_proj", h, nh * hd, bias)?;
            let k = lin(&mut p, "self_attn.k_proj", h, nkv * hd, bias)?;
            let v = lin(&mut p, "self_attn.v_proj", h, nkv * hd, bias)?;
            let o = lin(&mut p, "self_attn.o_proj", nh * hd, h, cfg.attention_bias)?;
            let gate = lin(&mut p, "mlp.gate_proj", h, inter, cfg.mlp_bias)?;
            let up = lin(&mut p, "mlp.up_proj", h, inter, cfg.mlp_bias)?;
            let down = lin(&mut p, "mlp.down_proj", inter, h, cfg.mlp_bias)?;
            let in_norm = get(
                &mut p,
                &format!("{base}.input_layernorm.weight"),
                &[h],
                full,
            )?;
            let post_norm = get(
                &mut p,
                &format!("{base}.post_attention_layernorm.weight"),
                &[h],
                full,
            )?;
            layers.push(Layer {
                in_norm,
                q,
                k,
                v,
                o,
                post_norm,
                gate,
                up,
                down,
            });
        }
        let norm = get(&mut p, "model.norm.weight", &[h], full)?;
        let lm_head = if vb.contains("lm_head.weight") && !cfg.tie_word_embeddings {
            Some(Lin {
                w: get(&mut p, "lm_head.weight", &[cfg.vocab_size, h], full)?,
                b: None,
                din: h,
                dout: cfg.vocab_size,
                lora: None,
            })
        } else {
            None
        };
        let (cos, sin) = crate::nn::rope::tables(
            hd,
            cfg.rope_theta,
            cfg.max_position_embeddings,
            cfg.rope_scaling.as_ref(),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            params: p,
            lora,
            lora_dropout: 0.0,
            seed,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
        })
    }

    fn shape(&self, b: usize, t: usize) -> AttnShape {
        AttnShape {
            b,
            t,
            nh: self.cfg.num_attention_heads,
            nkv: self.cfg.n_kv_heads(),
            hd: self.cfg.head_dim(),
            causal: true,
        }
    }

    fn head(&self, xn: &[f32], n: usize) -> (Vec<f32>, LinCache) {
        match &self.lm_head {
            Some(l) => l.forward(&self.params, xn, n, None),
            None => (
                ops::linear(
                    xn,
                    self.params.value(self.embed),
                    None,
                    (n, self.cfg.hidden_size, self.cfg.vocab_size),
                ),
                LinCache::default(),
            ),
        }
    }

    /// Logits `[b·t, vocab]` and what the backward pass needs; `train` is the step's seed
    /// while training (LoRA dropout), `None` to evaluate.
    fn forward(
        &self,
        batch: &CausalBatch,
        train: Option<u64>,
    ) -> (Vec<f32>, Vec<LayerCache>, Vec<f32>, NormCache, LinCache) {
        let p = &self.params;
        let (h, t, b) = (self.cfg.hidden_size, batch.t, batch.size());
        let n = b * t;
        let eps = self.cfg.rms_norm_eps as f32;
        let s = self.shape(b, t);
        let mut x = Vec::with_capacity(n * h);
        for &id in &batch.ids {
            x.extend_from_slice(&p.value(self.embed)[id as usize * h..][..h]);
        }
        let mut caches = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let (hn, c1) = ops::rms_norm(&x, p.value(l.in_norm), eps, h);
            let (mut q, cq) = l.q.forward(p, &hn, n, train);
            let (mut k, ck) = l.k.forward(p, &hn, n, train);
            let (v, cv) = l.v.forward(p, &hn, n, train);
            ops::rope(&mut q, &self.cos, &self.sin, t, s.nh, s.hd, false);
            ops::rope(&mut k, &self.cos, &self.sin, t, s.nkv, s.hd, false);
            let (ctx, probs) = ops::attention(&q, &k, &v, &batch.lengths, s);
            let (o, co) = l.o.forward(p, &ctx, n, train);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let (hn2, c2) = ops::rms_norm(&x, p.value(l.post_norm), eps, h);
            let (g, cg) = l.gate.forward(p, &hn2, n, train);
            let (u, cu) = l.up.forward(p, &hn2, n, train);
            let a = ops::swiglu(&g, &u);
            let (d, cd) = l.down.forward(p, &a, n, train);
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
            caches.push(LayerCache {
                hn,
                c1,
                q,
                k,
                v,
                lin: [cq, ck, cv, co],
                probs,
                ctx,
                hn2,
                c2,
                g,
                u,
                a,
                lin_mlp: [cg, cu, cd],
            });
        }
        let (xn, cf) = ops::rms_norm(&x, p.value(self.norm), eps, h);
        let (logits, ch) = self.head(&xn, n);
        (logits, caches, xn, cf, ch)
    }

    /// Logits `[b·t, vocab]` of a batch.
    pub fn logits(&self, batch: &CausalBatch) -> Vec<f32> {
        self.forward(batch, None).0
    }

    /// Summed token loss and the number of target tokens of a batch, without gradients.
    pub fn loss_sum(&self, batch: &CausalBatch) -> (f64, usize) {
        let (logits, ..) = self.forward(batch, None);
        let count = batch.targets.iter().filter(|t| t.is_some()).count();
        let (loss, _) = ops::cross_entropy(&logits, &batch.targets, self.cfg.vocab_size, 1.0);
        (loss, count)
    }

    /// Forward and backward of the mean token loss / `accum`; returns the mean token loss.
    pub fn forward_backward(&mut self, batch: &CausalBatch, accum: usize) -> f64 {
        let (logits, caches, xn, cf, ch) =
            self.forward(batch, Some(step_seed(self.seed, &batch.ids)));
        let count = batch.targets.iter().filter(|t| t.is_some()).count().max(1);
        let (loss, dlogits) = ops::cross_entropy(
            &logits,
            &batch.targets,
            self.cfg.vocab_size,
            (count * accum) as f32,
        );
        drop(logits);
        self.backward(batch, &caches, &xn, &cf, &ch, &dlogits);
        loss * accum as f64
    }

    fn backward(
        &mut self,
        batch: &CausalBatch,
        caches: &[LayerCache],
        xn: &[f32],
        cf: &NormCache,
        ch: &LinCache,
        dlogits: &[f32],
    ) {
        let (h, t, b) = (self.cfg.hidden_size, batch.t, batch.size());
        let n = b * t;
        let s = self.shape(b, t);
        let (embed, norm) = (self.embed, self.norm);
        let p = &mut self.params;
        let dxn = match &self.lm_head {
            Some(l) => l.backward(p, dlogits, xn, ch, n, None).unwrap_or_default(),
            None => {
                let v = self.cfg.vocab_size;
                let (w, dw) = p.split(embed);
                let mut dx = vec![0f32; n * h];
                ops::linear_backward(dlogits, xn, w, Some((&mut dx, false)), dw, None, (n, h, v));
                dx
            }
        };
        let mut dg = p.trainable(norm).then(|| vec![0f32; h]);
        let mut dx = ops::rms_norm_backward(&dxn, cf, p.value(norm), dg.as_deref_mut(), h);
        add_grad(p, norm, dg);
        for (l, c) in self.layers.iter().zip(caches).rev() {
            let da = l
                .down
                .backward(p, &dx, &c.a, &c.lin_mlp[2], n, None)
                .unwrap_or_default();
            let (dgate, dup) = ops::swiglu_backward(&da, &c.g, &c.u);
            let mut dhn2 = l
                .gate
                .backward(p, &dgate, &c.hn2, &c.lin_mlp[0], n, None)
                .unwrap_or_default();
            l.up.backward(p, &dup, &c.hn2, &c.lin_mlp[1], n, Some(&mut dhn2));
            let mut g2 = p.trainable(l.post_norm).then(|| vec![0f32; h]);
            let d2 =
                ops::rms_norm_backward(&dhn2, &c.c2, p.value(l.post_norm), g2.as_deref_mut(), h);
            add_grad(p, l.post_norm, g2);
            dx.iter_mut().zip(&d2).for_each(|(a, b)| *a += b);
            let dctx =
                l.o.backward(p, &dx, &c.ctx, &c.lin[3], n, None)
                    .unwrap_or_default();
            let (mut dq, mut dk, dv) =
                ops::attention_backward(&dctx, &c.q, &c.k, &c.v, &c.probs, s);
            ops::rope(&mut dq, &self.cos, &self.sin, t, s.nh, s.hd, true);
            ops::rope(&mut dk, &self.cos, &self.sin, t, s.nkv, s.hd, true);
            let mut dhn =
                l.q.backward(p, &dq, &c.hn, &c.lin[0], n, None)
                    .unwrap_or_default();
            l.k.backward(p, &dk, &c.hn, &c.lin[1], n, Some(&mut dhn));
            l.v.backward(p, &dv, &c.hn, &c.lin[2], n, Some(&mut dhn));
            let mut g1 = p.trainable(l.in_norm).then(|| vec![0f32; h]);
            let d1 = ops::rms_norm_backward(&dhn, &c.c1, p.value(l.in_norm), g1.as_deref_mut(), h);
            add_grad(p, l.in_norm, g1);
            dx.iter_mut().zip(&d1).for_each(|(a, b)| *a += b);
        }
        if let Some(g) = p.grad(embed) {
            for (row, &id) in dx.chunks(h).zip(&batch.ids) {
                g[id as usize * h..][..h]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(g, d)| *g += d);
            }
        }
    }

    /// PEFT's `lora_dropout` on every LoRA branch.
    pub fn set_lora_dropout(&mut self, p: f32) {
        for l in &mut self.layers {
            for lin in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                lin.set_lora_dropout(p);
            }
        }
        self.lora_dropout = p;
    }

    /// Every linear layer, for merging LoRA factors.
    pub fn linears(&self) -> impl Iterator<Item = &Lin> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
    }
}

fn add_grad(p: &mut Params, i: usize, g: Option<Vec<f32>>) {
    if let (Some(g), Some(pg)) = (g, p.grad(i)) {
        pg.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
    }
}
