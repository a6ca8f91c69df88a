//! AVX2 MXFP4 tile kernel: the tile's two halves of 8 rows, a row per 32-bit
//! lane, as the Q4_0 AVX2 kernel; codes become `2 * value + 12` by one `vpshufb`
//! (24 x 127 x 2 x 2 still fits `vpmaddubsw`'s i16 pairs).

use std::arch::x86_64::*;

use super::{CODE_OFFSET, FP4_UNSIGNED, Mxfp4Tile};
use crate::ops::kernels::MAX_TOKENS;
use crate::ops::quant::{QuantizedActs, TILE};

/// 8 E8M0 exponents as f32 `2^(e - 127)`, `e = 0` as the subnormal `2^-127`.
#[inline]
#[target_feature(enable = "avx2")]
fn exp8(e: __m128i) -> __m256 {
    let e = _mm256_cvtepu8_epi32(e);
    let bits = _mm256_slli_epi32::<23>(e);
    let zero = _mm256_cmpeq_epi32(e, _mm256_setzero_si256());
    _mm256_castsi256_ps(_mm256_blendv_epi8(
        bits,
        _mm256_set1_epi32(0x0040_0000),
        zero,
    ))
}

/// # Safety
/// The CPU must support AVX2 and FMA; `w` is a whole tile of `acts.cols` columns
/// and `t0 + nt <= acts.n`, `nt <= MAX_TOKENS`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_dots(
    w: Mxfp4Tile<'_>,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]; TILE],
) {
    let nb = acts.blocks_per_row();
    let ones = _mm256_set1_epi16(1);
    let nibbles = _mm256_set1_epi8(0x0F);
    // SAFETY: FP4_UNSIGNED is 16 bytes.
    let lut = unsafe {
        _mm256_broadcastsi128_si256(_mm_loadu_si128(FP4_UNSIGNED.as_ptr() as *const __m128i))
    };
    let off = CODE_OFFSET as f32;
    for t in 0..nt {
        let (xq, dx, sx) = acts.token(t0 + t);
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..nb {
            // SAFETY: block `b < nb` of the tile is 256 bytes at `256 b` and 16 exponents
            // at `16 b`; the activation block is 32 bytes at `32 b`.
            unsafe {
                let wb = w.quants.as_ptr().add(b * 256);
                let x4 = |i: usize| {
                    _mm256_set1_epi32(std::ptr::read_unaligned(
                        xq.as_ptr().add(b * 32 + i) as *const i32
                    ))
                };
                for (h, acc) in acc.iter_mut().enumerate() {
                    let mut isum = _mm256_setzero_si256();
                    for c in 0..4 {
                        let v = _mm256_loadu_si256(wb.add(c * 64 + h * 32) as *const __m256i);
                        let lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, nibbles));
                        let hi = _mm256_shuffle_epi8(
                            lut,
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibbles),
                        );
                        let p16 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, x4(4 * c)),
                            _mm256_maddubs_epi16(hi, x4(16 + 4 * c)),
                        );
                        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, ones));
                    }
                    let dw = exp8(_mm_loadl_epi64(
                        w.exps.as_ptr().add(b * TILE + h * 8) as *const __m128i
                    ));
                    let v = _mm256_fmsub_ps(
                        _mm256_cvtepi32_ps(isum),
                        _mm256_set1_ps(dx[b]),
                        _mm256_set1_ps(off * sx[b]),
                    );
                    *acc = _mm256_fmadd_ps(dw, v, *acc);
                }
            }
        }
        let half = _mm256_set1_ps(0.5);
        let mut lanes = [0f32; TILE];
        // SAFETY: `lanes` holds 16 f32.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_mul_ps(acc[0], half));
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), _mm256_mul_ps(acc[1], half));
        }
        for (o, v) in out.iter_mut().zip(lanes) {
            o[t] = v;
        }
    }
}
