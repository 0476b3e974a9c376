//! Re-quantizing a GGUF model the way `llama-quantize` does: each 2-D weight to the requested
//! block type, norms and other 1-D tensors in f32, the output projection (or the tied embedding
//! that serves as one) at Q6_K, and k-quant requests falling back to the legacy type llama.cpp
//! picks when a row is not a multiple of 256. Metadata (tokenizer, chat template) is copied.

pub mod from_hf;
pub mod q45k;
pub mod q6k;

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use crate::io::QuantWeight;

/// The types `slm quantize` writes, by their llama.cpp names.
pub fn parse_type(name: &str) -> Option<GgmlDType> {
    Some(match name.to_ascii_lowercase().as_str() {
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        "f16" => GgmlDType::F16,
        "f32" => GgmlDType::F32,
        _ => return None,
    })
}

/// llama.cpp's `general.file_type` code for a whole-model type (`llama_ftype`).
pub(crate) fn file_type(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q4K => 14, // Q4_K_S: every weight Q4_K
        GgmlDType::Q5K => 16, // Q5_K_S
        GgmlDType::Q6K => 18,
        _ => 0,
    }
}

/// The type one tensor gets, as llama.cpp's `llama_tensor_get_type` chooses it (without the
/// mixed "_M" recipes). Errors when the row length does not fit the block.
pub fn tensor_type(
    name: &str,
    dims: &[usize],
    want: GgmlDType,
    has_output: bool,
) -> Result<GgmlDType> {
    // Position tables stay f32, as llama-quantize keeps them: GPT-2's learned positions and
    // T5's relative position biases.
    if dims.len() < 2 || name == "position_embd.weight" || name.ends_with("attn_rel_b.weight") {
        return Ok(GgmlDType::F32);
    }
    let cols = dims[dims.len() - 1];
    let is_output = name == "output.weight" || (!has_output && name == "token_embd.weight");
    let mut t = want;
    if is_output && !matches!(want, GgmlDType::F32 | GgmlDType::F16) {
        t = if !cols.is_multiple_of(256) || want == GgmlDType::Q8_0 {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q6K
        };
    }
    if !cols.is_multiple_of(t.block_size()) {
        // llama.cpp's fallbacks for k-quants on rows that are not a multiple of 256.
        t = match t {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            other => other,
        };
    }
    if !cols.is_multiple_of(t.block_size()) {
        return Err(Error::msg(format!(
            "tensor '{name}' has rows of {cols} values, not a multiple of {:?}'s block of {}: it cannot be stored as {want:?}",
            t,
            t.block_size()
        )));
    }
    Ok(t)
}

/// f32 values (a multiple of 256) to the bytes of k-quant blocks.
type BlockQuantizer = fn(&[f32]) -> Vec<u8>;

/// Quantizes an f32 tensor (row length last) to `t`, with llama.cpp's current reference where
/// candle's quantizers differ from it (the k-quants).
pub fn quantize_tensor(f: &candle_core::Tensor, t: GgmlDType) -> Result<QTensor> {
    let own: Option<BlockQuantizer> = match t {
        GgmlDType::Q4K => Some(q45k::quantize_q4k),
        GgmlDType::Q5K => Some(q45k::quantize_q5k),
        GgmlDType::Q6K => Some(q6k::quantize),
        _ => None,
    };
    if let Some(quantize) = own {
        let dims = f.dims().to_vec();
        if !dims.last().is_some_and(|c| c.is_multiple_of(256)) {
            return Err(Error::msg(format!(
                "rows of {dims:?} are not a multiple of 256 ({t:?})"
            )));
        }
        let bytes = quantize(&f.flatten_all()?.to_vec1::<f32>()?);
        return Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
            t,
            &bytes,
            dims,
            &Device::Cpu,
        )?);
    }
    Ok(QTensor::quantize(f, t)?)
}

/// What was written, per tensor: name, source type, written type.
#[derive(Debug)]
pub struct Summary {
    pub tensors: Vec<(String, GgmlDType, GgmlDType)>,
    pub bytes: u64,
}

pub(crate) use crate::io::write::check_overwrite as check_output;

