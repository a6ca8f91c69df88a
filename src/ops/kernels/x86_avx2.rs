//! AVX2 kernels. Packed tiles go as two halves of 8 rows, a row per 32-bit lane,
//! 4 values per `vpmaddubsw` lane pair against 4 broadcast activations. Q8_0 uses
//! the sign trick (|w| times sign-adjusted x) because offset weights times x could
//! overflow the 16-bit pair sums; Q4_0 nibbles (0..15) cannot.

use std::arch::x86_64::*;

use super::{DenseRow, MAX_TOKENS};
use crate::ops::quant::{PackedFormat, PackedMatrix, QuantizedActs, TILE, Tile};

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
/// The CPU must support AVX2, FMA and F16C; `tile < w.tiles()`, `w.cols() == acts.cols`
/// and `t0 + nt <= acts.n`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn packed_tile_dots(
    w: &PackedMatrix,
    tile: usize,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]; TILE],
) {
    if w.format() == PackedFormat::Q4K {
        // SAFETY: forwarded caller guarantees.
        unsafe { tile_q4k(w.tile(tile), acts, t0, nt, out) };
        return;
    }
    let Tile {
        quants,
        scales,
        mins,
        scales_hi,
        ..
    } = w.tile(tile);
    let format = w.format();
    let nb = acts.blocks_per_row();
    let bb = TILE * format.block_bytes();
    let ones = _mm256_set1_epi16(1);
    let nibbles = _mm256_set1_epi8(0x0F);
    let flip = _mm256_set1_epi8(-128);
    // Q8_0 is made signed again in registers (`maddubs` is unsigned x signed and
    // 255 x 127 x 2 would overflow its i16 pairs), so only Q4_0 carries the offset.
    let off = match format {
        PackedFormat::Q8_0 => 0.0,
        PackedFormat::Q4_0 | PackedFormat::Q4_1 | PackedFormat::Q6 | PackedFormat::Q4K => {
            format.offset() as f32
        }
    };
    let top = _mm256_set1_epi8(0x30);
    // Bits `2c..2c + 2` of each byte of `h`, moved to bits 4-5 (Q6's high bits).
    let high = |h: __m256i, c: usize| {
        let moved = match c {
            0 => _mm256_slli_epi16::<4>(h),
            1 => _mm256_slli_epi16::<2>(h),
            2 => h,
            _ => _mm256_srli_epi16::<2>(h),
        };
        _mm256_and_si256(moved, top)
    };
    for t in 0..nt {
        let (xq, dx, sx) = acts.token(t0 + t);
        let sx_lo = &acts.sums_lo[(t0 + t) * nb..(t0 + t + 1) * nb];
        // The tile's two halves of 8 rows, one 32-bit lane per row.
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..nb {
            // SAFETY: block `b < nb` of the tile is `bb` bytes at `b * bb` and 16 scales
            // (and mins, where the format has them) at `16b`; the activation block is
            // 32 bytes at `32b`.
            unsafe {
                let wb = quants.as_ptr().add(b * bb);
                let x4 = |i: usize| {
                    _mm256_set1_epi32(std::ptr::read_unaligned(
                        xq.as_ptr().add(b * 32 + i) as *const i32
                    ))
                };
                for (h, acc) in acc.iter_mut().enumerate() {
                    let mut isum = _mm256_setzero_si256();
                    match format {
                        PackedFormat::Q8_0 => {
                            for k in 0..8 {
                                let v =
                                    _mm256_loadu_si256(wb.add(k * 64 + h * 32) as *const __m256i);
                                let ws = _mm256_xor_si256(v, flip);
                                let p16 = _mm256_maddubs_epi16(
                                    _mm256_sign_epi8(ws, ws),
                                    _mm256_sign_epi8(x4(4 * k), ws),
                                );
                                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, ones));
                            }
                        }
                        PackedFormat::Q6 => {
                            // The two 16-value halves have their own scales: the
                            // upper half's sum goes to `isum_hi`.
                            let h0 = _mm256_loadu_si256(wb.add(256 + h * 32) as *const __m256i);
                            let h1 = _mm256_loadu_si256(wb.add(320 + h * 32) as *const __m256i);
                            let mut isum_hi = _mm256_setzero_si256();
                            for c in 0..4 {
                                let v =
                                    _mm256_loadu_si256(wb.add(c * 64 + h * 32) as *const __m256i);
                                let lo = _mm256_or_si256(_mm256_and_si256(v, nibbles), high(h0, c));
                                let hi = _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16(v, 4), nibbles),
                                    high(h1, c),
                                );
                                // 63 x 127 x 2 fits the i16 pairs.
                                let p_lo = _mm256_maddubs_epi16(lo, x4(4 * c));
                                let p_hi = _mm256_maddubs_epi16(hi, x4(16 + 4 * c));
                                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p_lo, ones));
                                isum_hi = _mm256_add_epi32(isum_hi, _mm256_madd_epi16(p_hi, ones));
                            }
                            let d_hi = _mm256_cvtph_ps(_mm_loadu_si128(
                                scales_hi.as_ptr().add(b * TILE + h * 8) as *const __m128i,
                            ));
                            let v_hi = _mm256_fmsub_ps(
                                _mm256_cvtepi32_ps(isum_hi),
                                _mm256_set1_ps(dx[b]),
                                _mm256_set1_ps(off * (sx[b] - sx_lo[b])),
                            );
                            *acc = _mm256_fmadd_ps(d_hi, v_hi, *acc);
                        }
                        PackedFormat::Q4_0 | PackedFormat::Q4_1 | PackedFormat::Q4K => {
                            for c in 0..4 {
                                let v =
                                    _mm256_loadu_si256(wb.add(c * 64 + h * 32) as *const __m256i);
                                let lo = _mm256_and_si256(v, nibbles);
                                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibbles);
                                // 2 x 15 x 127 x 2 fits the i16 pairs.
                                let p16 = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(lo, x4(4 * c)),
                                    _mm256_maddubs_epi16(hi, x4(16 + 4 * c)),
                                );
                                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, ones));
                            }
                        }
                    }
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                        scales.as_ptr().add(b * TILE + h * 8) as *const __m128i,
                    ));
                    // Q6's `isum` holds only the lower 16 values.
                    let sx_isum = if format == PackedFormat::Q6 {
                        sx_lo[b]
                    } else {
                        sx[b]
                    };
                    let v = _mm256_fmsub_ps(
                        _mm256_cvtepi32_ps(isum),
                        _mm256_set1_ps(dx[b]),
                        _mm256_set1_ps(off * sx_isum),
                    );
                    *acc = _mm256_fmadd_ps(dw, v, *acc);
                    if format.has_min() {
                        let dm = _mm256_cvtph_ps(_mm_loadu_si128(
                            mins.as_ptr().add(b * TILE + h * 8) as *const __m128i,
                        ));
                        *acc = _mm256_fmadd_ps(dm, _mm256_set1_ps(sx[b]), *acc);
                    }
                }
            }
        }
        let mut lanes = [0f32; TILE];
        // SAFETY: `lanes` holds 16 f32.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
        }
        for (o, v) in out.iter_mut().zip(lanes) {
            o[t] = v;
        }
    }
}

