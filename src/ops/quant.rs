//! Block-quantized weight formats (GGML's Q8_0 and Q4_0: 32-element blocks with
//! an f16 scale) in a row-major layout our kernels read with full-width loads,
//! and the on-the-fly Q8 quantization of activations that the integer kernels use.
//!
//! Quantized values are stored unsigned with an offset (`q + 128` for Q8_0,
//! `q + 8` for Q4_0, GGML's own nibbles) so that one AVX-512 VNNI `vpdpbusd`
//! (unsigned x signed) computes a block's dot product; the offset is removed
//! once per row through the activations' per-block sums.

use half::f16;

use super::kernels::{PackedRow, unpack_block};
use crate::error::{Error, Result};

/// Element count of one quantization block.
pub const BLOCK: usize = 32;

/// What `--quant` converts weight matrices to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    /// 8-bit, 1.0625 bytes per weight.
    Q8_0,
    /// 4-bit, 0.5625 bytes per weight.
    Q4_0,
    /// 4-bit k-quant (256-element super-blocks), 0.5625 bytes per weight, via candle's kernels.
    Q4K,
}

impl QuantKind {
    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4_0 => "q4_0",
            QuantKind::Q4K => "q4_k",
        }
    }
}

impl std::str::FromStr for QuantKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(QuantKind::Q8_0),
            "q4_0" => Ok(QuantKind::Q4_0),
            "q4_k" | "q4k" => Ok(QuantKind::Q4K),
            _ => Err(Error::InvalidInput(format!(
                "unknown quantization {s:?}; supported: q8_0, q4_0, q4_k"
            ))),
        }
    }
}

impl std::fmt::Display for QuantKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The packed formats our own kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedFormat {
    /// Per row: `cols` bytes `q + 128`, then nothing else; scales kept apart.
    Q8_0,
    /// Per row: `cols / 2` bytes. Blocks go in pairs: byte `j` of a pair holds
    /// element `j` (low nibble) and `32 + j` (high nibble) of the pair's 64, so one
    /// 32-byte load unpacks to two whole blocks. A final unpaired block uses
    /// GGML's own layout (byte `j`: elements `j` and `16 + j`).
    Q4_0,
}

impl PackedFormat {
    /// Unsigned offset of the stored values.
    pub fn offset(self) -> i32 {
        match self {
            PackedFormat::Q8_0 => 128,
            PackedFormat::Q4_0 => 8,
        }
    }

    fn max_q(self) -> f32 {
        match self {
            PackedFormat::Q8_0 => 127.0,
            PackedFormat::Q4_0 => 8.0,
        }
    }

    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            PackedFormat::Q8_0 => cols,
            PackedFormat::Q4_0 => cols / 2,
        }
    }
}

/// A `[rows, cols]` weight matrix in a [`PackedFormat`]; `cols` is a multiple of 32.
#[derive(Clone)]
pub struct PackedMatrix {
    format: PackedFormat,
    rows: usize,
    cols: usize,
    quants: Vec<u8>,  // [rows, row_bytes]
    scales: Vec<f16>, // [rows, cols / 32]
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedMatrix({:?}, [{}, {}])",
            self.format, self.rows, self.cols
        )
    }
}

