//! Scalar kernels for any CPU; also the reference the SIMD paths are tested against.

use super::{DenseRow, MAX_TOKENS, PackedRow, packed_block_dot};
use crate::ops::quant::QuantizedActs;

pub fn dense_row_dots(w: DenseRow<'_>, xs: &[f32], nt: usize, out: &mut [f32; MAX_TOKENS]) {
    let cols = w.len();
    for (t, o) in out.iter_mut().enumerate().take(nt) {
        let x = &xs[t * cols..(t + 1) * cols];
        *o = match w {
            DenseRow::F32(w) => w.iter().zip(x).map(|(a, b)| a * b).sum(),
            DenseRow::BF16(w) => w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum(),
            DenseRow::F16(w) => w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum(),
        };
    }
}

pub fn packed_row_dots(
    w: PackedRow<'_>,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [f32; MAX_TOKENS],
) {
    for (t, o) in out.iter_mut().enumerate().take(nt) {
        let (xq, dx, sx) = acts.token(t0 + t);
        *o = (0..w.scales.len())
            .map(|b| packed_block_dot(&w, b, xq, dx[b], sx[b]))
            .sum();
    }
}

pub fn bf16_rows_dots(
    w: &[half::bf16],
    cols: usize,
    rows: std::ops::Range<usize>,
    xb: &[half::bf16],
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]],
) {
    for (r, o) in rows.zip(out.iter_mut()) {
        let wr = &w[r * cols..(r + 1) * cols];
        for (t, v) in o.iter_mut().enumerate().take(nt) {
            let x = &xb[(t0 + t) * cols..(t0 + t + 1) * cols];
            *v = wr.iter().zip(x).map(|(a, b)| a.to_f32() * b.to_f32()).sum();
        }
    }
}
