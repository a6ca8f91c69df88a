//! The model reports every routing decision here; `trace` implements it, so the
//! model never depends on analysis code.

use super::moe::Routing;

/// Where in the model and in the sequence a routing decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingSite {
    /// Decoder layer index (dense layers never report).
    pub layer: usize,
    /// Index of the sequence within the forward's batch.
    pub sequence: usize,
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
