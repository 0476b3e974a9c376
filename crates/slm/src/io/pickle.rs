//! PyTorch `.bin`/`.pth` zip-pickle checkpoints. candle's reader interprets only the pickle opcodes
//! that describe tensors; no Python object is ever constructed or called.

use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;

use super::{to_f32, ShardIndex, TensorMeta, Weight, WeightStore};
use crate::error::{Error, Result};

pub struct PickleStore {
    files: Vec<PthTensors>,
    shards: ShardIndex,
}

impl PickleStore {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut shards = ShardIndex::new();
        for path in paths {
            let pth = PthTensors::new(path, None).map_err(|e| {
                Error::file(path, format!("not a readable PyTorch checkpoint: {e}"))
            })?;
            shards.add(path, pth.tensor_infos().keys().cloned());
            files.push(pth);
        }
        Ok(Self { files, shards })
    }
}

impl WeightStore for PickleStore {
    fn file_of(&self, name: &str) -> &Path {
        self.shards.file_of(name)
    }

    fn tensors(&self) -> Vec<TensorMeta> {
        let mut out: Vec<TensorMeta> = self
            .files
            .iter()
            .flat_map(|f| f.tensor_infos().values())
            .map(|t| TensorMeta {
                name: t.name.clone(),
                dtype: format!("{:?}", t.dtype),
                shape: t.layout.shape().dims().to_vec(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn contains(&self, name: &str) -> bool {
        self.shards.contains(name)
    }

    fn load(&self, name: &str, _keep_quant: bool) -> Result<Weight> {
        let i = self.shards.find(name)?;
        let path = &self.shards.paths[i];
        let t = self.files[i]
            .get(name)
            .map_err(|e| Error::file(path, format!("tensor '{name}': {e}")))?
            .ok_or_else(|| super::missing(path, name))?;
        Ok(Weight::Dense(to_f32(t)?))
    }
}
