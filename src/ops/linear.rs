use std::cell::Cell;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};

use super::kernels::Isa;
use super::matmul::{
    DenseData, DenseRows, MatmulJob, RowDots, dense_dots, matmul_dense, matmul_packed, packed_dots,
    run_jobs,
};
use super::mxfp4::{Mxfp4Matrix, mxfp4_dots, mxfp4_dots_f32};
use super::quant::{BLOCK, PackedFormat, PackedMatrix, QuantKind, QuantizedActs};
use crate::error::{Error, Result};

/// How a [`Linear`] stores its `[out, in]` weight.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// f32, bf16 or f16 as loaded; the only kind autograd (training) sees.
    Dense(Tensor),
    /// Q8_0 / Q4_0 in our packed layout, read by our kernels.
    Packed(Arc<PackedMatrix>),
    /// MXFP4 (gpt-oss experts, as the Hub and GGUF ship them), read by our kernels:
    /// on f32 activations, exactly the product on the dequantized weights, or
    /// (`q8_activations`, after [`Linear::quantize`]) on Q8 activations with the
    /// integer dot products the packed kinds use.
    Mxfp4 {
        matrix: Arc<Mxfp4Matrix>,
        q8_activations: bool,
    },
    /// Any other GGML type (Q4_K, Q6_K, ...) through candle's quantized kernels.
    Ggml {
        matmul: QMatMul,
        dims: (usize, usize),
        bytes: usize,
    },
}

/// `y = x Wᵀ (+ b)`, the weight stored `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

thread_local! {
    /// Quantized activations, reused across calls on this thread.
    static ACTS: Cell<QuantizedActs> = Cell::new(QuantizedActs::default());
}

