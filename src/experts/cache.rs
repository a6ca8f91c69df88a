//! The expert cache: routed experts read from the checkpoint on demand into a
//! resident set bounded by a byte budget (`--expert-memory`), ranked by a
//! [`CachePolicy`](super::CachePolicy). Cost per miss: one expert's stored
//! bytes read with positioned reads, then converted to the kernels' layout;
//! or, from a packed expert file ([`super::packed`]), one read straight into
//! the kernels' buffers.
//!
//! Counting is [`super::resident`]'s, with one global pool whose capacity in
//! experts is the budget over the largest layer's expert bytes, so that the
//! budget holds whatever mix of layers is resident. The block never asks for
//! more experts at once than that capacity ([`ExpertProvider::max_experts_per_call`]):
//! a wider layer call (prefill) is computed in groups that fit, each group one
//! layer call for the counting, so eviction never has to touch an expert in use.
//!
//! Locking: the state lock is held for bookkeeping only. A miss reserves its
//! slot (its bytes count against the budget from then on), the expert is read
//! without the lock, and it is published under the lock again; the prefetch
//! thread does the same. A report copies counters under the lock and replays
//! the optimal yardstick outside it ([`CacheSnapshot`]).
//!
//! With `--miss-precision q4` the budget is split: a stand-in pool of Q4_0
//! copies takes at most half of it, no more than all stand-ins need, and never
//! so much that the full copies hold less than one decode step; the full
//! copies get the rest. Every expert read makes its stand-in. A miss whose
//! stand-in is resident computes with it and has the full copy read in the
//! background; a miss without one is read on demand.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::Instant;

use super::memory::{ExpertMemory, MissPrecision, Prefetch};
use super::packed::{PackedExperts, PackedPlan};
use super::policy::{Admission, PolicyKind};
use super::replay::{CacheCounts, RoutingHistory};
use super::report::{CacheReport, CacheSnapshot, ExpertFileReport, PrefetchCounts, StandInCounts};
use super::resident::{Admit, Capacity, Lookup, ResidentSet};
use super::{CacheOutcome, CallExperts, ExpertId, ExpertLayout, ExpertProvider};
use crate::config::format_bytes;
use crate::error::{Error, Result};
use crate::ops::{Ffn, QuantKind};
use crate::weights::{ReadStats, ReadTotals, Reopened, TensorSource};

/// How the checkpoint's experts are read and laid out.
#[derive(Debug, Clone)]
pub struct ExpertReads {
    pub layout: ExpertLayout,
    /// `--quant`: experts are quantized after each read, as at load.
    pub quant: Option<QuantKind>,
    /// Experts one token uses per layer (the smallest budget holds this many).
    pub top_k: usize,
}

/// The stand-ins' format.
const STAND_IN_QUANT: QuantKind = QuantKind::Q4_0;

/// Routed experts read on demand under a byte budget.
pub struct ExpertCache {
    shared: Arc<Shared>,
    /// The background reader, when prefetching or standing in.
    io: Option<IoThread>,
    prefetch: Prefetch,
}

/// What the background reader is asked to read.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// A next-layer prediction.
    Prefetch(ExpertId),
    /// The full copy of an expert a stand-in just served.
    Replace(ExpertId),
}

impl Job {
    fn id(self) -> ExpertId {
        match self {
            Job::Prefetch(id) | Job::Replace(id) => id,
        }
    }
}

