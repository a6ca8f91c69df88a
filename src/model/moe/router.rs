//! The router as a pure function: router logits in, a [`Routing`] value out.
//! The experts, the expert cache and the trace all consume that value.

use crate::error::{Error, Result};

/// How a block turns router logits into expert choices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterConfig {
    pub top_k: usize,
    /// Renormalise the selected experts' probabilities to sum to one.
    pub norm_topk_prob: bool,
    /// Dynamic activation (`--expert-top-p`): fewer experts for confident tokens.
    pub top_p: Option<ExpertTopP>,
}

impl RouterConfig {
    /// Most experts one token can use: the stride of [`Routing`]'s rows.
    pub fn max_experts_per_token(&self, n_experts: usize) -> usize {
        match self.top_p {
            Some(ExpertTopP {
                mode: TopPMode::Dynamoe,
                ..
            }) => n_experts,
            _ => self.top_k.min(n_experts),
        }
    }
}

/// Which rule `--expert-top-p` applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TopPMode {
    /// Keep the shortest prefix of the top-k experts (by router probability) whose
    /// probability reaches `p` of the top-k total; mixing weights follow the
    /// model's own rule (renormalised over the kept experts when it renormalises).
    #[default]
    TopK,
    /// DynaMoE's rule: the shortest prefix of all experts whose cumulative softmax
    /// probability reaches `p`, mixed with the raw probabilities (never renormalised).
    Dynamoe,
}

/// `--expert-top-p P` with its rule. `p` is in (0, 1]; at least one expert is kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertTopP {
    p: f32,
    pub mode: TopPMode,
}

impl ExpertTopP {
    pub fn new(p: f32, mode: TopPMode) -> Result<Self> {
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::InvalidInput(format!(
                "--expert-top-p {p}: must be in (0, 1] (1 keeps all top-k experts)"
            )));
        }
        Ok(Self { p, mode })
    }

    pub fn p(&self) -> f32 {
        self.p
    }
}

