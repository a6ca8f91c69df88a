//! The expert cache: routed experts read from the checkpoint on demand into a
//! resident set bounded by a byte budget (`--expert-memory`), ranked by a
//! [`CachePolicy`](super::CachePolicy). Cost per miss: one expert's stored
//! bytes read with positioned reads, then converted to the kernels' layout.
//!
//! Counting is [`super::resident`]'s, with one global pool whose capacity in
//! experts is the budget over the largest layer's expert bytes, so that the
//! budget holds whatever mix of layers is resident. The block never asks for
//! more experts at once than that capacity ([`ExpertProvider::max_experts_per_call`]):
//! a wider layer call (prefill) is computed in groups that fit, each group one
//! layer call for the counting, so eviction never has to touch an expert in use.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::Instant;

use super::policy::{Admission, PolicyKind};
use super::replay::{CacheCounts, LayerCall, replay_optimal};
use super::resident::{Admit, Capacity, Lookup, ResidentSet};
use super::{CacheOutcome, CallExperts, ExpertId, ExpertLayout, ExpertProvider};
use crate::config::{ByteSize, format_bytes};
use crate::error::{Error, Result};
use crate::ops::{Ffn, QuantKind};
use crate::weights::{ReadStats, ReadTotals, Reopened, TensorSource};

/// What `--expert-memory` and `--expert-cache` ask for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertMemory {
    /// Of all routed experts' bytes in the kernels' layout, for a percentage.
    pub budget: ByteSize,
    pub policy: PolicyKind,
    pub prefetch: Prefetch,
}

/// How the checkpoint's experts are read and laid out.
#[derive(Debug, Clone)]
pub struct ExpertReads {
    pub layout: ExpertLayout,
    /// `--quant`: experts are quantized after each read, as at load.
    pub quant: Option<QuantKind>,
    /// Experts one token uses per layer (the smallest budget holds this many).
    pub top_k: usize,
}

/// `--prefetch`: what an expert cache reads ahead of use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefetch {
    #[default]
    Off,
    /// Layer L+1's router applied to layer L's MoE input (as FATE and
    /// Pre-gated MoE predict), the predicted misses read on a background I/O
    /// thread while layer L computes.
    NextLayer,
}

impl Prefetch {
    pub const ACCEPTED: &'static str = "off, next-layer";
}

impl std::str::FromStr for Prefetch {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" => Ok(Prefetch::Off),
            "next-layer" => Ok(Prefetch::NextLayer),
            _ => Err(Error::InvalidInput(format!(
                "--prefetch {s:?}: expected one of {}",
                Self::ACCEPTED
            ))),
        }
    }
}

impl std::fmt::Display for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Prefetch::Off => "off",
            Prefetch::NextLayer => "next-layer",
        })
    }
}

/// Routed experts read on demand under a byte budget.
pub struct ExpertCache {
    shared: Arc<Shared>,
    /// The background reader, when prefetching.
    io: Option<IoThread>,
}

struct IoThread {
    queue: Mutex<Option<mpsc::Sender<ExpertId>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// What the caller and the I/O thread both reach.
struct Shared {
    source: Box<dyn TensorSource + Send + Sync>,
    read_stats: Arc<ReadStats>,
    reads: ExpertReads,
    /// `[layer]`: one expert's bytes in the kernels' layout; 0 for dense layers.
    layer_expert_bytes: Vec<usize>,
    total_expert_bytes: u64,
    budget_bytes: u64,
    capacity: usize,
    state: Mutex<CacheState>,
    /// Signalled whenever a prefetched expert arrives (or its read failed).
    arrived: Condvar,
}

struct CacheState {
    resident: ResidentSet,
    ffns: HashMap<ExpertId, Arc<Ffn>>,
    /// Admitted by a prefetch (their bytes already counted), being read.
    pending: HashSet<ExpertId>,
    /// Arrived by prefetch and not asked for yet.
    unused_prefetch: HashSet<ExpertId>,
    /// The last call's experts, which its caller may still be computing with.
    in_use: (u32, Vec<u32>),
    resident_bytes: usize,
    peak_resident_bytes: usize,
    counts: CacheCounts,
    /// Every layer call as the cache saw it: the optimal yardstick replays it.
    calls: Vec<LayerCall>,
    /// Experts read on demand; time spent reading and converting experts
    /// (on demand and prefetched).
    loads: u64,
    load_nanos: u64,
    prefetch: PrefetchCounts,
    /// Per layer, the last prediction and what the layer's calls used since.
    predictions: HashMap<u32, (Vec<u32>, BTreeSet<u32>)>,
    /// Read counters at the last reset.
    reads_at_reset: ReadTotals,
}

/// How well next-layer prediction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchCounts {
    /// Experts predicted, experts then used, and both.
    pub predicted: u64,
    pub used: u64,
    pub correct: u64,
    /// Predicted experts not resident, read in the background.
    pub reads: u64,
    /// Lookups served by an expert a prefetch brought in.
    pub hits: u64,
    /// Prefetched experts evicted before any call asked for them.
    pub wasted: u64,
}

