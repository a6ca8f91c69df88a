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
/// `sinks` (gpt-oss's attention sinks, one logit per query head, query head
/// `h * rows + r` for row `r` of KV head `h`) join every row's softmax as one more
/// logit whose value row is zero: they only take probability mass away.
///
/// # Shapes
/// `q: [n_kv_heads, rows, head_dim]` (contiguous), `k, v: [n_kv_heads, total, head_dim]`
/// (row-contiguous views of a cache, any head stride), `sinks: [n_kv_heads * rows]`
/// -> `[n_kv_heads, rows, head_dim]`
pub fn attend_cache(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    sinks: Option<&[f32]>,
) -> Result<Tensor> {
    let (heads, rows, hd) = q.dims3()?;
    if let Some(s) = sinks
        && s.len() != heads * rows
    {
        return Err(Error::InvalidInput(format!(
            "{} attention sinks for {heads} x {rows} query rows",
            s.len()
        )));
    }
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
        let mut scores = vec![0f32; rows * total]; // [rows, total]
        key_scores(qh, kh, hd, &mut scores);
        for (r, p) in scores.chunks_exact_mut(total).enumerate() {
            softmax_scaled(p, scale, sinks.map(|s| s[h * rows + r]));
        }
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
    // A one-position view's row stride is never stepped (candle leaves a
    // transposed size-1 dim with the other dim's stride: `[16, 32, 1]`).
    if st.len() != 3 || (hd > 1 && st[2] != 1) || (total > 1 && st[1] != hd) {
        return Err(Error::InvalidInput(format!(
            "cache view strides {st:?} are not row-contiguous"
        )));
    }
    let start = layout.start_offset() + h * st[0];
    data.get(start..start + total * hd)
        .ok_or_else(|| Error::InvalidInput("cache view out of its storage".into()))
}

/// `scores[r, j] = q[r] · k[j]`.
///
/// # Shapes
/// `q: [rows, hd]`, `k: [total, hd]` -> `scores: [rows, total]`
fn key_scores(q: &[f32], k: &[f32], hd: usize, scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::best() == Isa::Avx512 && hd.is_multiple_of(16) && hd <= 128 {
        // SAFETY: `Isa::Avx512` is only produced when the CPU has AVX-512 F; the
        // head size is a whole number of registers, at most 8.
        unsafe { avx512::key_scores(q, k, hd, scores) };
        return;
    }
    let (rows, total) = (q.len() / hd, k.len() / hd);
    let keys = DenseRows {
        data: DenseData::F32(k),
        cols: hd,
    };
    matmul_dense(Isa::best(), keys, total, q, rows, scores);
}

/// In place: `p = softmax(p * scale)`, with `sink` as one more logit in the
/// normaliser when given.
fn softmax_scaled(p: &mut [f32], scale: f32, sink: Option<f32>) {
    let max = p
        .iter()
        .fold(sink.unwrap_or(f32::NEG_INFINITY), |m, &x| m.max(x * scale));
    #[cfg(target_arch = "x86_64")]
    let sum = if Isa::best() == Isa::Avx512 {
        // SAFETY: `Isa::Avx512` is only produced when the CPU has AVX-512 F.
        unsafe { avx512::exp_shifted(p, scale, max) }
    } else {
        exp_shifted(p, scale, max)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let sum = exp_shifted(p, scale, max);
    let sum = sum + sink.map_or(0.0, |s| (s - max).exp());
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|x| *x *= inv);
}

/// In place `p = exp(p * scale - max)`; returns the sum.
fn exp_shifted(p: &mut [f32], scale: f32, max: f32) -> f32 {
    let mut sum = 0f32;
    for x in p.iter_mut() {
        *x = (*x * scale - max).exp();
        sum += *x;
    }
    sum
}

/// `out[r] = Σ_j p[r, j] v[j, :]`, every query row in one pass over the value rows
/// (each value row is read once, not once per query row).
///
/// # Shapes
/// `p: [rows, total]`, `v: [total, hd]` -> `out: [rows, hd]`
fn weighted_rows_sum(p: &[f32], v: &[f32], hd: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::best() == Isa::Avx512 && hd.is_multiple_of(16) && hd <= 128 {
        // SAFETY: `Isa::Avx512` is only produced when the CPU has AVX-512 F; the
        // head size is a whole number of registers, at most 8.
        unsafe { avx512::weighted_rows_sum(p, v, hd, out) };
        return;
    }
    weighted_rows_sum_body(p, v, hd, out);
}

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

