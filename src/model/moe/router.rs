//! The router as a pure function: router logits in, a [`Routing`] value out.
//! The experts, the expert cache and the trace all consume that value.

use crate::config::{GroupLimit, GroupRank, RouterSpec, ScoreFn};
use crate::error::{Error, Result};

/// How a block turns router logits into expert choices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterConfig {
    pub top_k: usize,
    /// The family's rule (score function, renormalisation, scaling, groups).
    pub spec: RouterSpec,
    /// Dynamic activation (`--expert-top-p`): fewer experts for confident tokens.
    pub top_p: Option<ExpertTopP>,
}

/// Per-expert vectors a router may add, each `[n_experts]`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RouterBias<'a> {
    /// Added to the logits before scoring (gpt-oss's router bias).
    pub logits: Option<&'a [f32]>,
    /// Added to the scores for choosing experts only, never to their weights
    /// (DeepSeek-V3 / GLM `e_score_correction_bias`, ERNIE `moe_statics`).
    pub selection: Option<&'a [f32]>,
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

/// The transformers epsilon added to a renormalisation's denominator
/// (DeepSeek-V3 `topk_weight.sum() + 1e-20`): a row whose chosen scores all
/// underflowed gets small finite weights, not NaN.
const NORM_EPS: f32 = 1e-20;

