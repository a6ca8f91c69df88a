use std::collections::BTreeMap;

use crate::model::moe::Routing;
use crate::model::{RoutingObserver, RoutingSite};

/// Every routing decision of one or more forwards: per layer, per sequence,
/// the experts of each token in position order.
#[derive(Debug, Clone, Default)]
pub struct RoutingTrace {
    /// `(layer, sequence) -> [token] -> expert ids`.
    tokens: BTreeMap<(usize, usize), Vec<Vec<u32>>>,
    num_experts: usize,
    /// Added to the sequence index the model reports (see [`RoutingTrace::new_forward`]).
    sequence_offset: usize,
}

impl RoutingTrace {
    /// A trace for a model with `num_experts` routed experts per layer.
    pub fn new(num_experts: usize) -> Self {
        Self {
            tokens: BTreeMap::new(),
            num_experts,
            sequence_offset: 0,
        }
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Layers that reported, ascending.
    pub fn layers(&self) -> Vec<usize> {
        let mut layers: Vec<usize> = self.tokens.keys().map(|(l, _)| *l).collect();
        layers.dedup();
        layers
    }

    /// Per sequence, the experts each token of `layer` used.
    pub fn sequences(&self, layer: usize) -> impl Iterator<Item = &[Vec<u32>]> {
        self.tokens
            .range((layer, 0)..(layer, usize::MAX))
            .map(|(_, v)| v.as_slice())
    }

    /// Tokens recorded for `layer`, over all sequences.
    pub fn n_tokens(&self, layer: usize) -> usize {
        self.sequences(layer).map(|s| s.len()).sum()
    }

    /// Call before a forward whose sequences are new (not continuations of the
    /// previous forward's through a KV cache): they are recorded as new sequences.
    pub fn new_forward(&mut self) {
        self.sequence_offset = self.tokens.keys().map(|(_, s)| s + 1).max().unwrap_or(0);
    }

    fn record(&mut self, layer: usize, sequence: usize, routing: &Routing) {
        let seq = self.tokens.entry((layer, sequence)).or_default();
        for t in 0..routing.n_tokens() {
            seq.push(routing.experts_of(t).to_vec());
        }
    }
}

impl RoutingObserver for RoutingTrace {
    fn on_routing(&mut self, site: RoutingSite, routing: &Routing) {
        self.record(site.layer, self.sequence_offset + site.sequence, routing);
    }
}
