//! AVX-512 kernels. Packed tiles: 16 rows at once, a row per 32-bit lane, so
//! `vpdpbusd` needs no horizontal sums and a block's 16 scales are one vector;
//! the weights' unsigned offset is removed per block via the activations' sums.
//! Dense rows: bf16/f16 widened to f32 in registers, then FMA.

// Accumulator arrays are indexed in step with token rows; index loops read clearer.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{DenseRow, MAX_TOKENS};
use crate::ops::quant::{PackedFormat, PackedMatrix, QuantizedActs, TILE, Tile};

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
/// The CPU must support AVX-512 F/BW/VNNI; `tile < w.tiles()`, `w.cols() == acts.cols`
/// and `t0 + nt <= acts.n`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn packed_tile_dots(
    w: &PackedMatrix,
    tile: usize,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]; TILE],
) {
    let w_tile = w.tile(tile);
    // SAFETY (all arms): forwarded caller guarantees.
    unsafe {
        match (w.format(), nt) {
            (PackedFormat::Q8_0, 1) => tile_n::<1, false, false>(w_tile, acts, t0, out),
            (PackedFormat::Q8_0, 2) => tile_n::<2, false, false>(w_tile, acts, t0, out),
            (PackedFormat::Q8_0, 3) => tile_n::<3, false, false>(w_tile, acts, t0, out),
            (PackedFormat::Q8_0, _) => tile_n::<4, false, false>(w_tile, acts, t0, out),
            (PackedFormat::Q4_0, 1) => tile_n::<1, true, false>(w_tile, acts, t0, out),
            (PackedFormat::Q4_0, 2) => tile_n::<2, true, false>(w_tile, acts, t0, out),
            (PackedFormat::Q4_0, 3) => tile_n::<3, true, false>(w_tile, acts, t0, out),
            (PackedFormat::Q4_0, _) => tile_n::<4, true, false>(w_tile, acts, t0, out),
            (PackedFormat::Q4_1, 1) => tile_n::<1, true, true>(w_tile, acts, t0, out),
            (PackedFormat::Q4_1, 2) => tile_n::<2, true, true>(w_tile, acts, t0, out),
            (PackedFormat::Q4_1, 3) => tile_n::<3, true, true>(w_tile, acts, t0, out),
            (PackedFormat::Q4_1, _) => tile_n::<4, true, true>(w_tile, acts, t0, out),
            (PackedFormat::Q6, 1) => tile_q6::<1>(w_tile, acts, t0, out),
            (PackedFormat::Q6, 2) => tile_q6::<2>(w_tile, acts, t0, out),
            (PackedFormat::Q6, 3) => tile_q6::<3>(w_tile, acts, t0, out),
            (PackedFormat::Q6, _) => tile_q6::<4>(w_tile, acts, t0, out),
            (PackedFormat::Q4K, 1) => tile_q4k::<1>(w_tile, acts, t0, out),
            (PackedFormat::Q4K, 2) => tile_q4k::<2>(w_tile, acts, t0, out),
            (PackedFormat::Q4K, 3) => tile_q4k::<3>(w_tile, acts, t0, out),
            (PackedFormat::Q4K, _) => tile_q4k::<4>(w_tile, acts, t0, out),
        }
    }
}

