//! The token embedding: a `[vocab, hidden]` table of which a forward reads only
//! the rows of its tokens. A table in GGML blocks stays in its stored encoding,
//! wherever [`BlockRows`] keeps it, and a lookup decodes just the rows asked for,
//! so its f32 form (4x a Q8_0 table, 7x a Q4_0 one) never exists.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Where the encoded bytes of a table in GGML blocks are kept. Each row is
/// whole blocks, so a row decodes alone, with the same per-block arithmetic as
/// the whole table.
pub trait BlockRows: Send + Sync + std::fmt::Debug {
    /// Fills `out` with the table's bytes from `offset` on (whole rows, all
    /// inside the table).
    fn read(&self, offset: usize, out: &mut [u8]) -> Result<()>;

    /// Bytes of the table held in this process's memory.
    fn resident_bytes(&self) -> usize;
}

#[derive(Debug)]
enum Table {
    /// As loaded (f32, bf16 or f16); the only kind autograd (training) sees.
    Dense(Tensor),
    Blocks {
        dtype: GgmlDType,
        row_bytes: usize,
        rows: Box<dyn BlockRows>,
    },
}

/// Rows decoded per pass when checking a table in blocks for non-finite
/// values: bounds the transient f32 rows to a few MB whatever the vocabulary.
const CHECK_ROWS: usize = 1024;

#[derive(Debug)]
pub struct Embedding {
    table: Table,
    rows: usize,
    cols: usize,
    device: Device,
}

impl Embedding {
    /// A dense `[rows, cols]` table.
    pub fn dense(table: Tensor) -> Result<Self> {
        let (rows, cols) = table.dims2()?;
        Ok(Self {
            device: table.device().clone(),
            table: Table::Dense(table),
            rows,
            cols,
        })
    }

    /// A `[rows, cols]` table of `dtype` blocks (decoded on the CPU).
    pub fn blocks(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        source: Box<dyn BlockRows>,
    ) -> Result<Self> {
        let block = dtype.block_size();
        if !cols.is_multiple_of(block) {
            return Err(Error::InvalidInput(format!(
                "a {dtype:?} embedding with rows {cols} wide: rows are not whole blocks of {block}"
            )));
        }
        Ok(Self {
            table: Table::Blocks {
                dtype,
                row_bytes: cols / block * dtype.type_size(),
                rows: source,
            },
            rows,
            cols,
            device: Device::Cpu,
        })
    }

