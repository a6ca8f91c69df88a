//! Row kernels: the dot products of one weight row with up to [`MAX_TOKENS`]
//! activation rows, one implementation per instruction set, picked at runtime.
//! [`super::matmul`] spreads rows over threads; everything here is single-threaded.
//!
//! Every path is tested against the portable one and a naive f64 reference
//! (`tests` below), for each instruction set the test machine has.

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

use std::sync::OnceLock;

use half::{bf16, f16};

use super::quant::{PackedMatrix, QuantizedActs, TILE};

/// Activation rows one call handles; a weight row is loaded once for all of them.
pub const MAX_TOKENS: usize = 4;

/// The instruction sets with a kernel, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW + VNNI.
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| *Isa::supported().last().unwrap_or(&Isa::Portable))
    }

    /// Every instruction set this CPU can run, `Portable` first.
    pub fn supported() -> Vec<Isa> {
        let mut out = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                out.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    out.push(Isa::Avx512);
                }
            }
        }
        out
    }
}

/// Whether the CPU has AVX-512 BF16 (`vdpbf16ps`: 32 bf16 products per instruction).
pub fn has_avx512_bf16() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            Isa::best() == Isa::Avx512 && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// bf16 weights times bf16-rounded activations with f32 accumulation (prefill of
/// bf16 models, compute-bound: twice the products per instruction of widening to
/// f32). `out[i][j] = w[rows.start + i] · xb[t0 + j]`, `w: [_, cols]`, `xb: [n, cols]`.
/// Falls back to the portable loop without AVX-512 BF16.
pub fn bf16_rows_dots(
    w: &[bf16],
    cols: usize,
    rows: std::ops::Range<usize>,
    xb: &[bf16],
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]],
) {
    assert!(rows.end * cols <= w.len() && (t0 + nt) * cols <= xb.len() && out.len() >= rows.len());
    assert!(nt <= MAX_TOKENS);
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU has AVX-512 F and BF16 (checked); bounds were asserted above.
        unsafe { x86_avx512::bf16_rows_dots(w, cols, rows, xb, t0, nt, out) };
        return;
    }
    portable::bf16_rows_dots(w, cols, rows, xb, t0, nt, out);
}

/// One row of a dense weight matrix.
#[derive(Debug, Clone, Copy)]
pub enum DenseRow<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl DenseRow<'_> {
    pub fn len(&self) -> usize {
        match self {
            DenseRow::F32(w) => w.len(),
            DenseRow::BF16(w) => w.len(),
            DenseRow::F16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `out[i] = w · x[t0 + i]` for `i < nt`, `x: [n, cols]` row-major.
pub fn dense_row_dots(
    isa: Isa,
    w: DenseRow<'_>,
    x: &[f32],
    t0: usize,
    nt: usize,
    out: &mut [f32; MAX_TOKENS],
) {
    let cols = w.len();
    debug_assert!(nt <= MAX_TOKENS && x.len() >= (t0 + nt) * cols);
    let xs = &x[t0 * cols..(t0 + nt) * cols];
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only produced when the CPU has AVX-512 F/BW/VNNI,
        // and `xs` holds `nt` rows of `cols`.
        Isa::Avx512 => unsafe { x86_avx512::dense_row_dots(w, xs, nt, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU has AVX2/FMA/F16C.
        Isa::Avx2 => unsafe { x86_avx2::dense_row_dots(w, xs, nt, out) },
        _ => portable::dense_row_dots(w, xs, nt, out),
    }
}

/// [`dense_row_dots`] for rows `rows` of a row-major `[_, cols]` matrix:
/// `out[i][j] = w[rows.start + i] · x[t0 + j]`.
pub fn dense_rows_dots(
    isa: Isa,
    w: DenseRows<'_>,
    rows: std::ops::Range<usize>,
    x: &[f32],
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]],
) {
    for (r, o) in rows.zip(out.iter_mut()) {
        dense_row_dots(isa, w.row(r), x, t0, nt, o);
    }
}

/// Rows `rows` of a packed matrix times activation rows `t0..t0 + nt`:
/// `out[i][j] = w[rows.start + i] · dequant(acts[t0 + j])`. Works tile by tile;
/// ranges that start on a tile boundary waste nothing.
pub fn packed_rows_dots(
    isa: Isa,
    w: &PackedMatrix,
    rows: std::ops::Range<usize>,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]],
) {
    assert!(rows.end <= w.rows() && out.len() >= rows.len() && t0 + nt <= acts.n);
    assert!(nt <= MAX_TOKENS);
    assert_eq!(
        w.cols(),
        acts.cols,
        "packed matrix and activations differ in width"
    );
    if rows.is_empty() {
        return;
    }
    let mut tile_out = [[0f32; MAX_TOKENS]; TILE];
    for tile in rows.start / TILE..rows.end.div_ceil(TILE) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512` is only produced when the CPU has AVX-512 F/BW/VNNI;
            // the tile exists and widths and the token range were checked above.
            Isa::Avx512 => unsafe {
                x86_avx512::packed_tile_dots(w, tile, acts, t0, nt, &mut tile_out)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` is only produced when the CPU has AVX2/FMA/F16C; as above.
            Isa::Avx2 => unsafe {
                x86_avx2::packed_tile_dots(w, tile, acts, t0, nt, &mut tile_out)
            },
            _ => portable::packed_tile_dots(w, tile, acts, t0, nt, &mut tile_out),
        }
        let first = tile * TILE;
        for r in first.max(rows.start)..(first + TILE).min(rows.end) {
            out[r - rows.start] = tile_out[r - first];
        }
    }
}

