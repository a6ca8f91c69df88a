//! `y = x Wᵀ` over all cores: output rows are split into chunks that rayon's
//! threads take in turn; each chunk walks its rows once per tile of tokens, so a
//! weight row is read from memory once and reused from L1 for every token.
//!
//! Cost model: decode reads every weight byte once (memory-bound); prefill does
//! `n * rows * cols` multiply-adds with each weight row loaded `n / 4` times from L1.

use rayon::prelude::*;

use super::kernels::{DenseRow, Isa, MAX_TOKENS, dense_row_dots, packed_row_dots};
use super::quant::{PackedMatrix, QuantizedActs};

/// Tokens per tile: their activations stay in L2 while a chunk's rows pass over them.
const TOKEN_TILE: usize = 64;
/// Below this many multiply-adds a matmul runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// Sets the threads our kernels and candle's use. Call once at startup, before
/// any other work: candle re-reads `RAYON_NUM_THREADS` (else `/proc/cpuinfo`)
/// on every matmul, which costs 12-15 % of decode when it is unset.
pub fn set_num_threads(n: usize) {
    let n = n.max(1);
    // SAFETY: called at startup by the binary before it spawns threads, so no other
    // thread reads the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    // An already-built global pool (a second call) keeps its size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}

/// Threads the kernels run on.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// A dense row-major `[rows, cols]` weight matrix borrowed from a tensor.
#[derive(Debug, Clone, Copy)]
pub enum DenseMatrix<'a> {
    F32(&'a [f32]),
    BF16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl<'a> DenseMatrix<'a> {
    fn row(self, r: usize, cols: usize) -> DenseRow<'a> {
        let s = r * cols..(r + 1) * cols;
        match self {
            DenseMatrix::F32(w) => DenseRow::F32(&w[s]),
            DenseMatrix::BF16(w) => DenseRow::BF16(&w[s]),
            DenseMatrix::F16(w) => DenseRow::F16(&w[s]),
        }
    }
}

/// Where output element `(t, r)` of `y: [n, rows]` goes; chunks write disjoint rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every `(t, r)` is written by exactly one chunk (chunks own disjoint row ranges),
// and `y` outlives the parallel loop that borrows it.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Runs `row_dots(r, t0, nt, out)` for every row and token tile, in parallel.
fn drive(
    rows: usize,
    n: usize,
    cols: usize,
    y: &mut [f32],
    row_dots: &(dyn Fn(usize, usize, usize, &mut [f32; MAX_TOKENS]) + Sync),
) {
    assert!(y.len() >= n * rows, "output of {} < {n} x {rows}", y.len());
    let out = OutPtr(y.as_mut_ptr());
    let chunk = |range: std::ops::Range<usize>| {
        let out = out;
        let mut dots = [0f32; MAX_TOKENS];
        for tile in (0..n).step_by(TOKEN_TILE) {
            let tile_end = (tile + TOKEN_TILE).min(n);
            for r in range.clone() {
                for t0 in (tile..tile_end).step_by(MAX_TOKENS) {
                    let nt = MAX_TOKENS.min(tile_end - t0);
                    row_dots(r, t0, nt, &mut dots);
                    for (i, &d) in dots.iter().enumerate().take(nt) {
                        // SAFETY: `(t0 + i) * rows + r < n * rows <= y.len()`, and row `r`
                        // belongs to this chunk only.
                        unsafe { *out.0.add((t0 + i) * rows + r) = d };
                    }
                }
            }
        }
    };
    let threads = num_threads();
    if threads <= 1 || n * rows * cols < PARALLEL_MIN_MACS {
        chunk(0..rows);
        return;
    }
    // A few chunks per thread so a thread slowed by a neighbour's job is evened out.
    let chunk_rows = rows.div_ceil(threads * 4).max(8);
    let n_chunks = rows.div_ceil(chunk_rows);
    (0..n_chunks)
        .into_par_iter()
        .for_each(|c| chunk(c * chunk_rows..((c + 1) * chunk_rows).min(rows)));
}

/// # Shapes
/// `x: [n, cols]`, `w: [rows, cols]` -> `y: [n, rows]`
pub fn matmul_dense(isa: Isa, w: DenseMatrix<'_>, rows: usize, x: &[f32], n: usize, y: &mut [f32]) {
    let cols = x.len() / n.max(1);
    drive(rows, n, cols, y, &|r, t0, nt, out| {
        dense_row_dots(isa, w.row(r, cols), x, t0, nt, out)
    });
}

/// # Shapes
/// `acts: [n, cols]` (quantized), `w: [rows, cols]` -> `y: [n, rows]`
pub fn matmul_packed(isa: Isa, w: &PackedMatrix, acts: &QuantizedActs, y: &mut [f32]) {
    drive(w.rows(), acts.n, w.cols(), y, &|r, t0, nt, out| {
        packed_row_dots(isa, w.row(r), acts, t0, nt, out)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::quant::PackedFormat;

    fn values(n: usize, k: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * k) % 113) as f32 - 56.0) / 40.0)
            .collect()
    }

    #[test]
    fn matmul_tiles_cover_every_row_and_token() {
        let (rows, cols, n) = (70, 96, 12);
        let w = values(rows * cols, 7);
        let x = values(n * cols, 11);
        let mut want = vec![0f32; n * rows];
        for t in 0..n {
            for r in 0..rows {
                want[t * rows + r] = (0..cols).map(|i| w[r * cols + i] * x[t * cols + i]).sum();
            }
        }
        let mut acts = QuantizedActs::default();
        acts.quantize_from(&x, n, cols);
        for isa in Isa::supported() {
            let mut y = vec![f32::NAN; n * rows];
            matmul_dense(isa, DenseMatrix::F32(&w), rows, &x, n, &mut y);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-3, "{isa:?}: {a} vs {b}");
            }
            let q = PackedMatrix::quantize(PackedFormat::Q8_0, &w, rows, cols).unwrap();
            let mut yq = vec![f32::NAN; n * rows];
            matmul_packed(isa, &q, &acts, &mut yq);
            for (a, b) in yq.iter().zip(&want) {
                assert!((a - b).abs() < 0.25, "{isa:?} q8_0: {a} vs {b}");
            }
        }
    }
}
