//! What a routing trace says about load balance and locality.

use super::RoutingTrace;

/// Shannon entropy in bits of a load distribution (counts or fractions).
/// Uniform over `n` experts gives `log2(n)`; all load on one expert gives 0.
pub fn entropy_bits(load: &[f64]) -> f64 {
    let total: f64 = load.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    load.iter()
        .filter(|&&c| c > 0.0)
        .map(|&c| {
            let p = c / total;
            -p * p.log2()
        })
        .sum()
}

/// How many token slots of `layer` went to each expert.
pub fn loads(trace: &RoutingTrace, layer: usize) -> Vec<f64> {
    let mut counts = vec![0f64; trace.num_experts()];
    for seq in trace.sequences(layer) {
        for token in seq {
            for &e in token {
                if let Some(c) = counts.get_mut(e as usize) {
                    *c += 1.0;
                }
            }
        }
    }
    counts
}

/// Entropy (bits) of `layer`'s expert load; compare with `log2(num_experts)`.
pub fn load_entropy(trace: &RoutingTrace, layer: usize) -> f64 {
    entropy_bits(&loads(trace, layer))
}

/// Share of consecutive token pairs (within a sequence) of `layer` whose expert
/// sets share at least one expert; `None` when there are no pairs. Independent
/// uniform top-k routing gives `1 - C(E-k, k) / C(E, k)`.
pub fn consecutive_reuse(trace: &RoutingTrace, layer: usize) -> Option<f64> {
    let (mut pairs, mut reused) = (0usize, 0usize);
    for seq in trace.sequences(layer) {
        for w in seq.windows(2) {
            pairs += 1;
            if w[1].iter().any(|e| w[0].contains(e)) {
                reused += 1;
            }
        }
    }
    (pairs > 0).then(|| reused as f64 / pairs as f64)
}

/// `1 - C(E-k, k) / C(E, k)`: the reuse share if each token picked its `k`
/// experts uniformly at random.
pub fn uniform_reuse(num_experts: usize, top_k: usize) -> f64 {
    if top_k == 0 || num_experts < top_k {
        return 0.0;
    }
    let mut miss = 1.0;
    // C(E-k, k) / C(E, k) = prod_{i<k} (E-k-i) / (E-i)
    for i in 0..top_k {
        miss *= (num_experts as f64 - top_k as f64 - i as f64).max(0.0) / (num_experts - i) as f64;
    }
    1.0 - miss
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::moe::Routing;
    use crate::model::{RoutingObserver, RoutingSite, SequenceId};

    fn site(layer: usize, sequence: u64) -> RoutingSite<'static> {
        RoutingSite {
            layer,
            sequence: SequenceId(sequence),
            start_position: 0,
            cache: None,
        }
    }

    fn routing(ids: &[u32]) -> Routing {
        Routing {
            top_k: 2,
            expert_ids: ids.to_vec(),
            weights: vec![0.5; ids.len()],
            scores: vec![0.25; ids.len()],
        }
    }

    #[test]
    fn entropy_is_log2_n_when_uniform_and_zero_when_collapsed() {
        assert!((entropy_bits(&[1.0; 8]) - 3.0).abs() < 1e-12);
        assert_eq!(entropy_bits(&[0.0, 5.0, 0.0]), 0.0);
        assert_eq!(entropy_bits(&[]), 0.0);
    }

    #[test]
    fn trace_counts_load_per_layer() {
        let mut t = RoutingTrace::new(4);
        t.on_routing(site(0, 0), &routing(&[0, 1, 0, 2]));
        t.on_routing(site(1, 0), &routing(&[3, 2, 3, 2]));
        assert_eq!(loads(&t, 0), vec![2.0, 1.0, 1.0, 0.0]);
        assert_eq!(t.layers(), vec![0, 1]);
        assert_eq!(t.n_tokens(1), 2);
        assert!((load_entropy(&t, 1) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn consecutive_reuse_counts_pairs_within_sequences_only() {
        let mut t = RoutingTrace::new(8);
        // Sequence 0: tokens {0,1} {1,2} {3,4}: one of two pairs reuses.
        t.on_routing(site(0, 0), &routing(&[0, 1, 1, 2, 3, 4]));
        // Sequence 1 starts with expert 4 again, but is not a continuation.
        t.on_routing(site(0, 1), &routing(&[4, 5]));
        assert_eq!(consecutive_reuse(&t, 0), Some(0.5));
        // A decode step continues sequence 0, in a later forward where it may sit
        // at another batch index: its id, not its place, joins it to its tokens.
        t.on_routing(site(0, 0), &routing(&[4, 7]));
        assert!((consecutive_reuse(&t, 0).unwrap_or(0.0) - 2.0 / 3.0).abs() < 1e-12);
        // A new sequence starting with expert 7 is not a continuation of sequence 0.
        t.on_routing(site(0, 2), &routing(&[7, 6]));
        assert!((consecutive_reuse(&t, 0).unwrap_or(0.0) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(consecutive_reuse(&t, 3), None);
    }

    #[test]
    fn uniform_reuse_matches_closed_form() {
        // top-2 of 16: 1 - (14*13)/(16*15)
        assert!((uniform_reuse(16, 2) - (1.0 - 182.0 / 240.0)).abs() < 1e-12);
        assert_eq!(uniform_reuse(4, 4), 1.0);
    }
}
