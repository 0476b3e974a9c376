//! PyTorch `.bin`/`.pth` zip-pickle checkpoints. candle's reader interprets only the pickle opcodes
//! that describe tensors; no Python object is ever constructed or called.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;

use super::{to_f32, TensorMeta, Weight, WeightStore};
use crate::error::{Error, Result};

pub struct PickleStore {
    files: Vec<(PathBuf, PthTensors)>,
    index: HashMap<String, usize>,
}

impl PickleStore {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let pth = PthTensors::new(path, None).map_err(|e| {
                Error::file(path, format!("not a readable PyTorch checkpoint: {e}"))
            })?;
            for name in pth.tensor_infos().keys() {
                index.insert(name.clone(), i);
            }
            files.push((path.clone(), pth));
        }
        Ok(Self { files, index })
    }
}

impl WeightStore for PickleStore {
    fn file_of(&self, name: &str) -> &Path {
        let i = self.index.get(name).copied().unwrap_or(0);
        &self.files[i].0
    }

    fn tensors(&self) -> Vec<TensorMeta> {
        let mut out: Vec<TensorMeta> = self
            .files
            .iter()
            .flat_map(|(_, f)| f.tensor_infos().values())
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
        self.index.contains_key(name)
    }

    fn load(&self, name: &str, _keep_quant: bool) -> Result<Weight> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| super::missing(&self.files[0].0, name))?;
        let (path, pth) = &self.files[i];
        let t = pth
            .get(name)
            .map_err(|e| Error::file(path, format!("tensor '{name}': {e}")))?
            .ok_or_else(|| super::missing(path, name))?;
        Ok(Weight::Dense(to_f32(t)?))
    }
}