/// The decode attention loops with AVX-512: scores of 16 keys per pass (a
/// register per key, summed across lanes all at once), value rows accumulated in
/// registers, and a polynomial `exp`.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::ops::kernels::exp16;

    /// Lane `i` of the result is the sum of `v[i]`'s 16 lanes: a transpose-and-add
    /// in 45 instructions instead of 16 separate horizontal sums.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sum_lanes_16(v: &[__m512; 16]) -> __m512 {
        // Within 128-bit lanes: pairs, then quads (lane e of group g sums source 4k + e).
        let pair = |a: __m512, b: __m512| {
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        };
        let quad = |a: __m512, b: __m512| {
            let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            )
        };
        let q: [__m512; 4] = std::array::from_fn(|k| {
            quad(
                pair(v[4 * k], v[4 * k + 1]),
                pair(v[4 * k + 2], v[4 * k + 3]),
            )
        });
        // Across the four 128-bit lanes: output lane group k sums q[k]'s groups.
        let lanes = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        };
        lanes(lanes(q[0], q[1]), lanes(q[2], q[3]))
    }

    /// # Safety
    /// The CPU must support AVX-512 F; `hd` is a multiple of 16 and at most 128.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn key_scores(q: &[f32], k: &[f32], hd: usize, scores: &mut [f32]) {
        let (rows, total) = (q.len() / hd, k.len() / hd);
        let chunks = hd / 16;
        let main = total / 16 * 16;
        for r in 0..rows {
            // SAFETY: row `r` of `q` has `hd` values, key `j < total` of `k` too.
            unsafe {
                let qp = q.as_ptr().add(r * hd);
                let qv: [__m512; 8] = std::array::from_fn(|c| {
                    if c < chunks {
                        _mm512_loadu_ps(qp.add(16 * c))
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                let dot = |j: usize| {
                    let kp = k.as_ptr().add(j * hd);
                    let mut acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kp));
                    for (c, qc) in qv.iter().enumerate().take(chunks).skip(1) {
                        acc = _mm512_fmadd_ps(*qc, _mm512_loadu_ps(kp.add(16 * c)), acc);
                    }
                    acc
                };
                let out = &mut scores[r * total..(r + 1) * total];
                for j in (0..main).step_by(16) {
                    let acc: [__m512; 16] = std::array::from_fn(|i| dot(j + i));
                    _mm512_storeu_ps(out.as_mut_ptr().add(j), sum_lanes_16(&acc));
                }
                for (j, o) in out.iter_mut().enumerate().skip(main) {
                    *o = _mm512_reduce_add_ps(dot(j));
                }
            }
        }
    }

    /// `out[r] = Σ_j p[r, j] v[j]` with up to 16 registers of accumulated output rows.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; `hd` is a multiple of 16 and at most 128.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_rows_sum(p: &[f32], v: &[f32], hd: usize, out: &mut [f32]) {
        let rows = out.len() / hd;
        // SAFETY (all arms): forwarded caller guarantees.
        unsafe {
            match hd / 16 {
                1 => rows_in_groups::<1, 8>(p, v, rows, out),
                2 => rows_in_groups::<2, 8>(p, v, rows, out),
                3 | 4 => rows_in_groups::<4, 4>(p, v, rows, out),
                _ => rows_in_groups::<8, 2>(p, v, rows, out),
            }
        }
    }

    /// Rows in groups of `R`, each group one pass over the value rows with its
    /// `R x C` accumulators in registers (`C >= hd / 16` chunks, extra ones unused).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_in_groups<const C: usize, const R: usize>(
        p: &[f32],
        v: &[f32],
        rows: usize,
        out: &mut [f32],
    ) {
        let hd = out.len() / rows.max(1);
        let total = v.len() / hd;
        let chunks = hd / 16;
        let mut r0 = 0;
        while r0 < rows {
            let nr = R.min(rows - r0);
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            // SAFETY: value row `j < total` has `hd = 16 * chunks` values; `p` has
            // `rows` rows of `total`, and rows `r0 + r < rows` exist in `out`.
            unsafe {
                for j in 0..total {
                    let vp = v.as_ptr().add(j * hd);
                    let vj: [__m512; C] = std::array::from_fn(|c| {
                        if c < chunks {
                            _mm512_loadu_ps(vp.add(16 * c))
                        } else {
                            _mm512_setzero_ps()
                        }
                    });
                    for (r, acc) in acc.iter_mut().enumerate().take(nr) {
                        let w = _mm512_set1_ps(*p.get_unchecked((r0 + r) * total + j));
                        for c in 0..chunks.min(C) {
                            acc[c] = _mm512_fmadd_ps(w, vj[c], acc[c]);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate().take(nr) {
                    let op = out.as_mut_ptr().add((r0 + r) * hd);
                    for (c, a) in acc.iter().enumerate().take(chunks) {
                        _mm512_storeu_ps(op.add(16 * c), *a);
                    }
                }
            }
            r0 += nr;
        }
    }

    /// In place `p = exp(p * scale - max)` (max: the largest `p * scale`, so every
    /// argument is <= 0); returns the sum.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted(p: &mut [f32], scale: f32, max: f32) -> f32 {
        let main = p.len() / 16 * 16;
        let (vs, vm) = (_mm512_set1_ps(scale), _mm512_set1_ps(max));
        let mut sum = _mm512_setzero_ps();
        for i in (0..main).step_by(16) {
            // SAFETY: `i + 16 <= main <= p.len()`.
            unsafe {
                let x = _mm512_fmsub_ps(_mm512_loadu_ps(p.as_ptr().add(i)), vs, vm);
                let e = exp16(x);
                _mm512_storeu_ps(p.as_mut_ptr().add(i), e);
                sum = _mm512_add_ps(sum, e);
            }
        }
        let mut total = _mm512_reduce_add_ps(sum);
        for x in &mut p[main..] {
            *x = (*x * scale - max).exp();
            total += *x;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_attention_matches_the_tensor_formula() {
        let dev = Device::Cpu;
        // A short cache (one thread) and a long one (one task per KV head).
        // Head sizes of 1, 4 and 8 registers and one that is not a whole register
        // (the portable loops); key counts with and without a partial block of 16.
        for (heads, rows, hd, cap, total) in [
            (3, 4, 64, 40, 29),
            (4, 4, 64, 700, 613),
            (2, 3, 128, 64, 48),
            (2, 5, 16, 40, 33),
            (2, 2, 24, 40, 37),
        ] {
            let q = Tensor::randn(0f32, 1.0, (heads, rows, hd), &dev).unwrap();
            let kc = Tensor::randn(0f32, 1.0, (heads, cap, hd), &dev).unwrap();
            let vc = Tensor::randn(0f32, 1.0, (heads, cap, hd), &dev).unwrap();
            let (k, v) = (
                kc.narrow(1, 0, total).unwrap(),
                vc.narrow(1, 0, total).unwrap(),
            );
            let scale = 0.125f32;
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
            // Without sinks, then with a sink logit per query row appended to the
            // softmax and dropped after it (transformers' gpt-oss eager attention).
            let sinks: Vec<f32> = (0..heads * rows).map(|i| i as f32 * 0.7 - 2.0).collect();
            for sink in [None, Some(sinks.as_slice())] {
                let got = attend_cache(&q, &k, &v, scale, sink).unwrap();
                let probs = match sink {
                    None => candle_nn::ops::softmax_last_dim(&scores).unwrap(),
                    Some(s) => {
                        let col = Tensor::from_slice(s, (heads, rows, 1), &dev).unwrap();
                        let all = Tensor::cat(&[&scores, &col], 2).unwrap();
                        candle_nn::ops::softmax_last_dim(&all)
                            .unwrap()
                            .narrow(2, 0, total)
                            .unwrap()
                    }
                };
                let want = probs.matmul(&v.contiguous().unwrap()).unwrap();
                let diff = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff < 1e-5,
                    "{total} positions, sinks {}: max diff {diff}",
                    sink.is_some()
                );
            }
        }
    }

    /// The AVX-512 loops against the portable ones they replace.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_loops_match_the_portable_ones() {
        if Isa::best() != Isa::Avx512 {
            return;
        }
        let vals = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * k) % 101) as f32 / 25.0 - 2.0)
                .collect()
        };
        for (rows, hd, total) in [(4, 64, 37), (3, 128, 16), (8, 16, 5)] {
            let (q, k, v) = (
                vals(rows * hd, 7),
                vals(total * hd, 11),
                vals(total * hd, 13),
            );
            let mut want = vec![0f32; rows * total];
            let keys = DenseRows {
                data: DenseData::F32(&k),
                cols: hd,
            };
            matmul_dense(Isa::Portable, keys, total, &q, rows, &mut want);
            let mut got = vec![0f32; rows * total];
            // SAFETY: AVX-512 checked above; hd is 16, 64 or 128.
            unsafe { avx512::key_scores(&q, &k, hd, &mut got) };
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "scores {a} vs {b}");
            }
            let (mut e_fast, mut e_slow) = (want.clone(), want.clone());
            let max = want.iter().fold(f32::MIN, |m, &x| m.max(x * 0.3));
            // SAFETY: as above.
            let s_fast = unsafe { avx512::exp_shifted(&mut e_fast, 0.3, max) };
            let s_slow = exp_shifted(&mut e_slow, 0.3, max);
            assert!(
                (s_fast - s_slow).abs() < 1e-5 * s_slow,
                "{s_fast} vs {s_slow}"
            );
            for (a, b) in e_fast.iter().zip(&e_slow) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.max(1e-30) + 1e-30,
                    "exp {a} vs {b}"
                );
            }
            let (mut o_fast, mut o_slow) = (vec![0f32; rows * hd], vec![0f32; rows * hd]);
            // SAFETY: as above.
            unsafe { avx512::weighted_rows_sum(&e_slow, &v, hd, &mut o_fast) };
            weighted_rows_sum_body(&e_slow, &v, hd, &mut o_slow);
            for (a, b) in o_fast.iter().zip(&o_slow) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "sum {a} vs {b}");
            }
        }
    }
}