impl PackedMatrix {
    /// Quantizes row-major f32 weights `[rows, cols]` with GGML's rounding:
    /// Q8_0 `d = amax / 127`, `q = round(x / d)`; Q4_0 `d = max / -8` (signed
    /// value of largest magnitude), `q = min(15, trunc(x / d + 8.5))`.
    pub fn quantize(format: PackedFormat, w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return Err(Error::InvalidInput(format!(
                "cannot quantize a [{rows}, {cols}] matrix to {format:?}: the width must be a multiple of {BLOCK}"
            )));
        }
        let nb = cols / BLOCK;
        let mut quants = vec![0u8; rows * format.row_bytes(cols)];
        let mut scales = vec![f16::ZERO; rows * nb];
        let mut q = vec![0u8; cols];
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            for b in 0..nb {
                let xs = &row[b * BLOCK..(b + 1) * BLOCK];
                let d = quantize_block(format, xs, &mut q[b * BLOCK..(b + 1) * BLOCK]);
                scales[r * nb + b] = f16::from_f32(d);
            }
            store_row(format, &q, &mut quants, r, cols);
        }
        Ok(Self {
            format,
            rows,
            cols,
            quants,
            scales,
        })
    }

    /// Repacks GGML `block_q8_0` (34 bytes: f16 d, 32 x i8) or `block_q4_0`
    /// (18 bytes: f16 d, 16 bytes of nibbles) data, as a GGUF file stores it.
    pub fn from_ggml(format: PackedFormat, data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let block_bytes = 2 + format.row_bytes(BLOCK);
        let nb = cols / BLOCK;
        if !cols.is_multiple_of(BLOCK) || data.len() != rows * nb * block_bytes {
            return Err(Error::InvalidInput(format!(
                "{format:?} data of {} bytes does not hold a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        let mut quants = vec![0u8; rows * format.row_bytes(cols)];
        let mut scales = vec![f16::ZERO; rows * nb];
        let mut q = vec![0u8; cols];
        for r in 0..rows {
            for b in 0..nb {
                let blk = &data[(r * nb + b) * block_bytes..(r * nb + b + 1) * block_bytes];
                scales[r * nb + b] = f16::from_le_bytes([blk[0], blk[1]]);
                let qb = &mut q[b * BLOCK..(b + 1) * BLOCK];
                match format {
                    PackedFormat::Q8_0 => {
                        for (o, &v) in qb.iter_mut().zip(&blk[2..]) {
                            *o = (v as i8 as i32 + 128) as u8;
                        }
                    }
                    PackedFormat::Q4_0 => {
                        for j in 0..16 {
                            qb[j] = blk[2 + j] & 0x0F;
                            qb[16 + j] = blk[2 + j] >> 4;
                        }
                    }
                }
            }
            store_row(format, &q, &mut quants, r, cols);
        }
        Ok(Self {
            format,
            rows,
            cols,
            quants,
            scales,
        })
    }

    pub fn format(&self) -> PackedFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes a matrix-vector product reads: quants plus scales.
    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * 2
    }

    /// Row `r`'s stored (offset) quants and f16 scales.
    pub fn row(&self, r: usize) -> PackedRow<'_> {
        let rb = self.format.row_bytes(self.cols);
        let nb = self.cols / BLOCK;
        PackedRow {
            format: self.format,
            quants: &self.quants[r * rb..(r + 1) * rb],
            scales: &self.scales[r * nb..(r + 1) * nb],
        }
    }

    /// Row-major f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let off = self.format.offset();
        let mut out = Vec::with_capacity(self.rows * self.cols);
        let mut q = [0u8; BLOCK];
        for r in 0..self.rows {
            let row = self.row(r);
            for (b, d) in row.scales.iter().enumerate() {
                unpack_block(&row, b, &mut q);
                let d = d.to_f32();
                out.extend(q.iter().map(|&v| (v as i32 - off) as f32 * d));
            }
        }
        out
    }
}

/// Quantizes one block to offset values; returns its scale.
fn quantize_block(format: PackedFormat, xs: &[f32], q: &mut [u8]) -> f32 {
    let off = format.offset() as f32;
    match format {
        PackedFormat::Q8_0 => {
            let amax = xs.iter().fold(0f32, |m, &x| m.max(x.abs()));
            let d = amax / format.max_q();
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (o, &x) in q.iter_mut().zip(xs) {
                *o = ((x * id).round() + off) as u8;
            }
            // The kernels multiply by the f16-rounded scale, as GGML does.
            f16::from_f32(d).to_f32()
        }
        PackedFormat::Q4_0 => {
            let max = xs
                .iter()
                .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
            let d = max / -format.max_q();
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (o, &x) in q.iter_mut().zip(xs) {
                *o = ((x * id + off + 0.5) as u8).min(15);
            }
            f16::from_f32(d).to_f32()
        }
    }
}

fn pack_q4_row(q: &[u8], dst: &mut [u8]) {
    let nb = q.len() / BLOCK;
    for p in 0..nb / 2 {
        let src = &q[p * 64..(p + 1) * 64];
        for j in 0..32 {
            dst[p * 32 + j] = src[j] | (src[32 + j] << 4);
        }
    }
    if nb % 2 == 1 {
        let src = &q[(nb - 1) * BLOCK..];
        let base = (nb - 1) * 16;
        for j in 0..16 {
            dst[base + j] = src[j] | (src[16 + j] << 4);
        }
    }
}

/// 1.5 * 2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to an integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Activations `[n, cols]` quantized to signed 8 bits per 32-element block
/// (GGML's `block_q8_0` rounding), with each block's scale and scaled sum.
#[derive(Debug, Default, Clone)]
pub struct QuantizedActs {
    pub n: usize,
    pub cols: usize,
    pub quants: Vec<i8>,  // [n, cols]
    pub scales: Vec<f32>, // [n, cols / 32]
    pub sums: Vec<f32>,   // [n, cols / 32]: scale * sum of the block's quants
}