/// Q4K tiles: per 256-value super-block and half tile, the blocks' integer dots
/// scaled by their 6-bit scales (activation sums by their 6-bit mins), unpacked
/// from GGML's 12 bytes per row, then the super-block's `d` and `dmin` once.
///
/// # Safety
/// As [`packed_tile_dots`], with `w` a Q4K tile.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q4k(
    w: Tile<'_>,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]; TILE],
) {
    let nb = acts.blocks_per_row();
    let ones = _mm256_set1_epi16(1);
    let nibbles = _mm256_set1_epi8(0x0F);
    let six = _mm256_set1_epi32(63);
    let four = _mm256_set1_epi32(0x0F);
    let two = _mm256_set1_epi32(3);
    let shift = |v: __m256i, n: u32| _mm256_srlv_epi32(v, _mm256_set1_epi32(n as i32));
    for t in 0..nt {
        let (xq, dx, sx) = acts.token(t0 + t);
        let mut acc = [_mm256_setzero_ps(); 2];
        for s in 0..nb / 8 {
            for (h, acc) in acc.iter_mut().enumerate() {
                // SAFETY: super-block `s < nb / 8` of the tile has 8 blocks of 256 quant
                // bytes at `256 (8 s + j)`, 192 bytes of 6-bit scales at `192 s` and 16 f16
                // `d` and `dmin` at `16 s`; the activation block is 32 bytes at `32 b`.
                unsafe {
                    let g = |k: usize| {
                        _mm256_loadu_si256(
                            w.sub.as_ptr().add(s * 192 + k * 64 + h * 32) as *const __m256i
                        )
                    };
                    let (g0, g1, g2) = (g(0), g(1), g(2));
                    let mut acc_d = _mm256_setzero_ps();
                    let mut acc_m = _mm256_setzero_ps();
                    for j in 0..8 {
                        let b = s * 8 + j;
                        let wb = w.quants.as_ptr().add(b * 256);
                        let x4 = |i: usize| {
                            _mm256_set1_epi32(std::ptr::read_unaligned(
                                xq.as_ptr().add(b * 32 + i) as *const i32
                            ))
                        };
                        let mut isum = _mm256_setzero_si256();
                        for c in 0..4 {
                            let v = _mm256_loadu_si256(wb.add(c * 64 + h * 32) as *const __m256i);
                            let lo = _mm256_and_si256(v, nibbles);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibbles);
                            // 2 x 15 x 127 x 2 fits the i16 pairs.
                            let p16 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, x4(4 * c)),
                                _mm256_maddubs_epi16(hi, x4(16 + 4 * c)),
                            );
                            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, ones));
                        }
                        let (sc, mn) = if j < 4 {
                            let k = 8 * j as u32;
                            (
                                _mm256_and_si256(shift(g0, k), six),
                                _mm256_and_si256(shift(g1, k), six),
                            )
                        } else {
                            let k = 8 * (j - 4) as u32;
                            let top = |g: __m256i| {
                                _mm256_slli_epi32(_mm256_and_si256(shift(g, k + 6), two), 4)
                            };
                            (
                                _mm256_or_si256(_mm256_and_si256(shift(g2, k), four), top(g0)),
                                _mm256_or_si256(_mm256_and_si256(shift(g2, k + 4), four), top(g1)),
                            )
                        };
                        let v = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(dx[b]));
                        acc_d = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sc), v, acc_d);
                        acc_m =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(mn), _mm256_set1_ps(sx[b]), acc_m);
                    }
                    let f16x8 = |p: *const half::f16| {
                        _mm256_cvtph_ps(_mm_loadu_si128(p.add(s * TILE + h * 8) as *const __m128i))
                    };
                    let (d, dmin) = (f16x8(w.scales.as_ptr()), f16x8(w.mins.as_ptr()));
                    *acc = _mm256_fnmadd_ps(dmin, acc_m, _mm256_fmadd_ps(d, acc_d, *acc));
                }
            }
        }
        let mut lanes = [0f32; TILE];
        // SAFETY: `lanes` holds 16 f32.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
        }
        for (o, v) in out.iter_mut().zip(lanes) {
            o[t] = v;
        }
    }
}
