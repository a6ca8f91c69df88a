//! Scalar kernels for any CPU; also the reference the SIMD paths are tested against.

use super::{DenseRow, MAX_TOKENS};
use crate::ops::quant::{BLOCK, PackedMatrix, QuantizedActs, TILE};

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

pub fn packed_tile_dots(
    w: &PackedMatrix,
    tile: usize,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]; TILE],
) {
    let off = w.format().offset();
    let mut q = [0u8; BLOCK];
    for (i, o) in out.iter_mut().enumerate() {
        let r = tile * TILE + i;
        if r >= w.rows() {
            *o = [0.0; MAX_TOKENS];
            continue;
        }
        for (t, v) in o.iter_mut().enumerate().take(nt) {
            let (xq, dx, sx) = acts.token(t0 + t);
            *v = (0..w.cols() / BLOCK)
                .map(|b| {
                    let p = w.block(r, b, &mut q);
                    let xb = &xq[b * BLOCK..(b + 1) * BLOCK];
                    let dot = |h: usize| -> f32 {
                        let isum: i32 = q[16 * h..16 * h + 16]
                            .iter()
                            .zip(&xb[16 * h..16 * h + 16])
                            .map(|(&a, &c)| (a as i32 - off) * c as i32)
                            .sum();
                        isum as f32
                    };
                    dx[b] * (p.d * dot(0) + p.d_hi * dot(1)) + p.min * sx[b]
                })
                .sum();
        }
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

pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((h, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *h = g / (1.0 + (-g).exp()) * u;
    }
}