impl PrefetchCounts {
    /// Of the experts predicted, the share then used.
    pub fn precision(&self) -> f64 {
        self.correct as f64 / self.predicted.max(1) as f64
    }

    /// Of the experts used, the share predicted.
    pub fn recall(&self) -> f64 {
        self.correct as f64 / self.used.max(1) as f64
    }

    fn score(&mut self, predicted: &[u32], used: &BTreeSet<u32>) {
        self.predicted += predicted.len() as u64;
        self.used += used.len() as u64;
        self.correct += predicted.iter().filter(|e| used.contains(e)).count() as u64;
    }
}

impl std::fmt::Debug for ExpertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertCache")
            .field("budget_bytes", &self.shared.budget_bytes)
            .field("capacity", &self.shared.capacity)
            .field("prefetch", &self.io.is_some())
            .finish_non_exhaustive()
    }
}

/// What an expert cache did over a run: the summary line and `--json` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheReport {
    pub policy: PolicyKind,
    pub budget_bytes: u64,
    /// Experts the budget holds (of the largest layer's size).
    pub capacity_experts: usize,
    pub total_expert_bytes: u64,
    /// Hits include lookups served by a prefetched expert.
    pub counts: CacheCounts,
    /// Belady's MIN on the same layer calls with the same capacity and counting
    /// (demand reads only: a prefetching cache may beat it).
    pub optimal: CacheCounts,
    /// Positioned reads of expert bytes since the last reset, prefetches included.
    pub read: ReadTotals,
    /// Experts read on demand, and the time spent reading plus converting
    /// every expert read (prefetched ones too).
    pub loads: u64,
    pub load_nanos: u64,
    pub resident_bytes: usize,
    pub peak_resident_bytes: usize,
    /// `None` without `--prefetch`.
    pub prefetch: Option<PrefetchCounts>,
}

impl CacheReport {
    /// Bytes read per token over `tokens` tokens run through the model.
    pub fn read_bytes_per_token(&self, tokens: usize) -> f64 {
        self.read.bytes as f64 / tokens.max(1) as f64
    }

    /// Time converting what was read into the kernels' layout (bf16 to f32,
    /// `--quant`, GGUF blocks into tiles), as a share of the read time.
    pub fn repack_over_read(&self) -> f64 {
        let repack = self.load_nanos.saturating_sub(self.read.nanos);
        repack as f64 / self.read.nanos.max(1) as f64
    }

    /// `expert cache: hit 71.2 % (optimal 80.4 %) | read 3.1 GiB, 24.1 MiB/token | ...`.
    pub fn summary_line(&self, tokens: usize) -> String {
        let mut line = format!(
            "expert cache: hit {:.1} % (optimal {:.1} %) | read {}, {:.1} MiB/token",
            100.0 * self.counts.hit_rate(),
            100.0 * self.optimal.hit_rate(),
            format_bytes(self.read.bytes),
            self.read_bytes_per_token(tokens) / (1 << 20) as f64,
        );
        if let Some(p) = &self.prefetch {
            line += &format!(
                " | prefetch precision {:.2} recall {:.2}",
                p.precision(),
                p.recall()
            );
        }
        line += &format!(
            " | {} of {} experts' bytes, {} | repack {:.2}x read time",
            format_bytes(self.budget_bytes),
            format_bytes(self.total_expert_bytes),
            self.policy,
            self.repack_over_read(),
        );
        line
    }

