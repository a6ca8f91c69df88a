use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::backing::ReadStats;
use crate::error::Result;
use crate::ops::Linear;

/// A checkpoint opened again for positioned reads after the build.
pub struct Reopened {
    pub source: Box<dyn TensorSource + Send + Sync>,
    /// Bytes and time its reads have taken.
    pub stats: Arc<ReadStats>,
}

/// Anything the model can be built from: a checkpoint on disk, or freshly
/// initialised trainable variables.
pub trait TensorSource {
    /// The tensor called `name`, checked to have `shape`, converted to `dtype`.
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// Whether the source has (or will provide) a tensor of that name.
    fn contains(&self, name: &str) -> bool;

    /// Slice `index` along the first dimension of the tensor `name` of `shape`
    /// (one expert of a fused expert tensor). File sources read only the slice.
    fn load_index(
        &self,
        name: &str,
        shape: &[usize],
        index: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        Ok(self.load(name, shape, dtype)?.get(index)?)
    }

    /// The same checkpoint opened again for positioned reads (no map), to be
    /// kept for the engine's lifetime by an expert provider reading experts on
    /// demand; `None` for a source that is not a file.
    fn reopen_for_reads(&self) -> Result<Option<Reopened>> {
        Ok(None)
    }

    /// Checks that `name` exists with `shape`, reading no values where the
    /// source can (file metadata); by default it loads the tensor.
    fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.load(name, shape, DType::F32).map(|_| ())
    }

    /// Every tensor name the source holds, to find the ones a configuration
    /// leaves unused; empty where the source cannot list them in Hugging Face names.
    fn names(&self) -> Vec<String> {
        Vec::new()
    }

    /// Drops the source's files from the page cache where it reads them with
    /// positioned reads (before a measured run).
    fn drop_cached_pages(&self) -> Result<()> {
        Ok(())
    }

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

    fn load_index(
        &self,
        name: &str,
        shape: &[usize],
        index: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        SafetensorsFiles::load_index(self, name, shape, index, dtype)
    }

    fn reopen_for_reads(&self) -> Result<Option<Reopened>> {
        let (files, stats) = self.with_positioned_reads()?;
        Ok(Some(Reopened {
            source: Box::new(files),
            stats,
        }))
    }

    fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        SafetensorsFiles::check(self, name, shape).map(|_| ())
    }

    fn names(&self) -> Vec<String> {
        SafetensorsFiles::names(self).map(str::to_string).collect()
    }

    fn drop_cached_pages(&self) -> Result<()> {
        SafetensorsFiles::drop_cached_pages(self)
    }
}

use super::SafetensorsFiles;