/// Runs `f` with this thread's buffer in `key`, taken out of its cell for the
/// duration: a parallel section inside `f` may run another task on this thread
/// (rayon steals work while it waits), and that task then finds an empty buffer
/// of its own instead of one that is in use.
pub fn with_thread_scratch<T: Default + 'static, R>(
    key: &'static std::thread::LocalKey<Cell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut buf = key.with(Cell::take);
    let r = f(&mut buf);
    key.with(|c| c.set(buf));
    r
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Dense(weight),
            bias,
        }
    }

    /// Any weight kind with its bias (a packed expert file's reader builds them).
    pub fn from_weight(weight: LinearWeight, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// An MXFP4 weight (see [`Mxfp4Matrix`]) applied to f32 activations; the
    /// bias stays f32.
    pub fn from_mxfp4(weight: Mxfp4Matrix, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Mxfp4 {
                matrix: Arc::new(weight),
                q8_activations: false,
            },
            bias,
        }
    }

    /// From a GGML tensor (a GGUF file's): Q8_0, Q4_0, Q4_1, Q4_K and Q6_K are
    /// repacked for our kernels, Q5_0, Q5_1 and Q5_K re-encoded as Q8_0 for them,
    /// float types become dense, and Q2_K / Q3_K run on candle's kernels.
    pub fn from_qtensor(w: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (rows, cols) = w.shape().dims2()?;
        let weight = match w.dtype() {
            GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
                let format = match w.dtype() {
                    GgmlDType::Q8_0 => PackedFormat::Q8_0,
                    GgmlDType::Q4_0 => PackedFormat::Q4_0,
                    _ => PackedFormat::Q4_1,
                };
                let packed = PackedMatrix::from_ggml(format, &w.data()?, rows, cols)?;
                LinearWeight::Packed(Arc::new(packed))
            }
            GgmlDType::Q4K => LinearWeight::Packed(Arc::new(PackedMatrix::from_ggml_q4k(
                &w.data()?,
                rows,
                cols,
            )?)),
            GgmlDType::Q6K => LinearWeight::Packed(Arc::new(PackedMatrix::from_ggml_q6k(
                &w.data()?,
                rows,
                cols,
            )?)),
            // 5-bit blocks have no tile kernel of their own; Q8_0 holds them to within
            // an eighth of their own rounding step, for 1.5x the bytes, and runs ~2x
            // faster than candle's kernels for them.
            GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => {
                let data = w
                    .dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                LinearWeight::Packed(Arc::new(PackedMatrix::quantize(
                    PackedFormat::Q8_0,
                    &data,
                    rows,
                    cols,
                )?))
            }
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let t = w.dequantize(&Device::Cpu)?;
                let dtype = match w.dtype() {
                    GgmlDType::F32 => DType::F32,
                    GgmlDType::F16 => DType::F16,
                    _ => DType::BF16,
                };
                LinearWeight::Dense(t.to_dtype(dtype)?)
            }
            _ => {
                let bytes = w.storage_size_in_bytes();
                LinearWeight::Ggml {
                    matmul: QMatMul::from_qtensor(w)?,
                    dims: (rows, cols),
                    bytes,
                }
            }
        };
        Ok(Self { weight, bias })
    }

    /// The same layer with its weight quantized (the bias stays f32). Q4_K uses
    /// GGML's k-quant search (candle's quantizer) on widths that are a multiple of
    /// 256 and plain Q4_1 rounding on others; widths off the 32-element block stay
    /// unquantized (as in llama.cpp).
    pub fn quantize(&self, kind: QuantKind) -> Result<Linear> {
        let (rows, cols) = self.dims();
        // MXFP4 is already 4.25 bits per weight; re-encoding it could only add
        // error, so it keeps its codes and only its activations are quantized.
        if let LinearWeight::Mxfp4 { matrix, .. } = &self.weight {
            return Ok(Linear {
                weight: LinearWeight::Mxfp4 {
                    matrix: matrix.clone(),
                    q8_activations: true,
                },
                bias: self.bias.clone(),
            });
        }
        if !cols.is_multiple_of(BLOCK) {
            return Ok(self.clone());
        }
        let w = self.dense_f32()?;
        let packed = match kind {
            QuantKind::Q4K if cols.is_multiple_of(256) => {
                let q = QTensor::quantize(&w, GgmlDType::Q4K)?;
                PackedMatrix::from_ggml_q4k(&q.data()?, rows, cols)?
            }
            QuantKind::Q8_0 | QuantKind::Q4_0 | QuantKind::Q4K => {
                let format = match kind {
                    QuantKind::Q8_0 => PackedFormat::Q8_0,
                    QuantKind::Q4_0 => PackedFormat::Q4_0,
                    QuantKind::Q4K => PackedFormat::Q4_1,
                };
                let data = w.flatten_all()?.to_vec1::<f32>()?;
                PackedMatrix::quantize(format, &data, rows, cols)?
            }
        };
        let weight = LinearWeight::Packed(Arc::new(packed));
        Ok(Linear {
            weight,
            bias: self.bias.clone(),
        })
    }

    /// The weight as an f32 tensor `[out, in]` (dequantized when it is quantized).
    pub fn dense_f32(&self) -> Result<Tensor> {
        let (rows, cols) = self.dims();
        Ok(match &self.weight {
            LinearWeight::Dense(w) => w.to_dtype(DType::F32)?,
            LinearWeight::Packed(p) => {
                Tensor::from_vec(p.dequantize(), (rows, cols), &Device::Cpu)?
            }
            LinearWeight::Mxfp4 { matrix, .. } => {
                Tensor::from_vec(matrix.dequantize(), (rows, cols), &Device::Cpu)?
            }
            LinearWeight::Ggml { matmul, .. } => match matmul {
                QMatMul::QTensor(q) => q.dequantize(&Device::Cpu)?,
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
            },
        })
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// The dense weight tensor; `None` for quantized weights.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Some(w),
            _ => None,
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// (out, in)
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            LinearWeight::Dense(w) => {
                let d = w.dims();
                (d[0], d[1])
            }
            LinearWeight::Packed(p) => (p.rows(), p.cols()),
            LinearWeight::Mxfp4 { matrix, .. } => (matrix.rows(), matrix.cols()),
            LinearWeight::Ggml { dims, .. } => *dims,
        }
    }

    /// Bytes a forward reads from the weight (and bias).
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let w = match &self.weight {
            LinearWeight::Dense(w) => bytes(w),
            LinearWeight::Packed(p) => p.bytes(),
            LinearWeight::Mxfp4 { matrix, .. } => matrix.bytes(),
            LinearWeight::Ggml { bytes, .. } => *bytes,
        };
        w + self.bias.as_ref().map_or(0, bytes)
    }

    /// # Shapes
    /// `x: [n, in] -> [n, out]`; f32 out unless the weight is dense and `x` is not
    /// f32 (then `x`'s dtype, via candle).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let LinearWeight::Dense(w) = &self.weight
            && (x.track_op()
                || w.track_op()
                || x.dtype() != DType::F32
                || !w.is_contiguous()
                || uses_gemm(w, x.dim(0)?))
        {
            return self.forward_candle(w, x);
        }
        let (n, cols) = x.dims2()?;
        let rows = self.dims().0;
        let x = x.contiguous()?;
        let mut y = vec![0f32; n * rows];
        with_f32(&x, |xs| self.forward_f32(xs, n, cols, &mut y))??;
        Ok(Tensor::from_vec(y, (n, rows), &Device::Cpu)?)
    }

    /// The same product on plain slices, for hot paths that keep their
    /// activations outside tensors.
    ///
    /// # Shapes
    /// `x: [n, in]` -> `y: [n, out]` (overwritten)
    pub fn forward_f32(&self, x: &[f32], n: usize, cols: usize, y: &mut [f32]) -> Result<()> {
        let (rows, w_cols) = self.dims();
        if cols != w_cols || x.len() != n * cols || y.len() != n * rows {
            return Err(Error::InvalidInput(format!(
                "linear [{rows}, {w_cols}] applied to {} values as [{n}, {cols}] into {}",
                x.len(),
                y.len()
            )));
        }
        let isa = Isa::best();
        match &self.weight {
            LinearWeight::Dense(w) if uses_gemm(w, n) => {
                let xt = Tensor::from_slice(x, (n, cols), &Device::Cpu)?;
                let yt = xt.matmul(&w.t()?)?;
                with_f32(&yt.contiguous()?, |v| y.copy_from_slice(v))?;
            }
            LinearWeight::Dense(w) => with_dense(w, |m| matmul_dense(isa, m, rows, x, n, y))?,
            LinearWeight::Mxfp4 {
                matrix,
                q8_activations: false,
            } => {
                let dots = mxfp4_dots_f32(matrix, x);
                run_jobs(
                    n,
                    cols,
                    &mut [MatmulJob {
                        rows,
                        y,
                        dots: &dots,
                    }],
                );
            }
            LinearWeight::Packed(_) | LinearWeight::Mxfp4 { .. } => {
                return with_thread_scratch(&ACTS, |acts| {
                    acts.quantize_from(x, n, cols);
                    self.forward_quantized(acts, y)
                });
            }
            LinearWeight::Ggml { matmul, .. } => {
                let xt = Tensor::from_slice(x, (n, cols), &Device::Cpu)?;
                let yt = matmul.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?;
                y.copy_from_slice(&yt);
            }
        }
        self.add_bias(y)
    }

    /// Whether the weight multiplies Q8-quantized activations ([`Linear::forward_quantized`]).
    pub fn reads_quantized(&self) -> bool {
        matches!(
            self.weight,
            LinearWeight::Packed(_)
                | LinearWeight::Mxfp4 {
                    q8_activations: true,
                    ..
                }
        )
    }

    /// The product on activations quantized by the caller, so that layers reading
    /// the same input (a MoE layer's experts) share one quantization of it.
    ///
    /// # Shapes
    /// `acts: [n, in]` -> `y: [n, out]` (overwritten)
    pub fn forward_quantized(&self, acts: &QuantizedActs, y: &mut [f32]) -> Result<()> {
        let (rows, cols) = self.dims();
        if acts.cols != cols || y.len() != acts.n * rows {
            return Err(Error::InvalidInput(format!(
                "linear [{rows}, {cols}] applied to quantized [{}, {}] into {}",
                acts.n,
                acts.cols,
                y.len()
            )));
        }
        let isa = Isa::best();
        match &self.weight {
            LinearWeight::Packed(p) => matmul_packed(isa, p, acts, y),
            LinearWeight::Mxfp4 { matrix, .. } => {
                let dots = mxfp4_dots(isa, matrix, acts);
                run_jobs(
                    acts.n,
                    cols,
                    &mut [MatmulJob {
                        rows,
                        y,
                        dots: &dots,
                    }],
                );
            }
            LinearWeight::Dense(_) | LinearWeight::Ggml { .. } => {
                return Err(Error::InvalidInput(format!(
                    "linear [{rows}, {cols}] does not read quantized activations"
                )));
            }
        }
        self.add_bias(y)
    }

    /// Several layers applied to the same input in one parallel pass (one
    /// fork-join instead of one each), e.g. the q, k and v projections.
    ///
    /// # Shapes
    /// `x: [n, in] -> [[n, out_i]]`
    pub fn forward_many(linears: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let fast = x.dtype() == DType::F32
            && !x.track_op()
            && linears.iter().all(|l| match &l.weight {
                LinearWeight::Dense(w) => {
                    !w.track_op() && w.is_contiguous() && !uses_gemm(w, x.dims()[0])
                }
                LinearWeight::Packed(_) | LinearWeight::Mxfp4 { .. } => true,
                LinearWeight::Ggml { .. } => false,
            });
        if !fast {
            return linears.iter().map(|l| l.forward(x)).collect();
        }
        let (n, cols) = x.dims2()?;
        if linears.iter().any(|l| l.dims().1 != cols) {
            return Err(Error::InvalidInput(format!(
                "linears of different widths applied to [{n}, {cols}]"
            )));
        }
        let x = x.contiguous()?;
        let mut ys: Vec<Vec<f32>> = linears.iter().map(|l| vec![0f32; n * l.dims().0]).collect();
        let isa = Isa::best();
        // Storage guards of the dense weights, held while the kernels read them.
        let guards: Vec<_> = linears
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Dense(w) => Some(w.storage_and_layout()),
                _ => None,
            })
            .collect();
        let dense: Vec<Option<DenseRows<'_>>> = guards
            .iter()
            .map(|g| g.as_ref().map(|(s, l)| dense_matrix(s, l)).transpose())
            .collect::<Result<_>>()?;
        with_f32(&x, |xs| {
            with_thread_scratch(&ACTS, |acts| {
                if linears.iter().any(|l| l.reads_quantized()) {
                    acts.quantize_from(xs, n, cols);
                }
                let acts = &*acts;
                let dots: Vec<Box<RowDots<'_>>> = linears
                    .iter()
                    .zip(&dense)
                    .map(|(l, d)| -> Box<RowDots<'_>> {
                        match (&l.weight, d) {
                            (LinearWeight::Packed(p), _) => Box::new(packed_dots(isa, p, acts)),
                            (
                                LinearWeight::Mxfp4 {
                                    matrix,
                                    q8_activations: true,
                                },
                                _,
                            ) => Box::new(mxfp4_dots(isa, matrix, acts)),
                            (LinearWeight::Mxfp4 { matrix, .. }, _) => {
                                Box::new(mxfp4_dots_f32(matrix, xs))
                            }
                            (_, Some(d)) => dense_dots(isa, *d, xs),
                            _ => unreachable!("checked above: dense or packed"),
                        }
                    })
                    .collect();
                let mut jobs: Vec<MatmulJob<'_>> = ys
                    .iter_mut()
                    .zip(linears)
                    .zip(&dots)
                    .map(|((y, l), dots)| MatmulJob {
                        rows: l.dims().0,
                        y,
                        dots: dots.as_ref(),
                    })
                    .collect();
                run_jobs(n, cols, &mut jobs);
            })
        })?;
        drop(guards);
        linears
            .iter()
            .zip(ys)
            .map(|(l, mut y)| {
                l.add_bias(&mut y)?;
                Ok(Tensor::from_vec(y, (n, l.dims().0), &Device::Cpu)?)
            })
            .collect()
    }

    fn add_bias(&self, y: &mut [f32]) -> Result<()> {
        if let Some(b) = &self.bias {
            let b = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            for row in y.chunks_mut(b.len()) {
                row.iter_mut().zip(&b).for_each(|(v, b)| *v += b);
            }
        }
        Ok(())
    }

    fn forward_candle(&self, w: &Tensor, x: &Tensor) -> Result<Tensor> {
        let w = if w.dtype() == x.dtype() {
            w.clone()
        } else {
            w.to_dtype(x.dtype())?
        };
        let y = x.matmul(&w.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }
}

