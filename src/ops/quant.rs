//! Block-quantized weight formats (GGML's Q8_0 and Q4_0: 32-element blocks with
//! an f16 scale) in a row-interleaved layout our kernels read with full-width
//! loads, and the on-the-fly Q8 quantization of activations the integer kernels use.
//!
//! Rows go in tiles of [`TILE`]: for each block, the tile's 16 rows lie side by
//! side, 4 consecutive values of a row per 32-bit lane. One AVX-512 VNNI
//! `vpdpbusd` then multiplies 4 values of all 16 rows by the same 4 broadcast
//! activations, so a lane accumulates one row's dot product: no horizontal sums,
//! and a block's 16 scales are applied with one multiply (3x fewer instructions
//! per weight than a row at a time, which made 4-bit decode compute-bound).
//!
//! Quantized values are stored unsigned with an offset (`q + 128` for Q8_0,
//! `q + 8` for Q4_0, GGML's own nibbles) so that `vpdpbusd` (unsigned x signed)
//! applies; the offset is removed per block through the activations' block sums.

use half::f16;

use super::aligned::AlignedVec;

use crate::error::{Error, Result};

/// Element count of one quantization block.
pub const BLOCK: usize = 32;

/// Rows interleaved in one tile: one 512-bit register holds 4 bytes of each.
pub const TILE: usize = 16;

/// What `--quant` converts weight matrices to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    /// 8-bit, 1.0625 bytes per weight.
    Q8_0,
    /// 4-bit, 0.5625 bytes per weight.
    Q4_0,
    /// 4-bit k-quant: GGML's Q4_K rounding (256-element super-blocks, a 6-bit scale
    /// and min per 32), run as [`PackedFormat::Q4K`] (0.5625 bytes per weight).
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
    /// A tile's block is 8 groups of 64 bytes: group `k`, lane `r` holds
    /// `q + 128` of elements `4k..4k + 4` of the tile's row `r`.
    Q8_0,
    /// A tile's block is 4 groups of 64 bytes: group `c`, lane `r` holds elements
    /// `4c..4c + 4` of row `r` in the low nibbles and `16 + 4c..16 + 4c + 4` in the
    /// high ones (GGML's pairing of a block's halves), `q + 8` each.
    Q4_0,
    /// Q4_0's nibbles (`q` in 0..15, no offset) with a scale and a min per block:
    /// `x = d q + m`. Holds GGML's Q4_1 exactly (and Q4_K rounding on widths off
    /// its 256-value super-block).
    Q4_1,
    /// GGML's Q6_K: 6-bit `q + 32` with a scale per 16 values. The low 4 bits as
    /// Q4_0's nibbles, then two 64-byte groups of high bits: lane `r`, byte `i`,
    /// bits `2c..2c + 2` hold element `4c + i`'s (first group) or `16 + 4c + i`'s
    /// (second). The first 16 values of a block use `scales`, the last 16
    /// `scales_hi`: each 16-block's `d * scale` rounded to f16.
    Q6,
    /// GGML's Q4_K at its own size (144 bytes per 256 values): Q4_0's nibbles
    /// (`q` in 0..15, no offset), and per 256-value super-block and row an f16 `d`
    /// (in `scales`) and `dmin` (in `mins`) and GGML's 12 bytes of 6-bit block
    /// scales and mins, as three 64-byte groups (group `g`, lane `r`: bytes
    /// `4g..4g + 4` of row `r`'s 12). Block `j`: `x = d sc_j q - dmin m_j`.
    Q4K,
}

impl PackedFormat {
    /// Unsigned offset of the stored values.
    pub fn offset(self) -> i32 {
        match self {
            PackedFormat::Q8_0 => 128,
            PackedFormat::Q4_0 => 8,
            PackedFormat::Q4_1 | PackedFormat::Q4K => 0,
            PackedFormat::Q6 => 32,
        }
    }

    /// Whether scales (and mins) are per 256-value super-block, with 6-bit block
    /// scales and mins beside them.
    pub fn has_super_blocks(self) -> bool {
        self == PackedFormat::Q4K
    }

    /// Whether the last 16 values of a block have a scale of their own.
    pub fn has_half_scales(self) -> bool {
        self == PackedFormat::Q6
    }

    /// Whether blocks carry a min (`x = d q + m`) besides the scale.
    pub fn has_min(self) -> bool {
        self == PackedFormat::Q4_1
    }

