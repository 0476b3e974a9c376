//! BERT (MiniLM) for sequence classification, trainable: the network of
//! `models/bert.rs` written as forward passes that keep their activations, and the backward
//! passes over them. Parameters keep transformers' names (`bert.encoder.layer.0.…`), so what
//! is saved is a `BertForSequenceClassification` checkpoint transformers and slm both load.

use std::path::Path;

use super::ops::{self, AttnShape, NormCache};
use super::params::{add_lora, normal, seeded, step_seed, Lin, LinCache, Params};
use super::{TrainError, TrainResult};
use crate::io::{open_weights, ModelFiles};
use crate::models::bert::{Config, Flavor};
use crate::models::{config_of, ModelConfig};
use crate::nn::Vb;

/// A right-padded batch of token ids with their labels.
#[derive(Debug, Clone)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub types: Vec<u32>,
    pub lengths: Vec<usize>,
    pub t: usize,
    /// Classification: one label per sequence.
    pub labels: Vec<u32>,
    /// Masked LM: the original id at each masked position, `None` elsewhere (`[b·t]`).
    pub targets: Vec<Option<u32>>,
}

impl Batch {
    pub fn size(&self) -> usize {
        self.lengths.len()
    }
}

/// How the encoder is trained.
#[derive(Debug, Clone)]
pub struct Method {
    /// LoRA rank and alpha; `None` trains every weight.
    pub lora: Option<(usize, f32)>,
    /// LoRA target modules by name (`query`, `value`, ...).
    pub targets: Vec<String>,
    pub seed: u64,
}

#[derive(Clone, Copy)]
struct Norm {
    g: usize,
    b: usize,
}

struct Layer {
    q: Lin,
    k: Lin,
    v: Lin,
    attn_out: Lin,
    ln1: Norm,
    inter: Lin,
    out: Lin,
    ln2: Norm,
}

/// The task head on top of the encoder.
#[derive(Clone, Copy)]
enum Head {
    /// BERT's pooler (`tanh(dense(h[CLS]))`) and a linear classifier.
    Classify { pooler: Lin, classifier: Lin },
    /// `cls.predictions`: dense, GELU, LayerNorm, then the word embeddings (tied) plus a bias.
    MaskedLm { dense: Lin, norm: Norm, bias: usize },
}

/// Which head to train.
pub enum HeadKind {
    Classify(Vec<String>),
    MaskedLm,
}

pub struct BertTrain {
    pub cfg: Config,
    pub method: Method,
    pub lora_dropout: f32,
    pub params: Params,
    pub labels: Vec<String>,
    word: usize,
    pos: usize,
    typ: Option<usize>,
    emb_ln: Norm,
    layers: Vec<Layer>,
    head: Head,
}

/// Activations of one layer kept for its backward pass.
struct LayerCache {
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    lin_qkv: [LinCache; 3],
    probs: Vec<f32>,
    ctx: Vec<f32>,
    lin_ao: LinCache,
    n1: NormCache,
    h1: Vec<f32>,
    pre: Vec<f32>,
    lin_i: LinCache,
    act: Vec<f32>,
    lin_o: LinCache,
    n2: NormCache,
}

struct Cache {
    emb: NormCache,
    layers: Vec<LayerCache>,
    head: HeadCache,
}

enum HeadCache {
    Classify {
        cls: Vec<f32>,
        lin_p: LinCache,
        pooled: Vec<f32>,
        lin_c: LinCache,
    },
    MaskedLm {
        /// Rows of the masked positions in the batch.
        rows: Vec<usize>,
        x: Vec<f32>,
        lin_d: LinCache,
        pre: Vec<f32>,
        norm: NormCache,
        y: Vec<f32>,
    },
}

impl BertTrain {
    /// Loads a BERT checkpoint (a bare encoder such as all-MiniLM-L6-v2, or a classifier) and
    /// gives it a head for `labels`: the checkpoint's own when its size matches, else a new one
    /// initialised as transformers does (N(0, 0.02²) weights, zero biases).
    pub fn load(path: &Path, labels: Vec<String>, method: &Method) -> TrainResult<Self> {
        Self::load_with(path, HeadKind::Classify(labels), method)
    }

