//! The router as a pure function: router logits in, a [`Routing`] value out.
//! The experts, the expert cache and the trace all consume that value.

/// How a block turns router logits into expert choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterConfig {
    pub top_k: usize,
    /// Renormalise the selected experts' probabilities to sum to one.
    pub norm_topk_prob: bool,
}

/// Which experts each token of a forward uses, and with what mixing weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    /// `[n_tokens * top_k]`: per token, expert ids by descending routing probability.
    pub expert_ids: Vec<u32>,
    /// `[n_tokens * top_k]`: the weight each chosen expert's output is mixed with.
    pub weights: Vec<f32>,
    /// `[n_tokens * top_k]`: each chosen expert's router probability before any
    /// selection bias or renormalisation (what a routing trace records as `score`).
    pub scores: Vec<f32>,
}

impl Routing {
    pub fn n_tokens(&self) -> usize {
        self.expert_ids.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// The experts token `t` uses, best first.
    pub fn experts_of(&self, t: usize) -> &[u32] {
        &self.expert_ids[t * self.top_k..(t + 1) * self.top_k]
    }

    pub fn weights_of(&self, t: usize) -> &[f32] {
        &self.weights[t * self.top_k..(t + 1) * self.top_k]
    }

    pub fn scores_of(&self, t: usize) -> &[f32] {
        &self.scores[t * self.top_k..(t + 1) * self.top_k]
    }

    /// The rows of tokens `start..start + n_tokens` (one sequence of a batch).
    pub fn tokens(&self, start: usize, n_tokens: usize) -> Routing {
        let rows = start * self.top_k..(start + n_tokens) * self.top_k;
        Routing {
            top_k: self.top_k,
            expert_ids: self.expert_ids[rows.clone()].to_vec(),
            weights: self.weights[rows.clone()].to_vec(),
            scores: self.scores[rows].to_vec(),
        }
    }

    /// Groups the (token, slot) pairs by expert, so each active expert runs once
    /// over all of its tokens. Returns `(expert, slots)` where a slot indexes
    /// `expert_ids` (token = slot / top_k), experts in ascending id order.
    pub fn slots_by_expert(&self) -> Vec<(u32, Vec<u32>)> {
        let mut order: Vec<u32> = (0..self.expert_ids.len() as u32).collect();
        order.sort_by_key(|&slot| self.expert_ids[slot as usize]);
        let mut groups: Vec<(u32, Vec<u32>)> = Vec::new();
        for slot in order {
            let expert = self.expert_ids[slot as usize];
            match groups.last_mut() {
                Some((e, slots)) if *e == expert => slots.push(slot),
                _ => groups.push((expert, vec![slot])),
            }
        }
        groups
    }
}

/// Softmax over all experts in f32, keep the `top_k` most probable, optionally
/// renormalise (with a clamped denominator, so an underflowed row stays finite).
///
/// `logits` is `[n_tokens, n_experts]`, row-major.
pub fn route(logits: &[f32], n_experts: usize, cfg: RouterConfig) -> Routing {
    let n_tokens = logits.len() / n_experts.max(1);
    let mut expert_ids = Vec::with_capacity(n_tokens * cfg.top_k);
    let mut weights = Vec::with_capacity(n_tokens * cfg.top_k);
    let mut scores = Vec::with_capacity(n_tokens * cfg.top_k);
    let mut probs = vec![0f32; n_experts];
    let mut order: Vec<u32> = Vec::with_capacity(n_experts);
    for row in logits.chunks_exact(n_experts) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for (p, &l) in probs.iter_mut().zip(row) {
            *p = (l - max).exp();
            sum += *p;
        }
        for p in probs.iter_mut() {
            *p /= sum;
        }
        order.clear();
        order.extend(0..n_experts as u32);
        // Stable: on an exact tie the lower expert id wins.
        order.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]));
        let chosen = &order[..cfg.top_k];
        let denom = if cfg.norm_topk_prob {
            chosen
                .iter()
                .map(|&e| probs[e as usize])
                .sum::<f32>()
                .max(f32::MIN_POSITIVE)
        } else {
            1.0
        };
        for &e in chosen {
            expert_ids.push(e);
            weights.push(probs[e as usize] / denom);
            scores.push(probs[e as usize]);
        }
    }
    Routing {
        top_k: cfg.top_k,
        expert_ids,
        weights,
        scores,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_picks_most_probable_experts_in_order() {
        let logits = [0.0, 3.0, 1.0, 2.0, /* token 2 */ 5.0, 0.0, 0.0, 4.0];
        let r = route(
            &logits,
            4,
            RouterConfig {
                top_k: 2,
                norm_topk_prob: false,
            },
        );
        assert_eq!(r.n_tokens(), 2);
        assert_eq!(r.experts_of(0), &[1, 3]);
        assert_eq!(r.experts_of(1), &[0, 3]);
        let z: f32 = [0.0f32, 3.0, 1.0, 2.0].iter().map(|x| x.exp()).sum();
        assert!((r.weights_of(0)[0] - 3f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn norm_topk_prob_makes_weights_sum_to_one() {
        let logits = [0.1, 0.7, -1.0, 2.0, 0.3];
        let r = route(
            &logits,
            5,
            RouterConfig {
                top_k: 3,
                norm_topk_prob: true,
            },
        );
        let s: f32 = r.weights_of(0).iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert_eq!(r.experts_of(0), &[3, 1, 4]);
        // Scores stay the softmax over all experts, before renormalisation.
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!((r.scores_of(0)[0] - 2f32.exp() / z).abs() < 1e-6);
        assert!(r.scores_of(0).iter().sum::<f32>() < 1.0);
    }

    #[test]
    fn slots_group_tokens_by_expert() {
        let r = Routing {
            top_k: 2,
            expert_ids: vec![3, 1, 1, 0, 3, 2],
            weights: vec![0.5; 6],
            scores: vec![0.25; 6],
        };
        let g = r.slots_by_expert();
        assert_eq!(
            g,
            vec![(0, vec![3]), (1, vec![1, 2]), (2, vec![5]), (3, vec![0, 4])]
        );
    }
}
