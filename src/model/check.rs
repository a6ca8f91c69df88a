//! A dry run of the loader over a checkpoint's metadata: every tensor the
//! configuration implies is looked up and shape-checked exactly as loading does,
//! with stride-0 stand-ins for the values, so nothing is read or allocated from
//! the sizes a file states. `info` reports from it; loading runs it first.

use std::cell::RefCell;
use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};

use super::LoadOptions;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::ops::Linear;
use crate::weights::{MatrixLayout, TensorSource, mxfp4_blocks_per_row};

/// What a dry run found besides errors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Tensors of the checkpoint the configuration never asks for.
    pub unused: Vec<String>,
}

impl CheckReport {
    /// `"N tensors are not used by config.json, e.g. a, b, c"`; `None` when all are.
    pub fn unused_warning(&self) -> Option<String> {
        (!self.unused.is_empty()).then(|| {
            format!(
                "{} tensors are not used by config.json, e.g. {}",
                self.unused.len(),
                self.unused[..self.unused.len().min(3)].join(", ")
            )
        })
    }
}

/// Checks `src` against `cfg` as [`super::Model::from_source`] would, reading
/// only metadata. A checkpoint whose shared-expert tensors the configuration
/// would silently skip is an error; other unused tensors are reported.
pub fn check_checkpoint(cfg: &ModelConfig, src: &dyn TensorSource) -> Result<CheckReport> {
    let dry = ShapeOnly {
        inner: src,
        used: RefCell::new(BTreeSet::new()),
    };
    drop(super::load::build(cfg, &dry, &LoadOptions::default())?);
    let used = dry.used.into_inner();
    let unused: Vec<String> = src
        .names()
        .into_iter()
        .filter(|n| !used.contains(n))
        .collect();
    if cfg.moe.shared_expert_ffn.is_none()
        && let Some(name) = unused.iter().find(|n| n.contains(".shared_expert"))
    {
        return Err(Error::InvalidInput(format!(
            "the checkpoint has shared-expert tensors ({name}) but the configuration has no shared expert (shared_expert_intermediate_size is 0 or missing)"
        )));
    }
    Ok(CheckReport { unused })
}

struct ShapeOnly<'a> {
    inner: &'a dyn TensorSource,
    used: RefCell<BTreeSet<String>>,
}

impl ShapeOnly<'_> {
    fn checked(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.inner.check(name, shape)?;
        self.used.borrow_mut().insert(name.to_string());
        Ok(())
    }
}

/// Zeros of `shape` without their storage: one element broadcast.
fn stand_in(shape: &[usize], dtype: DType) -> Result<Tensor> {
    Ok(Tensor::zeros((), dtype, &Device::Cpu)?.broadcast_as(shape)?)
}

impl TensorSource for ShapeOnly<'_> {
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.checked(name, shape)?;
        stand_in(shape, dtype)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn load_matrix_index(
        &self,
        name: &str,
        shape: &[usize],
        _index: usize,
        layout: MatrixLayout,
        dtype: DType,
    ) -> Result<Tensor> {
        self.checked(name, shape)?;
        let (a, b) = match shape {
            [_, a, b] => (*a, *b),
            _ => {
                return Err(Error::InvalidInput(format!(
                    "tensor {name:?}: expected 3 dimensions, got {shape:?}"
                )));
            }
        };
        let dims = if layout.transposed { [b, a] } else { [a, b] };
        stand_in(&dims, dtype)
    }

    fn load_mxfp4_index(
        &self,
        name: &str,
        dims: [usize; 3],
        _index: usize,
        _interleaved: bool,
        bias: Option<Tensor>,
    ) -> Result<Linear> {
        let [n, rows, cols] = dims;
        let nb = mxfp4_blocks_per_row(name, cols)?;
        self.checked(&format!("{name}_blocks"), &[n, rows, nb, 16])?;
        self.checked(&format!("{name}_scales"), &[n, rows, nb])?;
        Ok(Linear::new(stand_in(&[rows, cols], DType::F32)?, bias))
    }

    fn load_linear(
        &self,
        parts: &[(&str, usize)],
        cols: usize,
        dtype: DType,
        bias: Option<Tensor>,
    ) -> Result<Linear> {
        for &(name, rows) in parts {
            self.checked(name, &[rows, cols])?;
        }
        let rows = parts.iter().map(|&(_, r)| r).sum::<usize>();
        Ok(Linear::new(stand_in(&[rows, cols], dtype)?, bias))
    }
}