struct IoThread {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// What the caller and the I/O thread both reach.
struct Shared {
    source: Box<dyn TensorSource + Send + Sync>,
    /// Where misses are read from instead of `source`, when there is one.
    packed: Option<PackedExperts>,
    read_stats: Arc<ReadStats>,
    reads: ExpertReads,
    /// `[layer]`: one expert's bytes in the kernels' layout; 0 for dense layers.
    layer_expert_bytes: Vec<usize>,
    total_expert_bytes: u64,
    budget_bytes: u64,
    /// Full copies the budget holds (less the stand-ins' share).
    capacity: usize,
    /// `None` without `--miss-precision`.
    stand_ins: Option<StandInPlan>,
    record_routing: bool,
    state: Mutex<CacheState>,
    /// Signalled whenever a reserved expert arrives (or its read failed).
    arrived: Condvar,
}

/// The stand-in pool's share of the budget.
#[derive(Debug, Clone)]
struct StandInPlan {
    /// `[layer]`: one stand-in's bytes.
    layer_bytes: Vec<usize>,
    budget_bytes: u64,
    capacity: usize,
}

struct StandIns {
    resident: ResidentSet,
    ffns: HashMap<ExpertId, Arc<Ffn>>,
    counts: StandInCounts,
}

struct CacheState {
    resident: ResidentSet,
    ffns: HashMap<ExpertId, Arc<Ffn>>,
    /// Admitted (their bytes already counted) and being read, by the I/O
    /// thread or by a caller outside the lock.
    pending: HashSet<ExpertId>,
    /// Of `pending`, the background reads not started yet: a call that needs
    /// one reads it itself instead of waiting behind the queue.
    queued: HashMap<ExpertId, Job>,
    /// Arrived by prefetch and not asked for yet.
    unused_prefetch: HashSet<ExpertId>,
    /// The last call's experts, which its caller may still be computing with.
    in_use: (u32, Vec<u32>),
    /// Full copies, stand-ins and reads in flight together.
    resident_bytes: usize,
    peak_resident_bytes: usize,
    counts: CacheCounts,
    /// The layer calls as the cache saw them, for the optimal yardstick; only
    /// when asked for ([`ExpertMemory::record_routing`]), bounded. Shared with
    /// snapshots, copied on write while one is alive.
    history: Option<Arc<RoutingHistory>>,
    /// Experts read on demand; time spent reading and converting experts
    /// (on demand and in the background).
    loads: u64,
    load_nanos: u64,
    prefetch: PrefetchCounts,
    /// Per layer, the last prediction and what the layer's calls used since.
    predictions: HashMap<u32, (Vec<u32>, BTreeSet<u32>)>,
    /// Read counters at the last reset.
    reads_at_reset: ReadTotals,
    stand_ins: Option<StandIns>,
}

impl std::fmt::Debug for ExpertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertCache")
            .field("budget_bytes", &self.shared.budget_bytes)
            .field("capacity", &self.shared.capacity)
            .field("prefetch", &self.prefetch)
            .field("stand_ins", &self.shared.stand_ins)
            .finish_non_exhaustive()
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
            files,
        } = reopened;
        let layout = &reads.layout;
        let standing_in = memory.miss_precision == MissPrecision::Q4;
        let mut layer_expert_bytes = Vec::with_capacity(layout.layers.len());
        let mut layer_stand_in_bytes = Vec::with_capacity(layout.layers.len());
        let mut total_expert_bytes = 0u64;
        let mut total_stand_in_bytes = 0u64;
        // Expert 0 of each layer, converted: its size, and what a packed file must hold.
        let mut probes = Vec::with_capacity(layout.layers.len());
        for l in 0..layout.layers.len() {
            let n = layout.num_experts(l);
            let (bytes, stand_in) = if n == 0 {
                probes.push(None);
                (0, 0)
            } else {
                let id = ExpertId {
                    layer: l as u32,
                    expert: 0,
                };
                let (ffn, stand_in) = read_expert(source.as_ref(), &reads, id, standing_in)?;
                let sizes = (ffn.weight_bytes(), stand_in.map_or(0, |s| s.weight_bytes()));
                probes.push(Some(ffn));
                sizes
            };
            total_expert_bytes += (bytes * n) as u64;
            total_stand_in_bytes += (stand_in * n) as u64;
            layer_expert_bytes.push(bytes);
            layer_stand_in_bytes.push(stand_in);
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
        let stand_ins = standing_in
            .then(|| {
                plan_stand_ins(
                    layer_stand_in_bytes,
                    total_stand_in_bytes,
                    largest,
                    budget_bytes - minimum,
                    budget_bytes,
                )
            })
            .transpose()?;
        let packed = PackedExperts::prepare(&PackedPlan {
            files: &files,
            layout: &reads.layout,
            quant: reads.quant,
            probes: &probes,
            options: &memory.expert_file,
            stats: read_stats.clone(),
            convert: &|id| read_expert(source.as_ref(), &reads, id, false).map(|(ffn, _)| ffn),
        })?;
        drop(probes);
        let full_budget = budget_bytes - stand_ins.as_ref().map_or(0, |s| s.budget_bytes);
        let capacity = (full_budget / largest as u64) as usize;
        let reads_at_reset = read_stats.totals();
        let state = CacheState {
            resident: ResidentSet::new(Capacity::Global(capacity), memory.policy),
            ffns: HashMap::new(),
            pending: HashSet::new(),
            queued: HashMap::new(),
            unused_prefetch: HashSet::new(),
            in_use: (0, Vec::new()),
            resident_bytes: 0,
            peak_resident_bytes: 0,
            counts: CacheCounts::default(),
            history: memory
                .record_routing
                .then(|| Arc::new(RoutingHistory::with_limit(RoutingHistory::LIMIT_CALLS))),
            loads: 0,
            load_nanos: 0,
            prefetch: PrefetchCounts::default(),
            predictions: HashMap::new(),
            reads_at_reset,
            stand_ins: stand_ins
                .as_ref()
                .map(|plan| StandIns::new(plan, memory.policy)),
        };
        let shared = Arc::new(Shared {
            source,
            packed,
            read_stats,
            reads,
            layer_expert_bytes,
            total_expert_bytes,
            budget_bytes,
            capacity,
            stand_ins,
            record_routing: memory.record_routing,
            state: Mutex::new(state),
            arrived: Condvar::new(),
        });
        let io = if memory.prefetch == Prefetch::NextLayer || shared.stand_ins.is_some() {
            Some(IoThread::spawn(shared.clone())?)
        } else {
            None
        };
        Ok(Self {
            shared,
            io,
            prefetch: memory.prefetch,
        })
    }

    pub fn budget_bytes(&self) -> u64 {
        self.shared.budget_bytes
    }

    /// Full-precision experts the budget holds.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Stand-ins the budget holds (0 without `--miss-precision`).
    pub fn stand_in_capacity(&self) -> usize {
        self.shared.stand_ins.as_ref().map_or(0, |s| s.capacity)
    }

    /// The cache's counters now, taken under the lock in O(1); the optimal
    /// yardstick is computed by [`CacheSnapshot::into_report`] without it.
    pub fn snapshot(&self) -> CacheSnapshot {
        let sh = &*self.shared;
        let st = sh.state();
        let now = sh.read_stats.totals();
        let base = st.reads_at_reset;
        let prefetch = (self.prefetch == Prefetch::NextLayer).then(|| {
            let mut p = st.prefetch;
            for (predicted, used) in st.predictions.values() {
                p.score(predicted, used);
            }
            p
        });
        let report = CacheReport {
            policy: st.resident.policy(),
            budget_bytes: sh.budget_bytes,
            capacity_experts: sh.capacity,
            total_expert_bytes: sh.total_expert_bytes,
            counts: st.counts,
            optimal: None,
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
            stand_ins: st.stand_ins.as_ref().map(|s| s.counts),
            expert_file: sh.packed.as_ref().map(|p| ExpertFileReport {
                path: p.path().to_path_buf(),
                direct: p.direct(),
            }),
        };
        CacheSnapshot {
            report,
            history: st.history.clone(),
            capacity: Capacity::Global(sh.capacity),
        }
    }
}

