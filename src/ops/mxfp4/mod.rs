//! MXFP4 weights (OCP microscaling FP4, as gpt-oss ships its experts): blocks of
//! 32 E2M1 values (sign, 2-bit exponent, 1-bit mantissa: ±{0, 0.5, 1, 1.5, 2, 3,
//! 4, 6}) sharing one E8M0 scale `2^(e - 127)`, 4.25 bits per weight, read by
//! our kernels as stored, never expanded to floats.
//!
//! Tiles as in [`super::quant`]: for each block, 16 rows side by side, lane `r`
//! of 64-byte group `c` holding the codes of elements `4c..4c + 4` (low nibbles)
//! and `16 + 4c..16 + 4c + 4` (high nibbles) of row `r`, then the block's 16
//! exponent bytes. The kernels map a code to `2 * value + 12` (an unsigned byte,
//! 0..24, by one byte shuffle) for the unsigned x signed integer dot products,
//! remove the offset 12 through the activations' block sums, and halve at the end.
//!
//! Cost per token: `rows * cols * 17 / 32` bytes read, as the Hub file stores them.

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

use super::aligned::AlignedVec;
use super::kernels::{Isa, MAX_TOKENS};
use super::quant::{BLOCK, QuantizedActs, TILE};
use crate::error::{Error, Result};

/// Bytes of one row's block of 32 codes.
const BLOCK_BYTES: usize = BLOCK / 2;

/// E2M1 code -> twice its value (every FP4 value is a multiple of 0.5).
pub const FP4_DOUBLED: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// [`FP4_DOUBLED`] plus this is unsigned (`vpdpbusd` / `vpmaddubsw` operand).
const CODE_OFFSET: i32 = 12;

/// E2M1 code -> `2 * value + 12`, the byte table the SIMD shuffles use.
const FP4_UNSIGNED: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (FP4_DOUBLED[i] as i32 + CODE_OFFSET) as u8;
        i += 1;
    }
    t
};

/// `2^(e - 127)` exactly, `e = 0` included (a subnormal); `e = 255` (NaN in the
/// OCP spec) reads as infinity.
pub fn e8m0_to_f32(e: u8) -> f32 {
    if e == 0 {
        f32::from_bits(0x0040_0000)
    } else {
        f32::from_bits((e as u32) << 23)
    }
}

/// A `[rows, cols]` MXFP4 matrix in the tile layout; `cols` is a multiple of 32.
/// Rows are padded to whole tiles with zero codes.
#[derive(Clone)]
pub struct Mxfp4Matrix {
    rows: usize,
    cols: usize,
    quants: AlignedVec<u8>, // [tiles, blocks, TILE * 16]
    exps: AlignedVec<u8>,   // [tiles, blocks, TILE]
}

impl std::fmt::Debug for Mxfp4Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mxfp4Matrix([{}, {}])", self.rows, self.cols)
    }
}

/// One tile of an [`Mxfp4Matrix`], as the kernels read it.
#[derive(Debug, Clone, Copy)]
pub struct Mxfp4Tile<'a> {
    /// `[blocks, TILE * 16]`
    pub quants: &'a [u8],
    /// `[blocks, TILE]`
    pub exps: &'a [u8],
}

impl Mxfp4Matrix {
    /// A `[rows, cols]` matrix of zero codes, for [`Mxfp4Matrix::buffers_mut`]
    /// to fill.
    pub fn empty(rows: usize, cols: usize) -> Result<Self> {
        Self::zeroed(rows, cols)
    }

    /// Codes and exponents as their aligned, zero-padded bytes: what a packed
    /// expert file stores (see [`crate::ops::quant::PackedMatrix::buffers`]).
    pub fn buffers(&self) -> [&[u8]; 2] {
        [self.quants.padded_bytes(), self.exps.padded_bytes()]
    }

    /// The same, writable, for a read straight into the kernels' buffers.
    pub fn buffers_mut(&mut self) -> [&mut [u8]; 2] {
        [self.quants.padded_bytes_mut(), self.exps.padded_bytes_mut()]
    }