/// One tile (16 rows, a row per lane) times `NT` activation rows. Per block and
/// token: 8 `vpdpbusd` on broadcast 4-byte activation groups, split over two
/// accumulators to halve the dependency chain, then one convert and two FMAs that
/// apply the 16 rows' scales and remove the unsigned offset (`MIN`: add the 16
/// rows' mins times the activations' block sums instead).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_n<const NT: usize, const Q4: bool, const MIN: bool>(
    w: Tile<'_>,
    acts: &QuantizedActs,
    t0: usize,
    out: &mut [[f32; MAX_TOKENS]; TILE],
) {
    let nb = acts.blocks_per_row();
    let cols = acts.cols;
    let off = match (Q4, MIN) {
        (_, true) => 0.0f32,
        (true, false) => 8.0,
        (false, false) => 128.0,
    };
    let bb = if Q4 { 256 } else { 512 };
    let nibbles = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); NT];
    let (wq, ws, wm) = (w.quants.as_ptr(), w.scales.as_ptr(), w.mins.as_ptr());
    let (xq, xd, xs) = (
        acts.quants.as_ptr(),
        acts.scales.as_ptr(),
        acts.sums.as_ptr(),
    );
    // SAFETY: block `b < nb` of the tile is `bb` bytes at `b * bb` and 16 f16 scales (and
    // mins, for `MIN` formats) at `16b`; each activation row `t0 + t < acts.n` has 32 bytes, a scale and a sum per block.
    unsafe {
        let x4 = |t: usize, b: usize, i: usize| {
            _mm512_set1_epi32(std::ptr::read_unaligned(
                xq.add((t0 + t) * cols + b * 32 + i) as *const i32,
            ))
        };
        for b in 0..nb {
            let wb = wq.add(b * bb);
            let mut s0 = [_mm512_setzero_si512(); NT];
            let mut s1 = [_mm512_setzero_si512(); NT];
            if Q4 {
                for c in 0..4 {
                    let v = _mm512_loadu_si512(wb.add(c * 64) as *const __m512i);
                    let lo = _mm512_and_si512(v, nibbles);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibbles);
                    for t in 0..NT {
                        s0[t] = _mm512_dpbusd_epi32(s0[t], lo, x4(t, b, 4 * c));
                        s1[t] = _mm512_dpbusd_epi32(s1[t], hi, x4(t, b, 16 + 4 * c));
                    }
                }
            } else {
                for k in 0..4 {
                    let v0 = _mm512_loadu_si512(wb.add(k * 64) as *const __m512i);
                    let v1 = _mm512_loadu_si512(wb.add((k + 4) * 64) as *const __m512i);
                    for t in 0..NT {
                        s0[t] = _mm512_dpbusd_epi32(s0[t], v0, x4(t, b, 4 * k));
                        s1[t] = _mm512_dpbusd_epi32(s1[t], v1, x4(t, b, 16 + 4 * k));
                    }
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(ws.add(b * TILE) as *const __m256i));
            let dm = if MIN {
                _mm512_cvtph_ps(_mm256_loadu_si256(wm.add(b * TILE) as *const __m256i))
            } else {
                _mm512_setzero_ps()
            };
            for t in 0..NT {
                let i = (t0 + t) * nb + b;
                let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[t], s1[t]));
                let dx = _mm512_set1_ps(*xd.add(i));
                if MIN {
                    acc[t] = _mm512_fmadd_ps(dw, _mm512_mul_ps(isum, dx), acc[t]);
                    acc[t] = _mm512_fmadd_ps(dm, _mm512_set1_ps(*xs.add(i)), acc[t]);
                } else {
                    let v = _mm512_fmsub_ps(isum, dx, _mm512_set1_ps(off * *xs.add(i)));
                    acc[t] = _mm512_fmadd_ps(dw, v, acc[t]);
                }
            }
        }
        for t in 0..NT {
            let mut lanes = [0f32; TILE];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[t]);
            for (o, v) in out.iter_mut().zip(lanes) {
                o[t] = v;
            }
        }
    }
}