    /// Bytes one row's block of 32 values takes.
    pub fn block_bytes(self) -> usize {
        match self {
            PackedFormat::Q8_0 => BLOCK,
            PackedFormat::Q4_0 | PackedFormat::Q4_1 | PackedFormat::Q4K => BLOCK / 2,
            PackedFormat::Q6 => BLOCK * 3 / 4,
        }
    }
}

/// A `[rows, cols]` weight matrix in a [`PackedFormat`]; `cols` is a multiple of 32.
/// Rows are padded to whole tiles with zero-scale rows.
#[derive(Clone)]
pub struct PackedMatrix {
    format: PackedFormat,
    rows: usize,
    cols: usize,
    quants: AlignedVec<u8>,     // [tiles, blocks, TILE * block_bytes]
    scales: AlignedVec<f16>,    // [tiles, blocks, TILE]; Q4K: [tiles, super-blocks, TILE]
    mins: AlignedVec<f16>,      // as scales for Q4_1 and Q4K, else empty
    scales_hi: AlignedVec<f16>, // as scales for Q6 (the blocks' last 16 values), else empty
    sub: AlignedVec<u8>, // Q4K: [tiles, super-blocks, 3 * 64] 6-bit scales and mins, else empty
}

/// Bytes of a tile's 6-bit scales and mins per super-block (12 per row).
const SUB_BYTES: usize = 3 * 64;

/// Values per GGML k-quant super-block.
const K_SUPER: usize = 256;

/// Super-blocks per row of GGML k-quant data of `bytes` per super-block, after
/// checking that `data` holds exactly a `[rows, cols]` matrix of them.
fn super_blocks_per_row(
    kind: &str,
    bytes: usize,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> Result<usize> {
    if !cols.is_multiple_of(K_SUPER) || data.len() != rows * cols / K_SUPER * bytes {
        return Err(Error::InvalidInput(format!(
            "{kind} data of {} bytes does not hold a [{rows}, {cols}] matrix",
            data.len()
        )));
    }
    Ok(cols / K_SUPER)
}

/// One block's scales and min: `x = d (q - offset) + min` for the first 16
/// values, `d_hi` in place of `d` for the last 16 (equal to `d` but in Q6). Stored
/// as f16 except in Q4K, whose are products of its f16 and 6-bit factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockParams {
    pub d: f32,
    pub d_hi: f32,
    pub min: f32,
}

impl BlockParams {
    fn single(d: f16) -> Self {
        Self {
            d: d.to_f32(),
            d_hi: d.to_f32(),
            min: 0.0,
        }
    }
}

/// Block `j`'s 6-bit scale and min from GGML Q4_K's 12 packed bytes: blocks 0-3
/// in the low bits of bytes 0-7, blocks 4-7 in bytes 8-11 plus the top bits of
/// bytes 0-7.
pub fn q4k_scale_min(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        (
            (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4),
            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
        )
    }
}

