//! Which experts are resident, under a capacity in experts, and the counting
//! every hit rate in Switchyard uses (the live expert cache, the replay
//! simulator, the optimal yardstick):
//!
//! - one lookup per distinct expert per layer call;
//! - a first-ever request is a miss;
//! - eviction never removes an expert the current call uses;
//! - capacity is global (one pool for all layers) or per layer.
//!
//! A call with more distinct experts than the capacity cannot be held whole:
//! its misses beyond what fits are computed and dropped (bypassed) and still
//! count as misses; a policy keeps the call's experts that are resident, the
//! optimum may keep any capacity's worth of old and new experts. The engine
//! sizes its prefill chunks so that this never happens; traces recorded
//! without a budget may contain such calls.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use super::ExpertId;
use super::policy::{Admission, CachePolicy, PolicyKind};
use crate::error::{Error, Result};

/// How many experts the cache holds, and over which key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    /// One pool shared by all layers.
    Global(usize),
    /// The same number of experts for each layer, each layer its own pool.
    PerLayer(usize),
}

impl Capacity {
    /// Experts one partition (the pool, or one layer's share) holds.
    pub fn per_partition(&self) -> usize {
        match *self {
            Capacity::Global(n) | Capacity::PerLayer(n) => n,
        }
    }

    /// The partition `layer`'s experts live in.
    pub(crate) fn partition(&self, layer: u32) -> usize {
        match self {
            Capacity::Global(_) => 0,
            Capacity::PerLayer(_) => layer as usize,
        }
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Capacity::Global(n) => write!(f, "{n}"),
            Capacity::PerLayer(n) => write!(f, "{n}/layer"),
        }
    }
}

impl FromStr for Capacity {
    type Err = Error;

    /// `N` (global) or `N/layer`.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let (n, per_layer) = match s.strip_suffix("/layer") {
            Some(n) => (n, true),
            None => (s, false),
        };
        let n: usize = n.trim().parse().map_err(|_| {
            Error::InvalidInput(format!(
                "cache capacity {s:?}: expected a number of experts, N (all layers) or N/layer"
            ))
        })?;
        Ok(if per_layer {
            Capacity::PerLayer(n)
        } else {
            Capacity::Global(n)
        })
    }
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
}

/// What admitting a missed expert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Resident now; `evicted` made room for it.
    Inserted { evicted: Option<ExpertId> },
    /// Every resident expert of its partition is pinned: computed and dropped.
    Bypassed,
}

#[derive(Debug)]
struct Partition {
    policy: Box<dyn CachePolicy>,
    resident: HashSet<ExpertId>,
}

/// The resident set of an expert cache, ranked by one [`CachePolicy`] per
/// partition. Holds no bytes: the live cache maps ids to its buffers, the
/// simulator needs none.
#[derive(Debug)]
pub struct ResidentSet {
    capacity: Capacity,
    kind: PolicyKind,
    /// Indexed by [`Capacity::partition`]; per-layer partitions appear as layers do.
    partitions: Vec<Partition>,
}

impl ResidentSet {
    pub fn new(capacity: Capacity, kind: PolicyKind) -> Self {
        Self {
            capacity,
            kind,
            partitions: Vec::new(),
        }
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    pub fn policy(&self) -> PolicyKind {
        self.kind
    }

    pub fn len(&self) -> usize {
        self.partitions.iter().map(|p| p.resident.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, id: ExpertId) -> bool {
        self.partitions
            .get(self.capacity.partition(id.layer))
            .is_some_and(|p| p.resident.contains(&id))
    }

    fn partition_mut(&mut self, layer: u32) -> &mut Partition {
        let i = self.capacity.partition(layer);
        while self.partitions.len() <= i {
            self.partitions.push(Partition {
                policy: self.kind.build(self.capacity.per_partition()),
                resident: HashSet::new(),
            });
        }
        &mut self.partitions[i]
    }

    /// A layer call of `layer` starts: lookups and admissions of its experts follow.
    pub fn begin_call(&mut self, layer: u32) {
        self.partition_mut(layer).policy.begin_call(layer);
    }

    /// One lookup of `id` (call once per distinct expert of a call).
    pub fn lookup(&mut self, id: ExpertId) -> Lookup {
        let p = self.partition_mut(id.layer);
        if p.resident.contains(&id) {
            p.policy.on_hit(id);
            Lookup::Hit
        } else {
            Lookup::Miss
        }
    }

    /// Makes `id` resident, evicting the policy's victim if the partition is
    /// full; `pinned` are the experts that must stay (the current call's).
    pub fn admit(
        &mut self,
        id: ExpertId,
        why: Admission,
        pinned: &dyn Fn(ExpertId) -> bool,
    ) -> Admit {
        let cap = self.capacity.per_partition();
        let p = self.partition_mut(id.layer);
        if p.resident.contains(&id) {
            return Admit::Inserted { evicted: None };
        }
        let mut evicted = None;
        if p.resident.len() >= cap {
            match p.policy.victim(&|v| v == id || pinned(v)) {
                Some(v) if p.resident.len() == cap => {
                    p.resident.remove(&v);
                    p.policy.on_remove(v);
                    evicted = Some(v);
                }
                _ => return Admit::Bypassed,
            }
        }
        p.resident.insert(id);
        p.policy.on_insert(id, why);
        Admit::Inserted { evicted }
    }

    /// Drops `id` (a failed read, or a stand-in replaced); true if it was resident.
    pub fn remove(&mut self, id: ExpertId) -> bool {
        let p = self.partition_mut(id.layer);
        let was = p.resident.remove(&id);
        if was {
            p.policy.on_remove(id);
        }
        was
    }
}