/// Writes a GGUF file atomically and reports what was written.
pub(crate) fn write_gguf(
    out: &Path,
    meta: &[(String, Value)],
    tensors: &[(String, QTensor)],
    summary: Vec<(String, GgmlDType, GgmlDType)>,
) -> Result<Summary> {
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    crate::io::write::write_atomic(out, |w| {
        candle_core::quantized::gguf_file::write(w, &meta_refs, &tensor_refs)
            .map_err(std::io::Error::other)
    })?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(Summary {
        tensors: summary,
        bytes,
    })
}

/// Writes `out` from the GGUF `src` with weights re-quantized to `want`. The output is written
/// to a temporary file and renamed, so a failure (disk full, bad tensor) leaves nothing behind.
pub fn quantize_gguf(
    src: &Path,
    want: GgmlDType,
    out: &Path,
    force: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<Summary> {
    check_output(out, force)?;
    let g = GgufFile::open(src)?;
    let mut infos: Vec<(&String, u64)> = g
        .content
        .tensor_infos
        .iter()
        .map(|(n, i)| (n, i.offset))
        .collect();
    infos.sort_by_key(|(_, off)| *off);
    let has_output = g.content.tensor_infos.contains_key("output.weight");
    let mut tensors = Vec::with_capacity(infos.len());
    let mut summary = Vec::with_capacity(infos.len());
    for (i, (name, _)) in infos.iter().enumerate() {
        let (dtype, dims, bytes) = g
            .raw(name)
            .ok_or_else(|| Error::file(src, format!("tensor '{name}' is unreadable")))?;
        // candle reports GGUF dims with the row length last.
        let target = tensor_type(name, &dims, want, has_output)
            .map_err(|e| Error::file(src, e.to_string()))?;
        let q = if dtype == target {
            candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                bytes,
                dims.clone(),
                &Device::Cpu,
            )?
        } else {
            let cols = *dims.last().unwrap_or(&1);
            let rows = dims.iter().product::<usize>() / cols.max(1);
            let f = QuantWeight {
                dtype,
                rows,
                cols,
                data: bytes.to_vec().into(),
                origin: None,
            }
            .dequantize()?
            .reshape(dims.clone())?;
            quantize_tensor(&f, target)?
        };
        summary.push((name.to_string(), dtype, target));
        tensors.push((name.to_string(), q));
        progress(i + 1, infos.len());
    }
    let mut meta: Vec<(String, Value)> = g
        .content
        .metadata
        .iter()
        .filter(|(k, _)| {
            k.as_str() != "general.file_type" && k.as_str() != "general.quantization_version"
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    meta.push(("general.file_type".into(), Value::U32(file_type(want))));
    meta.push(("general.quantization_version".into(), Value::U32(2)));
    write_gguf(out, &meta, &tensors, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_rules_follow_llama_quantize() {
        let t = |name, dims: &[usize], want| tensor_type(name, dims, want, false);
        assert_eq!(
            t("blk.0.attn_norm.weight", &[576], GgmlDType::Q4_0).unwrap(),
            GgmlDType::F32
        );
        assert_eq!(
            t("blk.0.ffn_down.weight", &[576, 1536], GgmlDType::Q4K).unwrap(),
            GgmlDType::Q4K
        );
        assert_eq!(
            t("blk.0.attn_q.weight", &[576, 576], GgmlDType::Q4K).unwrap(),
            GgmlDType::Q5_0
        );
        assert_eq!(
            t("blk.0.attn_q.weight", &[576, 576], GgmlDType::Q6K).unwrap(),
            GgmlDType::Q8_0
        );
        // The tied embedding is the output layer: Q6_K where rows allow, Q8_0 otherwise.
        assert_eq!(
            t("token_embd.weight", &[49152, 512], GgmlDType::Q4_0).unwrap(),
            GgmlDType::Q6K
        );
        assert_eq!(
            t("token_embd.weight", &[49152, 576], GgmlDType::Q4_0).unwrap(),
            GgmlDType::Q8_0
        );
        // Position tables are never quantized (found against llama.cpp's own quantization).
        assert_eq!(
            t("position_embd.weight", &[1024, 768], GgmlDType::Q8_0).unwrap(),
            GgmlDType::F32
        );
        assert_eq!(
            t("enc.blk.0.attn_rel_b.weight", &[32, 8], GgmlDType::Q4_0).unwrap(),
            GgmlDType::F32
        );
        let err = t("blk.0.attn_q.weight", &[64, 48], GgmlDType::Q4_0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor 'blk.0.attn_q.weight' has rows of 48 values, not a multiple of Q4_0's block of 32"), "{err}");
    }
}