    fn zeroed(rows: usize, cols: usize) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(Error::InvalidInput(format!(
                "an MXFP4 matrix needs a width that is a positive multiple of {BLOCK}, got [{rows}, {cols}]"
            )));
        }
        let blocks = rows.div_ceil(TILE) * (cols / BLOCK);
        Ok(Self {
            rows,
            cols,
            quants: AlignedVec::zeroed(blocks * TILE * BLOCK_BYTES),
            exps: AlignedVec::zeroed(blocks * TILE),
        })
    }

    /// From the Hub's tensors: `blocks` `[rows, cols / 32, 16]` (byte `j` holds
    /// element `2j` in its low nibble and `2j + 1` in its high one) and `scales`
    /// `[rows, cols / 32]` (E8M0 exponents), as `*_blocks` / `*_scales` U8 tensors.
    pub fn from_hub(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let mut m = Self::zeroed(rows, cols)?;
        let nb = cols / BLOCK;
        check_len(
            "MXFP4 blocks",
            blocks.len(),
            rows * nb * BLOCK_BYTES,
            rows,
            cols,
        )?;
        check_len("MXFP4 scales", scales.len(), rows * nb, rows, cols)?;
        let mut codes = [0u8; BLOCK];
        for (i, (blk, &e)) in blocks.chunks_exact(BLOCK_BYTES).zip(scales).enumerate() {
            for (j, &byte) in blk.iter().enumerate() {
                codes[2 * j] = byte & 0x0F;
                codes[2 * j + 1] = byte >> 4;
            }
            m.store_block(i / nb, i % nb, &codes, e);
        }
        Ok(m)
    }

    /// From GGML `block_mxfp4` data (17 bytes per 32 values: the E8M0 exponent,
    /// then 16 bytes with element `j` in the low nibble and `j + 16` in the high),
    /// as a GGUF file stores it.
    pub fn from_ggml(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let mut m = Self::zeroed(rows, cols)?;
        let nb = cols / BLOCK;
        check_len(
            "MXFP4 data",
            data.len(),
            rows * nb * (1 + BLOCK_BYTES),
            rows,
            cols,
        )?;
        let mut codes = [0u8; BLOCK];
        for (i, blk) in data.chunks_exact(1 + BLOCK_BYTES).enumerate() {
            for (j, &byte) in blk[1..].iter().enumerate() {
                codes[j] = byte & 0x0F;
                codes[16 + j] = byte >> 4;
            }
            m.store_block(i / nb, i % nb, &codes, blk[0]);
        }
        Ok(m)
    }

    /// Byte and exponent offsets of row `r`'s block `b`: `(tile block, lane)`.
    fn locate(&self, r: usize, b: usize) -> (usize, usize) {
        ((r / TILE) * (self.cols / BLOCK) + b, r % TILE)
    }

    /// Writes row `r`'s block `b` from 32 codes in natural order.
    fn store_block(&mut self, r: usize, b: usize, codes: &[u8; BLOCK], e: u8) {
        let (tb, lane) = self.locate(r, b);
        self.exps[tb * TILE + lane] = e;
        let bytes = &mut self.quants[tb * TILE * BLOCK_BYTES..];
        for c in 0..4 {
            for i in 0..4 {
                bytes[c * 64 + lane * 4 + i] = codes[4 * c + i] | (codes[16 + 4 * c + i] << 4);
            }
        }
    }

    /// Row `r`'s block `b`: its 32 codes in natural order and its exponent.
    pub fn block(&self, r: usize, b: usize, codes: &mut [u8; BLOCK]) -> u8 {
        let (tb, lane) = self.locate(r, b);
        let bytes = &self.quants[tb * TILE * BLOCK_BYTES..];
        for c in 0..4 {
            for i in 0..4 {
                let v = bytes[c * 64 + lane * 4 + i];
                codes[4 * c + i] = v & 0x0F;
                codes[16 + 4 * c + i] = v >> 4;
            }
        }
        self.exps[tb * TILE + lane]
    }

    pub fn tile(&self, t: usize) -> Mxfp4Tile<'_> {
        let nb = self.cols / BLOCK;
        let q = nb * TILE * BLOCK_BYTES;
        Mxfp4Tile {
            quants: &self.quants[t * q..(t + 1) * q],
            exps: &self.exps[t * nb * TILE..(t + 1) * nb * TILE],
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes a matrix-vector product reads: codes and exponents.
    pub fn bytes(&self) -> usize {
        self.quants.len() + self.exps.len()
    }

    /// Row-major f32 `[rows, cols]` (for `dense_f32` and tests; inference never does this).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        let mut codes = [0u8; BLOCK];
        for r in 0..self.rows {
            for b in 0..self.cols / BLOCK {
                let d = e8m0_to_f32(self.block(r, b, &mut codes)) * 0.5;
                out.extend(codes.iter().map(|&c| FP4_DOUBLED[c as usize] as f32 * d));
            }
        }
        out
    }
}

fn check_len(what: &str, len: usize, want: usize, rows: usize, cols: usize) -> Result<()> {
    if len != want {
        return Err(Error::InvalidInput(format!(
            "{what} of {len} bytes do not hold a [{rows}, {cols}] matrix ({want} bytes)"
        )));
    }
    Ok(())
}

