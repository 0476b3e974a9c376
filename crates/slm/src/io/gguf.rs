//! GGUF v2/v3 files: metadata, and tensors addressed by their Hugging Face names.
//!
//! llama.cpp's converter renames tensors and, for the `llama` architecture, permutes the rows of
//! the Q and K projections to suit its interleaved rotary embedding. This store undoes both, so a
//! model file sees exactly the tensors transformers would give it.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use super::{QuantWeight, TensorMeta, Weight, WeightStore};
use crate::error::{Error, Result};

pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    mmap: std::sync::Arc<Mmap>,
    /// The packed-weights cache, opened at the first quantized weight loaded for the kernels.
    pack: std::sync::OnceLock<Option<std::sync::Arc<super::pack_cache::PackCache>>>,
}

impl GgufFile {
    /// Opens `path`, reusing a parse that is still alive elsewhere: loading a model reads the
    /// config, the weights and the tokenizer from one file, and parsing its metadata (tens of
    /// thousands of vocabulary strings) costs more than the rest of the load.
    pub fn open_shared(path: &Path) -> Result<std::sync::Arc<Self>> {
        use std::sync::{Arc, Mutex, Weak};
        static OPEN: Mutex<Vec<(std::path::PathBuf, Weak<GgufFile>)>> = Mutex::new(Vec::new());
        let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(g) = open
            .iter()
            .find(|(p, _)| *p == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(g);
        }
        let g = Arc::new(Self::open(path)?);
        open.push((key, Arc::downgrade(&g)));
        Ok(g)
    }

    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        fn parse<R: std::io::Read + std::io::Seek>(path: &Path, mut reader: R) -> Result<Content> {
            crate::error::guard_foreign(path, "not a valid GGUF file", || {
                Content::read(&mut reader)
                    .map_err(|e| Error::file(path, format!("not a valid GGUF file: {e}")))
            })
        }
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = match unsafe { Mmap::map(&file) } {
            Ok(m) => m,
            Err(e) => {
                // Not mappable (a device, say): what is wrong with its bytes is the better error.
                parse(path, std::io::BufReader::new(&file))?;
                return Err(Error::io(path, e));
            }
        };
        // The header is parsed from the mapping: through a BufReader over the file, candle's
        // reader asked the kernel for its position once per string (98,381 lseek calls for
        // SmolLM2's vocabulary and merges).
        let content = parse(path, std::io::Cursor::new(&mmap[..]))?;
        let len = mmap.len() as u64;
        let mut ranges = Vec::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            let (start, size) = byte_range(&content, info).ok_or_else(|| {
                Error::file(
                    path,
                    format!(
                        "tensor '{name}' has a malformed size ({:?} of {:?})",
                        info.shape.dims(),
                        info.ggml_dtype
                    ),
                )
            })?;
            if start.checked_add(size).is_none_or(|end| end > len) {
                return Err(Error::file(
                    path,
                    format!(
                        "truncated: tensor '{name}' needs bytes {start}..{} but the file has {len}",
                        start.saturating_add(size)
                    ),
                ));
            }
            ranges.push((start, start + size, name));
        }
        // Two tensors sharing bytes is damage, not a layout llama.cpp writes.
        ranges.sort();
        for w in ranges.windows(2) {
            let ((_, end, a), (start, _, b)) = (&w[0], &w[1]);
            if start < end {
                return Err(Error::file(
                    path,
                    format!("tensors '{a}' and '{b}' overlap (bytes {start}..{end})"),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            mmap: std::sync::Arc::new(mmap),
            pack: Default::default(),
        })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.meta(key).and_then(|v| match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        })
    }

    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key).and_then(|v| match v {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            _ => None,
        })
    }

    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        self.meta(key).and_then(|v| v.to_bool().ok())
    }

    /// A required metadata key, with an error naming the file and key when it is absent.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.meta_u64(key).ok_or_else(|| {
            Error::file(
                &self.path,
                format!("metadata key '{key}' missing or not an integer"),
            )
        })
    }

    pub fn architecture(&self) -> Result<&str> {
        self.meta_str("general.architecture")
            .ok_or_else(|| Error::file(&self.path, "metadata key 'general.architecture' missing"))
    }

    /// A tensor as stored: type, dims (rows last, as candle reports them), bytes in the mapping.
    pub fn raw(&self, gguf_name: &str) -> Option<(GgmlDType, Vec<usize>, &[u8])> {
        let info = self.content.tensor_infos.get(gguf_name)?;
        let (start, size) = byte_range(&self.content, info)?;
        let bytes = &self.mmap[start as usize..(start + size) as usize];
        Some((info.ggml_dtype, info.shape.dims().to_vec(), bytes))
    }

    /// The inverse of llama.cpp's `permute` for rotary Q/K rows, or None when not needed.
    fn qk_heads(&self, hf_name: &str) -> Option<usize> {
        if self.architecture().ok()? != "llama" {
            return None;
        }
        let key = if hf_name.contains("self_attn.q_proj") {
            "llama.attention.head_count"
        } else if hf_name.contains("self_attn.k_proj") {
            self.meta("llama.attention.head_count_kv")
                .map(|_| "llama.attention.head_count_kv")
                .unwrap_or("llama.attention.head_count")
        } else {
            return None;
        };
        // Zero heads is not a permutation; the config check names that key.
        self.meta_u64(key).map(|h| h as usize).filter(|&h| h > 0)
    }
}