    /// The f32 rows of `ids`, `[ids.len(), cols]`.
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.rows) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is out of range for an embedding of {} rows",
                self.rows
            )));
        }
        match &self.table {
            // Activations are f32 whatever the weights' type, as in llama.cpp.
            Table::Dense(t) => {
                let ids = Tensor::new(ids, &self.device)?;
                Ok(t.index_select(&ids, 0)?.to_dtype(DType::F32)?)
            }
            Table::Blocks {
                dtype,
                row_bytes,
                rows,
            } => {
                let mut buf = vec![0u8; ids.len() * row_bytes];
                for (out, &id) in buf.chunks_exact_mut(*row_bytes).zip(ids) {
                    rows.read(id as usize * row_bytes, out)?;
                }
                self.decode(*dtype, &buf, ids.len())
            }
        }
    }

    /// `n` rows of `dtype` blocks as f32 `[n, cols]`.
    fn decode(&self, dtype: GgmlDType, bytes: &[u8], n: usize) -> Result<Tensor> {
        let q = super::ggml_qtensor(bytes, dtype, &[n, self.cols])?;
        Ok(q.dequantize(&self.device)?)
    }

    /// Whether every value is finite (`None` where that cannot be read, as
    /// [`super::all_finite`]); a table in blocks is decoded a slice of rows at a time.
    pub fn all_finite(&self) -> Result<Option<bool>> {
        let Table::Blocks {
            dtype,
            row_bytes,
            rows,
        } = &self.table
        else {
            return Ok(self.dense_table().and_then(super::all_finite));
        };
        let mut buf = vec![0u8; CHECK_ROWS * row_bytes];
        for first in (0..self.rows).step_by(CHECK_ROWS) {
            let n = CHECK_ROWS.min(self.rows - first);
            let bytes = &mut buf[..n * row_bytes];
            rows.read(first * row_bytes, bytes)?;
            if super::all_finite(&self.decode(*dtype, bytes, n)?) == Some(false) {
                return Ok(Some(false));
            }
        }
        Ok(Some(true))
    }

    /// The dense table, if it is one (a tied output projection shares it).
    pub fn dense_table(&self) -> Option<&Tensor> {
        match &self.table {
            Table::Dense(t) => Some(t),
            Table::Blocks { .. } => None,
        }
    }

    /// The GGML type of a table kept in blocks.
    pub fn block_dtype(&self) -> Option<GgmlDType> {
        match &self.table {
            Table::Dense(_) => None,
            Table::Blocks { dtype, .. } => Some(*dtype),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of the table held in this process's memory.
    pub fn resident_bytes(&self) -> usize {
        match &self.table {
            Table::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Table::Blocks { rows, .. } => rows.resident_bytes(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    /// A table held in memory, as stored.
    #[derive(Debug)]
    struct InMemory(Vec<u8>);

    impl BlockRows for InMemory {
        fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
            out.copy_from_slice(&self.0[offset..offset + out.len()]);
            Ok(())
        }
        fn resident_bytes(&self) -> usize {
            self.0.len()
        }
    }

    const ROWS: usize = 37;
    const COLS: usize = 256;

    /// A small xorshift, so that the test draws the same values every run.
    struct Draws(u64);

    impl Draws {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Uniform in [-1, 1).
        fn value(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    fn table(dtype: GgmlDType, seed: u64) -> (QTensor, Embedding) {
        let mut rng = Draws(0x9e37_79b9_7f4a_7c15 ^ seed);
        let w: Vec<f32> = (0..ROWS * COLS).map(|_| rng.value()).collect();
        let w = Tensor::from_vec(w, (ROWS, COLS), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let bytes = q.data().unwrap().to_vec();
        let e = Embedding::blocks(dtype, ROWS, COLS, Box::new(InMemory(bytes))).unwrap();
        (q, e)
    }

    /// The gather decodes each row exactly as dequantizing the whole table and
    /// indexing it: bit for bit, on every stored type, the first and last rows
    /// and repeated ids included.
    #[test]
    fn gather_equals_dequantize_then_index() {
        let types = [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::F16,
            GgmlDType::BF16,
        ];
        let mut rng = Draws(7);
        for (i, dtype) in types.into_iter().enumerate() {
            let (q, e) = table(dtype, i as u64);
            let full = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut ids: Vec<u32> = (0..9).map(|_| (rng.next() % ROWS as u64) as u32).collect();
            ids.extend([ROWS as u32 - 1, 0, ids[0]]);
            let got = e.lookup(&ids).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(got.len(), ids.len());
            for (row, &id) in got.iter().zip(&ids) {
                let want = &full[id as usize];
                assert!(
                    row.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype:?}: row {id} differs from the dequantized table"
                );
            }
            assert_eq!(e.all_finite().unwrap(), Some(true), "{dtype:?}");
        }
    }

    #[test]
    fn out_of_range_token_is_an_error() {
        let (_, e) = table(GgmlDType::Q8_0, 1);
        let err = e.lookup(&[3, ROWS as u32]).unwrap_err().to_string();
        assert!(err.contains(&format!("token id {ROWS}")), "{err}");
        let dense = Embedding::dense(Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap());
        let err = dense.unwrap().lookup(&[4]).unwrap_err().to_string();
        assert!(err.contains("token id 4"), "{err}");
    }

    /// A NaN block scale in the last row is found by the row-slice check.
    #[test]
    fn non_finite_blocks_are_found() {
        let (q, _) = table(GgmlDType::Q8_0, 2);
        let mut bytes = q.data().unwrap().to_vec();
        let last_block = bytes.len() - GgmlDType::Q8_0.type_size();
        bytes[last_block..last_block + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
        let e = Embedding::blocks(GgmlDType::Q8_0, ROWS, COLS, Box::new(InMemory(bytes))).unwrap();
        assert_eq!(e.all_finite().unwrap(), Some(false));
    }
}
