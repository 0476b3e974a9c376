//! Reading model files: folder discovery, and one `WeightStore` per weight format, so models
//! never know whether their tensors came from safetensors, a PyTorch zip-pickle or GGUF.

pub mod folder;
pub mod gguf;
pub mod pack_cache;
pub mod peft;
pub mod pickle;
pub mod safetensors;
pub mod write;

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub use folder::{ModelFiles, WeightFormat};

/// A weight exactly as stored when it is block-quantized: raw GGUF blocks, row-major, one row per
/// output feature. Kept as bytes so our own kernels can run on it without a copy.
#[derive(Debug)]
pub struct QuantWeight {
    pub dtype: GgmlDType,
    pub rows: usize,
    pub cols: usize,
    pub data: WeightBytes,
    /// Where the kernels may find this weight already repacked (a GGUF weight, while the
    /// packed-weights cache is on).
    pub origin: Option<Origin>,
}

/// A quantized weight's place in the packed-weights cache of its file.
#[derive(Clone)]
pub struct Origin {
    pub cache: Arc<pack_cache::PackCache>,
    /// The tensor's name in its file.
    pub name: String,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "'{}' in the packed-weights cache", self.name)
    }
}

/// A quantized weight's bytes: its own copy, or still in the file's mapping. Kernels that repack
/// at load read the mapping directly: copying first had the largest tensor twice in memory at
/// once (Gemma's 178 MB embedding table: the peak of its whole load).
pub enum WeightBytes {
    Owned(Vec<u8>),
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    },
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            WeightBytes::Owned(_) => "owned",
            WeightBytes::Mapped { .. } => "mapped",
        };
        write!(f, "{} {kind} bytes", self.len())
    }
}

impl From<Vec<u8>> for WeightBytes {
    fn from(v: Vec<u8>) -> Self {
        WeightBytes::Owned(v)
    }
}

impl std::ops::Deref for WeightBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            WeightBytes::Owned(v) => v,
            WeightBytes::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }
}

impl WeightBytes {
    /// Drops bytes `start..end` of a mapped weight from the resident set once a kernel has
    /// repacked them (a no-op for an owned copy): the source of a 178 MB table need not stay
    /// resident beside its repacked copy until the whole table is done.
    pub fn release(&self, start: usize, end: usize) {
        #[cfg(unix)]
        if let WeightBytes::Mapped {
            map,
            start: at,
            len,
        } = self
        {
            let end = end.min(*len);
            if start < end {
                // SAFETY: a read-only shared file mapping: MADV_DONTNEED only unmaps the
                // pages, and a later read faults them back in from the file, unchanged.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        at + start,
                        end - start,
                    )
                };
            }
        }
    }
}

/// Once a mapped weight is dropped (repacked, copied by candle, or dequantized), its pages leave
/// this process's resident set: they stay in the page cache, and a later read of the same bytes
/// faults them back in from the file, unchanged.
impl Drop for WeightBytes {
    fn drop(&mut self) {
        self.release(0, self.len());
    }
}

impl QuantWeight {
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// Reorders whole rows; quantization blocks never cross rows, so this is exact.
    pub fn permute_rows(&mut self, src_of_dst: &[usize]) {
        let rb = self.row_bytes();
        let mut out = vec![0u8; self.data.len()];
        for (dst, &src) in src_of_dst.iter().enumerate() {
            out[dst * rb..(dst + 1) * rb].copy_from_slice(&self.data[src * rb..(src + 1) * rb]);
        }
        self.data = out.into();
    }

    pub fn to_qtensor(&self) -> Result<candle_core::quantized::QTensor> {
        Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.dtype,
            &self.data,
            vec![self.rows, self.cols],
            &Device::Cpu,
        )?)
    }

    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(self.to_qtensor()?.dequantize(&Device::Cpu)?)
    }
}

/// A loaded tensor: dense (always f32 in memory) or still quantized.
pub enum Weight {
    Dense(Tensor),
    Quant(QuantWeight),
}

impl Weight {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Dense(t) => t.dims().to_vec(),
            Weight::Quant(q) => vec![q.rows, q.cols],
        }
    }

    pub fn into_dense(self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t),
            Weight::Quant(q) => q.dequantize(),
        }
    }
}

/// What `slm info` reports per tensor.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// A source of named tensors. Names are the format's own names; `models::names` maps HF names to
/// GGUF names where they differ.
pub trait WeightStore: Send + Sync {
    /// The file a tensor lives in, for error messages.
    fn file_of(&self, name: &str) -> &Path;
    fn tensors(&self) -> Vec<TensorMeta>;
    fn contains(&self, name: &str) -> bool;
    /// Loads a tensor; block-quantized tensors stay quantized when `keep_quant` is set and are
    /// dequantized to f32 otherwise. Dense tensors are always converted to f32.
    fn load(&self, name: &str, keep_quant: bool) -> Result<Weight>;
    /// Called once a model is built from this store: a GGUF file's packed-weights cache
    /// written during the load is finished here.
    fn finish_load(&self) {}
}

pub(crate) fn to_f32(t: Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 {
        t
    } else {
        t.to_dtype(DType::F32)?
    })
}

/// Opens the weights of a located model.
pub fn open_weights(files: &ModelFiles) -> Result<Arc<dyn WeightStore>> {
    Ok(match &files.format {
        WeightFormat::Safetensors(paths) => Arc::new(safetensors::SafetensorsStore::open(paths)?),
        WeightFormat::PyTorch(paths) => Arc::new(pickle::PickleStore::open(paths)?),
        WeightFormat::Gguf(path) => gguf::GgufFile::open_shared(path)?,
    })
}

/// Which file of a multi-file checkpoint holds each tensor.
pub(crate) struct ShardIndex {
    pub paths: Vec<std::path::PathBuf>,
    index: std::collections::HashMap<String, usize>,
}

impl ShardIndex {
    pub fn new() -> Self {
        Self {
            paths: Vec::new(),
            index: Default::default(),
        }
    }

    pub fn add(&mut self, path: &Path, names: impl IntoIterator<Item = String>) -> usize {
        let i = self.paths.len();
        self.paths.push(path.to_path_buf());
        self.index.extend(names.into_iter().map(|n| (n, i)));
        i
    }

    pub fn file_of(&self, name: &str) -> &Path {
        &self.paths[self.index.get(name).copied().unwrap_or(0)]
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The shard holding `name`, or an error naming the first file.
    pub fn find(&self, name: &str) -> Result<usize> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| missing(&self.paths[0], name))
    }
}

pub(crate) fn missing(path: &Path, name: &str) -> Error {
    Error::file(path, format!("tensor '{name}' not found"))
}