/// Where a tensor's bytes lie, with every product checked: a dimension of 2^62 must not wrap to
/// a small size that passes the bounds check.
fn byte_range(
    content: &Content,
    info: &candle_core::quantized::gguf_file::TensorInfo,
) -> Option<(u64, u64)> {
    let elems = info
        .shape
        .dims()
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))?;
    let bs = info.ggml_dtype.block_size();
    if bs == 0 || !elems.is_multiple_of(bs) {
        return None;
    }
    let size = (elems / bs).checked_mul(info.ggml_dtype.type_size())? as u64;
    Some((content.tensor_data_offset.checked_add(info.offset)?, size))
}

/// Row order of llama.cpp's permuted Q/K: GGUF row `h*hd + 2*i + j` holds HF row `h*hd + j*hd/2 + i`.
pub fn unpermute_qk_rows(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads;
    let mut src_of_dst = vec![0; rows];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..hd / 2 {
                src_of_dst[h * hd + j * hd / 2 + i] = h * hd + 2 * i + j;
            }
        }
    }
    src_of_dst
}

/// HF module names and llama.cpp's, per family: (HF, GGUF). Layer modules sit under
/// `{prefix}{i}.` in HF and `blk.{i}.` in GGUF; an encoder-decoder has a second stack.
struct NameTable {
    prefix: &'static str,
    global: &'static [(&'static str, &'static str)],
    layer: &'static Names,
    /// More stacks: (HF prefix, GGUF prefix, layer modules in parts).
    stacks: &'static [Stack],
}

type Names = [(&'static str, &'static str)];
type Stack = (&'static str, &'static str, &'static [&'static Names]);

/// T5's blocks, as llama.cpp's converter names them: self-attention in both stacks, then the
/// encoder's feed-forward block (`layer.1`) or the decoder's cross-attention and feed-forward
/// (`layer.1`, `layer.2`); `wi` (ReLU) and `wi_1` (gated) are both `ffn_up`.
const T5_SELF: &Names = &[
    ("layer.0.layer_norm", "attn_norm"),
    ("layer.0.SelfAttention.q", "attn_q"),
    ("layer.0.SelfAttention.k", "attn_k"),
    ("layer.0.SelfAttention.v", "attn_v"),
    ("layer.0.SelfAttention.o", "attn_o"),
    (
        "layer.0.SelfAttention.relative_attention_bias",
        "attn_rel_b",
    ),
];
const T5_ENCODER_FF: &Names = &[
    ("layer.1.layer_norm", "ffn_norm"),
    ("layer.1.DenseReluDense.wi_0", "ffn_gate"),
    ("layer.1.DenseReluDense.wi_1", "ffn_up"),
    ("layer.1.DenseReluDense.wi", "ffn_up"),
    ("layer.1.DenseReluDense.wo", "ffn_down"),
];
const T5_DECODER_REST: &Names = &[
    ("layer.1.layer_norm", "cross_attn_norm"),
    ("layer.1.EncDecAttention.q", "cross_attn_q"),
    ("layer.1.EncDecAttention.k", "cross_attn_k"),
    ("layer.1.EncDecAttention.v", "cross_attn_v"),
    ("layer.1.EncDecAttention.o", "cross_attn_o"),
    ("layer.2.layer_norm", "ffn_norm"),
    ("layer.2.DenseReluDense.wi_0", "ffn_gate"),
    ("layer.2.DenseReluDense.wi_1", "ffn_up"),
    ("layer.2.DenseReluDense.wi", "ffn_up"),
    ("layer.2.DenseReluDense.wo", "ffn_down"),
];

const LLAMA_GLOBAL: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
];
const NORMS: [(&str, &str); 2] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

