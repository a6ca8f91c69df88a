//! The model reports every routing decision here; `trace` implements it, so the
//! model never depends on analysis code.

use std::fmt;

use super::moe::Routing;
use crate::experts::CacheOutcome;

/// A sequence's identity for its whole life, assigned by the engine. Traces and
/// the expert cache key on it, never on the sequence's place in one forward's
/// batch, which changes as sequences join and leave between steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(pub u64);

impl fmt::Display for SequenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where in the model and in the sequence a routing decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingSite<'a> {
    /// Decoder layer index (dense layers never report).
    pub layer: usize,
    pub sequence: SequenceId,
    /// Absolute position of the first token of this routing in its sequence.
    pub start_position: usize,
    /// When an expert budget is set: the expert cache's outcome for each distinct
    /// expert of this layer call, `(expert, outcome)` sorted by expert id. `None`
    /// when every expert is resident (traces then leave `cache` null).
    pub cache: Option<&'a [(u32, CacheOutcome)]>,
}

impl RoutingSite<'_> {
    /// The cache's outcome for `expert` in this call, if a cache reported one.
    pub fn cache_outcome(&self, expert: u32) -> Option<CacheOutcome> {
        let outcomes = self.cache?;
        let i = outcomes.binary_search_by_key(&expert, |(e, _)| *e).ok()?;
        outcomes.get(i).map(|(_, o)| *o)
    }
}

pub trait RoutingObserver {
    fn on_routing(&mut self, site: RoutingSite<'_>, routing: &Routing);

    /// Whether MoE blocks should report [`Self::on_expert_output_norms`]
    /// (one more pass over every expert output; REAP pruning needs it).
    fn wants_expert_output_norms(&self) -> bool {
        false
    }

    /// After a MoE layer call over a whole batch: `norms[slot]` is the L2 norm
    /// of the unweighted output of the expert in `routing`'s `slot` (0 for an
    /// unused slot).
    fn on_expert_output_norms(&mut self, _layer: usize, _routing: &Routing, _norms: &[f32]) {}
}

/// Observes nothing.
pub struct NoObserver;

impl RoutingObserver for NoObserver {
    fn on_routing(&mut self, _site: RoutingSite<'_>, _routing: &Routing) {}
}
