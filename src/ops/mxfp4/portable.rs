//! Scalar MXFP4 tile kernel for any CPU; the SIMD paths are tested against it
//! and against a naive reference.

use super::{FP4_DOUBLED, Mxfp4Tile, e8m0_to_f32};
use crate::ops::kernels::MAX_TOKENS;
use crate::ops::quant::{BLOCK, QuantizedActs, TILE};

pub fn tile_dots(
    w: Mxfp4Tile<'_>,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]; TILE],
) {
    let nb = acts.blocks_per_row();
    for (lane, o) in out.iter_mut().enumerate() {
        for (t, v) in o.iter_mut().enumerate().take(nt) {
            let (xq, dx, _) = acts.token(t0 + t);
            let mut acc = 0f32;
            for b in 0..nb {
                let bytes = &w.quants[b * TILE * BLOCK / 2..];
                let xb = &xq[b * BLOCK..(b + 1) * BLOCK];
                let mut isum = 0i32;
                for c in 0..4 {
                    for i in 0..4 {
                        let byte = bytes[c * 64 + lane * 4 + i];
                        isum += FP4_DOUBLED[(byte & 0x0F) as usize] as i32 * xb[4 * c + i] as i32;
                        isum +=
                            FP4_DOUBLED[(byte >> 4) as usize] as i32 * xb[16 + 4 * c + i] as i32;
                    }
                }
                acc += e8m0_to_f32(w.exps[b * TILE + lane]) * dx[b] * isum as f32;
            }
            *v = acc * 0.5;
        }
    }
}