/// [`tile_n`] for Q6 blocks: the 6-bit values are rebuilt from their nibble and
/// their 2-bit group (moved to bits 4-5 by a 16-bit shift, whose spill into the
/// neighbouring byte the mask removes), and the block's two 16-value halves keep
/// their own accumulators, scales and offset sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_q6<const NT: usize>(
    w: Tile<'_>,
    acts: &QuantizedActs,
    t0: usize,
    out: &mut [[f32; MAX_TOKENS]; TILE],
) {
    let nb = acts.blocks_per_row();
    let cols = acts.cols;
    let nibbles = _mm512_set1_epi8(0x0F);
    let top = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); NT];
    let (wq, ws, wh) = (w.quants.as_ptr(), w.scales.as_ptr(), w.scales_hi.as_ptr());
    let (xq, xd) = (acts.quants.as_ptr(), acts.scales.as_ptr());
    let (xs, xl) = (acts.sums.as_ptr(), acts.sums_lo.as_ptr());
    // Bits `2c..2c + 2` of each byte of `h`, moved to bits 4-5.
    let high = |h: __m512i, c: usize| {
        let moved = match c {
            0 => _mm512_slli_epi16::<4>(h),
            1 => _mm512_slli_epi16::<2>(h),
            2 => h,
            _ => _mm512_srli_epi16::<2>(h),
        };
        _mm512_and_si512(moved, top)
    };
    // SAFETY: block `b < nb` of the tile is 384 bytes at `384 b` and 16 f16 scales of
    // each half at `16 b`; each activation row `t0 + t < acts.n` has 32 bytes, a scale
    // and two sums per block.
    unsafe {
        let x4 = |t: usize, b: usize, i: usize| {
            _mm512_set1_epi32(std::ptr::read_unaligned(
                xq.add((t0 + t) * cols + b * 32 + i) as *const i32,
            ))
        };
        for b in 0..nb {
            let wb = wq.add(b * 384);
            let h0 = _mm512_loadu_si512(wb.add(256) as *const __m512i);
            let h1 = _mm512_loadu_si512(wb.add(320) as *const __m512i);
            let mut s0 = [_mm512_setzero_si512(); NT];
            let mut s1 = [_mm512_setzero_si512(); NT];
            for c in 0..4 {
                let v = _mm512_loadu_si512(wb.add(c * 64) as *const __m512i);
                let lo = _mm512_or_si512(_mm512_and_si512(v, nibbles), high(h0, c));
                let hi = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibbles),
                    high(h1, c),
                );
                for t in 0..NT {
                    s0[t] = _mm512_dpbusd_epi32(s0[t], lo, x4(t, b, 4 * c));
                    s1[t] = _mm512_dpbusd_epi32(s1[t], hi, x4(t, b, 16 + 4 * c));
                }
            }
            let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(ws.add(b * TILE) as *const __m256i));
            let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(wh.add(b * TILE) as *const __m256i));
            for t in 0..NT {
                let i = (t0 + t) * nb + b;
                let dx = _mm512_set1_ps(*xd.add(i));
                let (lo_sum, sum) = (*xl.add(i), *xs.add(i));
                let v0 =
                    _mm512_fmsub_ps(_mm512_cvtepi32_ps(s0[t]), dx, _mm512_set1_ps(32.0 * lo_sum));
                let v1 = _mm512_fmsub_ps(
                    _mm512_cvtepi32_ps(s1[t]),
                    dx,
                    _mm512_set1_ps(32.0 * (sum - lo_sum)),
                );
                acc[t] = _mm512_fmadd_ps(d1, v1, _mm512_fmadd_ps(d0, v0, acc[t]));
            }
        }
        for t in 0..NT {
            let mut lanes = [0f32; TILE];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[t]);
            for (o, v) in out.iter_mut().zip(lanes) {
                o[t] = v;
            }
        }
    }
}