/// The stand-in pool: at most half the budget, no more than all stand-ins
/// need, and at most `spare` (what the full copies can give up and still hold
/// one decode step).
fn plan_stand_ins(
    layer_bytes: Vec<usize>,
    total_bytes: u64,
    largest_full: usize,
    spare: u64,
    budget_bytes: u64,
) -> Result<StandInPlan> {
    let largest = layer_bytes.iter().copied().max().unwrap_or(0);
    if largest >= largest_full {
        return Err(Error::InvalidInput(format!(
            "--miss-precision q4: the experts are already {} per expert as stored or quantized \
             ({} as q4_0): a 4-bit stand-in would save nothing",
            format_bytes(largest_full as u64),
            format_bytes(largest as u64),
        )));
    }
    let share = total_bytes.min(budget_bytes / 2).min(spare);
    let capacity = (share / largest as u64) as usize;
    Ok(StandInPlan {
        layer_bytes,
        budget_bytes: (capacity * largest) as u64,
        capacity,
    })
}

impl StandIns {
    fn new(plan: &StandInPlan, policy: PolicyKind) -> Self {
        Self {
            resident: ResidentSet::new(Capacity::Global(plan.capacity), policy),
            ffns: HashMap::new(),
            counts: StandInCounts {
                budget_bytes: plan.budget_bytes,
                capacity_experts: plan.capacity,
                ..StandInCounts::default()
            },
        }
    }
}

