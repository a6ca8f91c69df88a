//! Attention of a few query rows over a KV cache, read in place: the decode step.
//! Candle's gemm spent ~17 % of q4_0 decode on these tiny products (packing
//! overhead); here scores are row dots of the cached keys and the output a
//! weighted sum of cached value rows.
//!
//! Cost per KV head: `2 * rows * total * head_dim` multiply-adds over `total` cached positions.

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;

use super::kernels::{DenseData, DenseRows, Isa};
use super::matmul::{PARALLEL_MIN_MACS, as_task, matmul_dense};
use crate::error::{Error, Result};

/// `softmax(q kᵀ * scale) v` per KV head, without a mask (every query row sees
/// every cached position: decode, where the query is the newest position).
///
/// # Shapes
/// `q: [n_kv_heads, rows, head_dim]` (contiguous), `k, v: [n_kv_heads, total, head_dim]`
/// (row-contiguous views of a cache, any head stride) -> `[n_kv_heads, rows, head_dim]`
pub fn attend_cache(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let (heads, rows, hd) = q.dims3()?;
    let total = k.dim(1)?;
    let q = q.contiguous()?;
    let mut out = vec![0f32; heads * rows * hd];
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let qv = f32_values(&qs)?;
    let (kv, vv) = (f32_values(&ks)?, f32_values(&vs)?);
    let head = |h: usize, out: &mut [f32]| -> Result<()> {
        let qh = &qv[ql.start_offset() + h * rows * hd..][..rows * hd];
        let kh = head_rows(kv, kl, h, total, hd)?;
        let vh = head_rows(vv, vl, h, total, hd)?;
        let keys = DenseRows {
            data: DenseData::F32(kh),
            cols: hd,
        };
        let mut scores = vec![0f32; rows * total]; // [rows, total]
        matmul_dense(Isa::best(), keys, total, qh, rows, &mut scores);
        scores
            .chunks_exact_mut(total)
            .for_each(|p| softmax_scaled(p, scale));
        weighted_rows_sum(&scores, vh, hd, out);
        Ok(())
    };
    // KV heads are independent: one task each, so a long cache is read by all
    // threads at once (single-threaded it cost a 4-bit decode step ~20 % at 512
    // positions). A short cache is not worth a fork-join.
    if heads > 1 && 2 * rows * total * hd * heads >= PARALLEL_MIN_MACS {
        out.par_chunks_mut(rows * hd)
            .enumerate()
            .try_for_each(|(h, o)| as_task(|| head(h, o)))?;
    } else {
        for (h, o) in out.chunks_mut(rows * hd).enumerate() {
            head(h, o)?;
        }
    }
    Ok(Tensor::from_vec(out, (heads, rows, hd), &Device::Cpu)?)
}

fn f32_values(s: &Storage) -> Result<&[f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
        _ => Err(Error::InvalidInput(
            "attention over the cache expects f32 CPU tensors".into(),
        )),
    }
}

/// Head `h`'s `[total, hd]` rows of a `[heads, total, hd]` view with contiguous rows.
fn head_rows<'a>(
    data: &'a [f32],
    layout: &candle_core::Layout,
    h: usize,
    total: usize,
    hd: usize,
) -> Result<&'a [f32]> {
    let st = layout.stride();
    if st.len() != 3 || st[2] != 1 || st[1] != hd {
        return Err(Error::InvalidInput(format!(
            "cache view strides {st:?} are not row-contiguous"
        )));
    }
    let start = layout.start_offset() + h * st[0];
    data.get(start..start + total * hd)
        .ok_or_else(|| Error::InvalidInput("cache view out of its storage".into()))
}

/// In place: `p = softmax(p * scale)`.
fn softmax_scaled(p: &mut [f32], scale: f32) {
    let max = p.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    let mut sum = 0f32;
    for x in p.iter_mut() {
        *x = (*x * scale - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|x| *x *= inv);
}

/// `out[r] = Σ_j p[r, j] v[j, :]`, every query row in one pass over the value rows
/// (each value row is read once, not once per query row).
///
/// # Shapes
/// `p: [rows, total]`, `v: [total, hd]` -> `out: [rows, hd]`
fn weighted_rows_sum(p: &[f32], v: &[f32], hd: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::best() == Isa::Avx512 {
        // SAFETY: `Isa::Avx512` is only produced when the CPU has AVX-512 F.
        unsafe { weighted_rows_sum_avx512(p, v, hd, out) };
        return;
    }
    weighted_rows_sum_body(p, v, hd, out);
}

/// The same loop compiled with AVX-512 enabled, so LLVM vectorizes it 16 wide.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_rows_sum_avx512(p: &[f32], v: &[f32], hd: usize, out: &mut [f32]) {
    weighted_rows_sum_body(p, v, hd, out);
}

#[inline(always)]
fn weighted_rows_sum_body(p: &[f32], v: &[f32], hd: usize, out: &mut [f32]) {
    let total = v.len() / hd.max(1);
    out.iter_mut().for_each(|o| *o = 0.0);
    for (j, row) in v.chunks_exact(hd).enumerate() {
        for (r, o) in out.chunks_exact_mut(hd).enumerate() {
            let w = p[r * total + j];
            for (o, &x) in o.iter_mut().zip(row) {
                *o += w * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_attention_matches_the_tensor_formula() {
        let dev = Device::Cpu;
        // A short cache (one thread) and a long one (one task per KV head).
        for (heads, rows, hd, cap, total) in [(3, 4, 64, 40, 29), (4, 4, 64, 700, 613)] {
            assert_eq!(
                2 * rows * total * hd * heads >= PARALLEL_MIN_MACS,
                total > 100
            );
            let q = Tensor::randn(0f32, 1.0, (heads, rows, hd), &dev).unwrap();
            let kc = Tensor::randn(0f32, 1.0, (heads, cap, hd), &dev).unwrap();
            let vc = Tensor::randn(0f32, 1.0, (heads, cap, hd), &dev).unwrap();
            let (k, v) = (
                kc.narrow(1, 0, total).unwrap(),
                vc.narrow(1, 0, total).unwrap(),
            );
            let scale = 0.125f32;
            let got = attend_cache(&q, &k, &v, scale).unwrap();
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&scores)
                .unwrap()
                .matmul(&v.contiguous().unwrap())
                .unwrap();
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{total} positions: max diff {diff}");
        }
    }
}
