//! Expert scores from a calibration run, gathered as a [`RoutingObserver`].
//!
//! REAP (Cerebras, "REAP: Router-weighted Expert Activation Pruning", 2025):
//! `S_j = mean over tokens x routed to j of g_j(x) * ||f_j(x)||_2`, with `g`
//! the softmax over all experts (not renormalised over the top-k) and `f_j(x)`
//! expert j's output. An expert never routed to scores 0 under both criteria.

use std::collections::BTreeMap;

use super::write::PrunePlan;
use crate::error::{Error, Result};
use crate::model::moe::Routing;
use crate::model::{RoutingObserver, RoutingSite};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PruneCriterion {
    /// Tokens routed to the expert.
    #[default]
    Frequency,
    /// REAP saliency (router-weighted expert activation norm).
    Reap,
}

/// One MoE layer's tallies.
#[derive(Debug, Clone, Default)]
struct LayerTally {
    /// `[n_experts]`: tokens routed to each expert.
    counts: Vec<u64>,
    /// `[n_experts]`: sum over those tokens of `score * ||output||`.
    reap_sums: Vec<f64>,
}

/// Per MoE layer, how often and how strongly each expert was used.
#[derive(Debug, Clone)]
pub struct ExpertScores {
    num_experts: usize,
    criterion: PruneCriterion,
    layers: BTreeMap<usize, LayerTally>,
}

impl ExpertScores {
    pub fn new(num_experts: usize, criterion: PruneCriterion) -> Self {
        Self {
            num_experts,
            criterion,
            layers: BTreeMap::new(),
        }
    }

    fn tally(&mut self, layer: usize) -> &mut LayerTally {
        let n = self.num_experts;
        self.layers.entry(layer).or_insert_with(|| LayerTally {
            counts: vec![0; n],
            reap_sums: vec![0.0; n],
        })
    }

    /// Tokens routed to each expert of `layer`.
    pub fn counts(&self, layer: usize) -> Option<&[u64]> {
        self.layers.get(&layer).map(|t| t.counts.as_slice())
    }

    /// Each expert's score under the criterion, `[n_experts]`.
    pub fn scores(&self, layer: usize) -> Option<Vec<f64>> {
        let t = self.layers.get(&layer)?;
        Some(match self.criterion {
            PruneCriterion::Frequency => t.counts.iter().map(|&c| c as f64).collect(),
            PruneCriterion::Reap => (t.counts.iter().zip(&t.reap_sums))
                .map(|(&c, &s)| if c == 0 { 0.0 } else { s / c as f64 })
                .collect(),
        })
    }

    /// The MoE layers seen, ascending.
    pub fn layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.keys().copied()
    }

    /// Keeps the `keep` highest-scoring experts of every layer `moe_layers`
    /// names (ties: the lower id stays). Every one of them must have been seen.
    pub fn plan(&self, moe_layers: &[usize], keep: usize) -> Result<PrunePlan> {
        if keep == 0 || keep > self.num_experts {
            return Err(Error::InvalidInput(format!(
                "keeping {keep} experts per layer: must be between 1 and {}",
                self.num_experts
            )));
        }
        let mut kept = BTreeMap::new();
        for &layer in moe_layers {
            let scores = self.scores(layer).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "MoE layer {layer} routed no calibration token; nothing to score it by"
                ))
            })?;
            let mut order: Vec<u32> = (0..self.num_experts as u32).collect();
            // Stable: among equal scores the lower id comes first and stays.
            order.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]));
            let mut ids = order[..keep].to_vec();
            ids.sort_unstable();
            kept.insert(layer, ids);
        }
        PrunePlan::new(self.num_experts, kept)
    }
}

impl RoutingObserver for ExpertScores {
    fn on_routing(&mut self, _site: RoutingSite<'_>, _routing: &Routing) {}

    fn wants_expert_output_norms(&self) -> bool {
        true
    }

    fn on_expert_output_norms(&mut self, layer: usize, routing: &Routing, norms: &[f32]) {
        let n = self.num_experts;
        let t = self.tally(layer);
        for (slot, &e) in routing.expert_ids.iter().enumerate() {
            let e = e as usize;
            if e >= n {
                continue; // an unused slot
            }
            t.counts[e] += 1;
            if let (Some(&norm), Some(&score)) = (norms.get(slot), routing.scores.get(slot)) {
                t.reap_sums[e] += score as f64 * norm as f64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two tokens, top-2 of 4 experts: token 0 uses experts 1 and 3, token 1
    /// uses 1 and 0.
    fn routing() -> Routing {
        Routing {
            top_k: 2,
            expert_ids: vec![1, 3, 1, 0],
            weights: vec![0.6, 0.4, 0.7, 0.3],
            scores: vec![0.5, 0.2, 0.4, 0.1],
        }
    }

    #[test]
    fn frequency_and_reap_by_hand() {
        let norms = [2.0, 10.0, 1.0, 3.0];
        let mut freq = ExpertScores::new(4, PruneCriterion::Frequency);
        freq.on_expert_output_norms(0, &routing(), &norms);
        assert_eq!(freq.scores(0).unwrap(), vec![1.0, 2.0, 0.0, 1.0]);
        let mut reap = ExpertScores::new(4, PruneCriterion::Reap);
        reap.on_expert_output_norms(0, &routing(), &norms);
        // Expert 1: (0.5 x 2 + 0.4 x 1) / 2 = 0.7; expert 3: 0.2 x 10 = 2;
        // expert 0: 0.1 x 3 = 0.3; expert 2 unused: 0.
        let s = reap.scores(0).unwrap();
        for (got, want) in s.iter().zip([0.3, 0.7, 0.0, 2.0]) {
            assert!((got - want).abs() < 1e-6, "{s:?}");
        }
        // Frequency keeps experts 1 and then 0 (ties with 3, lower id); REAP keeps 3 and 1.
        assert_eq!(freq.plan(&[0], 2).unwrap().kept(0), Some(&[0u32, 1][..]));
        assert_eq!(reap.plan(&[0], 2).unwrap().kept(0), Some(&[1u32, 3][..]));
    }

    #[test]
    fn unused_slots_are_not_counted() {
        let r = Routing {
            top_k: 2,
            expert_ids: vec![2, Routing::NO_EXPERT],
            weights: vec![1.0, 0.0],
            scores: vec![0.9, 0.0],
        };
        let mut s = ExpertScores::new(4, PruneCriterion::Frequency);
        s.on_expert_output_norms(3, &r, &[1.0, 0.0]);
        assert_eq!(s.counts(3), Some(&[0u64, 0, 1, 0][..]));
    }

    #[test]
    fn a_layer_without_calibration_tokens_is_refused() {
        let mut s = ExpertScores::new(4, PruneCriterion::Reap);
        s.on_expert_output_norms(0, &routing(), &[1.0; 4]);
        let err = s.plan(&[0, 1], 2).unwrap_err().to_string();
        assert!(err.contains("MoE layer 1"), "{err}");
        assert!(s.plan(&[0], 0).is_err() && s.plan(&[0], 5).is_err());
    }
}