    /// The same fields for `--json`.
    pub fn to_json(&self, tokens: usize) -> serde_json::Value {
        let prefetch = self.prefetch.map(|p| {
            serde_json::json!({
                "precision": p.precision(),
                "recall": p.recall(),
                "predicted": p.predicted,
                "used": p.used,
                "correct": p.correct,
                "reads": p.reads,
                "hits": p.hits,
                "wasted": p.wasted,
            })
        });
        serde_json::json!({
            "policy": self.policy.to_string(),
            "budget_bytes": self.budget_bytes,
            "capacity_experts": self.capacity_experts,
            "total_expert_bytes": self.total_expert_bytes,
            "lookups": self.counts.lookups,
            "hits": self.counts.hits,
            "misses": self.counts.misses,
            "evictions": self.counts.evictions,
            "hit_rate": self.counts.hit_rate(),
            "optimal_hit_rate": self.optimal.hit_rate(),
            "read_bytes": self.read.bytes,
            "read_bytes_per_token": self.read_bytes_per_token(tokens),
            "read_seconds": self.read.nanos as f64 * 1e-9,
            "load_seconds": self.load_nanos as f64 * 1e-9,
            "repack_over_read": self.repack_over_read(),
            "peak_resident_bytes": self.peak_resident_bytes,
            "prefetch": prefetch,
        })
    }
}

impl ExpertCache {
    /// A cache over `reopened` (the checkpoint the model was built from, opened
    /// again for positioned reads). Reads one expert per MoE layer to learn its
    /// size in the kernels' layout; refuses a budget below `top_k` experts of
    /// the largest layer, stating that minimum.
    pub fn open(reopened: Reopened, reads: ExpertReads, memory: ExpertMemory) -> Result<Self> {
        let Reopened {
            source,
            stats: read_stats,
        } = reopened;
        let layout = &reads.layout;
        let mut layer_expert_bytes = Vec::with_capacity(layout.layers.len());
        let mut total_expert_bytes = 0u64;
        for l in 0..layout.layers.len() {
            let n = layout.num_experts(l);
            let bytes = if n == 0 {
                0
            } else {
                let id = ExpertId {
                    layer: l as u32,
                    expert: 0,
                };
                read_expert(source.as_ref(), &reads, id)?.weight_bytes()
            };
            total_expert_bytes += (bytes * n) as u64;
            layer_expert_bytes.push(bytes);
        }
        let largest = layer_expert_bytes.iter().copied().max().unwrap_or(0);
        if largest == 0 {
            return Err(Error::InvalidInput(
                "--expert-memory: the model has no routed experts to cache".into(),
            ));
        }
        let budget_bytes = memory.budget.resolve(total_expert_bytes);
        let minimum = (reads.top_k * largest) as u64;
        if budget_bytes < minimum {
            return Err(Error::InvalidInput(format!(
                "--expert-memory {} ({budget_bytes} bytes) is below the minimum of {minimum} bytes ({}): \
                 one decode step needs top_k = {} experts of the largest layer, {} each",
                memory.budget,
                format_bytes(minimum),
                reads.top_k,
                format_bytes(largest as u64),
            )));
        }
        let capacity = (budget_bytes / largest as u64) as usize;
        let reads_at_reset = read_stats.totals();
        let shared = Arc::new(Shared {
            source,
            read_stats,
            reads,
            layer_expert_bytes,
            total_expert_bytes,
            budget_bytes,
            capacity,
            state: Mutex::new(CacheState {
                resident: ResidentSet::new(Capacity::Global(capacity), memory.policy),
                ffns: HashMap::new(),
                pending: HashSet::new(),
                unused_prefetch: HashSet::new(),
                in_use: (0, Vec::new()),
                resident_bytes: 0,
                peak_resident_bytes: 0,
                counts: CacheCounts::default(),
                calls: Vec::new(),
                loads: 0,
                load_nanos: 0,
                prefetch: PrefetchCounts::default(),
                predictions: HashMap::new(),
                reads_at_reset,
            }),
            arrived: Condvar::new(),
        });
        let io = match memory.prefetch {
            Prefetch::Off => None,
            Prefetch::NextLayer => Some(IoThread::spawn(shared.clone())?),
        };
        Ok(Self { shared, io })
    }

