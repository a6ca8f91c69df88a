//! AVX-512 kernels. Packed rows: one `vpdpbusd` per two blocks (64 bytes), the
//! per-block scales applied in f32 by permuting a vector of 16 block scales; the
//! weights' unsigned offset is removed once per row via the activations' block sums.
//! Dense rows: bf16/f16 widened to f32 in registers, then FMA.

// Accumulator arrays are indexed in step with token rows; index loops read clearer.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{DenseRow, MAX_TOKENS, PackedRow, packed_block_dot};
use crate::ops::quant::{PackedFormat, PackedMatrix, QuantizedActs};

/// # Safety
/// The CPU must support AVX-512 F; `xs` holds `nt` rows of `w.len()`.
#[target_feature(enable = "avx512f")]
pub unsafe fn dense_row_dots(w: DenseRow<'_>, xs: &[f32], nt: usize, out: &mut [f32; MAX_TOKENS]) {
    // SAFETY (all arms): caller guarantees AVX-512 F and the slice lengths.
    unsafe {
        match nt {
            1 => dense_n::<1>(w, xs, out),
            2 => dense_n::<2>(w, xs, out),
            3 => dense_n::<3>(w, xs, out),
            _ => dense_n::<4>(w, xs, out),
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn load16(w: DenseRow<'_>, i: usize) -> __m512 {
    // SAFETY: the callers only pass `i + 16 <= w.len()`.
    unsafe {
        match w {
            DenseRow::F32(w) => _mm512_loadu_ps(w.as_ptr().add(i)),
            DenseRow::BF16(w) => {
                let h = _mm256_loadu_si256(w.as_ptr().add(i) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            }
            DenseRow::F16(w) => {
                _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(i) as *const __m256i))
            }
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn dense_n<const NT: usize>(w: DenseRow<'_>, xs: &[f32], out: &mut [f32; MAX_TOKENS]) {
    let cols = w.len();
    let x = xs.as_ptr();
    let mut acc0 = [_mm512_setzero_ps(); NT];
    let mut acc1 = [_mm512_setzero_ps(); NT];
    let main = cols / 32 * 32;
    let mut i = 0;
    // SAFETY: every load reads `[i, i + 32)` with `i + 32 <= cols` of the weight row and of
    // each of the `NT` activation rows, which the caller guarantees exist.
    unsafe {
        while i < main {
            let w0 = load16(w, i);
            let w1 = load16(w, i + 16);
            for t in 0..NT {
                let xp = x.add(t * cols + i);
                acc0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc0[t]);
                acc1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), acc1[t]);
            }
            i += 32;
        }
        if i + 16 <= cols {
            let w0 = load16(w, i);
            for t in 0..NT {
                acc0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x.add(t * cols + i)), acc0[t]);
            }
            i += 16;
        }
    }
    for t in 0..NT {
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
        let xr = &xs[t * cols..(t + 1) * cols];
        for j in i..cols {
            s += match w {
                DenseRow::F32(w) => w[j],
                DenseRow::BF16(w) => w[j].to_f32(),
                DenseRow::F16(w) => w[j].to_f32(),
            } * xr[j];
        }
        out[t] = s;
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; `w` and `acts` have the same number of blocks
/// and `t0 + nt <= acts.n`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn packed_row_dots(
    w: PackedRow<'_>,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [f32; MAX_TOKENS],
) {
    // SAFETY (all arms): forwarded caller guarantees.
    unsafe {
        match (w.format, nt) {
            (PackedFormat::Q8_0, 1) => packed_n::<1, false>(w, acts, t0, out),
            (PackedFormat::Q8_0, 2) => packed_n::<2, false>(w, acts, t0, out),
            (PackedFormat::Q8_0, 3) => packed_n::<3, false>(w, acts, t0, out),
            (PackedFormat::Q8_0, _) => packed_n::<4, false>(w, acts, t0, out),
            (PackedFormat::Q4_0, 1) => packed_n::<1, true>(w, acts, t0, out),
            (PackedFormat::Q4_0, 2) => packed_n::<2, true>(w, acts, t0, out),
            (PackedFormat::Q4_0, 3) => packed_n::<3, true>(w, acts, t0, out),
            (PackedFormat::Q4_0, _) => packed_n::<4, true>(w, acts, t0, out),
        }
    }
}

/// # Safety
/// As [`packed_row_dots`], for every row in `rows` (`rows.end <= w.rows()`), and
/// `out.len() >= rows.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn packed_rows_dots(
    w: &PackedMatrix,
    rows: std::ops::Range<usize>,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]],
) {
    // SAFETY (all arms): forwarded caller guarantees; the loop is here so that the
    // row kernel inlines into it.
    unsafe {
        for (r, o) in rows.zip(out.iter_mut()) {
            let row = w.row(r);
            match (row.format, nt) {
                (PackedFormat::Q8_0, 1) => packed_n::<1, false>(row, acts, t0, o),
                (PackedFormat::Q8_0, 2) => packed_n::<2, false>(row, acts, t0, o),
                (PackedFormat::Q8_0, 3) => packed_n::<3, false>(row, acts, t0, o),
                (PackedFormat::Q8_0, _) => packed_n::<4, false>(row, acts, t0, o),
                (PackedFormat::Q4_0, 1) => packed_n::<1, true>(row, acts, t0, o),
                (PackedFormat::Q4_0, 2) => packed_n::<2, true>(row, acts, t0, o),
                (PackedFormat::Q4_0, 3) => packed_n::<3, true>(row, acts, t0, o),
                (PackedFormat::Q4_0, _) => packed_n::<4, true>(row, acts, t0, o),
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn packed_n<const NT: usize, const Q4: bool>(
    w: PackedRow<'_>,
    acts: &QuantizedActs,
    t0: usize,
    out: &mut [f32; MAX_TOKENS],
) {
    let nb = w.scales.len();
    let groups = nb / 16;
    let cols = acts.cols;
    let nbx = acts.blocks_per_row();
    // Lane l of pair p's scale vector takes block 2p + l / 8 of the group.
    let idx: [__m512i; 8] = std::array::from_fn(|p| {
        let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
        _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
    });
    let nibbles = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); NT];
    let mut acc_off = [_mm512_setzero_ps(); NT];
    let wq = w.quants.as_ptr();
    let ws = w.scales.as_ptr();
    let xq = acts.quants.as_ptr();
    let xd = acts.scales.as_ptr();
    let xs = acts.sums.as_ptr();
    // SAFETY: group `g` reads blocks `16g .. 16g + 16 <= nb` of the weight row (64 bytes per
    // pair for Q8_0, 32 for Q4_0's pair layout, 16 f16 scales) and of each activation row
    // `t0 + t < acts.n` (32 bytes per block, 16 f32 scales and sums).
    unsafe {
        for g in 0..groups {
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(ws.add(g * 16) as *const __m256i));
            let mut dd = [_mm512_setzero_ps(); NT];
            for t in 0..NT {
                let row = (t0 + t) * nbx + g * 16;
                let dx = _mm512_loadu_ps(xd.add(row));
                let sx = _mm512_loadu_ps(xs.add(row));
                acc_off[t] = _mm512_fmadd_ps(dw, sx, acc_off[t]);
                dd[t] = _mm512_mul_ps(dw, dx);
            }
            for (p, idx) in idx.iter().enumerate() {
                let blk = g * 16 + 2 * p;
                let wv = if Q4 {
                    let v = _mm256_loadu_si256(wq.add(blk * 16) as *const __m256i);
                    let both =
                        _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
                    _mm512_and_si512(both, nibbles)
                } else {
                    _mm512_loadu_si512(wq.add(blk * 32) as *const __m512i)
                };
                for t in 0..NT {
                    let xv =
                        _mm512_loadu_si512(xq.add((t0 + t) * cols + blk * 32) as *const __m512i);
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
                    let scale = _mm512_permutexvar_ps(*idx, dd[t]);
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t]);
                }
            }
        }
    }
    let off = w.format.offset() as f32;
    for t in 0..NT {
        let mut s = _mm512_reduce_add_ps(acc[t]) - off * _mm512_reduce_add_ps(acc_off[t]);
        let (q, d, sum) = acts.token(t0 + t);
        for b in groups * 16..nb {
            s += packed_block_dot(&w, b, q, d[b], sum[b]);
        }
        out[t] = s;
    }
}