/// `out = silu(gate) * up` (SwiGLU's activation), vectorized with a polynomial
/// `exp` where the CPU has AVX-512 (libm's scalar `expf` was 7 % of prefill).
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if Isa::best() == Isa::Avx512 {
        // SAFETY: `Isa::Avx512` is only produced when the CPU has AVX-512 F; the
        // lengths were checked above.
        unsafe { x86_avx512::silu_mul(gate, up, out) };
        return;
    }
    portable::silu_mul(gate, up, out);
}

/// `e^x` for 16 lanes (AVX-512), shared by the softmax and SwiGLU loops.
#[cfg(target_arch = "x86_64")]
pub use x86_avx512::exp16;

/// A dense row-major `[rows, cols]` weight matrix borrowed from a tensor.
#[derive(Debug, Clone, Copy)]
pub struct DenseRows<'a> {
    pub data: DenseData<'a>,
    pub cols: usize,
}

/// The values of a [`DenseRows`].
#[derive(Debug, Clone, Copy)]
pub enum DenseData<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> DenseRows<'a> {
    pub fn row(self, r: usize) -> DenseRow<'a> {
        let s = r * self.cols..(r + 1) * self.cols;
        match self.data {
            DenseData::F32(w) => DenseRow::F32(&w[s]),
            DenseData::BF16(w) => DenseRow::BF16(&w[s]),
            DenseData::F16(w) => DenseRow::F16(&w[s]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::quant::{PackedFormat, PackedMatrix};

    /// Deterministic values in about [-1, 1] with some large outliers per block.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0;
                if i % 97 == 0 { u * 4.0 } else { u }
            })
            .collect()
    }

    // 35 blocks: an odd count, so no kernel can assume blocks come in pairs.
    const COLS: usize = 35 * 32;

    fn reference(w: &[f32], x: &[f32], cols: usize) -> Vec<f64> {
        x.chunks(cols)
            .map(|xr| xr.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum())
            .collect()
    }

    #[test]
    fn dense_kernels_match_naive_reference_on_every_isa() {
        let w = values(COLS + 7, 1);
        let x = values(5 * (COLS + 7), 2);
        let cols = COLS + 7;
        let expect = reference(&w, &x, cols);
        let bf: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let hf: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let w_bf: Vec<f32> = bf.iter().map(|v| v.to_f32()).collect();
        let w_hf: Vec<f32> = hf.iter().map(|v| v.to_f32()).collect();
        let cases = [
            (DenseRow::F32(&w), reference(&w, &x, cols)),
            (DenseRow::BF16(&bf), reference(&w_bf, &x, cols)),
            (DenseRow::F16(&hf), reference(&w_hf, &x, cols)),
        ];
        assert_eq!(expect, cases[0].1);
        for isa in Isa::supported() {
            for (row, want) in &cases {
                for (t0, nt) in [(0, 4), (4, 1), (1, 3), (2, 2)] {
                    let mut out = [0f32; MAX_TOKENS];
                    dense_row_dots(isa, *row, &x, t0, nt, &mut out);
                    for i in 0..nt {
                        let e = want[t0 + i];
                        assert!(
                            (out[i] as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                            "{isa:?} {row:?}: token {} got {} want {e}",
                            t0 + i,
                            out[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packed_kernels_match_naive_reference_on_every_isa() {
        // Two tiles, the second padded; row ranges on and off tile boundaries.
        let rows = 19;
        let w = values(rows * COLS, 3);
        let x = values(5 * COLS, 4);
        let mut acts = QuantizedActs::default();
        acts.quantize_from(&x, 5, COLS);
        // The integer kernels compute exactly dequant(W) · dequant(x).
        let xd: Vec<f32> = (0..5)
            .flat_map(|t| {
                let (q, d, _) = acts.token(t);
                q.iter()
                    .enumerate()
                    .map(|(i, &v)| v as f32 * d[i / 32])
                    .collect::<Vec<_>>()
            })
            .collect();
        for format in [
            PackedFormat::Q8_0,
            PackedFormat::Q4_0,
            PackedFormat::Q4_1,
            PackedFormat::Q6,
        ] {
            let m = PackedMatrix::quantize(format, &w, rows, COLS).unwrap();
            let wd = m.dequantize();
            for isa in Isa::supported() {
                for range in [0..rows, 3..rows, 16..rows, 5..9] {
                    for (t0, nt) in [(0, 4), (4, 1), (1, 3), (2, 2)] {
                        let mut out = vec![[f32::NAN; MAX_TOKENS]; range.len()];
                        packed_rows_dots(isa, &m, range.clone(), &acts, t0, nt, &mut out);
                        for (r, o) in range.clone().zip(&out) {
                            let wr = &wd[r * COLS..(r + 1) * COLS];
                            let exact = reference(wr, &xd, COLS);
                            let float = reference(&w[r * COLS..(r + 1) * COLS], &x, COLS);
                            for i in 0..nt {
                                let (e, f) = (exact[t0 + i], float[t0 + i]);
                                assert!(
                                    (o[i] as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                                    "{isa:?} {format:?} row {r} token {}: got {} want {e}",
                                    t0 + i,
                                    o[i]
                                );
                                // And the quantization error itself stays small.
                                let tol = match format {
                                    PackedFormat::Q8_0 => 0.02,
                                    PackedFormat::Q4_0 | PackedFormat::Q4_1 | PackedFormat::Q4K => {
                                        0.15
                                    }
                                    PackedFormat::Q6 => 0.05,
                                };
                                let norm = (COLS as f64).sqrt();
                                assert!(
                                    (o[i] as f64 - f).abs() < tol * norm,
                                    "{format:?}: {} vs {f}",
                                    o[i]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn q4k_kernels_match_naive_reference_on_every_isa() {
        // Two tiles (the second padded), 3 super-blocks per row (an odd count), every
        // 6-bit scale and min pattern: the kernels compute dequant(W) · dequant(x).
        let (rows, cols) = (19, 3 * 256);
        let m = PackedMatrix::from_ggml_q4k(
            &crate::ops::quant::ggml_q4k_test_data(rows, cols, 7),
            rows,
            cols,
        )
        .unwrap();
        let wd = m.dequantize();
        let x = values(5 * cols, 8);
        let mut acts = QuantizedActs::default();
        acts.quantize_from(&x, 5, cols);
        let xd: Vec<f32> = (0..5)
            .flat_map(|t| {
                let (q, d, _) = acts.token(t);
                q.iter()
                    .enumerate()
                    .map(|(i, &v)| v as f32 * d[i / 32])
                    .collect::<Vec<_>>()
            })
            .collect();
        for isa in Isa::supported() {
            for range in [0..rows, 3..rows, 16..rows, 5..9] {
                for (t0, nt) in [(0, 4), (4, 1), (1, 3), (2, 2)] {
                    let mut out = vec![[f32::NAN; MAX_TOKENS]; range.len()];
                    packed_rows_dots(isa, &m, range.clone(), &acts, t0, nt, &mut out);
                    for (r, o) in range.clone().zip(&out) {
                        let want = reference(&wd[r * cols..(r + 1) * cols], &xd, cols);
                        for i in 0..nt {
                            let e = want[t0 + i];
                            assert!(
                                (o[i] as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                                "{isa:?} row {r} token {}: got {} want {e}",
                                t0 + i,
                                o[i]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_dot_kernels_match_naive_reference() {
        let cols = COLS + 7;
        let w: Vec<bf16> = values(3 * cols, 5)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let xb: Vec<bf16> = values(5 * cols, 6)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let xf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        for (t0, nt) in [(0, 4), (4, 1), (1, 3), (2, 2)] {
            let mut fast = [[0f32; MAX_TOKENS]; 3];
            let mut slow = [[0f32; MAX_TOKENS]; 3];
            bf16_rows_dots(&w, cols, 0..3, &xb, t0, nt, &mut fast);
            portable::bf16_rows_dots(&w, cols, 0..3, &xb, t0, nt, &mut slow);
            for r in 0..3 {
                let want = reference(&wf[r * cols..(r + 1) * cols], &xf, cols);
                for i in 0..nt {
                    for got in [fast[r][i], slow[r][i]] {
                        let e = want[t0 + i];
                        assert!(
                            (got as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                            "{got} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn portable_path_is_always_available() {
        assert_eq!(Isa::supported()[0], Isa::Portable);
        assert!(Isa::supported().contains(&Isa::best()));
    }

    #[test]
    fn silu_mul_matches_the_scalar_formula() {
        let n = 16 * 5 + 7;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 - 40.0) * 0.37).collect();
        let up = values(n, 9);
        let mut fast = vec![0f32; n];
        let mut slow = vec![0f32; n];
        silu_mul(&gate, &up, &mut fast);
        portable::silu_mul(&gate, &up, &mut slow);
        for (a, b) in fast.iter().zip(&slow) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // Far outside exp's range on both sides: no NaN or infinity.
        let mut out = [0f32; 16];
        silu_mul(&[-1e4; 16], &[1.0; 16], &mut out);
        assert!(out.iter().all(|v| v.abs() < 1e-30));
        silu_mul(&[1e4; 16], &[1.0; 16], &mut out);
        assert!(out.iter().all(|&v| v == 1e4));
    }
}