/// f32 weights over many tokens go to candle's gemm: its register-blocked f32
/// kernel beats our row kernels once the product is compute-bound (measured: our
/// f32 prefill 0.91x candle-transformers' before this).
fn uses_gemm(w: &Tensor, n_tokens: usize) -> bool {
    w.dtype() == DType::F32 && n_tokens >= 16 && !super::matmul::batch_invariant()
}

/// Runs `f` on a contiguous f32 CPU tensor's values.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => Err(Error::InvalidInput(format!(
            "expected a contiguous f32 CPU tensor, got {:?} {:?}",
            t.dtype(),
            t.dims()
        ))),
    }
}

/// Runs `f` on a contiguous dense CPU weight's values.
fn with_dense<R>(t: &Tensor, f: impl FnOnce(DenseRows<'_>) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    Ok(f(dense_matrix(&storage, layout)?))
}

fn dense_matrix<'a>(storage: &'a Storage, layout: &candle_core::Layout) -> Result<DenseRows<'a>> {
    let Some((a, b)) = layout.contiguous_offsets() else {
        return Err(Error::InvalidInput("weight is not contiguous".into()));
    };
    let cols = layout.dims().last().copied().unwrap_or(1);
    let data = match storage {
        Storage::Cpu(CpuStorage::F32(v)) => DenseData::F32(&v[a..b]),
        Storage::Cpu(CpuStorage::BF16(v)) => DenseData::BF16(&v[a..b]),
        Storage::Cpu(CpuStorage::F16(v)) => DenseData::F16(&v[a..b]),
        _ => {
            return Err(Error::UnsupportedDtype {
                name: "linear weight".into(),
                dtype: format!("{:?}", storage.dtype()),
            });
        }
    };
    Ok(DenseRows { data, cols })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear(rows: usize, cols: usize, dtype: DType) -> (Linear, Tensor) {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (((i * 31) % 97) as f32 - 48.0) / 50.0)
            .collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let b = Tensor::arange(0f32, rows as f32, &Device::Cpu).unwrap();
        (Linear::new(w.to_dtype(dtype).unwrap(), Some(b)), w)
    }

    fn rel_rms(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().mean_all().unwrap();
        let n = b.sqr().unwrap().mean_all().unwrap();
        (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
    }

    #[test]
    fn every_weight_kind_matches_the_f32_product() {
        let (lin, w) = linear(40, 512, DType::F32);
        let x = Tensor::randn(0f32, 1.0, (6, 512), &Device::Cpu).unwrap();
        let want = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(lin.bias().unwrap())
            .unwrap();
        let cases = [
            (lin.clone(), 1e-5),
            (linear(40, 512, DType::BF16).0, 1e-2),
            (linear(40, 512, DType::F16).0, 1e-3),
            (lin.quantize(QuantKind::Q8_0).unwrap(), 1e-2),
            (lin.quantize(QuantKind::Q4_0).unwrap(), 0.1),
            (lin.quantize(QuantKind::Q4K).unwrap(), 0.1),
        ];
        for (i, (l, tol)) in cases.iter().enumerate() {
            let y = l.forward(&x).unwrap();
            let err = rel_rms(&y, &want);
            assert!(err < *tol, "case {i}: relative rms {err}");
        }
    }

    #[test]
    fn a_product_started_while_this_threads_buffer_is_in_use_gets_its_own() {
        // What a task that rayon steals onto this thread inside a parallel section
        // sees: the buffer is taken. It used to be a RefCell borrowed across the
        // section, and the nested product panicked.
        let (lin, w) = linear(40, 512, DType::F32);
        let q = lin.quantize(QuantKind::Q8_0).unwrap();
        // Fixed inputs: with two random rows the Q8_0 error crossed 1 % in about one
        // run in sixteen, and the test failed by chance.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let x: Vec<f32> = (0..2 * 512)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        let x = Tensor::from_vec(x, (2, 512), &Device::Cpu).unwrap();
        let want = q.forward(&x).unwrap();
        with_thread_scratch(&ACTS, |outer| {
            outer.quantize_from(&[0.5; 512], 1, 512);
            let y = q.forward(&x).unwrap();
            assert_eq!(y.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
            assert_eq!((outer.n, outer.scales[0]), (1, 0.5 / 127.0));
        });
        let dense = x.matmul(&w.t().unwrap()).unwrap();
        let err = rel_rms(
            &(want - lin.bias().unwrap().broadcast_as((2, 40)).unwrap()).unwrap(),
            &dense,
        );
        // Q8_0 weights times Q8 activations: about 1 % here, so 3 % leaves room for
        // the other instruction sets' rounding.
        assert!(err < 3e-2, "relative rms {err}");
    }

    #[test]
    fn weight_bytes_count_quants_and_scales() {
        let (lin, _) = linear(16, 512, DType::F32);
        assert_eq!(lin.weight_bytes(), 16 * 512 * 4 + 16 * 4);
        let q8 = lin.quantize(QuantKind::Q8_0).unwrap();
        assert_eq!(q8.weight_bytes(), 16 * 16 * 34 + 16 * 4);
        let q4 = lin.quantize(QuantKind::Q4_0).unwrap();
        assert_eq!(q4.weight_bytes(), 16 * 16 * 18 + 16 * 4);
        // Q4_K at its own size: 144 bytes per 256 values (6-bit scales and mins per
        // 32, an f16 d and dmin per 256).
        let q4k = lin.quantize(QuantKind::Q4K).unwrap();
        assert_eq!(q4k.weight_bytes(), 16 * 2 * 144 + 16 * 4);
        // Packed rows are stored (and read) in whole tiles of 16.
        let (lin, _) = linear(8, 512, DType::F32);
        let q8 = lin.quantize(QuantKind::Q8_0).unwrap();
        assert_eq!(q8.weight_bytes(), 16 * 16 * 34 + 8 * 4);
    }

    #[test]
    fn ggml_tensors_become_packed_or_ggml_weights() {
        // 19 rows: a padded tile. Q6_K's sub-block scales are rounded to f16
        // (relative 2^-11), so its values agree to ~1e-4 rather than exactly; Q5_K
        // is re-encoded as Q8_0.
        let (lin, w) = linear(19, 512, DType::F32);
        for (dtype, packed, tol) in [
            (GgmlDType::Q8_0, true, 1e-6),
            (GgmlDType::Q4_0, true, 1e-6),
            (GgmlDType::Q4_1, true, 1e-6),
            (GgmlDType::Q4K, true, 1e-6),
            (GgmlDType::Q6K, true, 1e-3),
            (GgmlDType::Q5K, true, 0.02),
            (GgmlDType::Q3K, false, 1e-6),
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap();
            let l = Linear::from_qtensor(q, lin.bias().cloned()).unwrap();
            assert_eq!(
                matches!(l.weight(), LinearWeight::Packed(_)),
                packed,
                "{dtype:?}"
            );
            let got = l.dense_f32().unwrap();
            let err = rel_rms(&got, &want);
            assert!(err < tol, "{dtype:?}: {err}");
            // And the product runs on the packed kernels with the same values.
            let x = Tensor::randn(0f32, 1.0, (3, 512), &Device::Cpu).unwrap();
            let y = l.forward(&x).unwrap();
            let y_ref = x
                .matmul(&want.t().unwrap())
                .unwrap()
                .broadcast_add(lin.bias().unwrap())
                .unwrap();
            let err = rel_rms(&y, &y_ref);
            assert!(err < 0.02, "{dtype:?} product: {err}");
        }
    }

    #[test]
    fn mxfp4_weights_run_on_their_kernels_alone_and_with_others() {
        // 19 rows of 2 blocks in the Hub layout: codes from a ramp, exponents near 2^-3.
        let (rows, cols) = (19, 64);
        let blocks: Vec<u8> = (0..rows * 2 * 16).map(|i| (i * 37 % 256) as u8).collect();
        let scales: Vec<u8> = (0..rows * 2).map(|i| 122 + (i % 5) as u8).collect();
        let m = Mxfp4Matrix::from_hub(&blocks, &scales, rows, cols).unwrap();
        let bias = Tensor::arange(0f32, rows as f32, &Device::Cpu).unwrap();
        let lin = Linear::from_mxfp4(m, Some(bias.clone()));
        assert_eq!(lin.dims(), (rows, cols));
        assert_eq!(lin.weight_bytes(), 2 * 2 * 16 * 17 + rows * 4);
        let q = lin.quantize(QuantKind::Q8_0).unwrap();
        assert!(matches!(
            q.weight(),
            LinearWeight::Mxfp4 {
                q8_activations: true,
                ..
            }
        ));
        assert!(q.reads_quantized() && !lin.reads_quantized());
        let w = lin.dense_f32().unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, cols), &Device::Cpu).unwrap();
        let want = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let (dense, _) = linear(5, cols, DType::F32);
        // On f32 activations the product is the dequantized one; on Q8 ones
        // within the activations' rounding.
        for (l, tol) in [(&lin, 1e-6), (&q, 0.01)] {
            let many = Linear::forward_many(&[l, &dense], &x).unwrap();
            for y in [l.forward(&x).unwrap(), many[0].clone()] {
                let err = rel_rms(&y, &want);
                assert!(err < tol, "mxfp4 product: {err} (tolerance {tol})");
            }
        }
    }
}
