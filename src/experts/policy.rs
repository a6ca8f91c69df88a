//! Expert cache policies: which resident expert leaves on a miss. The live
//! expert cache and the replay simulator (`experts::replay`) drive the same
//! policy objects through [`ResidentSet`](super::ResidentSet), so a run's hit
//! rate and its replay agree.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use super::ExpertId;
use crate::error::{Error, Result};

/// Why an expert became resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A layer call asked for it and it was not resident (a miss).
    Demand,
    /// Read ahead of use on a prediction; it counts as a use only once a call asks for it.
    Prefetch,
}

/// Decides the eviction order of one partition of the expert cache (the whole
/// cache, or one layer's share). The owner keeps the resident set and tells
/// the policy every event; the policy only ranks.
pub trait CachePolicy: Send + fmt::Debug {
    /// A layer call of `layer` starts; its lookups follow.
    fn begin_call(&mut self, _layer: u32) {}
    /// A lookup found `id` resident.
    fn on_hit(&mut self, id: ExpertId);
    /// `id` became resident.
    fn on_insert(&mut self, id: ExpertId, why: Admission);
    /// `id` left the cache.
    fn on_remove(&mut self, id: ExpertId);
    /// The resident expert to evict next, skipping those `pinned` holds (the
    /// current call's experts); `None` when every resident expert is pinned.
    fn victim(&self, pinned: &dyn Fn(ExpertId) -> bool) -> Option<ExpertId>;
}

/// The policies `--expert-cache` accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PolicyKind {
    /// Least recently used (mixtral-offloading's per-layer cache).
    Lru,
    /// Least frequently used, counts kept for evicted experts too and halved
    /// every `half_life` accesses of the partition, so old popularity fades.
    /// `None` takes [`PolicyKind::default_half_life`].
    Lfu { half_life: Option<u64> },
}

impl PolicyKind {
    pub const ACCEPTED: &'static str = "lru, lfu, lfu:HALF_LIFE (accesses)";

    /// LFU's default half-life: four times the partition's capacity in accesses,
    /// so a count fades by half over about four turnovers of the cache.
    pub fn default_half_life(capacity: usize) -> u64 {
        (4 * capacity as u64).max(1)
    }

    /// A fresh policy for a partition holding `capacity` experts.
    pub fn build(&self, capacity: usize) -> Box<dyn CachePolicy> {
        match *self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::Lfu { half_life } => Box::new(Lfu::new(
                half_life.unwrap_or_else(|| Self::default_half_life(capacity)),
            )),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyKind::Lru => f.write_str("lru"),
            PolicyKind::Lfu { half_life: None } => f.write_str("lfu"),
            PolicyKind::Lfu { half_life: Some(h) } => write!(f, "lfu:{h}"),
        }
    }
}

impl FromStr for PolicyKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidInput(format!(
                "--expert-cache {s:?}: expected one of {}",
                Self::ACCEPTED
            ))
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "lru" => Ok(PolicyKind::Lru),
            "lfu" => Ok(PolicyKind::Lfu { half_life: None }),
            other => {
                let h = other.strip_prefix("lfu:").ok_or_else(bad)?;
                match h.parse::<u64>() {
                    Ok(h) if h > 0 => Ok(PolicyKind::Lfu { half_life: Some(h) }),
                    _ => Err(bad()),
                }
            }
        }
    }
}

/// Least recently used: a logical clock stamps every hit and insertion.
#[derive(Debug, Default)]
pub struct Lru {
    clock: u64,
    stamp: HashMap<ExpertId, u64>,
    /// Oldest stamp first.
    order: BTreeMap<u64, ExpertId>,
}

impl Lru {
    fn touch(&mut self, id: ExpertId) {
        if let Some(old) = self.stamp.insert(id, self.clock) {
            self.order.remove(&old);
        }
        self.order.insert(self.clock, id);
        self.clock += 1;
    }
}

