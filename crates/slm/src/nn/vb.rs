//! `Vb` walks a weight store with a name prefix, in the manner of candle's VarBuilder, and checks
//! shapes so a mismatch names the file, the tensor and both shapes.

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::io::{Weight, WeightStore};

#[derive(Clone)]
pub struct Vb {
    store: Arc<dyn WeightStore>,
    prefix: String,
    /// Keep block-quantized linear weights quantized (fast path) instead of dequantizing to f32.
    pub keep_quant: bool,
}

impl Vb {
    pub fn new(store: Arc<dyn WeightStore>, keep_quant: bool) -> Self {
        Self {
            store,
            prefix: String::new(),
            keep_quant,
        }
    }

    pub fn pp(&self, s: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            s.to_string()
        } else {
            format!("{}.{s}", self.prefix)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    pub fn name(&self, n: &str) -> String {
        if self.prefix.is_empty() {
            n.to_string()
        } else {
            format!("{}.{n}", self.prefix)
        }
    }

    pub fn contains(&self, n: &str) -> bool {
        self.store.contains(&self.name(n))
    }

    fn check(&self, full: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got != want {
            return Err(Error::file(
                self.store.file_of(full),
                format!("tensor '{full}' has shape {got:?}, the config expects {want:?}"),
            ));
        }
        Ok(())
    }

    /// A dense f32 tensor of the given shape.
    pub fn get(&self, n: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.name(n);
        let t = self.store.load(&full, false)?.into_dense()?;
        self.check(&full, t.dims(), shape)?;
        Ok(t)
    }

    /// A 2-D weight, quantized when the store holds it quantized and `keep_quant` is set.
    pub fn get_weight(&self, n: &str, shape: &[usize]) -> Result<Weight> {
        let full = self.name(n);
        let w = self.store.load(&full, self.keep_quant)?;
        self.check(&full, &w.dims(), shape)?;
        Ok(w)
    }

    /// The stored shape of a tensor, when the store has it.
    pub fn shape_of(&self, n: &str) -> Option<Vec<usize>> {
        let full = self.name(n);
        self.store
            .tensors()
            .into_iter()
            .find(|t| t.name == full)
            .map(|t| t.shape)
    }

    /// The file the weights come from, for error messages about missing tensors.
    pub fn store_path(&self) -> &std::path::Path {
        self.store.file_of("")
    }

    pub fn is_gguf(&self) -> bool {
        self.store
            .file_of("")
            .extension()
            .is_some_and(|e| e == "gguf")
    }
}