fn name_table(arch: &str) -> NameTable {
    match arch {
        "t5" => NameTable {
            prefix: "",
            global: &[
                ("shared", "token_embd"),
                ("encoder.final_layer_norm", "enc.output_norm"),
                ("decoder.final_layer_norm", "dec.output_norm"),
                ("lm_head", "output"),
            ],
            layer: &[],
            stacks: &[
                ("encoder.block.", "enc.blk.", &[T5_SELF, T5_ENCODER_FF]),
                ("decoder.block.", "dec.blk.", &[T5_SELF, T5_DECODER_REST]),
            ],
        },
        "gpt2" => NameTable {
            prefix: "transformer.h.",
            global: &[
                ("transformer.wte", "token_embd"),
                ("transformer.wpe", "position_embd"),
                ("transformer.ln_f", "output_norm"),
                ("lm_head", "output"),
            ],
            layer: &[
                ("attn.c_attn", "attn_qkv"),
                ("attn.c_proj", "attn_output"),
                ("mlp.c_fc", "ffn_up"),
                ("mlp.c_proj", "ffn_down"),
                ("ln_1", "attn_norm"),
                ("ln_2", "ffn_norm"),
            ],
            stacks: &[],
        },
        // Phi-3 fuses q/k/v and gate/up; llama.cpp keeps them fused (gate first).
        "phi3" => NameTable {
            prefix: "model.layers.",
            global: LLAMA_GLOBAL,
            layer: &[
                ("self_attn.qkv_proj", "attn_qkv"),
                ("self_attn.o_proj", "attn_output"),
                ("mlp.gate_up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
                NORMS[0],
                NORMS[1],
            ],
            stacks: &[],
        },
        // Gemma norms around both blocks: HF's post_attention_layernorm is llama.cpp's
        // post_attention_norm here, and its pre_feedforward_layernorm the ffn_norm.
        "gemma2" | "gemma3" => NameTable {
            prefix: "model.layers.",
            global: LLAMA_GLOBAL,
            layer: &[
                ("self_attn.q_proj", "attn_q"),
                ("self_attn.k_proj", "attn_k"),
                ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"),
                ("self_attn.q_norm", "attn_q_norm"),
                ("self_attn.k_norm", "attn_k_norm"),
                ("mlp.gate_proj", "ffn_gate"),
                ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
                ("input_layernorm", "attn_norm"),
                ("post_attention_layernorm", "post_attention_norm"),
                ("pre_feedforward_layernorm", "ffn_norm"),
                ("post_feedforward_layernorm", "post_ffw_norm"),
            ],
            stacks: &[],
        },
        _ => NameTable {
            prefix: "model.layers.",
            global: LLAMA_GLOBAL,
            layer: &[
                ("self_attn.q_proj", "attn_q"),
                ("self_attn.k_proj", "attn_k"),
                ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"),
                ("mlp.gate_proj", "ffn_gate"),
                ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
                NORMS[0],
                NORMS[1],
            ],
            stacks: &[],
        },
    }
}

/// GPT-2's Conv1D layers keep `[in, out]` in HF files and `[out, in]` (as every linear layer) in
/// GGUF: the converters transpose these.
pub const GPT2_CONV1D: [&str; 4] = [
    ".attn.c_attn.",
    ".attn.c_proj.",
    ".mlp.c_fc.",
    ".mlp.c_proj.",
];

/// llama.cpp's converter stores Gemma's norm weights as `1 + w` (the gain itself); HF stores
/// `w`. The store gives HF's, and the GGUF writer adds the one back.
pub fn gemma_norm(arch: &str, hf: &str) -> bool {
    matches!(arch, "gemma2" | "gemma3") && hf.ends_with("norm.weight")
}

impl NameTable {
    /// Every stack: (HF prefix, GGUF prefix, modules in parts).
    fn all_stacks(&self) -> impl Iterator<Item = (&'static str, &'static str, &[&'static Names])> {
        let main = (!self.layer.is_empty()).then_some((
            self.prefix,
            "blk.",
            std::slice::from_ref(&self.layer),
        ));
        main.into_iter().chain(self.stacks.iter().copied())
    }
}

/// HF tensor name to llama.cpp's, for the architectures slm runs.
pub fn gguf_name(arch: &str, hf: &str) -> Option<String> {
    map_name(arch, hf, true)
}

/// llama.cpp's tensor name to HF's: the inverse of [`gguf_name`]. Where two HF modules share a
/// GGUF name (T5's `wi` and `wi_1`), the first is given; the caller knows which the model has.
pub fn hf_name(arch: &str, gguf: &str) -> Option<String> {
    map_name(arch, gguf, false)
}

fn map_name(arch: &str, name: &str, to_gguf: bool) -> Option<String> {
    let t = name_table(arch);
    let pick = |pair: &(&'static str, &'static str)| match to_gguf {
        true => (pair.0, pair.1),
        false => (pair.1, pair.0),
    };
    let (module, kind) = name.rsplit_once('.')?;
    if let Some((_, to)) = t.global.iter().map(pick).find(|(from, _)| *from == module) {
        return Some(format!("{to}.{kind}"));
    }
    let found = t.all_stacks().find_map(|(hp, gp, layer)| {
        let (from_prefix, to_prefix) = pick(&(hp, gp));
        let (i, module) = module.strip_prefix(from_prefix)?.split_once('.')?;
        i.parse::<usize>().ok()?;
        let (_, to) = layer
            .iter()
            .flat_map(|part| part.iter())
            .map(pick)
            .find(|(from, _)| *from == module)?;
        Some(format!("{to_prefix}{i}.{to}.{kind}"))
    });
    found
}

impl WeightStore for GgufFile {
    fn finish_load(&self) {
        if let Some(Some(c)) = self.pack.get() {
            c.commit_in_background();
        }
    }

    fn file_of(&self, _name: &str) -> &Path {
        &self.path
    }

    fn tensors(&self) -> Vec<TensorMeta> {
        let mut out: Vec<TensorMeta> = self
            .content
            .tensor_infos
            .iter()
            .map(|(name, info)| TensorMeta {
                name: name.clone(),
                dtype: format!("{:?}", info.ggml_dtype),
                shape: info.shape.dims().to_vec(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn contains(&self, name: &str) -> bool {
        let arch = self.architecture().unwrap_or_default();
        gguf_name(arch, name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    fn load(&self, name: &str, keep_quant: bool) -> Result<Weight> {
        let arch = self.architecture()?;
        let g = gguf_name(arch, name).ok_or_else(|| super::missing(&self.path, name))?;
        let (dtype, dims, bytes) = self.raw(&g).ok_or_else(|| {
            Error::file(&self.path, format!("tensor '{g}' (HF '{name}') not found"))
        })?;
        let (rows, cols) = match dims.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => {
                return Err(Error::file(
                    &self.path,
                    format!("tensor '{g}' has rank {}", dims.len()),
                ))
            }
        };
        let start = bytes.as_ptr() as usize - self.mmap.as_ptr() as usize;
        let mut q = QuantWeight {
            dtype,
            rows,
            cols,
            data: super::WeightBytes::Mapped {
                map: self.mmap.clone(),
                start,
                len: bytes.len(),
            },
            origin: None,
        };
        if let Some(heads) = self.qk_heads(name) {
            if rows % heads != 0 || (rows / heads) % 2 != 0 {
                return Err(Error::file(
                    &self.path,
                    format!("tensor '{g}': {rows} rows do not split into {heads} heads"),
                ));
            }
            if dims.len() == 2 {
                q.permute_rows(&unpermute_qk_rows(rows, heads));
            } else {
                // 1-D biases: each element is its own row.
                let mut p = QuantWeight {
                    rows: dims[0],
                    cols: 1,
                    ..q
                };
                p.permute_rows(&unpermute_qk_rows(p.rows, heads));
                q = QuantWeight {
                    rows: 1,
                    cols: p.rows,
                    ..p
                };
            }
        }
        let quantized = !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if keep_quant && quantized && dims.len() == 2 {
            let cache = self.pack.get_or_init(|| {
                let layout = crate::nn::qmatmul::packed_layout();
                super::pack_cache::PackCache::for_file(&self.path, &layout)
            });
            q.origin = cache.as_ref().map(|c| super::Origin {
                cache: c.clone(),
                name: g.clone(),
            });
            return Ok(Weight::Quant(q));
        }
        let mut t = q.dequantize()?.reshape(dims)?;
        if gemma_norm(arch, name) {
            t = (t - 1.0)?;
        }
        Ok(Weight::Dense(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (arch, hf, gguf) in [
            (
                "llama",
                "model.layers.3.self_attn.q_proj.weight",
                "blk.3.attn_q.weight",
            ),
            (
                "qwen2",
                "model.layers.0.self_attn.k_proj.bias",
                "blk.0.attn_k.bias",
            ),
            ("llama", "model.embed_tokens.weight", "token_embd.weight"),
            (
                "phi3",
                "model.layers.1.mlp.gate_up_proj.weight",
                "blk.1.ffn_up.weight",
            ),
            (
                "phi3",
                "model.layers.1.self_attn.qkv_proj.weight",
                "blk.1.attn_qkv.weight",
            ),
            (
                "gpt2",
                "transformer.h.11.mlp.c_proj.bias",
                "blk.11.ffn_down.bias",
            ),
            ("gpt2", "transformer.wpe.weight", "position_embd.weight"),
            ("gpt2", "lm_head.weight", "output.weight"),
        ] {
            assert_eq!(gguf_name(arch, hf).as_deref(), Some(gguf));
            assert_eq!(hf_name(arch, gguf).as_deref(), Some(hf));
        }
        // Each family has only its own modules.
        assert_eq!(
            gguf_name("llama", "model.layers.0.mlp.gate_up_proj.weight"),
            None
        );
        assert_eq!(
            gguf_name("gpt2", "model.layers.0.self_attn.q_proj.weight"),
            None
        );
        assert_eq!(hf_name("llama", "rope_freqs.weight"), None);
    }
}