/// One tile of a [`PackedMatrix`], as the kernels read it.
#[derive(Debug, Clone, Copy)]
pub struct Tile<'a> {
    pub quants: &'a [u8],
    pub scales: &'a [f16],
    pub mins: &'a [f16],
    pub scales_hi: &'a [f16],
    /// Q4K's 6-bit block scales and mins, `[super-blocks, 3 * 64]`; else empty.
    pub sub: &'a [u8],
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
    /// A `[rows, cols]` matrix of zero quants and scales, for
    /// [`PackedMatrix::buffers_mut`] to fill; an error unless `cols` is whole
    /// blocks (whole super-blocks for Q4K).
    pub fn empty(format: PackedFormat, rows: usize, cols: usize) -> Result<Self> {
        let block = if format.has_super_blocks() {
            K_SUPER
        } else {
            BLOCK
        };
        if cols == 0 || !cols.is_multiple_of(block) {
            return Err(Error::InvalidInput(format!(
                "a {format:?} matrix needs a width that is a positive multiple of {block}, got [{rows}, {cols}]"
            )));
        }
        Ok(Self::zeroed(format, rows, cols))
    }

    fn zeroed(format: PackedFormat, rows: usize, cols: usize) -> Self {
        let tiles = rows.div_ceil(TILE);
        let nb = cols / BLOCK;
        let nsb = cols / K_SUPER;
        let per_scale = if format.has_super_blocks() { nsb } else { nb };
        let per_block =
            |present: bool| AlignedVec::zeroed(if present { tiles * per_scale * TILE } else { 0 });
        Self {
            format,
            rows,
            cols,
            quants: AlignedVec::zeroed(tiles * nb * TILE * format.block_bytes()),
            scales: per_block(true),
            mins: per_block(format.has_min() || format.has_super_blocks()),
            scales_hi: per_block(format.has_half_scales()),
            sub: AlignedVec::zeroed(if format.has_super_blocks() {
                tiles * nsb * SUB_BYTES
            } else {
                0
            }),
        }
    }

    /// Every buffer as its aligned, zero-padded bytes, in a fixed order (quants,
    /// scales, mins, high scales, sub-block scales; empty ones included): what a
    /// packed expert file stores, and [`PackedMatrix::buffers_mut`] reads back
    /// into a [`PackedMatrix::empty`] one of the same format and shape.
    pub fn buffers(&self) -> [&[u8]; 5] {
        [
            self.quants.padded_bytes(),
            self.scales.padded_bytes(),
            self.mins.padded_bytes(),
            self.scales_hi.padded_bytes(),
            self.sub.padded_bytes(),
        ]
    }

    /// The same, writable, for a read straight into the kernels' buffers.
    pub fn buffers_mut(&mut self) -> [&mut [u8]; 5] {
        [
            self.quants.padded_bytes_mut(),
            self.scales.padded_bytes_mut(),
            self.mins.padded_bytes_mut(),
            self.scales_hi.padded_bytes_mut(),
            self.sub.padded_bytes_mut(),
        ]
    }

    /// Quantizes row-major f32 weights `[rows, cols]` with GGML's rounding:
    /// Q8_0 `d = amax / 127`, `q = round(x / d)`; Q4_0 `d = max / -8` (signed
    /// value of largest magnitude), `q = min(15, trunc(x / d + 8.5))`; Q4_1
    /// `d = (max - min) / 15`, `m = min`, `q = min(15, trunc((x - m) / d + 0.5))`.
    pub fn quantize(format: PackedFormat, w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return Err(Error::InvalidInput(format!(
                "cannot quantize a [{rows}, {cols}] matrix to {format:?}: the width must be a multiple of {BLOCK}"
            )));
        }
        if format.has_super_blocks() {
            return Err(Error::InvalidInput(
                "Q4K is quantized by GGML's k-quant search; repack its blocks with from_ggml_q4k"
                    .into(),
            ));
        }
        let mut m = Self::zeroed(format, rows, cols);
        let mut q = [0u8; BLOCK];
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            for (b, xs) in row.chunks_exact(BLOCK).enumerate() {
                let p = quantize_block(format, xs, &mut q);
                m.store_block(r, b, &q, p);
            }
        }
        Ok(m)
    }

    /// Repacks GGML `block_q8_0` (34 bytes: f16 d, 32 x i8), `block_q4_0`
    /// (18 bytes: f16 d, 16 bytes of nibbles) or `block_q4_1` (20 bytes: f16 d,
    /// f16 m, nibbles) data, as a GGUF file stores it.
    pub fn from_ggml(format: PackedFormat, data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let head = if format.has_min() { 4 } else { 2 };
        let block_bytes = head + format.block_bytes();
        let nb = cols / BLOCK;
        if !cols.is_multiple_of(BLOCK) || data.len() != rows * nb * block_bytes {
            return Err(Error::InvalidInput(format!(
                "{format:?} data of {} bytes does not hold a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        let mut m = Self::zeroed(format, rows, cols);
        let mut q = [0u8; BLOCK];
        for (i, blk) in data.chunks_exact(block_bytes).enumerate() {
            match format {
                PackedFormat::Q8_0 => {
                    for (o, &v) in q.iter_mut().zip(&blk[2..]) {
                        *o = (v as i8 as i32 + 128) as u8;
                    }
                }
                PackedFormat::Q4_0 | PackedFormat::Q4_1 => {
                    for j in 0..16 {
                        q[j] = blk[head + j] & 0x0F;
                        q[16 + j] = blk[head + j] >> 4;
                    }
                }
                PackedFormat::Q6 | PackedFormat::Q4K => {
                    return Err(Error::InvalidInput(format!(
                        "{format:?} has no 32-value GGML block; use from_ggml_q6k / from_ggml_q4k"
                    )));
                }
            }
            let d = f16::from_le_bytes([blk[0], blk[1]]);
            let min = f16::from_le_bytes([blk[2], blk[3]]);
            let p = BlockParams {
                min: if format.has_min() { min.to_f32() } else { 0.0 },
                ..BlockParams::single(d)
            };
            m.store_block(i / nb, i % nb, &q, p);
        }
        Ok(m)
    }

    /// Repacks GGML `block_q4_K` data (144 bytes per 256 values: f16 `d` and
    /// `dmin`, 12 bytes of 6-bit scales and mins for the 8 blocks of 32, 128 bytes
    /// of nibbles) as [`PackedFormat::Q4K`], every byte kept.
    pub fn from_ggml_q4k(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        const BYTES: usize = 144;
        let per_row = super_blocks_per_row("Q4_K", BYTES, data, rows, cols)?;
        let mut m = Self::zeroed(PackedFormat::Q4K, rows, cols);
        let mut q = [0u8; BLOCK];
        for (i, sb) in data.chunks_exact(BYTES).enumerate() {
            let (r, s) = (i / per_row, i % per_row);
            let (tile, lane) = (r / TILE, r % TILE);
            let at = (tile * per_row + s) * TILE + lane;
            m.scales[at] = f16::from_le_bytes([sb[0], sb[1]]);
            m.mins[at] = f16::from_le_bytes([sb[2], sb[3]]);
            let sub = &mut m.sub[(tile * per_row + s) * SUB_BYTES..];
            for g in 0..3 {
                sub[g * 64 + lane * 4..g * 64 + lane * 4 + 4]
                    .copy_from_slice(&sb[4 + 4 * g..8 + 4 * g]);
            }
            let qs = &sb[16..];
            for j in 0..8 {
                // Blocks 2k and 2k + 1 share 32 bytes: low and high nibbles.
                let src = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
                for (o, &v) in q.iter_mut().zip(src) {
                    *o = if j % 2 == 0 { v & 0x0F } else { v >> 4 };
                }
                m.store_quants(r, s * (K_SUPER / BLOCK) + j, &q);
            }
        }
        Ok(m)
    }

    /// Repacks GGML `block_q6_K` data (210 bytes per 256 values: 128 bytes of low
    /// nibbles, 64 of high 2-bit pairs, 16 signed 8-bit scales, f16 `d`) as
    /// [`PackedFormat::Q6`]: 16-value block `j` gets scale `d * sc_j`.
    pub fn from_ggml_q6k(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        const BYTES: usize = 210;
        let per_row = super_blocks_per_row("Q6_K", BYTES, data, rows, cols)?;
        let mut m = Self::zeroed(PackedFormat::Q6, rows, cols);
        let mut q = [0u8; K_SUPER];
        for (i, sb) in data.chunks_exact(BYTES).enumerate() {
            let (r, b0) = (i / per_row, (i % per_row) * (K_SUPER / BLOCK));
            let (ql, qh, sc) = (&sb[..128], &sb[128..192], &sb[192..208]);
            let d = f16::from_le_bytes([sb[208], sb[209]]).to_f32();
            // GGML's order: each half of 128 values takes 64 bytes of `ql` and 32 of
            // `qh`; value `l + 32k` of a half is nibble `k / 2` of byte `l + 32 (k % 2)`
            // with high bits `2k..2k + 2` of `qh[l]`.
            for half in 0..2 {
                let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                for l in 0..32 {
                    for k in 0..4 {
                        let nib = (ql[l + 32 * (k % 2)] >> (4 * (k / 2))) & 0x0F;
                        let hi = (qh[l] >> (2 * k)) & 3;
                        q[128 * half + 32 * k + l] = nib | (hi << 4);
                    }
                }
            }
            for j in 0..K_SUPER / BLOCK {
                // invariant: the slice is exactly BLOCK bytes long.
                let block: &[u8; BLOCK] = q[j * BLOCK..(j + 1) * BLOCK].try_into().unwrap();
                let p = BlockParams {
                    d: f16::from_f32(d * sc[2 * j] as i8 as f32).to_f32(),
                    d_hi: f16::from_f32(d * sc[2 * j + 1] as i8 as f32).to_f32(),
                    min: 0.0,
                };
                m.store_block(r, b0 + j, block, p);
            }
        }
        Ok(m)
    }

    /// Byte and scale offsets of row `r`'s block `b`: `(tile block start, lane)`.
    fn locate(&self, r: usize, b: usize) -> (usize, usize) {
        let nb = self.cols / BLOCK;
        ((r / TILE) * nb + b, r % TILE)
    }

    /// Writes row `r`'s block `b` from 32 offset values in natural order (the min
    /// and upper-half scale are kept only by formats that have them, rounded to f16).
    fn store_block(&mut self, r: usize, b: usize, q: &[u8; BLOCK], p: BlockParams) {
        let (tb, lane) = self.locate(r, b);
        self.scales[tb * TILE + lane] = f16::from_f32(p.d);
        if self.format.has_min() {
            self.mins[tb * TILE + lane] = f16::from_f32(p.min);
        }
        if self.format.has_half_scales() {
            self.scales_hi[tb * TILE + lane] = f16::from_f32(p.d_hi);
        }
        self.store_quants(r, b, q);
    }

    /// Writes row `r`'s block `b`'s 32 offset values, in natural order.
    fn store_quants(&mut self, r: usize, b: usize, q: &[u8; BLOCK]) {
        let (tb, lane) = self.locate(r, b);
        let bytes = &mut self.quants[tb * TILE * self.format.block_bytes()..];
        for i in 0..4 {
            match self.format {
                PackedFormat::Q8_0 => {
                    for k in 0..8 {
                        bytes[k * 64 + lane * 4 + i] = q[4 * k + i];
                    }
                }
                PackedFormat::Q4_0 | PackedFormat::Q4_1 | PackedFormat::Q4K => {
                    for c in 0..4 {
                        bytes[c * 64 + lane * 4 + i] = q[4 * c + i] | (q[16 + 4 * c + i] << 4);
                    }
                }
                PackedFormat::Q6 => {
                    let (mut h0, mut h1) = (0u8, 0u8);
                    for c in 0..4 {
                        let (a, z) = (q[4 * c + i], q[16 + 4 * c + i]);
                        bytes[c * 64 + lane * 4 + i] = (a & 0x0F) | ((z & 0x0F) << 4);
                        h0 |= (a >> 4) << (2 * c);
                        h1 |= (z >> 4) << (2 * c);
                    }
                    bytes[256 + lane * 4 + i] = h0;
                    bytes[320 + lane * 4 + i] = h1;
                }
            }
        }
    }

    /// Row `r`'s block `b` as 32 offset values in natural order, and its scales and min.
    pub fn block(&self, r: usize, b: usize, q: &mut [u8; BLOCK]) -> BlockParams {
        let (tb, lane) = self.locate(r, b);
        let bytes = &self.quants[tb * TILE * self.format.block_bytes()..];
        for i in 0..4 {
            match self.format {
                PackedFormat::Q8_0 => {
                    for k in 0..8 {
                        q[4 * k + i] = bytes[k * 64 + lane * 4 + i];
                    }
                }
                PackedFormat::Q4_0 | PackedFormat::Q4_1 | PackedFormat::Q6 | PackedFormat::Q4K => {
                    let (h0, h1) = if self.format == PackedFormat::Q6 {
                        (bytes[256 + lane * 4 + i], bytes[320 + lane * 4 + i])
                    } else {
                        (0, 0)
                    };
                    for c in 0..4 {
                        let v = bytes[c * 64 + lane * 4 + i];
                        q[4 * c + i] = (v & 0x0F) | (((h0 >> (2 * c)) & 3) << 4);
                        q[16 + 4 * c + i] = (v >> 4) | (((h1 >> (2 * c)) & 3) << 4);
                    }
                }
            }
        }
        if self.format.has_super_blocks() {
            let nsb = self.cols / K_SUPER;
            let (tile, s, j) = (r / TILE, b / (K_SUPER / BLOCK), b % (K_SUPER / BLOCK));
            let at = (tile * nsb + s) * TILE + lane;
            let sub = &self.sub[(tile * nsb + s) * SUB_BYTES..];
            let packed: [u8; 12] = std::array::from_fn(|k| sub[(k / 4) * 64 + lane * 4 + k % 4]);
            let (sc, m) = q4k_scale_min(&packed, j);
            let d = self.scales[at].to_f32() * f32::from(sc);
            return BlockParams {
                d,
                d_hi: d,
                min: -self.mins[at].to_f32() * f32::from(m),
            };
        }
        let at = tb * TILE + lane;
        let d = self.scales[at].to_f32();
        BlockParams {
            d,
            d_hi: if self.format.has_half_scales() {
                self.scales_hi[at].to_f32()
            } else {
                d
            },
            min: if self.format.has_min() {
                self.mins[at].to_f32()
            } else {
                0.0
            },
        }
    }

    /// Tile `t`'s quants (`[blocks, TILE * block_bytes]`), scales and mins
    /// (`[blocks, TILE]`; mins empty for formats without).
    pub fn tile(&self, t: usize) -> Tile<'_> {
        let nb = self.cols / BLOCK;
        let qb = nb * TILE * self.format.block_bytes();
        let per_scale = if self.format.has_super_blocks() {
            self.cols / K_SUPER
        } else {
            nb
        };
        let s = t * per_scale * TILE..(t + 1) * per_scale * TILE;
        let sub = self.cols / K_SUPER * SUB_BYTES;
        Tile {
            quants: &self.quants[t * qb..(t + 1) * qb],
            scales: &self.scales[s.clone()],
            sub: if self.format.has_super_blocks() {
                &self.sub[t * sub..(t + 1) * sub]
            } else {
                &[]
            },
            mins: if self.mins.is_empty() {
                &[]
            } else {
                &self.mins[s.clone()]
            },
            scales_hi: if self.format.has_half_scales() {
                &self.scales_hi[s]
            } else {
                &[]
            },
        }
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

    pub fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE)
    }

    /// Bytes a matrix-vector product reads: quants, scales and mins.
    pub fn bytes(&self) -> usize {
        self.quants.len()
            + self.sub.len()
            + (self.scales.len() + self.mins.len() + self.scales_hi.len()) * 2
    }

    /// Row-major f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let off = self.format.offset();
        let mut out = Vec::with_capacity(self.rows * self.cols);
        let mut q = [0u8; BLOCK];
        for r in 0..self.rows {
            for b in 0..self.cols / BLOCK {
                let p = self.block(r, b, &mut q);
                let (d, d_hi, min) = (p.d, p.d_hi, p.min);
                out.extend(q[..16].iter().map(|&v| (v as i32 - off) as f32 * d + min));
                out.extend(
                    q[16..]
                        .iter()
                        .map(|&v| (v as i32 - off) as f32 * d_hi + min),
                );
            }
        }
        out
    }
}

