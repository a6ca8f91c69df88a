//! How evenly a layer's tokens spread over its experts.

use super::routes::TokenExperts;

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

/// One layer's expert load.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ExpertLoad {
    pub layer: usize,
    /// Expert choices (token, rank) counted.
    pub choices: u64,
    /// `[num_experts]`: choices per expert.
    pub counts: Vec<u64>,
    /// `[num_experts]`: `counts / choices`.
    pub shares: Vec<f64>,
    /// The busiest expert's count over the mean count (1 = perfectly balanced).
    pub max_over_mean: f64,
    /// Standard deviation of the counts over their mean (0 = balanced).
    pub coefficient_of_variation: f64,
    /// Entropy of the shares over `log2(num_experts)` (1 = balanced).
    pub normalized_entropy: f64,
    /// Experts never chosen.
    pub unused_experts: usize,
}

impl ExpertLoad {
    pub fn of<'a>(
        layer: usize,
        sequences: impl IntoIterator<Item = &'a TokenExperts>,
        num_experts: usize,
    ) -> Self {
        let mut counts = vec![0u64; num_experts];
        for seq in sequences {
            for token in seq.tokens() {
                for &e in token {
                    if let Some(c) = counts.get_mut(e as usize) {
                        *c += 1;
                    }
                }
            }
        }
        let choices: u64 = counts.iter().sum();
        let mean = choices as f64 / num_experts.max(1) as f64;
        let var = counts
            .iter()
            .map(|&c| (c as f64 - mean).powi(2))
            .sum::<f64>()
            / num_experts.max(1) as f64;
        let ratio = |x: f64| if mean > 0.0 { x / mean } else { 0.0 };
        let as_f64: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
        let max_entropy = (num_experts as f64).log2();
        Self {
            layer,
            choices,
            shares: as_f64
                .iter()
                .map(|&c| c / (choices.max(1) as f64))
                .collect(),
            max_over_mean: ratio(counts.iter().copied().max().unwrap_or(0) as f64),
            coefficient_of_variation: ratio(var.sqrt()),
            normalized_entropy: if max_entropy > 0.0 {
                entropy_bits(&as_f64) / max_entropy
            } else {
                0.0
            },
            unused_experts: counts.iter().filter(|&&c| c == 0).count(),
            counts,
        }
    }
}

/// Share of consecutive token pairs (within a sequence) whose expert sets share
/// at least one expert; `None` when there are no pairs. Independent uniform
/// top-k routing gives [`uniform_reuse`].
pub fn consecutive_reuse<'a>(sequences: impl IntoIterator<Item = &'a TokenExperts>) -> Option<f64> {
    let (mut pairs, mut reused) = (0usize, 0usize);
    for seq in sequences {
        for t in 1..seq.len() {
            pairs += 1;
            let prev = seq.token(t - 1);
            if seq.token(t).iter().any(|e| prev.contains(e)) {
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

    #[test]
    fn entropy_is_log2_n_when_uniform_and_zero_when_collapsed() {
        assert!((entropy_bits(&[1.0; 8]) - 3.0).abs() < 1e-12);
        assert_eq!(entropy_bits(&[0.0, 5.0, 0.0]), 0.0);
        assert_eq!(entropy_bits(&[]), 0.0);
    }

    /// Counts 3, 1, 0, 0 over 4 experts: mean 1, max/mean 3, variance
    /// (4 + 0 + 1 + 1) / 4 = 1.5, entropy of (3/4, 1/4) = 0.8113 bits over 2.
    #[test]
    fn load_statistics_of_a_hand_made_layer() {
        let a = TokenExperts::from_tokens(&[&[0u32, 1][..], &[0]]);
        let b = TokenExperts::from_tokens(&[&[0u32][..]]);
        let load = ExpertLoad::of(3, [&a, &b], 4);
        assert_eq!(
            (load.layer, load.choices, load.counts.clone()),
            (3, 4, vec![3, 1, 0, 0])
        );
        assert_eq!(load.shares, vec![0.75, 0.25, 0.0, 0.0]);
        assert_eq!((load.max_over_mean, load.unused_experts), (3.0, 2));
        assert!((load.coefficient_of_variation - 1.5f64.sqrt()).abs() < 1e-12);
        let h = -(0.75f64 * 0.75f64.log2() + 0.25 * 0.25f64.log2());
        assert!((load.normalized_entropy - h / 2.0).abs() < 1e-12);
    }

    #[test]
    fn consecutive_reuse_counts_pairs_within_sequences_only() {
        // Tokens {0,1} {1,2} {3,4}: one of two pairs reuses; the next sequence
        // starting with 4 again is not a continuation.
        let a = TokenExperts::from_tokens(&[[0u32, 1], [1, 2], [3, 4]]);
        let b = TokenExperts::from_tokens(&[[4u32, 5]]);
        assert_eq!(consecutive_reuse([&a, &b]), Some(0.5));
        assert_eq!(consecutive_reuse([&b]), None);
    }

    #[test]
    fn uniform_reuse_matches_closed_form() {
        // top-2 of 16: 1 - (14*13)/(16*15)
        assert!((uniform_reuse(16, 2) - (1.0 - 182.0 / 240.0)).abs() < 1e-12);
        assert_eq!(uniform_reuse(4, 4), 1.0);
    }
}
