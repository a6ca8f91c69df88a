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

use super::quant::{PackedFormat, PackedMatrix, QuantizedActs};

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

/// One row of a packed weight matrix: offset quants and per-block scales.
#[derive(Debug, Clone, Copy)]
pub struct PackedRow<'a> {
    pub format: PackedFormat,
    pub quants: &'a [u8],
    pub scales: &'a [f16],
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

/// `out[i] = w · dequant(acts[t0 + i])` for `i < nt`.
pub fn packed_row_dots(
    isa: Isa,
    w: PackedRow<'_>,
    acts: &QuantizedActs,
    t0: usize,
    nt: usize,
    out: &mut [f32; MAX_TOKENS],
) {
    debug_assert!(nt <= MAX_TOKENS && t0 + nt <= acts.n);
    debug_assert_eq!(w.scales.len(), acts.blocks_per_row());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only produced when the CPU has AVX-512 F/BW/VNNI;
        // row and activation lengths agree (checked above in debug, by construction in
        // `matmul`).
        Isa::Avx512 => unsafe { x86_avx512::packed_row_dots(w, acts, t0, nt, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced when the CPU has AVX2/FMA/F16C.
        Isa::Avx2 => unsafe { x86_avx2::packed_row_dots(w, acts, t0, nt, out) },
        _ => portable::packed_row_dots(w, acts, t0, nt, out),
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

/// [`packed_row_dots`] for rows `rows` of a packed matrix:
/// `out[i][j] = w[rows.start + i] · acts[t0 + j]`.
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
    assert_eq!(
        w.cols(),
        acts.cols,
        "packed matrix and activations differ in width"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only produced when the CPU has AVX-512 F/BW/VNNI;
        // rows, widths and token range were checked above.
        Isa::Avx512 => unsafe { x86_avx512::packed_rows_dots(w, rows, acts, t0, nt, out) },
        _ => {
            for (r, o) in rows.zip(out.iter_mut()) {
                packed_row_dots(isa, w.row(r), acts, t0, nt, o);
            }
        }
    }
}

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

/// Block `b` (of `nb`) of a packed row as 32 offset values.
pub fn unpack_block(w: &PackedRow<'_>, b: usize, q: &mut [u8; 32]) {
    let nb = w.scales.len();
    match w.format {
        PackedFormat::Q8_0 => q.copy_from_slice(&w.quants[b * 32..(b + 1) * 32]),
        PackedFormat::Q4_0 if b == nb - 1 && nb % 2 == 1 => {
            let src = &w.quants[b * 16..b * 16 + 16];
            for j in 0..16 {
                q[j] = src[j] & 0x0F;
                q[16 + j] = src[j] >> 4;
            }
        }
        PackedFormat::Q4_0 => {
            let src = &w.quants[(b / 2) * 32..(b / 2) * 32 + 32];
            let shift = 4 * (b % 2);
            for j in 0..32 {
                q[j] = (src[j] >> shift) & 0x0F;
            }
        }
    }
}

/// Block `b`'s contribution to a packed dot product: `d_w * (d_x * Σ q_w q_x - off * s_x)`
/// with `q_w` still offset; shared by the portable kernel and the SIMD kernels' tails.
#[inline]
pub(crate) fn packed_block_dot(w: &PackedRow<'_>, b: usize, xq: &[i8], dx: f32, sx: f32) -> f32 {
    let mut q = [0u8; 32];
    unpack_block(w, b, &mut q);
    let isum: i32 = q
        .iter()
        .zip(&xq[b * 32..(b + 1) * 32])
        .map(|(&a, &c)| a as i32 * c as i32)
        .sum();
    w.scales[b].to_f32() * (dx * isum as f32 - w.format.offset() as f32 * sx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::quant::PackedMatrix;

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

    // 35 blocks: two full 16-block groups, a pair and an unpaired tail block.
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
        let rows = 3;
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
        for format in [PackedFormat::Q8_0, PackedFormat::Q4_0] {
            let m = PackedMatrix::quantize(format, &w, rows, COLS).unwrap();
            let wd = m.dequantize();
            for r in 0..rows {
                let row = m.row(r);
                let wr = &wd[r * COLS..(r + 1) * COLS];
                let exact = reference(wr, &xd, COLS);
                let float = reference(&w[r * COLS..(r + 1) * COLS], &x, COLS);
                for isa in Isa::supported() {
                    for (t0, nt) in [(0, 4), (4, 1), (1, 3), (2, 2)] {
                        let mut out = [0f32; MAX_TOKENS];
                        packed_row_dots(isa, row, &acts, t0, nt, &mut out);
                        for i in 0..nt {
                            let (e, f) = (exact[t0 + i], float[t0 + i]);
                            assert!(
                                (out[i] as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                                "{isa:?} {format:?} row {r} token {}: got {} want {e}",
                                t0 + i,
                                out[i]
                            );
                            // And the quantization error itself stays small.
                            let tol = match format {
                                PackedFormat::Q8_0 => 0.02,
                                PackedFormat::Q4_0 => 0.15,
                            };
                            let norm = (COLS as f64).sqrt();
                            assert!(
                                (out[i] as f64 - f).abs() < tol * norm,
                                "{format:?}: {} vs {f}",
                                out[i]
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
}