/// Rows `rows` of an MXFP4 matrix times activation rows `t0..t0 + nt`:
/// `out[i][j] = w[rows.start + i] · dequant(acts[t0 + j])`, tile by tile.
pub fn mxfp4_rows_dots(
    isa: Isa,
    w: &Mxfp4Matrix,
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
        "MXFP4 matrix and activations differ in width"
    );
    if rows.is_empty() {
        return;
    }
    let mut tile_out = [[0f32; MAX_TOKENS]; TILE];
    for tile in rows.start / TILE..rows.end.div_ceil(TILE) {
        let t = w.tile(tile);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512` is only produced when the CPU has AVX-512 F/BW/VNNI;
            // the tile exists, and the widths and token range were checked above.
            Isa::Avx512 => unsafe { x86_avx512::tile_dots(t, acts, t0, nt, &mut tile_out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` is only produced when the CPU has AVX2/FMA/F16C; as above.
            Isa::Avx2 => unsafe { x86_avx2::tile_dots(t, acts, t0, nt, &mut tile_out) },
            _ => portable::tile_dots(t, acts, t0, nt, &mut tile_out),
        }
        let first = tile * TILE;
        for r in first.max(rows.start)..(first + TILE).min(rows.end) {
            out[r - rows.start] = tile_out[r - first];
        }
    }
}

/// Rows `rows` of an MXFP4 matrix times f32 activation rows `t0..t0 + nt` of
/// `x: [n, cols]`: each block's codes are decoded to their exact values in
/// registers (never stored), so the product is the one transformers computes on
/// the dequantized weights, without the Q8 rounding of the activations.
pub fn mxfp4_rows_dots_f32(
    w: &Mxfp4Matrix,
    rows: std::ops::Range<usize>,
    x: &[f32],
    t0: usize,
    nt: usize,
    out: &mut [[f32; MAX_TOKENS]],
) {
    let cols = w.cols();
    assert!(rows.end <= w.rows() && out.len() >= rows.len() && nt <= MAX_TOKENS);
    assert!((t0 + nt) * cols <= x.len());
    let mut codes = [0u8; BLOCK];
    let mut values = [0f32; BLOCK];
    for (r, o) in rows.zip(out.iter_mut()) {
        let mut acc = [0f32; MAX_TOKENS];
        for b in 0..cols / BLOCK {
            let d = e8m0_to_f32(w.block(r, b, &mut codes)) * 0.5;
            for (v, &c) in values.iter_mut().zip(&codes) {
                *v = f32::from(FP4_DOUBLED[c as usize]) * d;
            }
            for (i, a) in acc.iter_mut().enumerate().take(nt) {
                let xs = &x[(t0 + i) * cols + b * BLOCK..][..BLOCK];
                *a += values.iter().zip(xs).map(|(v, x)| v * x).sum::<f32>();
            }
        }
        o[..nt].copy_from_slice(&acc[..nt]);
    }
}

/// The f32-activation row kernel of an MXFP4 matrix, for [`super::matmul::run_jobs`].
pub fn mxfp4_dots_f32<'a>(
    w: &'a Mxfp4Matrix,
    x: &'a [f32],
) -> impl Fn(std::ops::Range<usize>, usize, usize, &mut [[f32; MAX_TOKENS]]) + Sync + 'a {
    move |rows, t0, nt, out| mxfp4_rows_dots_f32(w, rows, x, t0, nt, out)
}