/// Quantizes one block to offset values; returns its scales and min.
fn quantize_block(format: PackedFormat, xs: &[f32], q: &mut [u8]) -> BlockParams {
    let off = format.offset() as f32;
    match format {
        PackedFormat::Q8_0 => {
            let amax = xs.iter().fold(0f32, |m, &x| m.max(x.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (o, &x) in q.iter_mut().zip(xs) {
                *o = ((x * id).round() + off) as u8;
            }
            BlockParams::single(f16::from_f32(d))
        }
        PackedFormat::Q4_0 => {
            let max = xs
                .iter()
                .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (o, &x) in q.iter_mut().zip(xs) {
                *o = ((x * id + off + 0.5) as u8).min(15);
            }
            BlockParams::single(f16::from_f32(d))
        }
        PackedFormat::Q4_1 => {
            let (min, max) = xs
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (o, &x) in q.iter_mut().zip(xs) {
                *o = (((x - min) * id + 0.5) as u8).min(15);
            }
            BlockParams {
                min: f16::from_f32(min).to_f32(),
                ..BlockParams::single(f16::from_f32(d))
            }
        }
        PackedFormat::Q4K => unreachable!("refused by PackedMatrix::quantize"),
        PackedFormat::Q6 => {
            // Per 16 values, as Q6_K: `d = max / -32` (signed value of largest
            // magnitude), `q = clamp(round(x / d), -32, 31) + 32`.
            let mut ds = [f16::ZERO; 2];
            for (h, (xs, q)) in xs.chunks(16).zip(q.chunks_mut(16)).enumerate() {
                let max = xs
                    .iter()
                    .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
                let d = max / -32.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for (o, &x) in q.iter_mut().zip(xs) {
                    *o = ((x * id).round().clamp(-32.0, 31.0) + off) as u8;
                }
                ds[h] = f16::from_f32(d);
            }
            BlockParams {
                d_hi: ds[1].to_f32(),
                ..BlockParams::single(ds[0])
            }
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
    pub quants: Vec<i8>,   // [n, cols]
    pub scales: Vec<f32>,  // [n, cols / 32]
    pub sums: Vec<f32>,    // [n, cols / 32]: scale * sum of the block's quants
    pub sums_lo: Vec<f32>, // [n, cols / 32]: the same over the block's first 16
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
        self.sums_lo.resize(n * nb, 0.0);
        for (i, xs) in x.chunks_exact(BLOCK).enumerate().take(n * nb) {
            let amax = xs.iter().fold(0f32, |m, &v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut self.quants[i * BLOCK..(i + 1) * BLOCK];
            let (mut sum, mut sum_lo) = (0i32, 0i32);
            for (j, (o, &v)) in q.iter_mut().zip(xs).enumerate() {
                // Round to nearest via the f32 mantissa (|v * id| <= 127): `f32::round`
                // is a libm call here and cost ~2 % of decode. Ties go to even, not
                // away from zero as in GGML; only exact halves differ.
                let v = ((v * id + ROUND_MAGIC) - ROUND_MAGIC) as i8;
                sum += v as i32;
                if j < 16 {
                    sum_lo += v as i32;
                }
                *o = v;
            }
            self.scales[i] = d;
            self.sums[i] = d * sum as f32;
            self.sums_lo[i] = d * sum_lo as f32;
        }
    }

    /// Re-fills `self` with rows `rows` of `src` (already quantized), reusing its
    /// buffers: a copy of 1.1 bytes per value instead of quantizing again.
    pub fn gather_rows(&mut self, src: &QuantizedActs, rows: &[usize]) {
        let (cols, nb) = (src.cols, src.blocks_per_row());
        self.n = rows.len();
        self.cols = cols;
        for v in [&mut self.scales, &mut self.sums, &mut self.sums_lo] {
            v.clear();
        }
        self.quants.clear();
        for &r in rows {
            self.quants
                .extend_from_slice(&src.quants[r * cols..(r + 1) * cols]);
            let blocks = r * nb..(r + 1) * nb;
            self.scales.extend_from_slice(&src.scales[blocks.clone()]);
            self.sums.extend_from_slice(&src.sums[blocks.clone()]);
            self.sums_lo.extend_from_slice(&src.sums_lo[blocks]);
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

/// GGML `block_q4_K` data of a `[rows, cols]` matrix from a seed: every scale,
/// min and nibble bit pattern occurs, `d` and `dmin` are small positive f16s.
#[cfg(test)]
pub(crate) fn ggml_q4k_test_data(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut byte = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 24) as u8
    };
    let mut data = Vec::with_capacity(rows * cols / K_SUPER * 144);
    for _ in 0..rows * cols / K_SUPER {
        let d = f16::from_f32(0.002 + f32::from(byte()) * 1e-5);
        let dmin = f16::from_f32(0.001 + f32::from(byte()) * 1e-5);
        data.extend_from_slice(&d.to_le_bytes());
        data.extend_from_slice(&dmin.to_le_bytes());
        data.extend((0..140).map(|_| byte()));
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect()
    }

    /// Row `r`'s scale of block `b`.
    fn scale(m: &PackedMatrix, r: usize, b: usize) -> f32 {
        let p = m.block(r, b, &mut [0; BLOCK]);
        p.d.abs().max(p.d_hi.abs())
    }

    #[test]
    fn round_trips_stay_within_the_formats_step() {
        // 19 rows: a whole tile and a padded one. Allowed error in steps `d`: half a
        // step for Q8_0 and Q4_1 (plus the f16 rounding of Q4_1's min); Q4_0's and
        // Q6's end opposite the largest magnitude clamps a step short, so up to one.
        let (rows, cols) = (19, 96);
        let w = ramp(rows * cols);
        for (format, steps, slack) in [
            (PackedFormat::Q8_0, 0.5, 1e-3),
            (PackedFormat::Q4_0, 1.0, 1e-3),
            (PackedFormat::Q4_1, 0.5, 2e-3),
            (PackedFormat::Q6, 1.0, 1e-3),
        ] {
            let m = PackedMatrix::quantize(format, &w, rows, cols).unwrap();
            let back = m.dequantize();
            assert_eq!(back.len(), w.len());
            for (i, (x, y)) in w.chunks(32).zip(back.chunks(32)).enumerate() {
                let d = scale(&m, i / 3, i % 3);
                for (a, c) in x.iter().zip(y) {
                    assert!((a - c).abs() <= d * steps + slack, "{format:?}: {a} vs {c}");
                }
            }
        }
    }

    #[test]
    fn ggml_blocks_repack_to_the_same_values() {
        let (rows, cols) = (17, 64);
        let w = ramp(rows * cols);
        for format in [PackedFormat::Q8_0, PackedFormat::Q4_0, PackedFormat::Q4_1] {
            let m = PackedMatrix::quantize(format, &w, rows, cols).unwrap();
            // Write GGML blocks from our values, repack, compare.
            let mut data = Vec::new();
            let mut q = [0u8; BLOCK];
            for r in 0..rows {
                for b in 0..cols / BLOCK {
                    let p = m.block(r, b, &mut q);
                    data.extend_from_slice(&f16::from_f32(p.d).to_le_bytes());
                    if format.has_min() {
                        data.extend_from_slice(&f16::from_f32(p.min).to_le_bytes());
                    }
                    match format {
                        PackedFormat::Q8_0 => {
                            data.extend(q.iter().map(|&v| (v as i32 - 128) as i8 as u8))
                        }
                        PackedFormat::Q4_0 | PackedFormat::Q4_1 => {
                            data.extend((0..16).map(|j| q[j] | (q[16 + j] << 4)))
                        }
                        PackedFormat::Q6 | PackedFormat::Q4K => {
                            unreachable!("not a 32-value GGML block")
                        }
                    }
                }
            }
            let r = PackedMatrix::from_ggml(format, &data, rows, cols).unwrap();
            assert_eq!(r.dequantize(), m.dequantize());
        }
    }

    #[test]
    fn q4k_keeps_its_144_bytes_per_256_and_dequantizes_as_ggml() {
        use candle_core::quantized::{GgmlDType, QStorage, QTensor};
        // 19 rows: a padded tile; 3 super-blocks per row.
        let (rows, cols) = (19, 768);
        let data = ggml_q4k_test_data(rows, cols, 5);
        let m = PackedMatrix::from_ggml_q4k(&data, rows, cols).unwrap();
        assert_eq!(m.format(), PackedFormat::Q4K);
        // Whole tiles are stored: 32 rows of 3 super-blocks of 144 bytes.
        assert_eq!(m.bytes(), 32 * 3 * 144);
        let storage = QStorage::from_data(
            std::borrow::Cow::Borrowed(&data),
            &candle_core::Device::Cpu,
            GgmlDType::Q4K,
        )
        .unwrap();
        let want = QTensor::new(storage, (rows, cols))
            .unwrap()
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, (a, b)) in m.dequantize().iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "value {i}: {a} vs {b}"
            );
        }
        // Truncated data is refused, not read past.
        assert!(PackedMatrix::from_ggml_q4k(&data[..data.len() - 1], rows, cols).is_err());
        assert!(PackedMatrix::quantize(PackedFormat::Q4K, &want, rows, cols).is_err());
    }

    #[test]
    fn gathered_rows_equal_quantizing_those_rows() {
        let (n, cols) = (5, 96);
        let x = ramp(n * cols);
        let mut all = QuantizedActs::default();
        all.quantize_from(&x, n, cols);
        let rows = [3, 0, 3, 4];
        let picked: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * cols..(r + 1) * cols].iter().copied())
            .collect();
        let mut want = QuantizedActs::default();
        want.quantize_from(&picked, rows.len(), cols);
        // A buffer that held something larger before.
        let mut got = all.clone();
        got.gather_rows(&all, &rows);
        assert_eq!(
            (got.n, got.cols, &got.quants, &got.scales),
            (want.n, want.cols, &want.quants, &want.scales)
        );
        assert_eq!((&got.sums, &got.sums_lo), (&want.sums, &want.sums_lo));
    }

    #[test]
    fn widths_off_the_block_size_are_refused() {
        assert!(PackedMatrix::quantize(PackedFormat::Q8_0, &[0.0; 40], 1, 40).is_err());
    }
}
