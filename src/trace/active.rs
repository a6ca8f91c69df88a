//! How many experts a run actually used: per MoE layer, tokens routed and how
//! often each expert was picked. With dynamic expert top-p a token may use
//! fewer than `top_k` experts; this is what `--expert-top-p` is judged by.

use std::collections::BTreeMap;

use crate::model::moe::Routing;
use crate::model::{RoutingObserver, RoutingSite};

/// Counts of one MoE layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerPicks {
    /// Tokens that passed through the layer.
    pub tokens: u64,
    /// `[n_experts]`: times each expert was used (grown as experts appear).
    pub picks: Vec<u64>,
}

/// A [`RoutingObserver`] counting expert use, by layer.
#[derive(Debug, Clone, Default)]
pub struct ActiveExperts {
    layers: BTreeMap<usize, LayerPicks>,
}

impl ActiveExperts {
    pub fn layers(&self) -> &BTreeMap<usize, LayerPicks> {
        &self.layers
    }

    /// (token, MoE layer) pairs routed.
    pub fn routed_tokens(&self) -> u64 {
        self.layers.values().map(|l| l.tokens).sum()
    }

    /// Experts used, summed over every (token, MoE layer) pair.
    pub fn routed_slots(&self) -> u64 {
        self.layers.values().flat_map(|l| &l.picks).sum()
    }

    /// Experts per token per MoE layer, averaged over every (token, layer) pair;
    /// 0 when nothing was routed.
    pub fn mean_active_per_token(&self) -> f64 {
        match self.routed_tokens() {
            0 => 0.0,
            tokens => self.routed_slots() as f64 / tokens as f64,
        }
    }

    /// Routed-expert weight bytes one token reads, summed over MoE layers:
    /// per layer, the bytes of the experts it picked over the tokens it saw.
    /// `expert_bytes(layer, expert)` gives one expert's size.
    pub fn expert_bytes_per_token(&self, expert_bytes: impl Fn(usize, u32) -> usize) -> f64 {
        self.layers
            .iter()
            .filter(|(_, l)| l.tokens > 0)
            .map(|(&layer, l)| {
                let bytes: f64 = (l.picks.iter().enumerate())
                    .map(|(e, &n)| n as f64 * expert_bytes(layer, e as u32) as f64)
                    .sum();
                bytes / l.tokens as f64
            })
            .sum()
    }
}

impl RoutingObserver for ActiveExperts {
    fn on_routing(&mut self, site: RoutingSite<'_>, routing: &Routing) {
        let layer = self.layers.entry(site.layer).or_default();
        for t in 0..routing.n_tokens() {
            layer.tokens += 1;
            for &e in routing.experts_of(t) {
                let e = e as usize;
                if layer.picks.len() <= e {
                    layer.picks.resize(e + 1, 0);
                }
                layer.picks[e] += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SequenceId;

    fn site(layer: usize) -> RoutingSite<'static> {
        RoutingSite {
            layer,
            sequence: SequenceId(0),
            start_position: 0,
            cache: None,
        }
    }

    #[test]
    fn counts_experts_per_token_and_their_bytes() {
        let mut active = ActiveExperts::default();
        // Layer 0: two tokens with two experts each; layer 1: one token, one
        // expert kept (the other slot dropped by dynamic top-p).
        let two = Routing {
            top_k: 2,
            expert_ids: vec![0, 3, 3, 1],
            weights: vec![0.5; 4],
            scores: vec![0.5; 4],
        };
        let one = Routing {
            top_k: 2,
            expert_ids: vec![2, Routing::NO_EXPERT],
            weights: vec![1.0, 0.0],
            scores: vec![0.9, 0.0],
        };
        active.on_routing(site(0), &two);
        active.on_routing(site(1), &one);
        assert_eq!(active.layers()[&0].picks, vec![1, 1, 0, 2]);
        assert_eq!(active.layers()[&1].picks, vec![0, 0, 1]);
        // (4 + 1) picks over 3 (token, layer) pairs.
        assert_eq!((active.routed_slots(), active.routed_tokens()), (5, 3));
        assert!((active.mean_active_per_token() - 5.0 / 3.0).abs() < 1e-12);
        // Layer 0: 4 picks of 10 bytes over 2 tokens = 20; layer 1: 100 bytes over 1 token.
        let bytes = active.expert_bytes_per_token(|layer, _| if layer == 0 { 10 } else { 100 });
        assert!((bytes - 120.0).abs() < 1e-9);
    }

    #[test]
    fn nothing_routed_is_zero() {
        let active = ActiveExperts::default();
        assert_eq!(active.mean_active_per_token(), 0.0);
        assert_eq!(active.expert_bytes_per_token(|_, _| 1), 0.0);
    }
}
