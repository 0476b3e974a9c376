//! Memory-mapped safetensors, single or sharded. Every file is validated when opened so a
//! truncated or corrupted shard fails early with its own name.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::{to_f32, ShardIndex, TensorMeta, Weight, WeightStore};
use crate::error::{Error, Result};

pub struct SafetensorsStore {
    files: Vec<Mmap>,
    shards: ShardIndex,
}

fn candle_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        _ => return None,
    })
}

impl SafetensorsStore {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut shards = ShardIndex::new();
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we assume it is
            // not modified underneath us while the model is loaded.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
            shards.add(path, st.names().into_iter().map(String::from));
            drop(st);
            files.push(mmap);
        }
        Ok(Self { files, shards })
    }
}

impl WeightStore for SafetensorsStore {
    fn file_of(&self, name: &str) -> &Path {
        self.shards.file_of(name)
    }

    fn tensors(&self) -> Vec<TensorMeta> {
        let mut out = Vec::new();
        for mmap in &self.files {
            if let Ok(st) = SafeTensors::deserialize(mmap) {
                for (name, view) in st.tensors() {
                    out.push(TensorMeta {
                        name,
                        dtype: format!("{:?}", view.dtype()),
                        shape: view.shape().to_vec(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn contains(&self, name: &str) -> bool {
        self.shards.contains(name)
    }

    fn load(&self, name: &str, _keep_quant: bool) -> Result<Weight> {
        let i = self.shards.find(name)?;
        let (path, mmap) = (&self.shards.paths[i], &self.files[i]);
        let st = SafeTensors::deserialize(mmap).map_err(|e| Error::file(path, e))?;
        let view = st.tensor(name).map_err(|e| Error::file(path, e))?;
        let dtype = candle_dtype(view.dtype()).ok_or_else(|| {
            Error::file(
                path,
                format!("tensor '{name}' has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
        Ok(Weight::Dense(to_f32(t)?))
    }
}