impl QuantizedActs {
    /// Re-fills `self` from `x: [n, cols]`, reusing its buffers.
    pub fn quantize_from(&mut self, x: &[f32], n: usize, cols: usize) {
        let nb = cols / BLOCK;
        self.n = n;
        self.cols = cols;
        self.quants.resize(n * cols, 0);
        self.scales.resize(n * nb, 0.0);
        self.sums.resize(n * nb, 0.0);
        for (i, xs) in x.chunks_exact(BLOCK).enumerate().take(n * nb) {
            let amax = xs.iter().fold(0f32, |m, &v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut self.quants[i * BLOCK..(i + 1) * BLOCK];
            let mut sum = 0i32;
            for (o, &v) in q.iter_mut().zip(xs) {
                // Round to nearest via the f32 mantissa (|v * id| <= 127): `f32::round`
                // is a libm call here and cost ~2 % of decode. Ties go to even, not
                // away from zero as in GGML; only exact halves differ.
                let v = ((v * id + ROUND_MAGIC) - ROUND_MAGIC) as i8;
                sum += v as i32;
                *o = v;
            }
            self.scales[i] = d;
            self.sums[i] = d * sum as f32;
        }
    }

    pub fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// Token `t`'s quants, scales and scaled sums.
    pub fn token(&self, t: usize) -> (&[i8], &[f32], &[f32]) {
        let nb = self.blocks_per_row();
        (
            &self.quants[t * self.cols..(t + 1) * self.cols],
            &self.scales[t * nb..(t + 1) * nb],
            &self.sums[t * nb..(t + 1) * nb],
        )
    }
}

/// Writes row `r`'s (offset, unsigned) quants `q` into the packed byte buffer of its format.
fn store_row(format: PackedFormat, q: &[u8], quants: &mut [u8], r: usize, cols: usize) {
    let row_bytes = format.row_bytes(cols);
    let dst = &mut quants[r * row_bytes..(r + 1) * row_bytes];
    match format {
        PackedFormat::Q8_0 => dst.copy_from_slice(q),
        PackedFormat::Q4_0 => pack_q4_row(q, dst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect()
    }

    #[test]
    fn q8_0_round_trip_is_within_half_a_step() {
        let w = ramp(4 * 96);
        let m = PackedMatrix::quantize(PackedFormat::Q8_0, &w, 4, 96).unwrap();
        let back = m.dequantize();
        for (b, (x, y)) in w.chunks(32).zip(back.chunks(32)).enumerate() {
            let d = m.scales[b].to_f32();
            for (a, c) in x.iter().zip(y) {
                assert!((a - c).abs() <= d * 0.5 + 1e-3, "{a} vs {c}");
            }
        }
    }

    #[test]
    fn q4_0_pair_and_tail_layouts_round_trip() {
        // 3 blocks per row: one pair and one unpaired GGML-layout block.
        let w = ramp(2 * 96);
        let m = PackedMatrix::quantize(PackedFormat::Q4_0, &w, 2, 96).unwrap();
        let back = m.dequantize();
        for (b, (x, y)) in w.chunks(32).zip(back.chunks(32)).enumerate() {
            // The end opposite the largest magnitude clamps at 7 steps, so up to one step.
            let d = m.scales[b].to_f32().abs();
            for (a, c) in x.iter().zip(y) {
                assert!((a - c).abs() <= d + 1e-3, "{a} vs {c}");
            }
        }
    }

    #[test]
    fn ggml_blocks_repack_to_the_same_values() {
        let w = ramp(3 * 64);
        for format in [PackedFormat::Q8_0, PackedFormat::Q4_0] {
            let m = PackedMatrix::quantize(format, &w, 3, 64).unwrap();
            // Write GGML blocks from our values, repack, compare.
            let mut data = Vec::new();
            let mut q = [0u8; BLOCK];
            for r in 0..3 {
                let row = m.row(r);
                for (b, d) in row.scales.iter().enumerate() {
                    unpack_block(&row, b, &mut q);
                    data.extend_from_slice(&d.to_le_bytes());
                    match format {
                        PackedFormat::Q8_0 => {
                            data.extend(q.iter().map(|&v| (v as i32 - 128) as i8 as u8))
                        }
                        PackedFormat::Q4_0 => data.extend((0..16).map(|j| q[j] | (q[16 + j] << 4))),
                    }
                }
            }
            let r = PackedMatrix::from_ggml(format, &data, 3, 64).unwrap();
            assert_eq!(r.dequantize(), m.dequantize());
        }
    }

    #[test]
    fn widths_off_the_block_size_are_refused() {
        assert!(PackedMatrix::quantize(PackedFormat::Q8_0, &[0.0; 40], 1, 40).is_err());
    }
}
