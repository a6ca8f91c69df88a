use std::collections::BTreeMap;

use crate::model::moe::Routing;
use crate::model::{RoutingObserver, RoutingSite, SequenceId};

/// Every routing decision of one or more forwards: per layer, per sequence,
/// the experts of each token in position order. A sequence continued through
/// its KV cache in later forwards keeps its id, so its tokens stay together.
#[derive(Debug, Clone, Default)]
pub struct RoutingTrace {
    /// `(layer, sequence) -> [token] -> expert ids`.
    tokens: BTreeMap<(usize, SequenceId), Vec<Vec<u32>>>,
    num_experts: usize,
}

impl RoutingTrace {
    /// A trace for a model with `num_experts` routed experts per layer.
    pub fn new(num_experts: usize) -> Self {
        Self {
            tokens: BTreeMap::new(),
            num_experts,
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

    /// Per sequence (in id order), the experts each token of `layer` used.
    pub fn sequences(&self, layer: usize) -> impl Iterator<Item = &[Vec<u32>]> {
        self.tokens
            .range((layer, SequenceId(0))..=(layer, SequenceId(u64::MAX)))
            .map(|(_, v)| v.as_slice())
    }

    /// Tokens recorded for `layer`, over all sequences.
    pub fn n_tokens(&self, layer: usize) -> usize {
        self.sequences(layer).map(|s| s.len()).sum()
    }

    fn record(&mut self, layer: usize, sequence: SequenceId, routing: &Routing) {
        let seq = self.tokens.entry((layer, sequence)).or_default();
        for t in 0..routing.n_tokens() {
            seq.push(routing.experts_of(t).to_vec());
        }
    }
}

impl RoutingObserver for RoutingTrace {
    fn on_routing(&mut self, site: RoutingSite<'_>, routing: &Routing) {
        self.record(site.layer, site.sequence, routing);
    }
}