/// Which experts each token of a forward uses, and with what mixing weight.
///
/// Rows have a fixed stride `top_k`; a token that uses fewer experts (dynamic
/// top-p) has its unused slots at the end of its row, holding
/// [`Routing::NO_EXPERT`] with weight and score 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Slots per token: the most experts one token can use.
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
    /// Marks an unused slot.
    pub const NO_EXPERT: u32 = u32::MAX;

    pub fn n_tokens(&self) -> usize {
        self.expert_ids.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// Slots `[start, start + used)` of token `t`: the ones holding an expert.
    fn used(&self, t: usize) -> std::ops::Range<usize> {
        let row = &self.expert_ids[t * self.top_k..(t + 1) * self.top_k];
        let used = row.iter().take_while(|&&e| e != Self::NO_EXPERT).count();
        t * self.top_k..t * self.top_k + used
    }

    /// The experts token `t` uses, best first.
    pub fn experts_of(&self, t: usize) -> &[u32] {
        &self.expert_ids[self.used(t)]
    }

    pub fn weights_of(&self, t: usize) -> &[f32] {
        &self.weights[self.used(t)]
    }

    pub fn scores_of(&self, t: usize) -> &[f32] {
        &self.scores[self.used(t)]
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
        let mut order: Vec<u32> = (0..self.expert_ids.len() as u32)
            .filter(|&slot| self.expert_ids[slot as usize] != Self::NO_EXPERT)
            .collect();
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

/// Softmax over all experts in f32, keep the `top_k` most probable (or fewer,
/// under [`RouterConfig::top_p`]), optionally renormalise (with a clamped
/// denominator, so an underflowed row stays finite).
///
/// `logits` is `[n_tokens, n_experts]`, row-major.
pub fn route(logits: &[f32], n_experts: usize, cfg: RouterConfig) -> Routing {
    let n_tokens = logits.len() / n_experts.max(1);
    let stride = cfg.max_experts_per_token(n_experts);
    let mut expert_ids = Vec::with_capacity(n_tokens * stride);
    let mut weights = Vec::with_capacity(n_tokens * stride);
    let mut scores = Vec::with_capacity(n_tokens * stride);
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
        let ranked = &order[..stride];
        let (kept, renormalise) = match cfg.top_p {
            None => (stride, cfg.norm_topk_prob),
            Some(t) if t.mode == TopPMode::TopK => (
                prefix_reaching(ranked, &probs, t.p, true),
                cfg.norm_topk_prob,
            ),
            Some(t) => (prefix_reaching(ranked, &probs, t.p, false), false),
        };
        let chosen = &ranked[..kept];
        let denom = if renormalise {
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
        for _ in kept..stride {
            expert_ids.push(Routing::NO_EXPERT);
            weights.push(0.0);
            scores.push(0.0);
        }
    }
    Routing {
        top_k: stride,
        expert_ids,
        weights,
        scores,
    }
}

/// Length of the shortest prefix of `ranked` whose probability reaches the target.
/// `relative`: the target is `p` times the sum over `ranked` (top-k mode);
/// otherwise `p` itself (DynaMoE: `ranked` is every expert, summing to one).
/// At least one expert; `p = 1` keeps all of `ranked` whatever the rounding.
fn prefix_reaching(ranked: &[u32], probs: &[f32], p: f32, relative: bool) -> usize {
    if p >= 1.0 {
        return ranked.len();
    }
    let total: f32 = ranked.iter().map(|&e| probs[e as usize]).sum();
    let target = if relative { p * total } else { p };
    let mut cumulative = 0f32;
    for (i, &e) in ranked.iter().enumerate() {
        cumulative += probs[e as usize];
        if cumulative >= target {
            return i + 1;
        }
    }
    ranked.len()
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
                top_p: None,
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
                top_p: None,
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

    fn config(top_k: usize, norm: bool, top_p: Option<(f32, TopPMode)>) -> RouterConfig {
        RouterConfig {
            top_k,
            norm_topk_prob: norm,
            top_p: top_p.map(|(p, mode)| ExpertTopP::new(p, mode).unwrap()),
        }
    }

    /// Router logits whose softmax is exactly `probs` (they sum to one).
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn expert_top_p_one_is_plain_top_k() {
        // Random-looking rows, both normalisation rules, several k.
        let logits: Vec<f32> = (0..8 * 6)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect();
        for norm in [false, true] {
            for k in [1, 2, 3, 6] {
                let plain = route(&logits, 6, config(k, norm, None));
                let top_p = route(&logits, 6, config(k, norm, Some((1.0, TopPMode::TopK))));
                assert_eq!(plain, top_p, "k = {k}, norm = {norm}");
                assert!(!plain.expert_ids.contains(&Routing::NO_EXPERT));
            }
        }
    }

    #[test]
    fn expert_top_p_keeps_shortest_prefix_of_top_k_reaching_p() {
        // Top-3 of [0.5, 0.2, 0.1, 0.1, 0.1] is experts 0, 1 then 2 (lowest id
        // wins the tie); the top-3 total is 0.8.
        let logits = logits_of(&[0.5, 0.2, 0.1, 0.1, 0.1]);
        // 0.6 x 0.8 = 0.48: expert 0 alone (0.5) reaches it.
        let r = route(&logits, 5, config(3, true, Some((0.6, TopPMode::TopK))));
        assert_eq!(r.experts_of(0), &[0]);
        assert_eq!(
            r.expert_ids,
            vec![0, Routing::NO_EXPERT, Routing::NO_EXPERT]
        );
        assert!(
            (r.weights_of(0)[0] - 1.0).abs() < 1e-6,
            "renormalised over the kept expert"
        );
        assert!((r.scores_of(0)[0] - 0.5).abs() < 1e-6);
        // 0.8 x 0.8 = 0.64: 0.5 is short, 0.7 reaches it.
        let r = route(&logits, 5, config(3, true, Some((0.8, TopPMode::TopK))));
        assert_eq!(r.experts_of(0), &[0, 1]);
        assert!((r.weights_of(0)[0] - 0.5 / 0.7).abs() < 1e-6);
        assert!((r.weights_of(0)[1] - 0.2 / 0.7).abs() < 1e-6);
        // A model that does not renormalise keeps the raw probabilities.
        let r = route(&logits, 5, config(3, false, Some((0.8, TopPMode::TopK))));
        assert!((r.weights_of(0)[0] - 0.5).abs() < 1e-6 && (r.weights_of(0)[1] - 0.2).abs() < 1e-6);
        // Groups skip the unused slots.
        let r = route(&logits, 5, config(3, true, Some((0.6, TopPMode::TopK))));
        assert_eq!(r.slots_by_expert(), vec![(0, vec![0])]);
    }

    #[test]
    fn dynamoe_takes_experts_past_top_k_with_raw_weights() {
        // Cumulative softmax 0.3, 0.55, 0.75, 0.9, 1.0: p = 0.8 needs four
        // experts though top_k is 2; the weights stay the softmax values.
        let logits = logits_of(&[0.1, 0.2, 0.3, 0.15, 0.25]);
        let r = route(&logits, 5, config(2, true, Some((0.8, TopPMode::Dynamoe))));
        assert_eq!(r.top_k, 5, "a row can hold every expert");
        assert_eq!(r.experts_of(0), &[2, 4, 1, 3]);
        for (w, want) in r.weights_of(0).iter().zip([0.3, 0.25, 0.2, 0.15]) {
            assert!((w - want).abs() < 1e-6);
        }
        // A confident token keeps one expert.
        let logits = logits_of(&[0.9, 0.025, 0.025, 0.025, 0.025]);
        let r = route(&logits, 5, config(2, true, Some((0.8, TopPMode::Dynamoe))));
        assert_eq!(r.experts_of(0), &[0]);
    }

    #[test]
    fn expert_top_p_outside_unit_interval_is_refused() {
        for p in [0.0, -0.5, 1.01, f32::NAN] {
            let err = ExpertTopP::new(p, TopPMode::TopK).unwrap_err().to_string();
            assert!(
                err.contains("--expert-top-p") && err.contains("(0, 1]"),
                "{err}"
            );
        }
        assert!(ExpertTopP::new(1.0, TopPMode::Dynamoe).is_ok());
    }
}
