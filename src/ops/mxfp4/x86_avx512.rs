//! AVX-512 MXFP4 tile kernel: 16 rows at once, a row per 32-bit lane, as the
//! Q4_0 `tile_n` kernel; codes become `2 * value + 12` by one `vpshufb` before
//! `vpdpbusd`, and a block's 16 exponents become its 16 scales by one shift.

// Accumulator arrays are indexed in step with token rows; index loops read clearer.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{CODE_OFFSET, FP4_UNSIGNED, Mxfp4Tile};
use crate::ops::kernels::MAX_TOKENS;
use crate::ops::quant::{QuantizedActs, TILE};

/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; `w` is a whole tile of `acts.cols`
/// columns and `t0 + nt <= acts.n`, `nt <= MAX_TOKENS`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn tile_dots(
    w: Mxfp4Tile<'_>,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]; TILE],
) {
    // SAFETY (all arms): forwarded caller guarantees.
    unsafe {
        match nt {
            1 => tile_n::<1>(w, acts, t0, out),
            2 => tile_n::<2>(w, acts, t0, out),
            3 => tile_n::<3>(w, acts, t0, out),
            _ => tile_n::<4>(w, acts, t0, out),
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_n<const NT: usize>(
    w: Mxfp4Tile<'_>,
    acts: &QuantizedActs,
    t0: usize,
    out: &mut [[f32; MAX_TOKENS]; TILE],
) {
    let nb = acts.blocks_per_row();
    let cols = acts.cols;
    let nibbles = _mm512_set1_epi8(0x0F);
    let off = CODE_OFFSET as f32;
    let subnormal = _mm512_set1_epi32(0x0040_0000);
    let mut acc = [_mm512_setzero_ps(); NT];
    let (wq, we) = (w.quants.as_ptr(), w.exps.as_ptr());
    let (xq, xd, xs) = (
        acts.quants.as_ptr(),
        acts.scales.as_ptr(),
        acts.sums.as_ptr(),
    );
    // SAFETY: block `b < nb` of the tile is 256 bytes at `256 b` and 16 exponents at
    // `16 b`; each activation row `t0 + t < acts.n` has 32 bytes, a scale and a sum per
    // block; FP4_UNSIGNED is 16 bytes.
    unsafe {
        let lut = _mm512_broadcast_i32x4(_mm_loadu_si128(FP4_UNSIGNED.as_ptr() as *const __m128i));
        let x4 = |t: usize, b: usize, i: usize| {
            _mm512_set1_epi32(std::ptr::read_unaligned(
                xq.add((t0 + t) * cols + b * 32 + i) as *const i32,
            ))
        };
        for b in 0..nb {
            let wb = wq.add(b * 256);
            let mut s0 = [_mm512_setzero_si512(); NT];
            let mut s1 = [_mm512_setzero_si512(); NT];
            for c in 0..4 {
                let v = _mm512_loadu_si512(wb.add(c * 64) as *const __m512i);
                let lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, nibbles));
                let hi =
                    _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibbles));
                for t in 0..NT {
                    s0[t] = _mm512_dpbusd_epi32(s0[t], lo, x4(t, b, 4 * c));
                    s1[t] = _mm512_dpbusd_epi32(s1[t], hi, x4(t, b, 16 + 4 * c));
                }
            }
            let e = _mm512_cvtepu8_epi32(_mm_loadu_si128(we.add(b * TILE) as *const __m128i));
            let zero = _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
            let dw = _mm512_castsi512_ps(_mm512_mask_mov_epi32(
                _mm512_slli_epi32::<23>(e),
                zero,
                subnormal,
            ));
            for t in 0..NT {
                let i = (t0 + t) * nb + b;
                let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[t], s1[t]));
                let v = _mm512_fmsub_ps(
                    isum,
                    _mm512_set1_ps(*xd.add(i)),
                    _mm512_set1_ps(off * *xs.add(i)),
                );
                acc[t] = _mm512_fmadd_ps(dw, v, acc[t]);
            }
        }
        let half = _mm512_set1_ps(0.5);
        for t in 0..NT {
            let mut lanes = [0f32; TILE];
            _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_mul_ps(acc[t], half));
            for (o, v) in out.iter_mut().zip(lanes) {
                o[t] = v;
            }
        }
    }
}
