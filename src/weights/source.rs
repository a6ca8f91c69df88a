use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::ops::Linear;

/// Anything the model can be built from: a checkpoint on disk, or freshly
/// initialised trainable variables.
pub trait TensorSource {
    /// The tensor called `name`, checked to have `shape`, converted to `dtype`.
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// Whether the source has (or will provide) a tensor of that name.
    fn contains(&self, name: &str) -> bool;

    /// A `[out, cols]` weight stacked from row blocks (`parts`: name and rows, e.g.
    /// gate then up), as a [`Linear`]. By default the parts are loaded in `dtype`
    /// and concatenated; a source holding quantized weights (GGUF) keeps them quantized.
    fn load_linear(
        &self,
        parts: &[(&str, usize)],
        cols: usize,
        dtype: DType,
        bias: Option<Tensor>,
    ) -> Result<Linear> {
        Ok(Linear::new(load_stacked(self, parts, cols, dtype)?, bias))
    }
}

/// Row blocks loaded in `dtype` and concatenated: `[sum(rows), cols]`.
pub(super) fn load_stacked<S: TensorSource + ?Sized>(
    src: &S,
    parts: &[(&str, usize)],
    cols: usize,
    dtype: DType,
) -> Result<Tensor> {
    let mut ws = parts
        .iter()
        .map(|&(name, rows)| src.load(name, &[rows, cols], dtype))
        .collect::<Result<Vec<_>>>()?;
    Ok(if ws.len() == 1 {
        ws.remove(0)
    } else {
        Tensor::cat(&ws, 0)?
    })
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
