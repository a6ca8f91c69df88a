//! `y = x Wᵀ` over all cores: output rows are split into chunks that rayon's
//! threads take in turn; a chunk's weights are read from memory once and reused
//! from cache for every token.
//!
//! Cost model: decode reads every weight byte once (memory-bound); prefill does
//! `n * rows * cols` multiply-adds with each weight row loaded `n / 4` times from L1.

use rayon::prelude::*;

pub use super::kernels::{DenseData, DenseRows};
use half::bf16;

use super::kernels::{
    Isa, MAX_TOKENS, bf16_rows_dots, dense_rows_dots, has_avx512_bf16, packed_rows_dots,
};
use super::quant::{PackedMatrix, QuantizedActs, TILE};

/// Rows per block (whole packed tiles): a block of weights stays in L2 while every
/// token passes over it.
const ROW_BLOCK: usize = 4 * TILE;
/// Below this many multiply-adds a matmul runs on the calling thread (a router,
/// a tiny test model): a fork-join costs more than the work.
pub(crate) const PARALLEL_MIN_MACS: usize = 1 << 18;

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
        .stack_size(WORKER_STACK)
        .build_global();
}

/// Stack of a pool thread: [`on_pool`] runs whole commands (training's autograd
/// included) on one.
const WORKER_STACK: usize = 16 << 20;

/// Runs `f` on one of the pool's threads and waits for it. Parallel loops started
/// from a pool thread hand work to the other threads through the pool's own
/// queues; started from any other thread, each one parks the caller and wakes it
/// again (a futex round trip per matmul, ~10 % of a 4-bit decode step).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::join(f, || ()).0
}

/// Keeps the pool's other threads polling for work while it lives, so that the
/// many small parallel sections of one forward (q/k/v, attention heads, o, the
/// experts, `lm_head`: ~65 per decode step of a 16-layer model) each find their
/// helpers awake. A rayon worker with nothing to do parks after a few
/// microseconds, and waking it costs a futex and, in a virtual machine, a halted
/// vCPU's wake-up: 12-22 us per fork-join after an idle gap of 20-300 us on this
/// project's 2-core guest, against ~1-3 us with the helpers polling (as
/// llama.cpp's thread pool spins between graph nodes). Polling threads run the
/// jobs they find through `rayon::yield_now`, so they are ordinary workers.
///
/// Only a pool thread spins the others (a caller outside the pool already pays
/// a park per parallel loop); `SWITCHYARD_SPIN=0` turns it off, to measure it.
#[must_use = "the other threads stop polling when the guard is dropped"]
pub struct SpinningWorkers {
    polling: Option<std::sync::Arc<Polling>>,
}

#[derive(Default)]
struct Polling {
    stop: std::sync::atomic::AtomicBool,
    /// Threads polling right now, and threads that started polling.
    pollers: std::sync::atomic::AtomicUsize,
    started: std::sync::atomic::AtomicUsize,
}

/// Starts [`SpinningWorkers`] for the caller's parallel sections.
pub fn spin_workers() -> SpinningWorkers {
    use std::sync::atomic::Ordering;
    let idle = SpinningWorkers { polling: None };
    let Some(me) = rayon::current_thread_index() else {
        return idle;
    };
    if rayon::current_num_threads() < 2 || !spinning_allowed() {
        return idle;
    }
    let polling = std::sync::Arc::new(Polling::default());
    let shared = polling.clone();
    rayon::spawn_broadcast(move |ctx| {
        if ctx.index() == me {
            return;
        }
        shared.pollers.fetch_add(1, Ordering::AcqRel);
        shared.started.fetch_add(1, Ordering::AcqRel);
        let mut idle_since = std::time::Instant::now();
        let mut misses = 0u32;
        while !shared.stop.load(Ordering::Acquire) {
            if rayon::yield_now() == Some(rayon::Yield::Executed) {
                idle_since = std::time::Instant::now();
                continue;
            }
            // ~0.3 us between polls: often enough to start a job within a
            // microsecond, rare enough not to contend on the queues.
            for _ in 0..16 {
                std::hint::spin_loop();
            }
            misses = misses.wrapping_add(1);
            // Every ~20 us, let a runnable thread of another process have
            // this core (an oversubscribed machine would otherwise lose the
            // time slice to a poller), and stop polling after a gap no
            // parallel section of a forward leaves: parking is cheap there.
            if misses.is_multiple_of(64) {
                if idle_since.elapsed() > SPIN_IDLE_LIMIT {
                    break;
                }
                std::thread::yield_now();
            }
        }
        shared.pollers.fetch_sub(1, Ordering::AcqRel);
    });
    SpinningWorkers {
        polling: Some(polling),
    }
}