/// [`tile_n`] for Q4K: per 256-value super-block, each block's integer dots are
/// scaled by its 16 rows' 6-bit scales (and its activation sums by their 6-bit
/// mins), unpacked from GGML's 12 bytes per row with shifts and masks, and the
/// super-block's f16 `d` and `dmin` are applied once to both sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_q4k<const NT: usize>(
    w: Tile<'_>,
    acts: &QuantizedActs,
    t0: usize,
    out: &mut [[f32; MAX_TOKENS]; TILE],
) {
    let nb = acts.blocks_per_row();
    let cols = acts.cols;
    let nibbles = _mm512_set1_epi8(0x0F);
    let six = _mm512_set1_epi32(63);
    let four = _mm512_set1_epi32(0x0F);
    let two = _mm512_set1_epi32(3);
    let mut acc = [_mm512_setzero_ps(); NT];
    let (wq, ws, wm, sub) = (
        w.quants.as_ptr(),
        w.scales.as_ptr(),
        w.mins.as_ptr(),
        w.sub.as_ptr(),
    );
    let (xq, xd, xs) = (
        acts.quants.as_ptr(),
        acts.scales.as_ptr(),
        acts.sums.as_ptr(),
    );
    let shift = |v: __m512i, n: u32| _mm512_srlv_epi32(v, _mm512_set1_epi32(n as i32));
    // SAFETY: super-block `s < nb / 8` of the tile has 8 blocks of 256 quant bytes at
    // `256 (8 s + j)`, 192 bytes of 6-bit scales at `192 s` and 16 f16 `d` and `dmin` at
    // `16 s`; each activation row `t0 + t < acts.n` has 32 bytes, a scale and a sum per block.
    unsafe {
        let x4 = |t: usize, b: usize, i: usize| {
            _mm512_set1_epi32(std::ptr::read_unaligned(
                xq.add((t0 + t) * cols + b * 32 + i) as *const i32,
            ))
        };
        for s in 0..nb / 8 {
            let g = |k: usize| _mm512_loadu_si512(sub.add(s * 192 + k * 64) as *const __m512i);
            let (g0, g1, g2) = (g(0), g(1), g(2));
            let mut acc_d = [_mm512_setzero_ps(); NT];
            let mut acc_m = [_mm512_setzero_ps(); NT];
            for j in 0..8 {
                let b = s * 8 + j;
                let wb = wq.add(b * 256);
                let mut s0 = [_mm512_setzero_si512(); NT];
                let mut s1 = [_mm512_setzero_si512(); NT];
                for c in 0..4 {
                    let v = _mm512_loadu_si512(wb.add(c * 64) as *const __m512i);
                    let lo = _mm512_and_si512(v, nibbles);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibbles);
                    for t in 0..NT {
                        s0[t] = _mm512_dpbusd_epi32(s0[t], lo, x4(t, b, 4 * c));
                        s1[t] = _mm512_dpbusd_epi32(s1[t], hi, x4(t, b, 16 + 4 * c));
                    }
                }
                // Byte `j % 4` of each lane's group word (see `q4k_scale_min`).
                let (sc, mn) = if j < 4 {
                    let k = 8 * j as u32;
                    (
                        _mm512_and_si512(shift(g0, k), six),
                        _mm512_and_si512(shift(g1, k), six),
                    )
                } else {
                    let k = 8 * (j - 4) as u32;
                    let top =
                        |g: __m512i| _mm512_slli_epi32(_mm512_and_si512(shift(g, k + 6), two), 4);
                    (
                        _mm512_or_si512(_mm512_and_si512(shift(g2, k), four), top(g0)),
                        _mm512_or_si512(_mm512_and_si512(shift(g2, k + 4), four), top(g1)),
                    )
                };
                let (sc, mn) = (_mm512_cvtepi32_ps(sc), _mm512_cvtepi32_ps(mn));
                for t in 0..NT {
                    let i = (t0 + t) * nb + b;
                    let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[t], s1[t]));
                    let v = _mm512_mul_ps(isum, _mm512_set1_ps(*xd.add(i)));
                    acc_d[t] = _mm512_fmadd_ps(sc, v, acc_d[t]);
                    acc_m[t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(*xs.add(i)), acc_m[t]);
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(ws.add(s * TILE) as *const __m256i));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(wm.add(s * TILE) as *const __m256i));
            for t in 0..NT {
                acc[t] = _mm512_fnmadd_ps(dmin, acc_m[t], _mm512_fmadd_ps(d, acc_d[t], acc[t]));
            }
        }
        for t in 0..NT {
            let mut lanes = [0f32; TILE];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[t]);
            for (o, v) in out.iter_mut().zip(lanes) {
                o[t] = v;
            }
        }
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

/// `e^x` for 16 lanes: `2^n e^f` with `n = round(x log2 e)` and `f` in
/// [-ln2/2, ln2/2] by a degree-6 polynomial; relative error < 2e-7. `x` is
/// clamped to [-87, 88], inside f32's normal range.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let f = _mm512_fnmadd_ps(
        n,
        _mm512_set1_ps(1.428_606_8e-6),
        _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x),
    );
    let c = [
        1.0f32,
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
    ];
    let mut y = _mm512_set1_ps(c[6]);
    for k in (0..6).rev() {
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(c[k]));
    }
    _mm512_scalef_ps(y, n)
}

/// `out = silu(gate) * up`.
///
/// # Safety
/// The CPU must support AVX-512 F; the three slices have the same length.
#[target_feature(enable = "avx512f")]
pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let main = out.len() / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    for i in (0..main).step_by(16) {
        // SAFETY: `i + 16 <= main <= len` of all three.
        unsafe {
            let g = _mm512_loadu_ps(gate.as_ptr().add(i));
            let u = _mm512_loadu_ps(up.as_ptr().add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let h = _mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(one, e));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), h);
        }
    }
    super::portable::silu_mul(&gate[main..], &up[main..], &mut out[main..]);
}
