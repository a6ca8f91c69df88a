//! AVX2 kernels: one 32-element block per `vpmaddubsw`. Q8_0 uses llama.cpp's
//! sign trick (|x| times sign-adjusted w) because offset weights times x could
//! overflow the 16-bit pair sums; Q4_0 nibbles (0..15) cannot.

use std::arch::x86_64::*;

use super::{DenseRow, MAX_TOKENS, PackedRow};
use crate::ops::quant::{PackedFormat, QuantizedActs};

/// # Safety
/// The CPU must support AVX2, FMA and F16C; `xs` holds `nt` rows of `w.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dense_row_dots(w: DenseRow<'_>, xs: &[f32], nt: usize, out: &mut [f32; MAX_TOKENS]) {
    let cols = w.len();
    let main = cols / 8 * 8;
    for (t, o) in out.iter_mut().enumerate().take(nt) {
        let x = xs[t * cols..].as_ptr();
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: reads `[i, i + 8)` with `i + 8 <= cols` of the row and of activation row `t`.
        unsafe {
            while i + 16 <= main {
                acc0 = _mm256_fmadd_ps(load8(w, i), _mm256_loadu_ps(x.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(load8(w, i + 8), _mm256_loadu_ps(x.add(i + 8)), acc1);
                i += 16;
            }
            if i < main {
                acc0 = _mm256_fmadd_ps(load8(w, i), _mm256_loadu_ps(x.add(i)), acc0);
                i += 8;
            }
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        let xr = &xs[t * cols..(t + 1) * cols];
        for j in i..cols {
            s += match w {
                DenseRow::F32(w) => w[j],
                DenseRow::BF16(w) => w[j].to_f32(),
                DenseRow::F16(w) => w[j].to_f32(),
            } * xr[j];
        }
        *o = s;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8(w: DenseRow<'_>, i: usize) -> __m256 {
    // SAFETY: callers pass `i + 8 <= w.len()`.
    unsafe {
        match w {
            DenseRow::F32(w) => _mm256_loadu_ps(w.as_ptr().add(i)),
            DenseRow::BF16(w) => {
                let h = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
            DenseRow::F16(w) => {
                _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i) as *const __m128i))
            }
        }
    }
}

#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` and `acts` have the same number of
/// blocks and `t0 + nt <= acts.n`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn packed_row_dots(
    w: PackedRow<'_>,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [f32; MAX_TOKENS],
) {
    let nb = w.scales.len();
    let ones = _mm256_set1_epi16(1);
    let nibbles = _mm256_set1_epi8(0x0F);
    let flip = _mm256_set1_epi8(-128);
    let wq = w.quants.as_ptr();
    for (t, o) in out.iter_mut().enumerate().take(nt) {
        let (xq, dx, sx) = acts.token(t0 + t);
        let mut acc = _mm256_setzero_ps();
        let mut off = 0f32;
        for b in 0..nb {
            let dw = w.scales[b].to_f32();
            // SAFETY: block `b < nb` lies inside the row: 32 bytes at `32b` (Q8_0), the
            // pair's 32 bytes at `16(b & !1)` or an unpaired block's 16 at `16b` (Q4_0);
            // the activation block is 32 bytes at `32b`.
            let p32 = unsafe {
                let xv = _mm256_loadu_si256(xq.as_ptr().add(b * 32) as *const __m256i);
                match w.format {
                    PackedFormat::Q8_0 => {
                        let ws = _mm256_xor_si256(
                            _mm256_loadu_si256(wq.add(b * 32) as *const __m256i),
                            flip,
                        );
                        let p16 = _mm256_maddubs_epi16(
                            _mm256_sign_epi8(xv, xv),
                            _mm256_sign_epi8(ws, xv),
                        );
                        _mm256_madd_epi16(p16, ones)
                    }
                    PackedFormat::Q4_0 => {
                        let wv = if b == nb - 1 && nb % 2 == 1 {
                            let v = _mm_loadu_si128(wq.add(b * 16) as *const __m128i);
                            let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
                            _mm256_and_si256(both, nibbles)
                        } else {
                            let v = _mm256_loadu_si256(wq.add((b & !1) * 16) as *const __m256i);
                            let v = if b % 2 == 1 {
                                _mm256_srli_epi16(v, 4)
                            } else {
                                v
                            };
                            _mm256_and_si256(v, nibbles)
                        };
                        off += dw * sx[b];
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones)
                    }
                }
            };
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(dw * dx[b]), acc);
        }
        // Q8_0 used signed weights directly, so only Q4_0 carries the offset term.
        *o = hsum(acc) - w.format.offset() as f32 * off;
    }
}