impl IoThread {
    fn spawn(shared: Arc<Shared>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("expert-reads".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    shared.read_in_background(job);
                }
            })
            .map_err(|e| Error::InvalidInput(format!("starting the expert-read thread: {e}")))?;
        Ok(Self {
            queue: Mutex::new(Some(tx)),
            handle: Some(handle),
        })
    }

    fn send(&self, job: Job) -> bool {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.as_ref().is_some_and(|tx| tx.send(job).is_ok())
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

    fn stand_in_bytes_of(&self, id: ExpertId) -> usize {
        self.stand_ins
            .as_ref()
            .and_then(|s| s.layer_bytes.get(id.layer as usize).copied())
            .unwrap_or(0)
    }

    /// Whether a read of `id` should also make its stand-in.
    fn wants_stand_in(&self, st: &CacheState, id: ExpertId) -> bool {
        st.stand_ins
            .as_ref()
            .is_some_and(|s| s.resident.capacity().per_partition() > 0 && !s.resident.contains(id))
    }

    fn read(&self, id: ExpertId, stand_in: bool) -> Result<(Ffn, Option<Ffn>)> {
        let Some(packed) = &self.packed else {
            return read_expert(self.source.as_ref(), &self.reads, id, stand_in);
        };
        let wrap = |e: Error| Error::ExpertRead {
            layer: id.layer,
            expert: id.expert,
            reason: e.to_string(),
        };
        let ffn = packed.read(id).map_err(wrap)?;
        // From the copy as the kernels hold it (after `--quant`, where the
        // checkpoint path quantizes the stored values).
        let stand_in = stand_in
            .then(|| ffn.quantize(STAND_IN_QUANT))
            .transpose()
            .map_err(wrap)?;
        Ok((ffn, stand_in))
    }

    /// The I/O thread's work: read an expert whose slot was reserved (its
    /// bytes counted) when it was queued, and publish it.
    fn read_in_background(&self, job: Job) {
        let id = job.id();
        let stand_in = {
            let mut st = self.state();
            // Taken over by the call that needed it.
            if st.queued.remove(&id).is_none() {
                return;
            }
            self.wants_stand_in(&st, id)
        };
        let t = Instant::now();
        let result = self.read(id, stand_in);
        let mut st = self.state();
        st.load_nanos += t.elapsed().as_nanos() as u64;
        st.pending.remove(&id);
        match result {
            Ok((ffn, stand_in)) => {
                st.ffns.insert(id, Arc::new(ffn));
                match job {
                    Job::Prefetch(_) => {
                        st.unused_prefetch.insert(id);
                        st.prefetch.reads += 1;
                    }
                    Job::Replace(_) => {
                        if let Some(s) = st.stand_ins.as_mut() {
                            s.counts.background_reads += 1;
                        }
                    }
                }
                if let Some(s) = stand_in {
                    self.keep_stand_in(&mut st, id, s);
                }
            }
            // The demand read that follows reports the error to the caller.
            Err(_) => self.release(&mut st, id),
        }
        drop(st);
        self.arrived.notify_all();
    }

    /// A reserved slot whose read failed or was never made: give it back.
    fn release(&self, st: &mut CacheState, id: ExpertId) {
        st.pending.remove(&id);
        st.queued.remove(&id);
        if st.resident.remove(id) {
            st.resident_bytes -= self.bytes_of(id);
        }
    }

    /// Waits until no read is in flight.
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

    /// `id`'s full copy is admitted: its bytes count from now on, read or not.
    fn admitted(&self, st: &mut CacheState, id: ExpertId) {
        st.resident_bytes += self.bytes_of(id);
        st.peak_resident_bytes = st.peak_resident_bytes.max(st.resident_bytes);
    }

    /// Keeps `ffn` as `id`'s stand-in, evicting another (never one the
    /// current call computes with) if the pool is full.
    fn keep_stand_in(&self, st: &mut CacheState, id: ExpertId, ffn: Ffn) {
        let CacheState {
            stand_ins,
            in_use: (busy_layer, busy),
            resident_bytes,
            peak_resident_bytes,
            ..
        } = st;
        let Some(s) = stand_ins.as_mut() else {
            return;
        };
        if s.resident.contains(id) {
            return;
        }
        let pinned = |v: ExpertId| v.layer == *busy_layer && busy.contains(&v.expert);
        if let Admit::Inserted { evicted } = s.resident.admit(id, Admission::Demand, &pinned) {
            if let Some(v) = evicted
                && s.ffns.remove(&v).is_some()
            {
                *resident_bytes -= self.stand_in_bytes_of(v);
            }
            s.ffns.insert(id, Arc::new(ffn));
            *resident_bytes += self.stand_in_bytes_of(id);
            *peak_resident_bytes = (*peak_resident_bytes).max(*resident_bytes);
        }
    }

    /// Reserves a slot for `id`, a miss of a call of `layer` over `experts`:
    /// true once admitted (pending, its bytes counted), false if every slot
    /// is pinned by the call itself. Waits for other reads in flight that
    /// hold the slots it needs.
    fn reserve<'a>(
        &'a self,
        mut st: MutexGuard<'a, CacheState>,
        layer: u32,
        experts: &[u32],
        id: ExpertId,
    ) -> (MutexGuard<'a, CacheState>, bool) {
        let ours = |v: &ExpertId| v.layer == layer && experts.binary_search(&v.expert).is_ok();
        loop {
            let admit = {
                let CacheState {
                    resident, pending, ..
                } = &mut *st;
                let pinned = |v: ExpertId| ours(&v) || pending.contains(&v);
                resident.admit(id, Admission::Demand, &pinned)
            };
            match admit {
                Admit::Inserted { evicted } => {
                    self.evicted(&mut st, evicted);
                    self.admitted(&mut st, id);
                    st.pending.insert(id);
                    return (st, true);
                }
                // Reads in flight for others hold the rest: once they land they can go.
                Admit::Bypassed if st.pending.iter().any(|v| !ours(v)) => {
                    st = self
                        .arrived
                        .wait_while(st, |st| st.pending.iter().any(|v| !ours(v)))
                        .unwrap_or_else(|p| p.into_inner());
                }
                // Unreachable while calls are at most `capacity` wide; counted all the same.
                Admit::Bypassed => {
                    st.counts.bypassed += 1;
                    return (st, false);
                }
            }
        }
    }
}