impl CachePolicy for Lru {
    fn on_hit(&mut self, id: ExpertId) {
        self.touch(id);
    }

    fn on_insert(&mut self, id: ExpertId, _why: Admission) {
        self.touch(id);
    }

    fn on_remove(&mut self, id: ExpertId) {
        if let Some(old) = self.stamp.remove(&id) {
            self.order.remove(&old);
        }
    }

    fn victim(&self, pinned: &dyn Fn(ExpertId) -> bool) -> Option<ExpertId> {
        self.order.values().copied().find(|&id| !pinned(id))
    }
}

/// An f64 with a total order, for ranking.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rank(f64);

impl Eq for Rank {}

impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Rank {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// An expert's use count as of access `last`; at a later access `t` it is worth
/// `count * 2^(-(t - last) / half_life)`.
#[derive(Debug, Clone, Copy)]
struct Frequency {
    count: f64,
    last: u64,
}

/// Least frequently used with exponential ageing. Counts survive eviction, so an
/// expert that returns keeps its history (experts are few, so this is cheap).
///
/// Ranking uses `log2(count) + last / half_life`: it orders experts exactly as
/// their aged counts at any common later time do (the `-t / half_life` term is
/// shared), so the order never needs recomputing as time passes.
#[derive(Debug)]
pub struct Lfu {
    half_life: f64,
    clock: u64,
    history: HashMap<ExpertId, Frequency>,
    rank: HashMap<ExpertId, (Rank, u64)>,
    /// Resident experts, least frequent first; the stamp breaks ties least recent first.
    order: BTreeSet<(Rank, u64, ExpertId)>,
}

impl Lfu {
    pub fn new(half_life: u64) -> Self {
        Self {
            half_life: half_life.max(1) as f64,
            clock: 0,
            history: HashMap::new(),
            rank: HashMap::new(),
            order: BTreeSet::new(),
        }
    }

    /// Adds `uses` to the aged count of `id` and re-ranks it if resident.
    fn count(&mut self, id: ExpertId, uses: f64, resident: bool) {
        let now = self.clock;
        self.clock += 1;
        let f = self.history.entry(id).or_insert(Frequency {
            count: 0.0,
            last: now,
        });
        let aged = f.count * (-((now - f.last) as f64) / self.half_life).exp2();
        *f = Frequency {
            count: aged + uses,
            last: now,
        };
        let rank = Rank(f.count.max(f64::MIN_POSITIVE).log2() + now as f64 / self.half_life);
        if let Some(old) = self.rank.remove(&id) {
            self.order.remove(&(old.0, old.1, id));
        }
        if resident {
            self.rank.insert(id, (rank, now));
            self.order.insert((rank, now, id));
        }
    }
}

impl CachePolicy for Lfu {
    fn on_hit(&mut self, id: ExpertId) {
        self.count(id, 1.0, true);
    }

    fn on_insert(&mut self, id: ExpertId, why: Admission) {
        let uses = match why {
            Admission::Demand => 1.0,
            Admission::Prefetch => 0.0,
        };
        self.count(id, uses, true);
    }

    fn on_remove(&mut self, id: ExpertId) {
        if let Some((rank, stamp)) = self.rank.remove(&id) {
            self.order.remove(&(rank, stamp, id));
        }
    }

    fn victim(&self, pinned: &dyn Fn(ExpertId) -> bool) -> Option<ExpertId> {
        self.order
            .iter()
            .map(|&(_, _, id)| id)
            .find(|&id| !pinned(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(expert: u32) -> ExpertId {
        ExpertId { layer: 0, expert }
    }

    fn nothing_pinned(_: ExpertId) -> bool {
        false
    }

    /// Removes victims until the policy has none left: the full eviction order.
    fn eviction_order(policy: &mut dyn CachePolicy) -> Vec<u32> {
        let mut order = Vec::new();
        while let Some(v) = policy.victim(&nothing_pinned) {
            policy.on_remove(v);
            order.push(v.expert);
        }
        order
    }

    #[test]
    fn lru_evicts_least_recent_expert() {
        let mut lru = PolicyKind::Lru.build(4);
        for e in [1, 2, 3, 4] {
            lru.on_insert(id(e), Admission::Demand);
        }
        lru.on_hit(id(2));
        lru.on_hit(id(1));
        assert_eq!(eviction_order(lru.as_mut()), vec![3, 4, 2, 1]);
    }

    #[test]
    fn lru_victim_skips_pinned_experts() {
        let mut lru = PolicyKind::Lru.build(3);
        for e in [5, 6, 7] {
            lru.on_insert(id(e), Admission::Demand);
        }
        let pinned = |x: ExpertId| x.expert == 5 || x.expert == 6;
        assert_eq!(lru.victim(&pinned), Some(id(7)));
        let all = |_: ExpertId| true;
        assert_eq!(lru.victim(&all), None);
    }

    #[test]
    fn lfu_evicts_least_frequent_then_least_recent() {
        let mut lfu = Lfu::new(1_000_000);
        for e in [1, 2, 3, 4] {
            lfu.on_insert(id(e), Admission::Demand);
        }
        for e in [4, 4, 1, 2, 2, 2] {
            lfu.on_hit(id(e));
        }
        // Counts: 1 -> 2, 2 -> 4, 3 -> 1, 4 -> 3.
        assert_eq!(eviction_order(&mut lfu), vec![3, 1, 4, 2]);
    }

    #[test]
    fn lfu_remembers_counts_of_evicted_experts() {
        let mut lfu = Lfu::new(1_000_000);
        lfu.on_insert(id(1), Admission::Demand);
        for _ in 0..5 {
            lfu.on_hit(id(1));
        }
        lfu.on_remove(id(1));
        lfu.on_insert(id(2), Admission::Demand);
        lfu.on_hit(id(2));
        lfu.on_insert(id(1), Admission::Demand); // back with 7 uses against 2's two
        assert_eq!(eviction_order(&mut lfu), vec![2, 1]);
    }

    #[test]
    fn lfu_ageing_lets_old_counts_fade() {
        // Expert 1 was used 8 times long ago; expert 2 twice just now. Without
        // ageing 1 would stay; with a half-life of 2 accesses its count decays
        // by 2^-6 over the 12 accesses since and 2 is the one kept.
        let mut aged = Lfu::new(2);
        let mut plain = Lfu::new(u64::MAX / 4);
        for p in [&mut aged, &mut plain] {
            p.on_insert(id(1), Admission::Demand);
            for _ in 0..7 {
                p.on_hit(id(1));
            }
            for e in 10..20 {
                p.on_insert(id(e), Admission::Demand);
                p.on_remove(id(e));
            }
            p.on_insert(id(2), Admission::Demand);
            p.on_hit(id(2));
        }
        assert_eq!(eviction_order(&mut aged), vec![1, 2]);
        assert_eq!(eviction_order(&mut plain), vec![2, 1]);
    }

    #[test]
    fn lfu_prefetch_is_not_a_use() {
        let mut lfu = Lfu::new(1_000_000);
        lfu.on_insert(id(1), Admission::Demand);
        lfu.on_insert(id(2), Admission::Prefetch);
        assert_eq!(eviction_order(&mut lfu), vec![2, 1]);
    }

    #[test]
    fn policy_names_parse_and_round_trip() {
        for s in ["lru", "lfu", "lfu:64"] {
            let kind: PolicyKind = s.parse().unwrap();
            assert_eq!(kind.to_string(), s);
        }
        assert_eq!("LRU".parse::<PolicyKind>().unwrap(), PolicyKind::Lru);
        for bad in ["", "fifo", "lfu:", "lfu:0", "lfu:x"] {
            let err = bad.parse::<PolicyKind>().unwrap_err().to_string();
            assert!(err.contains("lru, lfu"), "{bad:?}: {err}");
        }
    }
}
