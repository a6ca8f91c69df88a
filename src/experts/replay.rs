//! Replays a routing sequence (per layer call, its distinct experts) through a
//! cache policy or through the offline optimum (Belady's MIN), under the
//! counting of [`super::resident`]. The run's optimal yardstick and the
//! analysis' hit-rate curves both come from here.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::ExpertId;
use super::policy::{Admission, PolicyKind};
use super::resident::{Admit, Capacity, Lookup, ResidentSet};

/// One call of one MoE layer: the distinct experts it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerCall {
    pub layer: u32,
    /// Distinct, ascending.
    pub experts: Vec<u32>,
}

impl LayerCall {
    /// Duplicates are dropped: a call looks each expert up once.
    pub fn new(layer: u32, experts: impl IntoIterator<Item = u32>) -> Self {
        let mut experts: Vec<u32> = experts.into_iter().collect();
        experts.sort_unstable();
        experts.dedup();
        Self { layer, experts }
    }

    fn ids(&self) -> impl Iterator<Item = ExpertId> + '_ {
        self.experts.iter().map(|&expert| ExpertId {
            layer: self.layer,
            expert,
        })
    }
}

/// Hits and misses of a replay (or of a live cache, counted the same way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounts {
    pub lookups: u64,
    pub hits: u64,
    pub misses: u64,
    /// Resident experts removed to make room.
    pub evictions: u64,
    /// Misses that could not be kept because every resident expert was pinned
    /// (a call wider than the capacity); included in `misses`.
    pub bypassed: u64,
}

impl CacheCounts {
    /// `hits / lookups`, 0 when there were no lookups.
    pub fn hit_rate(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits as f64 / self.lookups as f64
        }
    }

    pub fn add(&mut self, other: &CacheCounts) {
        self.lookups += other.lookups;
        self.hits += other.hits;
        self.misses += other.misses;
        self.evictions += other.evictions;
        self.bypassed += other.bypassed;
    }
}

/// `calls` through a fresh cache of `capacity` ranked by `policy`.
pub fn replay(calls: &[LayerCall], capacity: Capacity, policy: PolicyKind) -> CacheCounts {
    let mut set = ResidentSet::new(capacity, policy);
    let mut counts = CacheCounts::default();
    for call in calls {
        replay_call(&mut set, call, &mut counts);
    }
    counts
}

/// One call through `set`: all lookups first, then the misses admitted in
/// order with the call's experts pinned (as the live cache does it).
pub fn replay_call(set: &mut ResidentSet, call: &LayerCall, counts: &mut CacheCounts) {
    set.begin_call(call.layer);
    let mut missed = Vec::new();
    for id in call.ids() {
        counts.lookups += 1;
        match set.lookup(id) {
            Lookup::Hit => counts.hits += 1,
            Lookup::Miss => {
                counts.misses += 1;
                missed.push(id);
            }
        }
    }
    let pinned =
        |v: ExpertId| v.layer == call.layer && call.experts.binary_search(&v.expert).is_ok();
    for id in missed {
        match set.admit(id, Admission::Demand, &pinned) {
            Admit::Inserted { evicted } => counts.evictions += u64::from(evicted.is_some()),
            Admit::Bypassed => counts.bypassed += 1,
        }
    }
}

/// Never used again.
const NEVER: usize = usize::MAX;

/// For each call and each of its experts, the index of the next call that uses
/// the same expert (`NEVER` if none). `[call][rank in call's experts]`.
fn next_uses<'a>(calls: impl Calls<'a>) -> Vec<Vec<usize>> {
    let mut next: HashMap<ExpertId, usize> = HashMap::new();
    let mut out = vec![Vec::new(); calls.len()];
    for (i, (layer, experts)) in calls.enumerate().rev() {
        out[i] = experts
            .iter()
            .map(|&expert| next.insert(ExpertId { layer, expert }, i).unwrap_or(NEVER))
            .collect();
    }
    out
}