    /// A BERT checkpoint with a masked-LM head: the checkpoint's own (`cls.predictions`), or a
    /// new one (N(0, 0.02²) dense, unit LayerNorm, zero bias) on a bare encoder.
    pub fn load_masked_lm(path: &Path, method: &Method) -> TrainResult<Self> {
        Self::load_with(path, HeadKind::MaskedLm, method)
    }

    fn load_with(path: &Path, kind: HeadKind, method: &Method) -> TrainResult<Self> {
        let files = ModelFiles::locate(path)?;
        let ModelConfig::Bert(cfg) = config_of(&files)? else {
            return Err(TrainError::Unsupported(format!(
                "{}: fine-tuning a classifier needs a BERT-family encoder",
                path.display()
            )));
        };
        // The backward pass is exact GELU's; another activation would train a different model.
        if cfg.hidden_act != crate::nn::Activation::Gelu {
            return Err(TrainError::Unsupported(format!(
                "{}: hidden_act {:?} is not trainable yet (encoder training implements gelu)",
                path.display(),
                cfg.hidden_act
            )));
        }
        if cfg.flavor != Flavor::Bert {
            return Err(TrainError::Unsupported(format!(
                "{}: fine-tuning supports BERT checkpoints (BERT, MiniLM, bge) for now, not {:?}",
                path.display(),
                cfg.flavor
            )));
        }
        let vb = Vb::new(open_weights(&files)?, false);
        let prefix = if vb.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let full = method.lora.is_none();
        // New heads and LoRA factors draw from separate streams, so a LoRA run starts from
        // exactly the head a full run with the same seed gets.
        let mut rng = seeded(method.seed);
        let mut lora_rng = seeded(method.seed ^ 0x4c6f_5241);
        let mut params = Params::default();
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let get =
            |p: &mut Params, name: &str, shape: &[usize], trainable: bool| -> TrainResult<usize> {
                let t = vb.get(&format!("{prefix}{name}"), shape)?;
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                Ok(p.add(format!("bert.{name}"), shape.to_vec(), v, trainable))
            };
        let word = get(
            &mut params,
            "embeddings.word_embeddings.weight",
            &[cfg.vocab_size, h],
            full,
        )?;
        let pos = get(
            &mut params,
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
            full,
        )?;
        let typ = if cfg.type_vocab_size > 0 {
            Some(get(
                &mut params,
                "embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, h],
                full,
            )?)
        } else {
            None
        };
        let norm = |p: &mut Params, name: &str| -> TrainResult<Norm> {
            Ok(Norm {
                g: get(p, &format!("{name}.weight"), &[h], full)?,
                b: get(p, &format!("{name}.bias"), &[h], full)?,
            })
        };
        let emb_ln = norm(&mut params, "embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let base = format!("encoder.layer.{i}");
            let mut lin =
                |p: &mut Params, name: &str, din: usize, dout: usize| -> TrainResult<Lin> {
                    let mut l = Lin {
                        w: get(p, &format!("{base}.{name}.weight"), &[dout, din], full)?,
                        b: Some(get(p, &format!("{base}.{name}.bias"), &[dout], full)?),
                        din,
                        dout,
                        lora: None,
                    };
                    let module = name.rsplit('.').next().unwrap_or(name);
                    if let Some((r, alpha)) = method.lora {
                        if method.targets.iter().any(|t| t == module || t == name) {
                            add_lora(
                                p,
                                &mut l,
                                &format!("bert.{base}.{name}"),
                                r,
                                alpha,
                                &mut lora_rng,
                            );
                        }
                    }
                    Ok(l)
                };
            let q = lin(&mut params, "attention.self.query", h, h)?;
            let k = lin(&mut params, "attention.self.key", h, h)?;
            let v = lin(&mut params, "attention.self.value", h, h)?;
            let attn_out = lin(&mut params, "attention.output.dense", h, h)?;
            let ln1 = norm(&mut params, &format!("{base}.attention.output.LayerNorm"))?;
            let inter_l = lin(&mut params, "intermediate.dense", h, inter)?;
            let out = lin(&mut params, "output.dense", inter, h)?;
            let ln2 = norm(&mut params, &format!("{base}.output.LayerNorm"))?;
            layers.push(Layer {
                q,
                k,
                v,
                attn_out,
                ln1,
                inter: inter_l,
                out,
                ln2,
            });
        }
        // The classifier is trained in LoRA runs too (PEFT's modules_to_save for SEQ_CLS); the
        // pooler, as in PEFT, is not.
        let mut head_lin = |p: &mut Params,
                            name: &str,
                            src: &str,
                            dout: usize,
                            trainable: bool|
         -> TrainResult<Lin> {
            let (w, b) = match (
                vb.shape_of(&format!("{src}.weight")),
                vb.get(&format!("{src}.bias"), &[dout]),
            ) {
                (Some(s), Ok(b)) if s == [dout, h] => (
                    vb.get(&format!("{src}.weight"), &[dout, h])?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                    b.to_vec1::<f32>()?,
                ),
                _ => (normal(dout * h, 0.02, &mut rng), vec![0.0; dout]),
            };
            Ok(Lin {
                w: p.add(format!("{name}.weight"), vec![dout, h], w, trainable),
                b: Some(p.add(format!("{name}.bias"), vec![dout], b, trainable)),
                din: h,
                dout,
                lora: None,
            })
        };
        let (head, labels) = match kind {
            HeadKind::Classify(labels) => {
                let pooler = head_lin(
                    &mut params,
                    "bert.pooler.dense",
                    &format!("{prefix}pooler.dense"),
                    h,
                    full,
                )?;
                let classifier =
                    head_lin(&mut params, "classifier", "classifier", labels.len(), true)?;
                (Head::Classify { pooler, classifier }, labels)
            }
            HeadKind::MaskedLm => {
                let t = "cls.predictions.transform";
                let dense = head_lin(
                    &mut params,
                    &format!("{t}.dense"),
                    &format!("{t}.dense"),
                    h,
                    true,
                )?;
                let own = |n: &str, init: f32| -> TrainResult<Vec<f32>> {
                    Ok(
                        match vb.get(
                            n,
                            &[if n.ends_with("predictions.bias") {
                                cfg.vocab_size
                            } else {
                                h
                            }],
                        ) {
                            Ok(v) => v.to_vec1::<f32>()?,
                            Err(_) => vec![
                                init;
                                if n.ends_with("predictions.bias") {
                                    cfg.vocab_size
                                } else {
                                    h
                                }
                            ],
                        },
                    )
                };
                let g = own(&format!("{t}.LayerNorm.weight"), 1.0)?;
                let b = own(&format!("{t}.LayerNorm.bias"), 0.0)?;
                let bias = own("cls.predictions.bias", 0.0)?;
                let norm = Norm {
                    g: params.add(format!("{t}.LayerNorm.weight"), vec![h], g, true),
                    b: params.add(format!("{t}.LayerNorm.bias"), vec![h], b, true),
                };
                let bias = params.add(
                    "cls.predictions.bias".into(),
                    vec![cfg.vocab_size],
                    bias,
                    true,
                );
                (Head::MaskedLm { dense, norm, bias }, Vec::new())
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            method: method.clone(),
            lora_dropout: 0.0,
            params,
            labels,
            word,
            pos,
            typ,
            emb_ln,
            layers,
            head,
        })
    }

