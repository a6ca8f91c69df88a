use candle_core::{DType, Tensor};

use crate::error::Result;

/// Anything the model can be built from: a checkpoint on disk, or freshly
/// initialised trainable variables.
pub trait TensorSource {
    /// The tensor called `name`, checked to have `shape`, converted to `dtype`.
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// Whether the source has (or will provide) a tensor of that name.
    fn contains(&self, name: &str) -> bool;
}

impl TensorSource for super::SafetensorsFiles {
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        SafetensorsFiles::load(self, name, shape, dtype)
    }

    fn contains(&self, name: &str) -> bool {
        SafetensorsFiles::contains(self, name)
    }
}

use super::SafetensorsFiles;
