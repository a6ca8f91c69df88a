//! Kernel micro-benchmarks: one expert-sized matrix (`[1024, 1024]`, the fused
//! gate/up of the bench model) for decode (1 token) and a prefill group (64
//! tokens), every weight format on every instruction set this CPU has, and
//! candle's quantized matmul on the same shape for comparison. The matrix fits in
//! the two cores' L2, so these time the kernels and their fork-join, not memory.
//!
//! `cargo bench --bench kernels`

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{Criterion, Throughput};
use half::bf16;
use switchyard::ops::kernels::Isa;
use switchyard::ops::matmul::{DenseData, DenseRows, matmul_dense, matmul_packed};
use switchyard::ops::quant::{PackedFormat, PackedMatrix, QuantizedActs};

const ROWS: usize = 1024;
const COLS: usize = 1024;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
        })
        .collect()
}

fn kernels(c: &mut Criterion) {
    let w = values(ROWS * COLS, 1);
    let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let q8 = PackedMatrix::quantize(PackedFormat::Q8_0, &w, ROWS, COLS).unwrap();
    let q4 = PackedMatrix::quantize(PackedFormat::Q4_0, &w, ROWS, COLS).unwrap();
    let wt = Tensor::from_slice(&w, (ROWS, COLS), &Device::Cpu).unwrap();
    for n in [1usize, 64] {
        let x = values(n * COLS, 2);
        let mut y = vec![0f32; n * ROWS];
        let mut acts = QuantizedActs::default();
        acts.quantize_from(&x, n, COLS);
        let mut g = c.benchmark_group(format!("matmul_{ROWS}x{COLS}_n{n}"));
        g.throughput(Throughput::Elements((n * ROWS * COLS) as u64));
        for isa in Isa::supported() {
            g.bench_function(format!("f32/{isa:?}"), |b| {
                b.iter(|| {
                    matmul_dense(
                        isa,
                        DenseRows {
                            data: DenseData::F32(&w),
                            cols: COLS,
                        },
                        ROWS,
                        &x,
                        n,
                        &mut y,
                    )
                })
            });
            g.bench_function(format!("bf16/{isa:?}"), |b| {
                b.iter(|| {
                    matmul_dense(
                        isa,
                        DenseRows {
                            data: DenseData::BF16(&w_bf16),
                            cols: COLS,
                        },
                        ROWS,
                        &x,
                        n,
                        &mut y,
                    )
                })
            });
            g.bench_function(format!("q8_0/{isa:?}"), |b| {
                b.iter(|| {
                    acts.quantize_from(&x, n, COLS);
                    matmul_packed(isa, &q8, &acts, &mut y)
                })
            });
            g.bench_function(format!("q4_0/{isa:?}"), |b| {
                b.iter(|| {
                    acts.quantize_from(&x, n, COLS);
                    matmul_packed(isa, &q4, &acts, &mut y)
                })
            });
        }
        let xt = Tensor::from_slice(&x, (n, COLS), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let qm = QMatMul::from_qtensor(QTensor::quantize(&wt, dtype).unwrap()).unwrap();
            g.bench_function(format!("candle_{dtype:?}"), |b| {
                b.iter(|| qm.forward(&xt).unwrap())
            });
        }
        g.finish();
    }
}

fn main() {
    // Set before the pool starts; then every call is made from a pool thread, as
    // the CLI makes them (`on_pool`), so a fork-join does not park the caller.
    switchyard::ops::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
    switchyard::ops::on_pool(|| {
        let mut c = Criterion::default().configure_from_args();
        kernels(&mut c);
        c.final_summary();
    });
}