    pub fn budget_bytes(&self) -> u64 {
        self.shared.budget_bytes
    }

    /// Experts the budget holds.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }
}

impl IoThread {
    fn spawn(shared: Arc<Shared>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<ExpertId>();
        let handle = std::thread::Builder::new()
            .name("expert-prefetch".into())
            .spawn(move || {
                while let Ok(id) = rx.recv() {
                    shared.read_prefetched(id);
                }
            })
            .map_err(|e| Error::InvalidInput(format!("starting the prefetch thread: {e}")))?;
        Ok(Self {
            queue: Mutex::new(Some(tx)),
            handle: Some(handle),
        })
    }

    fn send(&self, id: ExpertId) -> bool {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.as_ref().is_some_and(|tx| tx.send(id).is_ok())
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has read what was queued.
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, CacheState> {
        // A panic elsewhere while holding the lock leaves counters, not
        // invariants, half-updated: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bytes_of(&self, id: ExpertId) -> usize {
        self.layer_expert_bytes
            .get(id.layer as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The I/O thread's work: read a prefetched expert (its bytes were counted
    /// when it was admitted) and hand it over.
    fn read_prefetched(&self, id: ExpertId) {
        let t = Instant::now();
        let result = read_expert(self.source.as_ref(), &self.reads, id);
        let mut st = self.state();
        st.load_nanos += t.elapsed().as_nanos() as u64;
        st.pending.remove(&id);
        match result {
            Ok(ffn) => {
                st.ffns.insert(id, Arc::new(ffn));
                st.unused_prefetch.insert(id);
                st.prefetch.reads += 1;
            }
            // The demand read that follows reports the error to the caller.
            Err(_) => {
                if st.resident.remove(id) {
                    st.resident_bytes -= self.bytes_of(id);
                }
            }
        }
        drop(st);
        self.arrived.notify_all();
    }

    /// Waits until no prefetch is in flight.
    fn drain<'a>(&'a self, st: MutexGuard<'a, CacheState>) -> MutexGuard<'a, CacheState> {
        self.arrived
            .wait_while(st, |st| !st.pending.is_empty())
            .unwrap_or_else(|p| p.into_inner())
    }

    /// `evicted` left the resident set: drop its buffer.
    fn evicted(&self, st: &mut CacheState, evicted: Option<ExpertId>) {
        if let Some(v) = evicted {
            st.counts.evictions += 1;
            if st.ffns.remove(&v).is_some() {
                st.resident_bytes -= self.bytes_of(v);
            }
            if st.unused_prefetch.remove(&v) {
                st.prefetch.wasted += 1;
            }
        }
    }

    fn admitted(&self, st: &mut CacheState, id: ExpertId) {
        st.resident_bytes += self.bytes_of(id);
        st.peak_resident_bytes = st.peak_resident_bytes.max(st.resident_bytes);
    }
}

/// Reads expert `id` from `source` into the kernels' layout.
fn read_expert(source: &dyn TensorSource, reads: &ExpertReads, id: ExpertId) -> Result<Ffn> {
    let wrap = |e: Error| Error::ExpertRead {
        layer: id.layer,
        expert: id.expert,
        reason: e.to_string(),
    };
    let ffn = reads.layout.load(source, id).map_err(wrap)?;
    match reads.quant {
        Some(kind) => ffn.quantize(kind).map_err(wrap),
        None => Ok(ffn),
    }
}

impl ExpertProvider for ExpertCache {
    fn num_experts(&self, layer: usize) -> usize {
        self.shared.reads.layout.num_experts(layer)
    }

    fn expert_bytes(&self, id: ExpertId) -> usize {
        self.shared.bytes_of(id)
    }

    fn resident_bytes(&self) -> usize {
        self.shared.state().resident_bytes
    }

    fn max_experts_per_call(&self) -> usize {
        self.shared.capacity
    }

    fn experts_for_call(&self, layer: u32, experts: &[u32]) -> Result<CallExperts> {
        let sh = &*self.shared;
        if experts.len() > sh.capacity {
            return Err(Error::InvalidInput(format!(
                "layer {layer}: {} experts asked at once, the expert cache holds {}",
                experts.len(),
                sh.capacity
            )));
        }
        let n = self.num_experts(layer as usize);
        if let Some(&bad) = experts.iter().find(|&&e| e as usize >= n) {
            return Err(Error::InvalidInput(format!(
                "no expert {bad} in layer {layer} (it has {n})"
            )));
        }
        let mut st = sh.state();
        // This call's experts that a prefetch is still reading: wait for them.
        let ids = experts.iter().map(|&expert| ExpertId { layer, expert });
        if ids.clone().any(|id| st.pending.contains(&id)) {
            st = sh
                .arrived
                .wait_while(st, |st| {
                    experts
                        .iter()
                        .any(|&expert| st.pending.contains(&ExpertId { layer, expert }))
                })
                .unwrap_or_else(|p| p.into_inner());
        }
        st.in_use = (layer, experts.to_vec());
        st.resident.begin_call(layer);
        st.calls.push(LayerCall {
            layer,
            experts: experts.to_vec(),
        });
        if let Some((_, used)) = st.predictions.get_mut(&layer) {
            used.extend(experts);
        }
        let mut ffns: Vec<Option<Arc<Ffn>>> = Vec::with_capacity(experts.len());
        let mut outcomes = Vec::with_capacity(experts.len());
        let mut missed = Vec::new();
        for id in ids {
            st.counts.lookups += 1;
            let found = match st.resident.lookup(id) {
                Lookup::Hit => st.ffns.get(&id).cloned(),
                Lookup::Miss => None,
            };
            match found {
                Some(ffn) => {
                    st.counts.hits += 1;
                    let outcome = if st.unused_prefetch.remove(&id) {
                        st.prefetch.hits += 1;
                        CacheOutcome::Prefetched
                    } else {
                        CacheOutcome::Hit
                    };
                    ffns.push(Some(ffn));
                    outcomes.push((id.expert, outcome));
                }
                None => {
                    st.counts.misses += 1;
                    missed.push(ffns.len());
                    ffns.push(None);
                    outcomes.push((id.expert, CacheOutcome::Miss));
                }
            }
        }
        for i in missed {
            let id = ExpertId {
                layer,
                expert: experts[i],
            };
            let t = Instant::now();
            let ffn = Arc::new(read_expert(sh.source.as_ref(), &sh.reads, id)?);
            st.loads += 1;
            st.load_nanos += t.elapsed().as_nanos() as u64;
            loop {
                let admit = {
                    let CacheState {
                        resident, pending, ..
                    } = &mut *st;
                    let pinned = |v: ExpertId| {
                        (v.layer == layer && experts.binary_search(&v.expert).is_ok())
                            || pending.contains(&v)
                    };
                    resident.admit(id, Admission::Demand, &pinned)
                };
                match admit {
                    Admit::Inserted { evicted } => {
                        sh.evicted(&mut st, evicted);
                        st.ffns.insert(id, ffn.clone());
                        sh.admitted(&mut st, id);
                    }
                    // In-flight prefetches hold the rest: once they land they can go.
                    Admit::Bypassed if !st.pending.is_empty() => {
                        st = sh.drain(st);
                        continue;
                    }
                    // Unreachable while calls are at most `capacity` wide; counted all the same.
                    Admit::Bypassed => st.counts.bypassed += 1,
                }
                break;
            }
            ffns[i] = Some(ffn);
        }
        Ok(CallExperts {
            ffns: ffns.into_iter().flatten().collect(),
            outcomes: Some(outcomes),
        })
    }

    fn prefetch(&self, layer: u32, experts: &[u32]) {
        let Some(io) = &self.io else {
            return;
        };
        let sh = &*self.shared;
        let mut st = sh.state();
        let st = &mut *st;
        if let Some((predicted, used)) = st.predictions.remove(&layer) {
            st.prefetch.score(&predicted, &used);
        }
        st.predictions
            .insert(layer, (experts.to_vec(), BTreeSet::new()));
        let (busy_layer, busy) = st.in_use.clone();
        for &expert in experts {
            let id = ExpertId { layer, expert };
            if st.resident.contains(id) {
                continue;
            }
            // Never evict what the current call computes with, this
            // prediction, or another read in flight.
            let CacheState {
                resident, pending, ..
            } = &mut *st;
            let pinned = |v: ExpertId| {
                (v.layer == busy_layer && busy.contains(&v.expert))
                    || (v.layer == layer && experts.contains(&v.expert))
                    || pending.contains(&v)
            };
            match resident.admit(id, Admission::Prefetch, &pinned) {
                Admit::Inserted { evicted } => {
                    sh.evicted(st, evicted);
                    sh.admitted(st, id);
                    st.pending.insert(id);
                    if !io.send(id) {
                        st.pending.remove(&id);
                    }
                }
                Admit::Bypassed => break,
            }
        }
    }

    fn cache_report(&self) -> Option<CacheReport> {
        let sh = &*self.shared;
        let st = sh.state();
        let now = sh.read_stats.totals();
        let base = st.reads_at_reset;
        let prefetch = self.io.as_ref().map(|_| {
            let mut p = st.prefetch;
            for (predicted, used) in st.predictions.values() {
                p.score(predicted, used);
            }
            p
        });
        Some(CacheReport {
            policy: st.resident.policy(),
            budget_bytes: sh.budget_bytes,
            capacity_experts: sh.capacity,
            total_expert_bytes: sh.total_expert_bytes,
            counts: st.counts,
            optimal: replay_optimal(&st.calls, Capacity::Global(sh.capacity)),
            read: ReadTotals {
                bytes: now.bytes - base.bytes,
                nanos: now.nanos - base.nanos,
                reads: now.reads - base.reads,
            },
            loads: st.loads,
            load_nanos: st.load_nanos,
            resident_bytes: st.resident_bytes,
            peak_resident_bytes: st.peak_resident_bytes,
            prefetch,
        })
    }

    fn drop_cached_pages(&self) -> Result<()> {
        self.shared.source.drop_cached_pages()
    }

    /// Empties the cache as well as its counters: the optimal yardstick starts
    /// cold, so the live cache must too for the two to be comparable.
    fn reset_cache(&self) {
        let sh = &*self.shared;
        let mut st = sh.drain(sh.state());
        let policy = st.resident.policy();
        st.resident = ResidentSet::new(Capacity::Global(sh.capacity), policy);
        st.ffns.clear();
        st.unused_prefetch.clear();
        st.in_use = (0, Vec::new());
        st.resident_bytes = 0;
        st.peak_resident_bytes = 0;
        st.counts = CacheCounts::default();
        st.calls.clear();
        st.loads = 0;
        st.load_nanos = 0;
        st.prefetch = PrefetchCounts::default();
        st.predictions.clear();
        st.reads_at_reset = sh.read_stats.totals();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_precision_and_recall_count_predicted_against_used() {
        let mut p = PrefetchCounts::default();
        // Predicted {1, 2, 3}, used {2, 3, 4, 5}: 2 of 3 right, 2 of 4 found.
        p.score(&[1, 2, 3], &[2, 3, 4, 5].into_iter().collect());
        assert_eq!((p.predicted, p.used, p.correct), (3, 4, 2));
        assert!((p.precision() - 2.0 / 3.0).abs() < 1e-12);
        assert!((p.recall() - 0.5).abs() < 1e-12);
        assert_eq!(PrefetchCounts::default().precision(), 0.0);
    }

    #[test]
    fn prefetch_names_parse_and_round_trip() {
        for s in ["off", "next-layer"] {
            assert_eq!(s.parse::<Prefetch>().unwrap().to_string(), s);
        }
        let err = "next".parse::<Prefetch>().unwrap_err().to_string();
        assert!(err.contains("off, next-layer"), "{err}");
    }
}