    /// `train`: the step's seed while training (LoRA dropout), `None` to evaluate.
    fn forward(&self, batch: &Batch, train: Option<u64>) -> (Vec<f32>, Cache) {
        let p = &self.params;
        let cfg = &self.cfg;
        let (h, t, b) = (cfg.hidden_size, batch.t, batch.size());
        let n = b * t;
        let eps = cfg.layer_norm_eps as f32;
        let mut emb = vec![0f32; n * h];
        for (i, row) in emb.chunks_mut(h).enumerate() {
            let w = &p.value(self.word)[batch.ids[i] as usize * h..][..h];
            let ps = &p.value(self.pos)[(i % t) * h..][..h];
            row.iter_mut()
                .zip(w)
                .zip(ps)
                .for_each(|((o, a), b)| *o = a + b);
            if let Some(typ) = self.typ {
                let ty = &p.value(typ)[batch.types[i] as usize * h..][..h];
                row.iter_mut().zip(ty).for_each(|(o, a)| *o += a);
            }
        }
        let (mut x, emb_cache) =
            ops::layer_norm(&emb, p.value(self.emb_ln.g), p.value(self.emb_ln.b), eps, h);
        let shape = AttnShape {
            b,
            t,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_attention_heads,
            hd: h / cfg.num_attention_heads,
            causal: false,
            window: None,
            dropout: None,
        };
        let mut caches = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let (q, cq) = l.q.forward(p, &x, n, train);
            let (k, ck) = l.k.forward(p, &x, n, train);
            let (v, cv) = l.v.forward(p, &x, n, train);
            let (ctx, probs) = ops::attention(&q, &k, &v, &batch.lengths, shape);
            let (mut a, lin_ao) = l.attn_out.forward(p, &ctx, n, train);
            a.iter_mut().zip(&x).for_each(|(a, r)| *a += r);
            let (h1, n1) = ops::layer_norm(&a, p.value(l.ln1.g), p.value(l.ln1.b), eps, h);
            let (pre, lin_i) = l.inter.forward(p, &h1, n, train);
            let act = ops::gelu(&pre);
            let (mut o, lin_o) = l.out.forward(p, &act, n, train);
            o.iter_mut().zip(&h1).for_each(|(o, r)| *o += r);
            let (h2, n2) = ops::layer_norm(&o, p.value(l.ln2.g), p.value(l.ln2.b), eps, h);
            caches.push(LayerCache {
                x: std::mem::replace(&mut x, h2),
                q,
                k,
                v,
                lin_qkv: [cq, ck, cv],
                probs,
                ctx,
                lin_ao,
                n1,
                h1,
                pre,
                lin_i,
                act,
                lin_o,
                n2,
            });
        }
        let (logits, head) = self.head_forward(&x, batch, train);
        (
            logits,
            Cache {
                emb: emb_cache,
                layers: caches,
                head,
            },
        )
    }

    fn head_forward(&self, x: &[f32], batch: &Batch, train: Option<u64>) -> (Vec<f32>, HeadCache) {
        let p = &self.params;
        let (h, t, b) = (self.cfg.hidden_size, batch.t, batch.size());
        match self.head {
            Head::Classify { pooler, classifier } => {
                let cls: Vec<f32> = (0..b).flat_map(|s| x[s * t * h..][..h].to_vec()).collect();
                let (pre, lin_p) = pooler.forward(p, &cls, b, train);
                let pooled = ops::tanh_forward(&pre);
                let (logits, lin_c) = classifier.forward(p, &pooled, b, train);
                (
                    logits,
                    HeadCache::Classify {
                        cls,
                        lin_p,
                        pooled,
                        lin_c,
                    },
                )
            }
            Head::MaskedLm { dense, norm, bias } => {
                // Only the masked positions go through the vocabulary-sized output.
                let rows: Vec<usize> = (0..b * t).filter(|&i| batch.targets[i].is_some()).collect();
                let m = rows.len();
                let xr: Vec<f32> = rows
                    .iter()
                    .flat_map(|&r| x[r * h..][..h].to_vec())
                    .collect();
                let (pre, lin_d) = dense.forward(p, &xr, m, train);
                let act = ops::gelu(&pre);
                let eps = self.cfg.layer_norm_eps as f32;
                let (y, nc) = ops::layer_norm(&act, p.value(norm.g), p.value(norm.b), eps, h);
                let logits = ops::linear(
                    &y,
                    p.value(self.word),
                    Some(p.value(bias)),
                    (m, h, self.cfg.vocab_size),
                );
                (
                    logits,
                    HeadCache::MaskedLm {
                        rows,
                        x: xr,
                        lin_d,
                        pre,
                        norm: nc,
                        y,
                    },
                )
            }
        }
    }

    /// Class logits `[b, labels]`, or for a masked LM the vocabulary logits of the masked
    /// positions `[masked, vocab]`.
    pub fn logits(&self, batch: &Batch) -> Vec<f32> {
        self.forward(batch, None).0
    }

    /// The targets of the rows `logits` returns, and how many classes each row has.
    pub fn targets(&self, batch: &Batch) -> (Vec<Option<u32>>, usize) {
        match self.head {
            Head::Classify { .. } => (
                batch.labels.iter().map(|&l| Some(l)).collect(),
                self.labels.len(),
            ),
            Head::MaskedLm { .. } => (
                batch
                    .targets
                    .iter()
                    .filter(|t| t.is_some())
                    .copied()
                    .collect(),
                self.cfg.vocab_size,
            ),
        }
    }

    pub fn is_masked_lm(&self) -> bool {
        matches!(self.head, Head::MaskedLm { .. })
    }

    /// Forward and backward of the mean cross-entropy over the batch divided by `accum`
    /// (gradient accumulation); gradients are added to the parameters'. Returns the batch's
    /// mean loss.
    pub fn forward_backward(&mut self, batch: &Batch, accum: usize) -> f64 {
        let (logits, cache) = self.forward(batch, Some(step_seed(self.method.seed, &batch.ids)));
        let (targets, classes) = self.targets(batch);
        let denom = (targets.len().max(1) * accum) as f32;
        let (loss, dlogits) = ops::cross_entropy(&logits, &targets, classes, denom);
        self.backward(batch, &cache, &dlogits);
        loss * accum as f64
    }

    fn backward(&mut self, batch: &Batch, c: &Cache, dlogits: &[f32]) {
        let (h, t, b) = (self.cfg.hidden_size, batch.t, batch.size());
        let n = b * t;
        let (head, word) = (self.head, self.word);
        let p = &mut self.params;
        let mut dx = vec![0f32; n * h];
        match (&c.head, head) {
            (
                HeadCache::Classify {
                    cls,
                    lin_p,
                    pooled,
                    lin_c,
                },
                Head::Classify { pooler, classifier },
            ) => {
                let dpooled = classifier
                    .backward(p, dlogits, pooled, lin_c, b, None)
                    .unwrap_or_default();
                let dpre = ops::tanh_backward(&dpooled, pooled);
                let dcls = pooler
                    .backward(p, &dpre, cls, lin_p, b, None)
                    .unwrap_or_default();
                for s in 0..b {
                    dx[s * t * h..][..h].copy_from_slice(&dcls[s * h..][..h]);
                }
            }
            (
                HeadCache::MaskedLm {
                    rows,
                    x,
                    lin_d,
                    pre,
                    norm: nc,
                    y,
                },
                Head::MaskedLm { dense, norm, bias },
            ) => {
                let (m, v) = (rows.len(), self.cfg.vocab_size);
                if let Some(db) = p.grad(bias) {
                    ops::linear_backward(dlogits, y, &[], None, None, Some(db), (m, h, v));
                }
                let mut dy = vec![0f32; m * h];
                {
                    let (w, dw) = p.split(word);
                    ops::linear_backward(
                        dlogits,
                        y,
                        w,
                        Some((&mut dy, false)),
                        dw,
                        None,
                        (m, h, v),
                    );
                }
                let mut g = Some((vec![0f32; h], vec![0f32; h]));
                let dact = ops::layer_norm_backward(
                    &dy,
                    nc,
                    p.value(norm.g),
                    g.as_mut()
                        .map(|(a, b)| (a.as_mut_slice(), b.as_mut_slice())),
                    h,
                );
                add_norm_grads(p, norm, g);
                let dpre = ops::gelu_backward(&dact, pre);
                let dxr = dense
                    .backward(p, &dpre, x, lin_d, m, None)
                    .unwrap_or_default();
                for (k, &r) in rows.iter().enumerate() {
                    dx[r * h..][..h].copy_from_slice(&dxr[k * h..][..h]);
                }
            }
            _ => unreachable!("the cache comes from this model's head"),
        }
        let shape = AttnShape {
            b,
            t,
            nh: self.cfg.num_attention_heads,
            nkv: self.cfg.num_attention_heads,
            hd: h / self.cfg.num_attention_heads,
            causal: false,
            window: None,
            dropout: None,
        };
        for (l, lc) in self.layers.iter().zip(&c.layers).rev() {
            let norm_grads = |p: &mut Params, nm: Norm| -> Option<(Vec<f32>, Vec<f32>)> {
                p.trainable(nm.g).then(|| (vec![0f32; h], vec![0f32; h]))
            };
            let mut g2 = norm_grads(p, l.ln2);
            let dres2 = ops::layer_norm_backward(
                &dx,
                &lc.n2,
                p.value(l.ln2.g),
                g2.as_mut()
                    .map(|(a, b)| (a.as_mut_slice(), b.as_mut_slice())),
                h,
            );
            add_norm_grads(p, l.ln2, g2);
            let dact = l
                .out
                .backward(p, &dres2, &lc.act, &lc.lin_o, n, None)
                .unwrap_or_default();
            let dpre = ops::gelu_backward(&dact, &lc.pre);
            let mut dh1 = dres2;
            l.inter
                .backward(p, &dpre, &lc.h1, &lc.lin_i, n, Some(&mut dh1));
            let mut g1 = norm_grads(p, l.ln1);
            let dres1 = ops::layer_norm_backward(
                &dh1,
                &lc.n1,
                p.value(l.ln1.g),
                g1.as_mut()
                    .map(|(a, b)| (a.as_mut_slice(), b.as_mut_slice())),
                h,
            );
            add_norm_grads(p, l.ln1, g1);
            let dctx = l
                .attn_out
                .backward(p, &dres1, &lc.ctx, &lc.lin_ao, n, None)
                .unwrap_or_default();
            let (dq, dk, dv) =
                ops::attention_backward(&dctx, &lc.q, &lc.k, &lc.v, &lc.probs, shape);
            let mut dxin = dres1;
            l.q.backward(p, &dq, &lc.x, &lc.lin_qkv[0], n, Some(&mut dxin));
            l.k.backward(p, &dk, &lc.x, &lc.lin_qkv[1], n, Some(&mut dxin));
            l.v.backward(p, &dv, &lc.x, &lc.lin_qkv[2], n, Some(&mut dxin));
            dx = dxin;
        }
        if !p.trainable(self.emb_ln.g) {
            return;
        }
        let mut ge = Some((vec![0f32; h], vec![0f32; h]));
        let demb = ops::layer_norm_backward(
            &dx,
            &c.emb,
            p.value(self.emb_ln.g),
            ge.as_mut()
                .map(|(a, b)| (a.as_mut_slice(), b.as_mut_slice())),
            h,
        );
        add_norm_grads(p, self.emb_ln, ge);
        for (i, row) in demb.chunks(h).enumerate() {
            let mut add = |param: usize, r: usize| {
                if let Some(g) = p.grad(param) {
                    g[r * h..][..h]
                        .iter_mut()
                        .zip(row)
                        .for_each(|(g, d)| *g += d);
                }
            };
            add(self.word, batch.ids[i] as usize);
            add(self.pos, i % t);
            if let Some(typ) = self.typ {
                add(typ, batch.types[i] as usize);
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
                &mut l.attn_out,
                &mut l.inter,
                &mut l.out,
            ] {
                lin.set_lora_dropout(p);
            }
        }
        self.lora_dropout = p;
    }

    /// The parameters with every LoRA update folded into its weight (the model unchanged).
    pub fn clone_params_merged(&self) -> Params {
        let mut p = self.params.clone();
        for l in &self.layers {
            for lin in [&l.q, &l.k, &l.v, &l.attn_out, &l.inter, &l.out] {
                lin.merge(&mut p);
            }
        }
        p
    }
}

fn add_norm_grads(p: &mut Params, nm: Norm, g: Option<(Vec<f32>, Vec<f32>)>) {
    if let Some((dg, db)) = g {
        if let Some(pg) = p.grad(nm.g) {
            pg.iter_mut().zip(&dg).for_each(|(a, b)| *a += b);
        }
        if let Some(pb) = p.grad(nm.b) {
            pb.iter_mut().zip(&db).for_each(|(a, b)| *a += b);
        }
    }
}