/// A routing sequence as `(layer, distinct ascending experts)` per layer call.
pub trait Calls<'a>:
    Iterator<Item = (u32, &'a [u32])> + DoubleEndedIterator + ExactSizeIterator + Clone
{
}

impl<'a, I> Calls<'a> for I where
    I: Iterator<Item = (u32, &'a [u32])> + DoubleEndedIterator + ExactSizeIterator + Clone
{
}

/// The hit rate an offline-optimal cache of `capacity` achieves on `calls`:
/// Belady's MIN (evict the resident expert whose next use is furthest away),
/// under the same counting as [`replay`]. After a call wider than the
/// capacity it keeps, of the resident and the call's experts, those used soonest.
pub fn replay_optimal(calls: &[LayerCall], capacity: Capacity) -> CacheCounts {
    optimal(
        calls.iter().map(|c| (c.layer, c.experts.as_slice())),
        capacity,
    )
}

/// [`replay_optimal`] over a recorded [`RoutingHistory`].
pub fn replay_optimal_history(history: &RoutingHistory, capacity: Capacity) -> CacheCounts {
    optimal(history.iter(), capacity)
}

fn optimal<'a>(calls: impl Calls<'a>, capacity: Capacity) -> CacheCounts {
    let cap = capacity.per_partition();
    let next = next_uses(calls.clone());
    // Per partition, resident experts ordered by next use (furthest last).
    let mut pools: Vec<BTreeSet<(usize, ExpertId)>> = Vec::new();
    let mut next_of: HashMap<ExpertId, usize> = HashMap::new();
    let mut counts = CacheCounts::default();
    for ((layer, experts), next) in calls.zip(&next) {
        let part = capacity.partition(layer);
        if pools.len() <= part {
            pools.resize_with(part + 1, BTreeSet::new);
        }
        let pool = &mut pools[part];
        // A call that fits keeps all its experts (the engine computes from the
        // resident copy). A wider one cannot be held whole: what stays is the
        // capacity's worth of old and new experts used soonest (pinning its hits
        // instead would make the greedy choice lose to a search).
        let fits = experts.len() <= cap;
        let mut pinned = HashSet::new();
        let mut inserted = HashSet::new();
        let ids = experts.iter().map(|&expert| ExpertId { layer, expert });
        for (id, &n) in ids.zip(next) {
            counts.lookups += 1;
            if let Some(old) = next_of.insert(id, n) {
                counts.hits += 1;
                pool.remove(&(old, id));
            } else {
                counts.misses += 1;
                inserted.insert(id);
            }
            if fits {
                pinned.insert(id);
            }
            pool.insert((n, id));
        }
        while pool.len() > cap {
            let Some(&(n, v)) = pool.iter().rev().find(|(_, v)| !pinned.contains(v)) else {
                break;
            };
            pool.remove(&(n, v));
            next_of.remove(&v);
            if inserted.contains(&v) {
                counts.bypassed += 1;
            } else {
                counts.evictions += 1;
            }
        }
    }
    counts
}

/// A live cache's routing sequence, kept for the optimal yardstick, in flat
/// arrays (4 bytes per expert looked up, 8 per call) and bounded: past
/// `limit_calls` layer calls it stops recording and says so, instead of
/// growing for as long as the engine runs.
#[derive(Debug, Clone)]
pub struct RoutingHistory {
    layers: Vec<u32>,
    /// `[call]`: end of the call's experts in `experts`.
    ends: Vec<usize>,
    experts: Vec<u32>,
    limit_calls: usize,
    overflowed: bool,
}

impl RoutingHistory {
    /// The limit a cache records under: 2^21 layer calls, at most 80 MiB at
    /// top-8 (about 43k tokens of a 48-layer model).
    pub const LIMIT_CALLS: usize = 1 << 21;

    pub fn with_limit(limit_calls: usize) -> Self {
        Self {
            layers: Vec::new(),
            ends: Vec::new(),
            experts: Vec::new(),
            limit_calls,
            overflowed: false,
        }
    }

    /// Records one call (`experts` distinct, ascending); past the limit only
    /// notes that the history is incomplete.
    pub fn push(&mut self, layer: u32, experts: &[u32]) {
        if self.layers.len() >= self.limit_calls {
            self.overflowed = true;
            return;
        }
        self.layers.push(layer);
        self.experts.extend_from_slice(experts);
        self.ends.push(self.experts.len());
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// More calls happened than were recorded.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    pub fn clear(&mut self) {
        self.layers.clear();
        self.ends.clear();
        self.experts.clear();
        self.overflowed = false;
    }

    pub fn iter(&self) -> impl Calls<'_> {
        (0..self.layers.len()).map(move |i| {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            (self.layers[i], &self.experts[start..self.ends[i]])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(layer_experts: &[(u32, &[u32])]) -> Vec<LayerCall> {
        layer_experts
            .iter()
            .map(|&(l, e)| LayerCall::new(l, e.iter().copied()))
            .collect()
    }

    #[test]
    fn layer_call_looks_each_expert_up_once() {
        let c = LayerCall::new(3, [5, 1, 5, 2, 1]);
        assert_eq!(c.experts, vec![1, 2, 5]);
        let counts = replay(&[c], Capacity::Global(8), PolicyKind::Lru);
        assert_eq!((counts.lookups, counts.misses), (3, 3));
    }

    #[test]
    fn lru_replay_counts_hand_made_sequence() {
        // Capacity 2, one layer: 1 2 | 1 | 3 (evicts 2) | 2 (evicts 1) | 1 (evicts 3).
        let seq = calls(&[(0, &[1, 2]), (0, &[1]), (0, &[3]), (0, &[2]), (0, &[1])]);
        let c = replay(&seq, Capacity::Global(2), PolicyKind::Lru);
        assert_eq!((c.lookups, c.hits, c.misses, c.evictions), (6, 1, 5, 3));
        // MIN at call 2 evicts 1 (next used at call 4) rather than 2 (call 3).
        let m = replay_optimal(&seq, Capacity::Global(2));
        assert_eq!((m.hits, m.misses), (2, 4));
    }

    #[test]
    fn lfu_replay_keeps_the_popular_expert() {
        // 1 is used often; 2, 3, 4 stream through. LRU at capacity 2 loses 1 to
        // the stream at every other step, LFU keeps it.
        let seq = calls(&[
            (0, &[1]),
            (0, &[1]),
            (0, &[2]),
            (0, &[3]),
            (0, &[1]),
            (0, &[4]),
            (0, &[5]),
            (0, &[1]),
        ]);
        let lfu = replay(
            &seq,
            Capacity::Global(2),
            PolicyKind::Lfu { half_life: None },
        );
        let lru = replay(&seq, Capacity::Global(2), PolicyKind::Lru);
        assert_eq!(lfu.hits, 3);
        assert_eq!(lru.hits, 1);
    }

    #[test]
    fn per_layer_capacity_keeps_layers_apart() {
        // Layer 1's stream cannot evict layer 0's expert with a per-layer pool.
        let seq = calls(&[(0, &[1]), (1, &[1]), (1, &[2]), (1, &[3]), (0, &[1])]);
        let global = replay(&seq, Capacity::Global(2), PolicyKind::Lru);
        let per_layer = replay(&seq, Capacity::PerLayer(1), PolicyKind::Lru);
        assert_eq!(global.hits, 0);
        assert_eq!(per_layer.hits, 1);
        assert_eq!(replay_optimal(&seq, Capacity::PerLayer(1)).hits, 1);
    }

    #[test]
    fn call_wider_than_capacity_bypasses_and_never_evicts_its_own_experts() {
        let seq = calls(&[(0, &[1]), (0, &[1, 2, 3])]);
        let c = replay(&seq, Capacity::Global(2), PolicyKind::Lru);
        // Call 1: 1 hits; 2 fills the second slot; 3 finds both pinned.
        assert_eq!((c.hits, c.misses, c.bypassed, c.evictions), (1, 3, 1, 0));
        let m = replay_optimal(&seq, Capacity::Global(2));
        assert_eq!((m.hits, m.misses, m.bypassed, m.evictions), (1, 3, 1, 0));
    }

    #[test]
    fn routing_history_stops_at_its_limit_and_says_so() {
        let mut h = RoutingHistory::with_limit(2);
        h.push(0, &[1, 2]);
        h.push(1, &[3]);
        assert!(!h.overflowed());
        h.push(0, &[4]);
        assert_eq!(h.len(), 2);
        assert!(h.overflowed());
        let calls: Vec<(u32, Vec<u32>)> = h.iter().map(|(l, e)| (l, e.to_vec())).collect();
        assert_eq!(calls, vec![(0, vec![1, 2]), (1, vec![3])]);
        h.clear();
        assert!(h.is_empty() && !h.overflowed());
    }

    #[test]
    fn zero_capacity_misses_everything() {
        let seq = calls(&[(0, &[1]), (0, &[1])]);
        let c = replay(&seq, Capacity::Global(0), PolicyKind::Lru);
        assert_eq!((c.hits, c.misses, c.bypassed), (0, 2, 2));
        assert_eq!(replay_optimal(&seq, Capacity::Global(0)).hits, 0);
    }

    /// The most hits any admissible schedule achieves: at each call every
    /// choice of what to keep (the call's experts forced in when they fit),
    /// searched exhaustively.
    fn brute_force_hits(calls: &[LayerCall], cap: usize, resident: &BTreeSet<ExpertId>) -> u64 {
        let Some((call, rest)) = calls.split_first() else {
            return 0;
        };
        let ids: Vec<ExpertId> = call.ids().collect();
        let hits = ids.iter().filter(|id| resident.contains(id)).count() as u64;
        let forced: BTreeSet<ExpertId> = if ids.len() <= cap {
            ids.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        let optional: Vec<ExpertId> = resident
            .iter()
            .chain(&ids)
            .copied()
            .filter(|id| !forced.contains(id))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut best = 0;
        for mask in 0u32..(1 << optional.len()) {
            if forced.len() + mask.count_ones() as usize > cap {
                continue;
            }
            let mut keep = forced.clone();
            keep.extend(
                optional
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, id)| *id),
            );
            best = best.max(brute_force_hits(rest, cap, &keep));
        }
        hits + best
    }

    fn random_calls() -> impl proptest::strategy::Strategy<Value = Vec<LayerCall>> {
        use proptest::prelude::*;
        prop::collection::vec((0u32..2, prop::collection::vec(0u32..5, 1..4)), 0..8)
            .prop_map(|v| v.into_iter().map(|(l, e)| LayerCall::new(l, e)).collect())
    }

    proptest::proptest! {
        #[test]
        fn optimal_matches_brute_force(seq in random_calls(), cap in 0usize..4) {
            let min = replay_optimal(&seq, Capacity::Global(cap));
            let brute = brute_force_hits(&seq, cap, &BTreeSet::new());
            let mut history = RoutingHistory::with_limit(seq.len());
            for c in &seq {
                history.push(c.layer, &c.experts);
            }
            proptest::prop_assert_eq!(replay_optimal_history(&history, Capacity::Global(cap)), min);
            proptest::prop_assert_eq!(min.hits, brute);
            proptest::prop_assert_eq!(min.hits + min.misses, min.lookups);
        }

        #[test]
        fn per_layer_optimal_is_each_layer_alone(seq in random_calls(), cap in 0usize..4) {
            let per_layer = replay_optimal(&seq, Capacity::PerLayer(cap));
            let mut sum = 0;
            for layer in 0..2 {
                let only: Vec<LayerCall> = seq.iter().filter(|c| c.layer == layer).cloned().collect();
                sum += brute_force_hits(&only, cap, &BTreeSet::new());
            }
            proptest::prop_assert_eq!(per_layer.hits, sum);
        }

        #[test]
        fn no_policy_beats_optimal(seq in random_calls(), cap in 0usize..4) {
            for capacity in [Capacity::Global(cap), Capacity::PerLayer(cap)] {
                let min = replay_optimal(&seq, capacity);
                for kind in [PolicyKind::Lru, PolicyKind::Lfu { half_life: None }] {
                    let c = replay(&seq, capacity, kind);
                    proptest::prop_assert!(c.hits <= min.hits, "{kind} {capacity}: {c:?} vs {min:?}");
                    proptest::prop_assert_eq!(c.lookups, min.lookups);
                }
            }
        }
    }
}