/// # Safety
/// The CPU must support AVX-512 F and BF16; `rows.end * cols <= w.len()`,
/// `(t0 + nt) * cols <= xb.len()`, `nt <= MAX_TOKENS`, `out.len() >= rows.len()`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn bf16_rows_dots(
    w: &[half::bf16],
    cols: usize,
    rows: std::ops::Range<usize>,
    xb: &[half::bf16],
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]],
) {
    // SAFETY (all arms): forwarded caller guarantees.
    unsafe {
        for (r, o) in rows.zip(out.iter_mut()) {
            let wr = &w[r * cols..(r + 1) * cols];
            let xs = &xb[t0 * cols..];
            match nt {
                1 => bf16_n::<1>(wr, xs, o),
                2 => bf16_n::<2>(wr, xs, o),
                3 => bf16_n::<3>(wr, xs, o),
                _ => bf16_n::<4>(wr, xs, o),
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_n<const NT: usize>(
    w: &[half::bf16],
    xs: &[half::bf16],
    out: &mut [f32; MAX_TOKENS],
) {
    let cols = w.len();
    let (wp, xp) = (w.as_ptr(), xs.as_ptr());
    let mut acc0 = [_mm512_setzero_ps(); NT];
    let mut acc1 = [_mm512_setzero_ps(); NT];
    let load = |p: *const half::bf16| -> __m512bh {
        // SAFETY: callers only pass pointers with 32 readable bf16 values; bf16 pairs
        // and `__m512bh` share their bit layout.
        unsafe { std::mem::transmute(_mm512_loadu_si512(p as *const __m512i)) }
    };
    let mut i = 0;
    // SAFETY: reads `[i, i + 64)` of the weight row and of each of the `NT` activation
    // rows (`xs` holds at least `NT` rows of `cols`).
    unsafe {
        while i + 64 <= cols {
            let (w0, w1) = (load(wp.add(i)), load(wp.add(i + 32)));
            for t in 0..NT {
                acc0[t] = _mm512_dpbf16_ps(acc0[t], w0, load(xp.add(t * cols + i)));
                acc1[t] = _mm512_dpbf16_ps(acc1[t], w1, load(xp.add(t * cols + i + 32)));
            }
            i += 64;
        }
        if i + 32 <= cols {
            let w0 = load(wp.add(i));
            for t in 0..NT {
                acc0[t] = _mm512_dpbf16_ps(acc0[t], w0, load(xp.add(t * cols + i)));
            }
            i += 32;
        }
    }
    for t in 0..NT {
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
        for j in i..cols {
            s += w[j].to_f32() * xs[t * cols + j].to_f32();
        }
        out[t] = s;
    }
}