impl SpinningWorkers {
    /// Threads polling for this guard right now.
    pub fn pollers(&self) -> usize {
        self.polling
            .as_ref()
            .map_or(0, |p| p.pollers.load(std::sync::atomic::Ordering::Acquire))
    }
}

impl Drop for SpinningWorkers {
    fn drop(&mut self) {
        if let Some(p) = &self.polling {
            p.stop.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// A poller with nothing to do for this long parks as rayon's threads do.
const SPIN_IDLE_LIMIT: std::time::Duration = std::time::Duration::from_micros(500);

fn spinning_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("SWITCHYARD_SPIN").map_or(true, |v| v != "0"))
}

static BATCH_INVARIANT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// With `on`, every row of a dense matmul is computed exactly as it would be alone:
/// no bf16-rounded activations for several tokens, no gemm for many. A greedy
/// request then gives the same tokens whatever it is batched with (the server's
/// default, like vLLM's batch-invariant mode), at some prefill speed.
pub fn set_batch_invariant(on: bool) {
    BATCH_INVARIANT.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn batch_invariant() -> bool {
    BATCH_INVARIANT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Threads the kernels run on.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Where output element `(t, r)` of `y: [n, rows]` goes; chunks write disjoint rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every `(t, r)` is written by exactly one chunk (chunks own disjoint row ranges),
// and `y` outlives the parallel loop that borrows it.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// The dot products of rows `rows` with tokens `t0..t0 + nt`: `out[row - rows.start][token - t0]`.
pub type RowDots<'a> =
    dyn Fn(std::ops::Range<usize>, usize, usize, &mut [[f32; MAX_TOKENS]]) + Sync + 'a;

/// One matrix of a [`run_jobs`] call: `y: [n, rows]` from `dots`.
pub struct MatmulJob<'a> {
    pub rows: usize,
    pub y: &'a mut [f32],
    pub dots: &'a RowDots<'a>,
}

thread_local! {
    /// Set while this thread runs one task of a caller-level parallel loop.
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as one task of a parallel loop the caller spreads over the threads
/// (e.g. one expert of a MoE layer): matmuls inside it stay on this thread, as
/// splitting them again would only add overhead.
pub fn as_task<R>(f: impl FnOnce() -> R) -> R {
    let was = IN_TASK.with(|t| t.replace(true));
    let r = f();
    IN_TASK.with(|t| t.set(was));
    r
}

/// Runs every job's rows for all `n` tokens, all jobs in one parallel loop (one
/// fork-join, e.g. for the q, k and v projections together).
///
/// Rows go in blocks of [`ROW_BLOCK`] (kept in L2) and, within a block, tokens in
/// groups of [`MAX_TOKENS`] (kept in L1) that each row is applied to at once.
pub fn run_jobs(n: usize, cols: usize, jobs: &mut [MatmulJob<'_>]) {
    for job in jobs.iter() {
        assert!(
            job.y.len() >= n * job.rows,
            "output of {} < {n} x {}",
            job.y.len(),
            job.rows
        );
    }
    let outs: Vec<OutPtr> = jobs.iter_mut().map(|j| OutPtr(j.y.as_mut_ptr())).collect();
    let chunk = |j: usize, range: std::ops::Range<usize>| {
        let (out, rows, dots) = (outs[j], jobs[j].rows, jobs[j].dots);
        let mut vals = [[0f32; MAX_TOKENS]; ROW_BLOCK];
        for block in range.clone().step_by(ROW_BLOCK) {
            let block_end = (block + ROW_BLOCK).min(range.end);
            for t0 in (0..n).step_by(MAX_TOKENS) {
                let nt = MAX_TOKENS.min(n - t0);
                dots(block..block_end, t0, nt, &mut vals);
                for (r, v) in (block..block_end).zip(&vals) {
                    for (i, &d) in v.iter().enumerate().take(nt) {
                        // SAFETY: `(t0 + i) * rows + r < n * rows <= y.len()`, and row `r`
                        // of job `j` belongs to this chunk only.
                        unsafe { *out.0.add((t0 + i) * rows + r) = d };
                    }
                }
            }
        }
    };
    let total_rows: usize = jobs.iter().map(|j| j.rows).sum();
    let threads = num_threads();
    if IN_TASK.with(|t| t.get()) || threads <= 1 || n * total_rows * cols < PARALLEL_MIN_MACS {
        for (j, job) in jobs.iter().enumerate() {
            chunk(j, 0..job.rows);
        }
        return;
    }
    // A few chunks per thread so a thread slowed by a neighbour's job is evened out;
    // whole packed tiles each.
    let chunk_rows = total_rows.div_ceil(threads * 4).next_multiple_of(TILE);
    let chunks: Vec<(usize, std::ops::Range<usize>)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| {
            (0..job.rows)
                .step_by(chunk_rows)
                .map(move |r| (j, r..(r + chunk_rows).min(job.rows)))
        })
        .collect();
    chunks
        .into_par_iter()
        .with_max_len(1)
        .for_each(|(j, range)| chunk(j, range));
}

/// The row kernel of a dense matrix. bf16 weights times several tokens use
/// `vdpbf16ps` on bf16-rounded activations where the CPU has it (as llama.cpp
/// does for bf16); a single token (decode, memory-bound) keeps f32 activations.
pub fn dense_dots<'a>(isa: Isa, w: DenseRows<'a>, x: &'a [f32]) -> Box<RowDots<'a>> {
    let n = x.len() / w.cols.max(1);
    match w.data {
        DenseData::BF16(wb)
            if n > 1 && isa == Isa::Avx512 && has_avx512_bf16() && !batch_invariant() =>
        {
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let cols = w.cols;
            Box::new(move |rows, t0, nt, out| bf16_rows_dots(wb, cols, rows, &xb, t0, nt, out))
        }
        _ => Box::new(move |rows, t0, nt, out| dense_rows_dots(isa, w, rows, x, t0, nt, out)),
    }
}

/// The row kernel of a packed matrix.
pub fn packed_dots<'a>(
    isa: Isa,
    w: &'a PackedMatrix,
    acts: &'a QuantizedActs,
) -> impl Fn(std::ops::Range<usize>, usize, usize, &mut [[f32; MAX_TOKENS]]) + Sync + 'a {
    move |rows, t0, nt, out| packed_rows_dots(isa, w, rows, acts, t0, nt, out)
}

/// # Shapes
/// `x: [n, cols]`, `w: [rows, cols]` -> `y: [n, rows]`
pub fn matmul_dense(isa: Isa, w: DenseRows<'_>, rows: usize, x: &[f32], n: usize, y: &mut [f32]) {
    let dots = dense_dots(isa, w, &x[..n * w.cols]);
    run_jobs(
        n,
        w.cols,
        &mut [MatmulJob {
            rows,
            y,
            dots: dots.as_ref(),
        }],
    );
}

/// # Shapes
/// `acts: [n, cols]` (quantized), `w: [rows, cols]` -> `y: [n, rows]`
pub fn matmul_packed(isa: Isa, w: &PackedMatrix, acts: &QuantizedActs, y: &mut [f32]) {
    let dots = packed_dots(isa, w, acts);
    run_jobs(
        acts.n,
        w.cols(),
        &mut [MatmulJob {
            rows: w.rows(),
            y,
            dots: &dots,
        }],
    );
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
    fn spinning_workers_poll_run_the_callers_jobs_and_let_go() {
        let wait_for = |what: &dyn Fn() -> bool| {
            let t = std::time::Instant::now();
            while !what() && t.elapsed() < std::time::Duration::from_secs(10) {
                std::thread::yield_now();
            }
            what()
        };
        // Outside a pool there is nothing to keep awake.
        assert!(spin_workers().polling.is_none());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let polling = pool.install(|| {
            let guard = spin_workers();
            assert!(
                wait_for(&|| guard.pollers() == 1),
                "the other thread never polled"
            );
            let mut seen = std::collections::HashSet::new();
            let mut sum = 0u64;
            for i in 0..2000u64 {
                let ((a, ta), (b, tb)) = rayon::join(
                    || {
                        // Long enough for the poller to steal the other half.
                        let t = std::time::Instant::now();
                        while t.elapsed() < std::time::Duration::from_micros(20) {}
                        (i * 2, rayon::current_thread_index())
                    },
                    || (i * 3, rayon::current_thread_index()),
                );
                sum += a + b;
                seen.extend([ta, tb]);
            }
            assert_eq!(sum, 5 * (0..2000u64).sum::<u64>());
            assert_eq!(seen.len(), 2, "{seen:?}");
            let polling = guard.polling.clone().unwrap();
            drop(guard);
            polling
        });
        let stopped = || polling.pollers.load(std::sync::atomic::Ordering::Acquire) == 0;
        assert!(
            wait_for(&stopped),
            "the poller kept its thread after the guard was dropped"
        );
    }

    #[test]
    fn a_poller_left_alone_parks() {
        use std::sync::atomic::Ordering;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let guard = spin_workers();
            let polling = guard.polling.clone().unwrap();
            let t = std::time::Instant::now();
            let limit = std::time::Duration::from_secs(10);
            while polling.started.load(Ordering::Acquire) == 0 && t.elapsed() < limit {
                std::thread::yield_now();
            }
            assert_eq!(polling.started.load(Ordering::Acquire), 1);
            // No work for longer than the idle limit: it stops by itself while
            // the guard lives.
            while guard.pollers() != 0 && t.elapsed() < limit {
                std::thread::sleep(SPIN_IDLE_LIMIT);
            }
            assert_eq!(guard.pollers(), 0);
        });
    }

    #[test]
    fn matmul_tiles_cover_every_row_and_token() {
        let (rows, cols, n) = (300, 35 * 32, 12);
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
            matmul_dense(
                isa,
                DenseRows {
                    data: DenseData::F32(&w),
                    cols,
                },
                rows,
                &x,
                n,
                &mut y,
            );
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{isa:?}: {a} vs {b}"
                );
            }
            for format in [
                PackedFormat::Q8_0,
                PackedFormat::Q4_0,
                PackedFormat::Q4_1,
                PackedFormat::Q6,
            ] {
                let q = PackedMatrix::quantize(format, &w, rows, cols).unwrap();
                let mut yq = vec![f32::NAN; n * rows];
                matmul_packed(isa, &q, &acts, &mut yq);
                // The portable tile kernel is the reference for the blocked driver.
                let mut one = vec![[0f32; MAX_TOKENS]; rows];
                let mut want = vec![0f32; n * rows];
                for t in 0..n {
                    crate::ops::kernels::packed_rows_dots(
                        Isa::Portable,
                        &q,
                        0..rows,
                        &acts,
                        t,
                        1,
                        &mut one,
                    );
                    for r in 0..rows {
                        want[t * rows + r] = one[r][0];
                    }
                }
                for (got, want) in yq.iter().zip(&want) {
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{isa:?} {format:?}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
