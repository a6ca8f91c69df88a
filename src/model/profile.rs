//! Where a forward's time goes: wall-clock nanoseconds per phase and per layer,
//! summed while profiling is on (`switchyard bench --profile`). Off, a span costs
//! one relaxed atomic load; on, two clock reads and one atomic add (~50 ns), a few
//! microseconds per decode step of a 16-layer model.
//!
//! The totals are process-wide (like a `tracing` subscriber): spans from expert
//! tasks on the pool's worker threads add up with the forward thread's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The phases of a forward. Each is timed where it runs; what no span covers
/// (embedding lookup, tensor plumbing) is the step's remainder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A layer's RMS norms wherever its family places them, with the residual
    /// adds beside them (and the final norm, outside layers).
    Norm,
    /// The q, k, v and o projections.
    AttentionProjections,
    /// q/k norms, RoPE, the KV-cache append and the scores/softmax/values over the cache.
    AttentionCore,
    /// The router's matvec, top-k selection and the routing report.
    Router,
    /// The routed experts as a whole, on the forward thread: gathering rows,
    /// quantizing them, the parallel section and mixing the outputs.
    Experts,
    /// Inside [`Phase::Experts`]: each expert's own matmuls, summed over the
    /// threads that ran them (busy time, not wall time).
    ExpertMatvecs,
    /// A shared (always-on) expert and its gate.
    SharedExpert,
    /// A dense (non-MoE) feed-forward layer.
    DenseFfn,
    /// The output projection.
    LmHead,
    /// Picking the next token from the logits (timed by the caller).
    Sampling,
}

impl Phase {
    pub const ALL: [Phase; 10] = [
        Phase::Norm,
        Phase::AttentionProjections,
        Phase::AttentionCore,
        Phase::Router,
        Phase::Experts,
        Phase::ExpertMatvecs,
        Phase::SharedExpert,
        Phase::DenseFfn,
        Phase::LmHead,
        Phase::Sampling,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Norm => "norms",
            Phase::AttentionProjections => "attention q/k/v/o projections",
            Phase::AttentionCore => "attention over the cache (rope, append, scores)",
            Phase::Router => "router",
            Phase::Experts => "routed experts (wall)",
            Phase::ExpertMatvecs => "expert matmuls (busy, all threads)",
            Phase::SharedExpert => "shared expert",
            Phase::DenseFfn => "dense ffn",
            Phase::LmHead => "lm_head",
            Phase::Sampling => "sampling",
        }
    }
}

const PHASES: usize = Phase::ALL.len();
/// Layers with their own totals; deeper ones share the last row.
const MAX_LAYERS: usize = 255;
/// Row of the spans outside any layer (final norm, lm_head, sampling).
const OUTSIDE: usize = MAX_LAYERS + 1;

static ENABLED: AtomicBool = AtomicBool::new(false);
static STEPS: AtomicU64 = AtomicU64::new(0);
static STEP_NS: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ZERO_ROW: [AtomicU64; PHASES] = [ZERO; PHASES];
static TOTALS: [[AtomicU64; PHASES]; OUTSIDE + 1] = [ZERO_ROW; OUTSIDE + 1];

/// Starts (or stops) collecting; starting clears what was collected before.
pub fn set_enabled(on: bool) {
    if on {
        for row in &TOTALS {
            for v in row {
                v.store(0, Ordering::Relaxed);
            }
        }
        STEPS.store(0, Ordering::Relaxed);
        STEP_NS.store(0, Ordering::Relaxed);
    }
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A running timer; adds its elapsed time to its phase when dropped.
#[must_use = "a span measures until it is dropped"]
pub struct Span {
    start: Option<Instant>,
    row: usize,
    phase: Phase,
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            let ns = start.elapsed().as_nanos() as u64;
            TOTALS[self.row][self.phase as usize].fetch_add(ns, Ordering::Relaxed);
        }
    }
}

/// Times `phase` of `layer` (`None`: outside the layers) until the span drops.
pub fn span(phase: Phase, layer: Option<usize>) -> Span {
    Span {
        start: is_enabled().then(Instant::now),
        row: layer.map_or(OUTSIDE, |l| l.min(MAX_LAYERS)),
        phase,
    }
}

/// Records one whole step (forward plus sampling) of `elapsed`, the denominator
/// of the per-step averages and the total the phases' shares refer to.
pub fn record_step(elapsed: Duration) {
    if is_enabled() {
        STEPS.fetch_add(1, Ordering::Relaxed);
        STEP_NS.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// What was collected since profiling was switched on.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub steps: u64,
    /// Summed wall time of the recorded steps.
    pub step_ns: u64,
    /// `[layer][phase]` nanoseconds, for layers `0..num_layers`.
    pub layers: Vec<[u64; PHASES]>,
    /// Spans outside any layer, by phase.
    pub outside: [u64; PHASES],
}

impl Profile {
    /// Nanoseconds of `phase` over all layers and outside them.
    pub fn phase_ns(&self, phase: Phase) -> u64 {
        let i = phase as usize;
        self.layers.iter().map(|l| l[i]).sum::<u64>() + self.outside[i]
    }

    /// Step time no top-level span covers (embedding, residual adds, plumbing).
    /// Expert matmuls run inside the experts' span and are not subtracted again.
    pub fn remainder_ns(&self) -> u64 {
        let covered: u64 = Phase::ALL
            .iter()
            .filter(|&&p| p != Phase::ExpertMatvecs)
            .map(|&p| self.phase_ns(p))
            .sum();
        self.step_ns.saturating_sub(covered)
    }
}

/// The totals of layers `0..num_layers` and outside them.
pub fn snapshot(num_layers: usize) -> Profile {
    let row = |r: &[AtomicU64; PHASES]| -> [u64; PHASES] {
        std::array::from_fn(|p| r[p].load(Ordering::Relaxed))
    };
    Profile {
        steps: STEPS.load(Ordering::Relaxed),
        step_ns: STEP_NS.load(Ordering::Relaxed),
        layers: TOTALS[..num_layers.min(MAX_LAYERS + 1)]
            .iter()
            .map(row)
            .collect(),
        outside: row(&TOTALS[OUTSIDE]),
    }
}
