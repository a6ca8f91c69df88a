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

/// GGML-encoded `bytes` holding exactly `shape` elements of `dtype` as a candle
/// `QTensor` (the bytes are copied). candle reinterprets them as blocks
/// (alignment at most 4), so unaligned bytes, e.g. one expert's slice of a
/// merged tensor, are first copied to an aligned buffer.
pub fn ggml_qtensor(
    bytes: &[u8],
    dtype: candle_core::quantized::GgmlDType,
    shape: &[usize],
) -> Result<candle_core::quantized::QTensor> {
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    let device = &candle_core::Device::Cpu;
    if (bytes.as_ptr() as usize).is_multiple_of(8) {
        return qtensor_from_ggml(dtype, bytes, shape.to_vec(), device);
    }
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `words` owns at least `bytes.len()` initialised bytes, and u8 has no alignment.
    let aligned =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes.len()) };
    aligned.copy_from_slice(bytes);
    qtensor_from_ggml(dtype, aligned, shape.to_vec(), device)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}
