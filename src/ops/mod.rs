//! Kernels and the small numeric building blocks the model is made of. Knows no model.
//!
//! Each op picks a fused no-autograd kernel for inference and a composed,
//! differentiable form when an input is part of an autograd graph (training).

pub mod aligned;
mod attention;
pub mod bandwidth;
mod embedding;
mod ffn;
pub mod kernels;
mod linear;
pub mod matmul;
pub mod mxfp4;
mod norm;
pub mod quant;
mod rope;

pub use attention::attend_cache;
pub use embedding::{BlockRows, Embedding};
pub use ffn::{Ffn, FfnInput, FfnScratch, GluActivation};
pub use linear::{Linear, LinearWeight, with_thread_scratch};
pub use matmul::{
    SpinningWorkers, batch_invariant, num_threads, on_pool, set_batch_invariant, set_num_threads,
    spin_workers,
};
pub use norm::RmsNorm;
pub use quant::QuantKind;
pub use rope::{RopeTable, Yarn};

use candle_core::{D, Result, Tensor};

/// Whether every value of a contiguous f32 / f16 / bf16 CPU tensor is finite;
/// `None` for any other tensor (a stride-0 stand-in, another dtype or device).
///
/// Cost: one pass over the values.
pub fn all_finite(t: &Tensor) -> Option<bool> {
    use candle_core::{CpuStorage, Storage};
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(v.get(start..end)?.iter().all(|x| x.is_finite())),
        Storage::Cpu(CpuStorage::BF16(v)) => Some(v.get(start..end)?.iter().all(|x| x.is_finite())),
        Storage::Cpu(CpuStorage::F16(v)) => Some(v.get(start..end)?.iter().all(|x| x.is_finite())),
        _ => None,
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}
