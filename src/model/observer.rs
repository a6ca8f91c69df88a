//! The model reports every routing decision here; `trace` implements it, so the
//! model never depends on analysis code.

use std::fmt;

use super::moe::Routing;

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
pub struct RoutingSite {
    /// Decoder layer index (dense layers never report).
    pub layer: usize,
    pub sequence: SequenceId,
    /// Absolute position of the first token of this routing in its sequence.
    pub start_position: usize,
}

pub trait RoutingObserver {
    fn on_routing(&mut self, site: RoutingSite, routing: &Routing);
}

/// Observes nothing.
pub struct NoObserver;

impl RoutingObserver for NoObserver {
    fn on_routing(&mut self, _site: RoutingSite, _routing: &Routing) {}
}