/// Reads expert `id` from `source` into the kernels' layout, and its Q4_0
/// stand-in from the same bytes when `stand_in` is asked for.
fn read_expert(
    source: &dyn TensorSource,
    reads: &ExpertReads,
    id: ExpertId,
    stand_in: bool,
) -> Result<(Ffn, Option<Ffn>)> {
    let wrap = |e: Error| Error::ExpertRead {
        layer: id.layer,
        expert: id.expert,
        reason: e.to_string(),
    };
    let ffn = reads.layout.load(source, id).map_err(wrap)?;
    let stand_in = if stand_in {
        Some(ffn.quantize(STAND_IN_QUANT).map_err(wrap)?)
    } else {
        None
    };
    let ffn = match reads.quant {
        Some(kind) => ffn.quantize(kind).map_err(wrap)?,
        None => ffn,
    };
    Ok((ffn, stand_in))
}

/// A demand read this call makes once the lock is released.
struct DemandRead {
    /// Rank in the call's experts.
    rank: usize,
    id: ExpertId,
    /// Its slot was reserved (else it is computed with and dropped).
    kept: bool,
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
        let ids: Vec<ExpertId> = experts
            .iter()
            .map(|&expert| ExpertId { layer, expert })
            .collect();
        let mut st = sh.state();
        // This call's experts whose prefetch is queued and not started: read
        // here, now, rather than after whatever is queued before them (a wrong
        // prediction, say). Those another read is bringing in (a full copy
        // replacing a stand-in, too): wait for them.
        let stolen: HashMap<ExpertId, Job> = ids
            .iter()
            .filter_map(|id| match st.queued.get(id) {
                Some(&job @ Job::Prefetch(_)) => Some((*id, job)),
                _ => None,
            })
            .collect();
        for id in stolen.keys() {
            st.queued.remove(id);
        }
        let in_flight = |st: &CacheState| {
            ids.iter()
                .any(|id| st.pending.contains(id) && !stolen.contains_key(id))
        };
        if in_flight(&st) {
            st = sh
                .arrived
                .wait_while(st, |st| in_flight(st))
                .unwrap_or_else(|p| p.into_inner());
        }
        st.in_use = (layer, experts.to_vec());
        st.resident.begin_call(layer);
        if let Some(history) = st.history.as_mut() {
            // A snapshot still holding the history gets its own copy first.
            Arc::make_mut(history).push(layer, experts);
        }
        if let Some((_, used)) = st.predictions.get_mut(&layer) {
            used.extend(experts);
        }
        let mut ffns: Vec<Option<Arc<Ffn>>> = Vec::with_capacity(experts.len());
        let mut outcomes = Vec::with_capacity(experts.len());
        let mut missed = Vec::new();
        let mut taken_over = Vec::new();
        for &id in &ids {
            st.counts.lookups += 1;
            let found = match st.resident.lookup(id) {
                Lookup::Hit => st.ffns.get(&id).cloned(),
                Lookup::Miss => None,
            };
            if let Some(&job) = stolen.get(&id) {
                // Admitted when it was queued (a hit, as if it had arrived);
                // read below like a miss.
                st.counts.hits += 1;
                let outcome = match job {
                    Job::Prefetch(_) => {
                        st.prefetch.hits += 1;
                        CacheOutcome::Prefetched
                    }
                    Job::Replace(_) => CacheOutcome::Hit,
                };
                taken_over.push(ffns.len());
                ffns.push(None);
                outcomes.push((id.expert, outcome));
                continue;
            }
            if let Some(ffn) = found {
                st.counts.hits += 1;
                let outcome = if st.unused_prefetch.remove(&id) {
                    st.prefetch.hits += 1;
                    CacheOutcome::Prefetched
                } else {
                    CacheOutcome::Hit
                };
                ffns.push(Some(ffn));
                outcomes.push((id.expert, outcome));
                continue;
            }
            st.counts.misses += 1;
            missed.push(ffns.len());
            let stand_in = st
                .stand_ins
                .as_mut()
                .and_then(|s| match s.resident.lookup(id) {
                    Lookup::Hit => s.ffns.get(&id).cloned(),
                    Lookup::Miss => None,
                });
            let outcome = match stand_in {
                Some(_) => CacheOutcome::StandIn,
                None => CacheOutcome::Miss,
            };
            if let (Some(s), Some(_)) = (st.stand_ins.as_mut(), &stand_in) {
                s.counts.served += 1;
            }
            ffns.push(stand_in);
            outcomes.push((id.expert, outcome));
        }
        // Every miss takes its slot now, in call order (as the replay admits
        // them): its bytes count while it is read.
        let mut demand: Vec<DemandRead> = taken_over
            .into_iter()
            .map(|rank| DemandRead {
                rank,
                id: ids[rank],
                kept: true,
            })
            .collect();
        for rank in missed {
            let id = ids[rank];
            let kept;
            (st, kept) = sh.reserve(st, layer, experts, id);
            if ffns[rank].is_none() {
                demand.push(DemandRead { rank, id, kept });
            } else if kept {
                // Stood in for: the full copy is read in the background.
                st.queued.insert(id, Job::Replace(id));
                let sent = self.io.as_ref().is_some_and(|io| io.send(Job::Replace(id)));
                if !sent {
                    sh.release(&mut st, id);
                }
            }
        }
        if demand.is_empty() {
            drop(st);
            return Ok(CallExperts {
                ffns: ffns.into_iter().flatten().collect(),
                outcomes: Some(outcomes),
            });
        }
        let stand_ins: Vec<bool> = demand
            .iter()
            .map(|d| sh.wants_stand_in(&st, d.id))
            .collect();
        drop(st);
        // Read without the lock: the background reader and reports go on.
        let mut read = Vec::with_capacity(demand.len());
        for (d, &stand_in) in demand.iter().zip(&stand_ins) {
            let t = Instant::now();
            let result = sh.read(d.id, stand_in);
            let failed = result.is_err();
            read.push((result, t.elapsed().as_nanos() as u64));
            if failed {
                break;
            }
        }
        let mut st = sh.state();
        let mut error = None;
        let mut read = read.into_iter();
        for d in &demand {
            match read.next() {
                Some((Ok((ffn, stand_in)), nanos)) => {
                    st.loads += 1;
                    st.load_nanos += nanos;
                    let ffn = Arc::new(ffn);
                    if d.kept {
                        st.pending.remove(&d.id);
                        st.ffns.insert(d.id, ffn.clone());
                    }
                    if let Some(s) = stand_in {
                        sh.keep_stand_in(&mut st, d.id, s);
                    }
                    ffns[d.rank] = Some(ffn);
                }
                Some((Err(e), _)) => {
                    error = Some(e);
                    if d.kept {
                        sh.release(&mut st, d.id);
                    }
                }
                // Not read after an earlier failure.
                None => {
                    if d.kept {
                        sh.release(&mut st, d.id);
                    }
                }
            }
        }
        drop(st);
        sh.arrived.notify_all();
        if let Some(e) = error {
            return Err(e);
        }
        Ok(CallExperts {
            ffns: ffns.into_iter().flatten().collect(),
            outcomes: Some(outcomes),
        })
    }

    fn prefetch(&self, layer: u32, experts: &[u32]) {
        let Some(io) = self
            .io
            .as_ref()
            .filter(|_| self.prefetch == Prefetch::NextLayer)
        else {
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
        // A prediction covering most of the layer (a prefill's union of every
        // token's choices) is scored but not read: the call reads nearly all
        // of those experts itself, and reading them ahead only evicts
        // experts first. Measured on the bench model's Q4_0 GGUF at 50 %,
        // prefill with prefetch against without: 0.6-0.8x when such
        // predictions were read, 0.82-0.93x now.
        if experts.len() * 2 > self.num_experts(layer as usize) {
            return;
        }
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
                    st.queued.insert(id, Job::Prefetch(id));
                    if !io.send(Job::Prefetch(id)) {
                        sh.release(st, id);
                    }
                }
                Admit::Bypassed => break,
            }
        }
    }

    /// The snapshot is taken under the lock; Belady's MIN is replayed after.
    fn reads_in_background(&self) -> bool {
        self.io.is_some()
    }

    fn cache_report(&self) -> Option<CacheReport> {
        Some(self.snapshot().into_report())
    }

    fn drop_cached_pages(&self) -> Result<()> {
        if let Some(p) = &self.shared.packed {
            p.drop_cached_pages()?;
        }
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
        st.queued.clear();
        st.unused_prefetch.clear();
        st.in_use = (0, Vec::new());
        st.resident_bytes = 0;
        st.peak_resident_bytes = 0;
        st.counts = CacheCounts::default();
        st.history = sh
            .record_routing
            .then(|| Arc::new(RoutingHistory::with_limit(RoutingHistory::LIMIT_CALLS)));
        st.loads = 0;
        st.load_nanos = 0;
        st.prefetch = PrefetchCounts::default();
        st.predictions.clear();
        st.reads_at_reset = sh.read_stats.totals();
        st.stand_ins = sh
            .stand_ins
            .as_ref()
            .map(|plan| StandIns::new(plan, policy));
    }
}
