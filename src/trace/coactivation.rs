//! Cross-layer co-activation: which experts of the next MoE layer a token uses
//! given its experts in this one. This dependency is what MoETuner's placement
//! exploits (experts that follow each other placed on the same device) and what
//! next-layer prefetch bets on.

use super::load::entropy_bits;
use super::routes::Routes;

/// Co-activation counts between two consecutive MoE layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Coactivation {
    pub from_layer: usize,
    pub to_layer: usize,
    num_experts: usize,
    /// `[from_expert * num_experts + to_expert]`: tokens choosing both.
    joint: Vec<u64>,
    /// `[num_experts]`: tokens choosing each expert at `from_layer`.
    from_counts: Vec<u64>,
    /// `[num_experts]`: tokens choosing each expert at `to_layer`.
    to_counts: Vec<u64>,
    tokens: u64,
}

/// One (expert at layer L, expert at layer L+1) pair.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PairStat {
    pub from_expert: u32,
    pub to_expert: u32,
    /// Tokens that chose both.
    pub tokens: u64,
    /// P(to_expert at L+1 | from_expert at L).
    pub conditional: f64,
    /// `conditional / P(to_expert at L+1)`: 1 when independent.
    pub lift: f64,
}

impl Coactivation {
    /// Between MoE layers `li` and `li + 1` (indices into `meta.moe_layers`).
    pub fn of(routes: &Routes, li: usize) -> Option<Self> {
        let layers = &routes.meta.moe_layers;
        let (&from_layer, &to_layer) = (layers.get(li)?, layers.get(li + 1)?);
        let e = routes.meta.num_experts;
        let mut c = Self {
            from_layer,
            to_layer,
            num_experts: e,
            joint: vec![0; e * e],
            from_counts: vec![0; e],
            to_counts: vec![0; e],
            tokens: 0,
        };
        for seq in &routes.sequences {
            let (Some(a), Some(b)) = (seq.layers.get(li), seq.layers.get(li + 1)) else {
                continue;
            };
            for t in 0..a.len().min(b.len()) {
                c.add_token(a.token(t), b.token(t));
            }
        }
        Some(c)
    }

