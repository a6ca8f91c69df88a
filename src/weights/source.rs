use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::backing::ReadStats;
use crate::error::{Error, Result};
use crate::ops::mxfp4::Mxfp4Matrix;
use crate::ops::{Embedding, Linear};

/// How one slice of a stored 3-D tensor maps to a [`Linear`]'s `[out, in]`
/// weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MatrixLayout {
    /// Stored `[in, out]`, applied as `x @ W` (gpt-oss's fused experts).
    pub transposed: bool,
    /// Output rows alternate two halves (gpt-oss's gate and up): loaded as the
    /// even rows, then the odd ones.
    pub interleaved: bool,
}

impl MatrixLayout {
    /// The `[out, in]` weight of a stored slice, contiguous.
    pub fn apply(self, t: Tensor) -> Result<Tensor> {
        let t = if self.transposed { t.t()? } else { t };
        let t = if self.interleaved {
            deinterleave(&t)?
        } else {
            t
        };
        Ok(t.contiguous()?)
    }
}

/// `t`'s rows along the first dimension, even ones first, then odd ones.
pub fn deinterleave(t: &Tensor) -> Result<Tensor> {
    let dims = t.dims();
    let Some((&rows, rest)) = dims.split_first() else {
        return Err(Error::InvalidInput(
            "a scalar has no rows to reorder".into(),
        ));
    };
    if rows % 2 != 0 {
        return Err(Error::InvalidInput(format!(
            "{rows} interleaved rows do not split into two halves"
        )));
    }
    let inner: usize = rest.iter().product();
    Ok(t.contiguous()?
        .reshape((rows / 2, 2, inner))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape(dims)?)
}

/// The order [`deinterleave`] puts `rows` rows in: new row `i` is old row `order[i]`.
fn deinterleaved_order(rows: usize) -> impl Iterator<Item = usize> {
    (0..rows).step_by(2).chain((1..rows).step_by(2))
}

/// A checkpoint opened again for positioned reads after the build.
pub struct Reopened {
    pub source: Box<dyn TensorSource + Send + Sync>,
    /// Bytes and time its reads have taken.
    pub stats: Arc<ReadStats>,
    /// The checkpoint's files, whose sizes and modification times identify
    /// it (a packed expert file made from them is reused while they hold).
    pub files: Vec<std::path::PathBuf>,
}

/// Anything the model can be built from: a checkpoint on disk, or freshly
/// initialised trainable variables.
pub trait TensorSource {
    /// The tensor called `name`, checked to have `shape`, converted to `dtype`.
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// Whether the source has (or will provide) a tensor of that name.
    fn contains(&self, name: &str) -> bool;

    /// The `[vocab, hidden]` token embedding `name`: by default loaded in
    /// `dtype`; a source holding it quantized (GGUF) keeps it in its blocks.
    fn load_embedding(&self, name: &str, shape: [usize; 2], dtype: DType) -> Result<Embedding> {
        Embedding::dense(self.load(name, &shape, dtype)?)
    }

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

    /// Slice `index` of the 3-D tensor `name` of `shape` as an `[out, in]`
    /// weight laid out by `layout`, in `dtype`.
    fn load_matrix_index(
        &self,
        name: &str,
        shape: &[usize],
        index: usize,
        layout: MatrixLayout,
        dtype: DType,
    ) -> Result<Tensor> {
        layout.apply(self.load_index(name, shape, index, dtype)?)
    }

    /// Slice `index` of the MXFP4 tensors `{name}_blocks` `[n, rows, cols / 32,
    /// 16]` and `{name}_scales` `[n, rows, cols / 32]` (U8, as gpt-oss ships
    /// its experts; `dims` is `[n, rows, cols]`) as a [`Linear`] that reads the
    /// codes as stored, rows reordered as `interleaved` says.
    fn load_mxfp4_index(
        &self,
        name: &str,
        dims: [usize; 3],
        index: usize,
        interleaved: bool,
        bias: Option<Tensor>,
    ) -> Result<Linear> {
        let [n, rows, cols] = dims;
        let nb = mxfp4_blocks_per_row(name, cols)?;
        let read = |suffix: &str, shape: &[usize]| -> Result<Vec<u8>> {
            let t = self.load_index(&format!("{name}_{suffix}"), shape, index, DType::U8)?;
            Ok(t.flatten_all()?.to_vec1::<u8>()?)
        };
        let mut blocks = read("blocks", &[n, rows, nb, 16])?;
        let mut scales = read("scales", &[n, rows, nb])?;
        if interleaved {
            let reorder = |bytes: &[u8], row_bytes: usize| -> Vec<u8> {
                deinterleaved_order(rows)
                    .flat_map(|r| &bytes[r * row_bytes..(r + 1) * row_bytes])
                    .copied()
                    .collect()
            };
            blocks = reorder(&blocks, nb * 16);
            scales = reorder(&scales, nb);
        }
        Ok(Linear::from_mxfp4(
            Mxfp4Matrix::from_hub(&blocks, &scales, rows, cols)?,
            bias,
        ))
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

/// Blocks of 32 per row of an MXFP4 matrix `cols` wide; an error naming
/// `name` when `cols` does not split into them.
pub fn mxfp4_blocks_per_row(name: &str, cols: usize) -> Result<usize> {
    if cols == 0 || !cols.is_multiple_of(32) {
        return Err(Error::InvalidInput(format!(
            "MXFP4 tensor {name:?}: its rows of {cols} values do not split into blocks of 32"
        )));
    }
    Ok(cols / 32)
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
            files: files.paths().to_vec(),
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