/// Scores every expert (softmax or sigmoid, in f32, after any logit bias),
/// chooses the `top_k` best by score plus selection bias (within the best
/// groups under a group limit; fewer under [`RouterConfig::top_p`]), and
/// mixes them with their unbiased scores, renormalised and scaled as the
/// spec says; under [`ScoreFn::SoftmaxOfTopK`] the weights are instead a
/// softmax over the chosen experts' logits.
///
/// `logits` is `[n_tokens, n_experts]`, row-major; each bias `[n_experts]`.
pub fn route(logits: &[f32], n_experts: usize, cfg: RouterConfig, bias: RouterBias<'_>) -> Routing {
    let n_tokens = logits.len() / n_experts.max(1);
    let stride = cfg.max_experts_per_token(n_experts);
    let spec = cfg.spec;
    let mut expert_ids = Vec::with_capacity(n_tokens * stride);
    let mut weights = Vec::with_capacity(n_tokens * stride);
    let mut scores = Vec::with_capacity(n_tokens * stride);
    let mut row_logits = vec![0f32; n_experts];
    let mut probs = vec![0f32; n_experts];
    let mut choice = vec![0f32; n_experts];
    let mut order: Vec<u32> = Vec::with_capacity(n_experts);
    for row in logits.chunks_exact(n_experts) {
        row_logits.copy_from_slice(row);
        if let Some(b) = bias.logits {
            for (l, b) in row_logits.iter_mut().zip(b) {
                *l += b;
            }
        }
        score(spec.score, &row_logits, &mut probs);
        choice.copy_from_slice(&probs);
        if let Some(b) = bias.selection {
            for (c, b) in choice.iter_mut().zip(b) {
                *c += b;
            }
        }
        if let Some(groups) = spec.groups {
            limit_to_groups(&mut choice, groups);
        }
        order.clear();
        order.extend(0..n_experts as u32);
        // Stable: on an exact tie the lower expert id wins.
        order.sort_by(|&a, &b| choice[b as usize].total_cmp(&choice[a as usize]));
        let ranked = &order[..stride];
        let (kept, renormalise) = match cfg.top_p {
            None => (stride, spec.norm_topk_prob),
            Some(t) if t.mode == TopPMode::TopK => (
                prefix_reaching(ranked, &probs, t.p, true),
                spec.norm_topk_prob,
            ),
            Some(t) => (prefix_reaching(ranked, &probs, t.p, false), false),
        };
        let chosen = &ranked[..kept];
        let start = weights.len();
        if spec.score == ScoreFn::SoftmaxOfTopK {
            let max = chosen
                .iter()
                .map(|&e| row_logits[e as usize])
                .fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = chosen
                .iter()
                .map(|&e| (row_logits[e as usize] - max).exp())
                .collect();
            let sum: f32 = exps.iter().sum();
            weights.extend(exps.iter().map(|x| x / sum));
        } else {
            let denom = if renormalise {
                // Past the epsilon only a clamp below 1e-13 could differ from
                // transformers' `clamp(sum, norm_min)`, and there the clamp wins.
                (chosen.iter().map(|&e| probs[e as usize]).sum::<f32>() + NORM_EPS)
                    .max(spec.norm_min)
            } else {
                1.0
            };
            weights.extend(chosen.iter().map(|&e| probs[e as usize] / denom));
        }
        for w in &mut weights[start..] {
            *w *= spec.routed_scaling_factor;
        }
        for &e in chosen {
            expert_ids.push(e);
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

/// `probs[e]` = the score of `logits[e]`: the softmax over the row, or each
/// logit's sigmoid. [`ScoreFn::SoftmaxOfTopK`] ranks by the softmax too (same
/// order as the logits) and records it as the score.
fn score(kind: ScoreFn, logits: &[f32], probs: &mut [f32]) {
    match kind {
        ScoreFn::Softmax | ScoreFn::SoftmaxOfTopK => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (p, &l) in probs.iter_mut().zip(logits) {
                *p = (l - max).exp();
                sum += *p;
            }
            for p in probs.iter_mut() {
                *p /= sum;
            }
        }
        ScoreFn::Sigmoid => {
            for (p, &l) in probs.iter_mut().zip(logits) {
                *p = 1.0 / (1.0 + (-l).exp());
            }
        }
    }
}

/// Sets the selection score of every expert outside the `topk_group` best
/// groups to what transformers fills in: 0 for V2's `group_limited_greedy`
/// (its softmax scores are never negative), `-inf` for V3's `noaux_tc`, so a
/// negative bias inside the kept groups still beats every expert outside.
/// A limit that does not divide the experts evenly leaves them all
/// (`GroupLimit::check` refuses such a config at load).
fn limit_to_groups(choice: &mut [f32], groups: GroupLimit) {
    let n_experts = choice.len();
    if groups.n_group == 0 || !n_experts.is_multiple_of(groups.n_group) {
        return;
    }
    let size = n_experts / groups.n_group;
    let group_score = |g: &[f32]| match groups.rank {
        GroupRank::Best => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        GroupRank::SumOfTopTwo => {
            let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &c in g {
                if c > first {
                    second = first;
                    first = c;
                } else if c > second {
                    second = c;
                }
            }
            if second == f32::NEG_INFINITY {
                first
            } else {
                first + second
            }
        }
    };
    let group_scores: Vec<f32> = choice.chunks_exact(size).map(group_score).collect();
    let mut ranked: Vec<usize> = (0..groups.n_group).collect();
    ranked.sort_by(|&a, &b| group_scores[b].total_cmp(&group_scores[a]));
    let mut keep = vec![false; groups.n_group];
    for &g in ranked.iter().take(groups.topk_group) {
        keep[g] = true;
    }
    let fill = match groups.rank {
        GroupRank::Best => 0.0,
        GroupRank::SumOfTopTwo => f32::NEG_INFINITY,
    };
    for (g, chunk) in choice.chunks_exact_mut(size).enumerate() {
        if !keep[g] {
            chunk.fill(fill);
        }
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
                spec: RouterSpec::SOFTMAX,
                top_p: None,
            },
            RouterBias::default(),
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
                spec: RouterSpec {
                    norm_topk_prob: true,
                    ..RouterSpec::SOFTMAX
                },
                top_p: None,
            },
            RouterBias::default(),
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
            spec: RouterSpec {
                norm_topk_prob: norm,
                ..RouterSpec::SOFTMAX
            },
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
                let plain = route(&logits, 6, config(k, norm, None), RouterBias::default());
                let top_p = route(
                    &logits,
                    6,
                    config(k, norm, Some((1.0, TopPMode::TopK))),
                    RouterBias::default(),
                );
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
        let r = route(
            &logits,
            5,
            config(3, true, Some((0.6, TopPMode::TopK))),
            RouterBias::default(),
        );
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
        let r = route(
            &logits,
            5,
            config(3, true, Some((0.8, TopPMode::TopK))),
            RouterBias::default(),
        );
        assert_eq!(r.experts_of(0), &[0, 1]);
        assert!((r.weights_of(0)[0] - 0.5 / 0.7).abs() < 1e-6);
        assert!((r.weights_of(0)[1] - 0.2 / 0.7).abs() < 1e-6);
        // A model that does not renormalise keeps the raw probabilities.
        let r = route(
            &logits,
            5,
            config(3, false, Some((0.8, TopPMode::TopK))),
            RouterBias::default(),
        );
        assert!((r.weights_of(0)[0] - 0.5).abs() < 1e-6 && (r.weights_of(0)[1] - 0.2).abs() < 1e-6);
        // Groups skip the unused slots.
        let r = route(
            &logits,
            5,
            config(3, true, Some((0.6, TopPMode::TopK))),
            RouterBias::default(),
        );
        assert_eq!(r.slots_by_expert(), vec![(0, vec![0])]);
    }

    #[test]
    fn dynamoe_takes_experts_past_top_k_with_raw_weights() {
        // Cumulative softmax 0.3, 0.55, 0.75, 0.9, 1.0: p = 0.8 needs four
        // experts though top_k is 2; the weights stay the softmax values.
        let logits = logits_of(&[0.1, 0.2, 0.3, 0.15, 0.25]);
        let r = route(
            &logits,
            5,
            config(2, true, Some((0.8, TopPMode::Dynamoe))),
            RouterBias::default(),
        );
        assert_eq!(r.top_k, 5, "a row can hold every expert");
        assert_eq!(r.experts_of(0), &[2, 4, 1, 3]);
        for (w, want) in r.weights_of(0).iter().zip([0.3, 0.25, 0.2, 0.15]) {
            assert!((w - want).abs() < 1e-6);
        }
        // A confident token keeps one expert.
        let logits = logits_of(&[0.9, 0.025, 0.025, 0.025, 0.025]);
        let r = route(
            &logits,
            5,
            config(2, true, Some((0.8, TopPMode::Dynamoe))),
            RouterBias::default(),
        );
        assert_eq!(r.experts_of(0), &[0]);
    }

    fn spec(score: ScoreFn, norm: bool, scale: f32, groups: Option<GroupLimit>) -> RouterConfig {
        RouterConfig {
            top_k: 2,
            spec: RouterSpec {
                score,
                norm_topk_prob: norm,
                norm_min: 0.0,
                routed_scaling_factor: scale,
                groups,
            },
            top_p: None,
        }
    }

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn sigmoid_selection_bias_changes_choice_not_weights() {
        // sigmoid([0, 1, -1, 2]) = [0.5, 0.731059, 0.268941, 0.880797]; the bias
        // lifts expert 2 to 1.268941 for choosing, so the top two are 2 then 3
        // (unbiased: 3 then 1). Weights are the unbiased sigmoids renormalised,
        // 0.268941 / 1.149738 = 0.233915 and 0.766085, times 2.5.
        let logits = [0.0, 1.0, -1.0, 2.0];
        let cfg = spec(ScoreFn::Sigmoid, true, 2.5, None);
        let selection = [0.0, 0.0, 1.0, 0.0];
        let bias = RouterBias {
            logits: None,
            selection: Some(&selection),
        };
        let r = route(&logits, 4, cfg, bias);
        assert_eq!(r.experts_of(0), &[2, 3]);
        close(r.weights_of(0), &[0.584788, 1.915212]);
        close(r.scores_of(0), &[0.268941, 0.880797]);
        let plain = route(&logits, 4, cfg, RouterBias::default());
        assert_eq!(plain.experts_of(0), &[3, 1]);
    }

    #[test]
    fn noaux_tc_keeps_groups_by_sum_of_two_best_biased_scores() {
        // sigmoid of the logits, per group of two:
        //   g0 [0.880797, 0.119203]  g1 [0.5, 0.377541]
        //   g2 [0.731059, 0.731059]  g3 [0.268941, 0.268941] + bias 0.6 each
        // Two-best sums: 1.0, 0.877541, 1.462117, 1.737883: groups 3 and 2 stay,
        // so expert 0 (the best single score) is out and the biased 6 and 7
        // (0.868941) beat 4 and 5 (0.731059). Weights: 0.268941 each,
        // renormalised to 0.5, times 2.5 = 1.25.
        let logits = [2.0, -2.0, 0.0, -0.5, 1.0, 1.0, -1.0, -1.0];
        let selection = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 0.6];
        let bias = RouterBias {
            logits: None,
            selection: Some(&selection),
        };
        let groups = GroupLimit {
            n_group: 4,
            topk_group: 2,
            rank: GroupRank::SumOfTopTwo,
        };
        let r = route(
            &logits,
            8,
            spec(ScoreFn::Sigmoid, true, 2.5, Some(groups)),
            bias,
        );
        assert_eq!(r.experts_of(0), &[6, 7]);
        close(r.weights_of(0), &[1.25, 1.25]);
        // Without the group limit: expert 0 (0.880797) then 6 (biased 0.868941),
        // weights 0.880797 and 0.268941 over their sum 1.149738, times 2.5.
        let r = route(&logits, 8, spec(ScoreFn::Sigmoid, true, 2.5, None), bias);
        assert_eq!(r.experts_of(0), &[0, 6]);
        close(r.weights_of(0), &[1.915212, 0.584788]);
    }

    #[test]
    fn noaux_tc_never_picks_outside_the_kept_groups() {
        // sigmoid(0) = 0.5 everywhere; biased: -1.5 in groups 0-2, -2.5 in
        // group 3. Two-best sums -3, -3, -3, -5 keep groups 0-2, so the six
        // picks are experts 0-5 (ties: lower id first). transformers' V3 fills
        // dropped experts with -inf; a 0 fill would put 6 and 7 first.
        let logits = [0.0; 8];
        let selection = [-2.0, -2.0, -2.0, -2.0, -2.0, -2.0, -3.0, -3.0];
        let bias = RouterBias {
            logits: None,
            selection: Some(&selection),
        };
        let groups = GroupLimit {
            n_group: 4,
            topk_group: 3,
            rank: GroupRank::SumOfTopTwo,
        };
        let cfg = RouterConfig {
            top_k: 6,
            ..spec(ScoreFn::Sigmoid, false, 1.0, Some(groups))
        };
        let r = route(&logits, 8, cfg, bias);
        assert_eq!(r.experts_of(0), &[0, 1, 2, 3, 4, 5]);
        // Weights are the unbiased sigmoids.
        close(r.weights_of(0), &[0.5; 6]);
    }

    #[test]
    fn group_limited_greedy_keeps_groups_by_best_score() {
        // Softmax [0.30, 0.02 | 0.18, 0.18 | 0.14, 0.14 | 0.02, 0.02].
        let logits = logits_of(&[0.30, 0.02, 0.18, 0.18, 0.14, 0.14, 0.02, 0.02]);
        let limit = |rank| {
            Some(GroupLimit {
                n_group: 4,
                topk_group: 1,
                rank,
            })
        };
        // V2: group maxima 0.30, 0.18, 0.14, 0.02 keep group 0 alone, so its
        // weak second expert is chosen over 2; weights 0.30 and 0.02, times 16.
        let cfg = spec(ScoreFn::Softmax, false, 16.0, limit(GroupRank::Best));
        let r = route(&logits, 8, cfg, RouterBias::default());
        assert_eq!(r.experts_of(0), &[0, 1]);
        close(r.weights_of(0), &[4.8, 0.32]);
        // Two-best sums 0.32, 0.36, 0.28, 0.04 keep group 1: 0.18 x 16 each.
        let cfg = spec(ScoreFn::Softmax, false, 16.0, limit(GroupRank::SumOfTopTwo));
        let r = route(&logits, 8, cfg, RouterBias::default());
        assert_eq!(r.experts_of(0), &[2, 3]);
        close(r.weights_of(0), &[2.88, 2.88]);
        // No limit: 0.30 then 0.18 (the lower id of the tie).
        let r = route(
            &logits,
            8,
            spec(ScoreFn::Softmax, false, 16.0, None),
            RouterBias::default(),
        );
        assert_eq!(r.experts_of(0), &[0, 2]);
    }

    #[test]
    fn renormalising_underflowed_sigmoids_adds_transformers_epsilon() {
        // sigmoid(-60) = 8.756511e-27, sigmoid(-61) = 3.221340e-27; their sum
        // 1.197785e-26 is far below 1e-20, so the weights are about each
        // score / 1e-20 (transformers' `sum + 1e-20`), finite and far from 0.73 / 0.27.
        let r = route(
            &[-60.0, -61.0, -70.0],
            3,
            spec(ScoreFn::Sigmoid, true, 1.0, None),
            RouterBias::default(),
        );
        assert_eq!(r.experts_of(0), &[0, 1]);
        let w = r.weights_of(0);
        assert!((w[0] / 8.7565e-7 - 1.0).abs() < 1e-4, "{w:?}");
        assert!((w[1] / 3.221336e-7 - 1.0).abs() < 1e-4, "{w:?}");
    }

    #[test]
    fn softmax_of_top_k_uses_the_router_bias_and_the_chosen_logits_only() {
        // Logits [1, 3, 2, 0] + router bias [0, 0, 2, 0] = [1, 3, 4, 0]: experts 2
        // and 1, weights softmax([4, 3]) = [e / (e + 1), 1 / (e + 1)]
        // = [0.731059, 0.268941], whatever norm_topk_prob says. Scores are the
        // softmax over all four biased logits: e^4 / (e + e^3 + e^4 + 1) = 0.696387
        // and e^3 / (...) = 0.256187.
        let router_bias = [0.0, 0.0, 2.0, 0.0];
        let bias = RouterBias {
            logits: Some(&router_bias),
            selection: None,
        };
        for norm in [false, true] {
            let cfg = spec(ScoreFn::SoftmaxOfTopK, norm, 1.0, None);
            let r = route(&[1.0, 3.0, 2.0, 0.0], 4, cfg, bias);
            assert_eq!(r.experts_of(0), &[2, 1]);
            close(r.weights_of(0), &[0.731059, 0.268941]);
            close(r.scores_of(0), &[0.696387, 0.256187]);
        }
    }

    #[test]
    fn softmax_selection_bias_like_ernie_moe_statics() {
        // Softmax [0.4, 0.3, 0.2, 0.1] + bias [0, 0, 0.25, 0] = [0.4, 0.3, 0.45,
        // 0.1] for choosing: experts 2 and 0, mixed with 0.2 and 0.4 over 0.6.
        let logits = logits_of(&[0.4, 0.3, 0.2, 0.1]);
        let selection = [0.0, 0.0, 0.25, 0.0];
        let bias = RouterBias {
            logits: None,
            selection: Some(&selection),
        };
        let r = route(&logits, 4, spec(ScoreFn::Softmax, true, 1.0, None), bias);
        assert_eq!(r.experts_of(0), &[2, 0]);
        close(r.weights_of(0), &[1.0 / 3.0, 2.0 / 3.0]);
        close(r.scores_of(0), &[0.2, 0.4]);
    }

    #[test]
    fn norm_min_clamps_a_vanishing_renormalisation_denominator() {
        // Sigmoids of -40 and -41 sum to ~5.8e-18: renormalised (with the
        // 1e-20 epsilon) they mix at ~0.73 and ~0.27; clamped at 1e-12 they
        // stay ~1e-6 small.
        let logits = [-40.0, -41.0, -60.0];
        let clamped = RouterConfig {
            spec: RouterSpec {
                norm_min: 1e-12,
                ..spec(ScoreFn::Sigmoid, true, 1.0, None).spec
            },
            ..spec(ScoreFn::Sigmoid, true, 1.0, None)
        };
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let r = route(&logits, 3, clamped, RouterBias::default());
        assert_eq!(r.experts_of(0), &[0, 1]);
        close(r.weights_of(0), &[sig(-40.0) / 1e-12, sig(-41.0) / 1e-12]);
        let free = route(
            &logits,
            3,
            spec(ScoreFn::Sigmoid, true, 1.0, None),
            RouterBias::default(),
        );
        let sum = sig(-40.0) + sig(-41.0) + NORM_EPS;
        close(free.weights_of(0), &[sig(-40.0) / sum, sig(-41.0) / sum]);
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