    fn add_token(&mut self, from: &[u32], to: &[u32]) {
        let e = self.num_experts;
        self.tokens += 1;
        for &i in from.iter().filter(|&&i| (i as usize) < e) {
            self.from_counts[i as usize] += 1;
            for &j in to.iter().filter(|&&j| (j as usize) < e) {
                self.joint[i as usize * e + j as usize] += 1;
            }
        }
        for &j in to.iter().filter(|&&j| (j as usize) < e) {
            self.to_counts[j as usize] += 1;
        }
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// P(j at the next layer | i at this one); 0 when `i` was never chosen.
    pub fn conditional(&self, i: usize, j: usize) -> f64 {
        let n = self.from_counts.get(i).copied().unwrap_or(0);
        let both = self
            .joint
            .get(i * self.num_experts + j)
            .copied()
            .unwrap_or(0);
        if n == 0 { 0.0 } else { both as f64 / n as f64 }
    }

    /// `[from][to]`: the conditional probabilities, for the heat map.
    pub fn conditional_matrix(&self) -> Vec<Vec<f64>> {
        let e = self.num_experts;
        (0..e)
            .map(|i| (0..e).map(|j| self.conditional(i, j)).collect())
            .collect()
    }

    /// Mutual information in bits between an expert drawn from a token's choices
    /// at this layer and one drawn from its choices at the next (the pair
    /// distribution of all (i, j) choice pairs). 0 when the next layer's routing
    /// is independent of this one's; at most the next layer's routing entropy.
    pub fn mutual_information_bits(&self) -> f64 {
        let total: u64 = self.joint.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let e = self.num_experts;
        let n = total as f64;
        let row: Vec<f64> = (0..e)
            .map(|i| self.joint[i * e..(i + 1) * e].iter().sum::<u64>() as f64)
            .collect();
        let col: Vec<f64> = (0..e)
            .map(|j| (0..e).map(|i| self.joint[i * e + j]).sum::<u64>() as f64)
            .collect();
        let mut mi = 0.0;
        for (ij, &both) in self.joint.iter().enumerate() {
            let nij = both as f64;
            if nij > 0.0 {
                mi += nij / n * (nij * n / (row[ij / e] * col[ij % e])).log2();
            }
        }
        mi.max(0.0)
    }

    /// Mutual information over the next layer's routing entropy: the share of
    /// its uncertainty this layer's choice removes.
    pub fn normalized_mutual_information(&self) -> f64 {
        let to: Vec<f64> = self.to_counts.iter().map(|&c| c as f64).collect();
        let h = entropy_bits(&to);
        if h > 0.0 {
            self.mutual_information_bits() / h
        } else {
            0.0
        }
    }

    /// The `n` most frequent pairs (ties: higher conditional probability first).
    pub fn top_pairs(&self, n: usize) -> Vec<PairStat> {
        let e = self.num_experts;
        let mut pairs: Vec<PairStat> = (0..e * e)
            .filter(|&ij| self.joint[ij] > 0)
            .map(|ij| {
                let (i, j) = (ij / e, ij % e);
                let conditional = self.conditional(i, j);
                let p_to = self.to_counts[j] as f64 / self.tokens.max(1) as f64;
                PairStat {
                    from_expert: i as u32,
                    to_expert: j as u32,
                    tokens: self.joint[ij],
                    conditional,
                    lift: if p_to > 0.0 { conditional / p_to } else { 0.0 },
                }
            })
            .collect();
        pairs.sort_by(|a, b| {
            b.tokens
                .cmp(&a.tokens)
                .then(b.conditional.total_cmp(&a.conditional))
        });
        pairs.truncate(n);
        pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceMeta;
    use crate::trace::routes::{SequenceRoutes, TokenExperts};

    fn routes(layer_a: &[&[u32]], layer_b: &[&[u32]], num_experts: usize) -> Routes {
        Routes {
            meta: TraceMeta {
                num_layers: 2,
                num_experts,
                top_k: layer_a.first().map_or(1, |t| t.len()),
                moe_layers: vec![0, 1],
                model: "m".into(),
            },
            sequences: vec![SequenceRoutes {
                id: 0,
                positions: (0..layer_a.len() as u32).collect(),
                layers: vec![
                    TokenExperts::from_tokens(layer_a),
                    TokenExperts::from_tokens(layer_b),
                ],
            }],
        }
    }

    /// Top-1 of 4, layer 1 always picks (i + 1) mod 4 after i, each i equally
    /// often: P(i+1 | i) = 1, MI = H = log2 4 = 2 bits, lift 4.
    #[test]
    fn a_deterministic_successor_has_full_mutual_information() {
        let a: Vec<&[u32]> = vec![&[0], &[1], &[2], &[3], &[0], &[1], &[2], &[3]];
        let b: Vec<&[u32]> = vec![&[1], &[2], &[3], &[0], &[1], &[2], &[3], &[0]];
        let c = Coactivation::of(&routes(&a, &b, 4), 0).unwrap();
        assert_eq!((c.from_layer, c.to_layer), (0, 1));
        assert_eq!(c.conditional(2, 3), 1.0);
        assert_eq!(c.conditional(2, 2), 0.0);
        assert!((c.mutual_information_bits() - 2.0).abs() < 1e-12);
        assert!((c.normalized_mutual_information() - 1.0).abs() < 1e-12);
        let top = c.top_pairs(2);
        assert_eq!(top.len(), 2);
        assert_eq!(
            (top[0].tokens, top[0].conditional, top[0].lift),
            (2, 1.0, 4.0)
        );
        assert!(Coactivation::of(&routes(&a, &b, 4), 1).is_none());
    }

    /// Every (i, j) of 2 x 2 once: independent, MI 0, P(j | i) = 1/2.
    /// With top-2 tokens {0,1} -> {1, 2} and {0,1} -> {1, 3}: P(1 | 0) = 1,
    /// P(2 | 0) = 1/2; pairs (0,1) and (1,1) twice each, the others once.
    #[test]
    fn independent_layers_have_no_mutual_information() {
        let a: Vec<&[u32]> = vec![&[0], &[0], &[1], &[1]];
        let b: Vec<&[u32]> = vec![&[0], &[1], &[0], &[1]];
        let c = Coactivation::of(&routes(&a, &b, 2), 0).unwrap();
        assert!(c.mutual_information_bits().abs() < 1e-12);
        assert_eq!(c.conditional_matrix(), vec![vec![0.5, 0.5], vec![0.5, 0.5]]);

        let a: Vec<&[u32]> = vec![&[0, 1], &[0, 1]];
        let b: Vec<&[u32]> = vec![&[1, 2], &[1, 3]];
        let c = Coactivation::of(&routes(&a, &b, 4), 0).unwrap();
        assert_eq!((c.conditional(0, 1), c.conditional(0, 2)), (1.0, 0.5));
        let top = c.top_pairs(10);
        assert_eq!(top.len(), 6);
        assert_eq!((top[0].tokens, top[1].tokens, top[2].tokens), (2, 2, 1));
        // Layer 0's choice is the same for every token: it tells nothing.
        assert!(c.mutual_information_bits().abs() < 1e-12);
    }
}
