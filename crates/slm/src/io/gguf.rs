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
    mmap: Mmap,
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
        let mut reader = std::io::BufReader::new(&file);
        let content = Content::read(&mut reader)
            .map_err(|e| Error::file(path, format!("not a valid GGUF file: {e}")))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let len = mmap.len() as u64;
        for (name, info) in &content.tensor_infos {
            let (start, size) = byte_range(&content, info).ok_or_else(|| {
                Error::file(path, format!("tensor '{name}' has a malformed size"))
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
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            mmap,
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
        self.meta_u64(key).map(|h| h as usize)
    }
}

fn byte_range(
    content: &Content,
    info: &candle_core::quantized::gguf_file::TensorInfo,
) -> Option<(u64, u64)> {
    let elems = info.shape.elem_count();
    let bs = info.ggml_dtype.block_size();
    if bs == 0 || !elems.is_multiple_of(bs) {
        return None;
    }
    let size = (elems / bs * info.ggml_dtype.type_size()) as u64;
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

/// HF tensor name to llama.cpp's name, for the architectures slm runs.
pub fn gguf_name(arch: &str, hf: &str) -> Option<String> {
    const SIMPLE: &[(&str, &str)] = &[
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        ("transformer.wte.weight", "token_embd.weight"),
        ("transformer.wpe.weight", "position_embd.weight"),
        ("transformer.ln_f.weight", "output_norm.weight"),
        ("transformer.ln_f.bias", "output_norm.bias"),
    ];
    if let Some((_, g)) = SIMPLE.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf
        .strip_prefix("model.layers.")
        .or_else(|| hf.strip_prefix("transformer.h."))?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let phi3 = arch == "phi3";
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" | "attn.c_proj" => "attn_output",
        "self_attn.qkv_proj" | "attn.c_attn" => "attn_qkv",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" | "mlp.c_fc" => "ffn_up",
        "mlp.gate_up_proj" if phi3 => "ffn_up",
        "mlp.down_proj" | "mlp.c_proj" => "ffn_down",
        "input_layernorm" | "ln_1" => "attn_norm",
        "post_attention_layernorm" | "ln_2" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

impl WeightStore for GgufFile {
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
        let mut q = QuantWeight {
            dtype,
            rows,
            cols,
            data: bytes.to_vec(),
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
            return Ok(Weight::Quant(q));
        }
        let t = q.dequantize()?.reshape(dims)?;
        Ok(Weight::Dense(t))
    }
}