/// The row kernel of an MXFP4 matrix, for [`super::matmul::run_jobs`].
pub fn mxfp4_dots<'a>(
    isa: Isa,
    w: &'a Mxfp4Matrix,
    acts: &'a QuantizedActs,
) -> impl Fn(std::ops::Range<usize>, usize, usize, &mut [[f32; MAX_TOKENS]]) + Sync + 'a {
    move |rows, t0, nt, out| mxfp4_rows_dots(isa, w, rows, acts, t0, nt, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes from a seed.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    /// Hub-layout tensors of a random `[rows, cols]` matrix: every code, and
    /// exponents around 2^0 with one `e = 0` and one large exponent.
    fn hub_tensors(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let nb = cols / BLOCK;
        let blocks = bytes(rows * nb * 16, seed);
        let mut scales: Vec<u8> = bytes(rows * nb, seed + 1)
            .iter()
            .map(|&b| 120 + b % 12)
            .collect();
        scales[1] = 0;
        scales[2] = 140;
        (blocks, scales)
    }

    #[test]
    fn hub_layout_decodes_as_transformers_does() {
        // transformers' convert_moe_packed_tensors: low nibble -> element 2j, high ->
        // 2j + 1, value FP4_VALUES[code] * 2^(scale - 127).
        let mut blocks = vec![0u8; 16];
        blocks[0] = 0x1F; // elements 0 (code 0xF: -6) and 1 (code 1: +0.5)
        blocks[15] = 0x72; // elements 30 (code 2: +1) and 31 (code 7: +6)
        let m = Mxfp4Matrix::from_hub(&blocks, &[128], 1, 32).unwrap();
        let w = m.dequantize();
        assert_eq!((w[0], w[1], w[30], w[31]), (-12.0, 1.0, 2.0, 12.0));
        assert!(w[2..30].iter().all(|&v| v == 0.0));
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
    }

    #[test]
    fn ggml_and_hub_layouts_hold_the_same_matrix() {
        let (rows, cols) = (19, 96);
        let (blocks, scales) = hub_tensors(rows, cols, 7);
        let hub = Mxfp4Matrix::from_hub(&blocks, &scales, rows, cols).unwrap();
        // GGML's block_mxfp4 written from the same codes: e, then j | (j + 16) << 4.
        let mut ggml = Vec::new();
        let mut codes = [0u8; BLOCK];
        for r in 0..rows {
            for b in 0..cols / BLOCK {
                ggml.push(hub.block(r, b, &mut codes));
                ggml.extend((0..16).map(|j| codes[j] | (codes[16 + j] << 4)));
            }
        }
        let from_ggml = Mxfp4Matrix::from_ggml(&ggml, rows, cols).unwrap();
        assert_eq!(from_ggml.dequantize(), hub.dequantize());
        assert_eq!(hub.bytes(), 2 * 3 * 16 * 17); // two tiles of 3 blocks
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert!(Mxfp4Matrix::from_hub(&[0; 16], &[0], 1, 40).is_err());
        assert!(Mxfp4Matrix::from_hub(&[0; 15], &[0], 1, 32).is_err());
        assert!(Mxfp4Matrix::from_hub(&[0; 16], &[0, 0], 1, 32).is_err());
        assert!(Mxfp4Matrix::from_ggml(&[0; 16], 1, 32).is_err());
    }

    fn reference(w: &[f32], x: &[f32], cols: usize) -> Vec<f64> {
        x.chunks(cols)
            .map(|xr| xr.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum())
            .collect()
    }

    #[test]
    fn f32_activation_kernel_is_the_dequantized_product() {
        let (rows, cols, n) = (19, 3 * 32, 4);
        let (blocks, scales) = hub_tensors(rows, cols, 5);
        let m = Mxfp4Matrix::from_hub(&blocks, &scales, rows, cols).unwrap();
        let wd = m.dequantize();
        let x: Vec<f32> = bytes(n * cols, 13)
            .iter()
            .map(|&b| (b as f32 - 127.5) / 64.0)
            .collect();
        for (t0, nt) in [(0, 4), (1, 3), (3, 1)] {
            let mut out = vec![[f32::NAN; MAX_TOKENS]; rows - 2];
            mxfp4_rows_dots_f32(&m, 2..rows, &x, t0, nt, &mut out);
            for (r, o) in (2..rows).zip(&out) {
                let want = reference(&wd[r * cols..(r + 1) * cols], &x, cols);
                for i in 0..nt {
                    let e = want[t0 + i];
                    assert!(
                        (f64::from(o[i]) - e).abs() < 1e-5 * (1.0 + e.abs()),
                        "row {r} token {}: {} vs {e}",
                        t0 + i,
                        o[i]
                    );
                }
            }
        }
    }

    #[test]
    fn kernels_match_naive_reference_on_every_isa() {
        // Two tiles, the second padded; an odd block count; row ranges on and off
        // tile boundaries; every token count up to MAX_TOKENS.
        let (rows, cols, n) = (19, 35 * 32, 5);
        let (blocks, scales) = hub_tensors(rows, cols, 3);
        let m = Mxfp4Matrix::from_hub(&blocks, &scales, rows, cols).unwrap();
        let wd = m.dequantize();
        let x: Vec<f32> = bytes(n * cols, 11)
            .iter()
            .enumerate()
            .map(|(i, &b)| (b as f32 - 127.5) / 64.0 * if i % 97 == 0 { 4.0 } else { 1.0 })
            .collect();
        let mut acts = QuantizedActs::default();
        acts.quantize_from(&x, n, cols);
        // The integer kernels compute exactly dequant(W) · dequant(x).
        let xd: Vec<f32> = (0..n)
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
                    mxfp4_rows_dots(isa, &m, range.clone(), &acts, t0, nt, &mut out);
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
}
