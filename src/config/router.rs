//! How a family's router turns logits into expert choices and mixing weights:
//! data its family file declares and the config completes; the one function
//! that applies it is `model::moe::router::route`.

/// The router's rule. Selection (which experts) and mixing (their weights)
/// are kept apart: a selection bias or a group limit changes the first only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterSpec {
    pub score: ScoreFn,
    /// Renormalise the chosen experts' scores to sum to one; the denominator
    /// gets 1e-20 added, as transformers does, so a row of underflowed
    /// sigmoids stays finite.
    pub norm_topk_prob: bool,
    /// The renormalising denominator is clamped to at least this (ERNIE's
    /// `moe_norm_min`); 0 clamps nothing.
    pub norm_min: f32,
    /// Multiplies every mixing weight, after renormalising (DeepSeek's
    /// `routed_scaling_factor`).
    pub routed_scaling_factor: f32,
    /// Group-limited top-k (DeepSeek's `n_group` / `topk_group`).
    pub groups: Option<GroupLimit>,
}

impl RouterSpec {
    /// Softmax over all experts, top-k of it, no renormalisation.
    pub const SOFTMAX: RouterSpec = RouterSpec {
        score: ScoreFn::Softmax,
        norm_topk_prob: false,
        norm_min: 0.0,
        routed_scaling_factor: 1.0,
        groups: None,
    };
}

/// What a router logit becomes before top-k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFn {
    /// Softmax over all experts (Qwen, Mixtral, OLMoE, DeepSeek-V2, ERNIE-4.5).
    Softmax,
    /// Each logit's own sigmoid (DeepSeek-V3, GLM-4 MoE).
    Sigmoid,
    /// Top-k of the logits, then a softmax over the chosen k only (gpt-oss).
    SoftmaxOfTopK,
}

/// Choose the `topk_group` best of `n_group` equal groups of experts, then
/// the top-k among their experts only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    pub n_group: usize,
    pub topk_group: usize,
    pub rank: GroupRank,
}

/// How a group's selection score is formed from its experts' ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupRank {
    /// Its best expert's score (DeepSeek-V2 `group_limited_greedy`).
    Best,
    /// The sum of its two best biased scores (DeepSeek-V3 `noaux_tc`).
    SumOfTopTwo,
}

impl GroupLimit {
    /// Why this limit cannot route `n_experts` experts `top_k` at a time, if it cannot.
    pub fn check(&self, n_experts: usize, top_k: usize) -> Result<(), String> {
        let GroupLimit {
            n_group,
            topk_group,
            ..
        } = *self;
        if n_group == 0 || !n_experts.is_multiple_of(n_group) {
            return Err(format!(
                "`n_group` {n_group} must divide the number of experts ({n_experts})"
            ));
        }
        if topk_group == 0 || topk_group > n_group {
            return Err(format!(
                "`topk_group` {topk_group} must be between 1 and `n_group` ({n_group})"
            ));
        }
        let reachable = topk_group * (n_experts / n_group);
        if top_k > reachable {
            return Err(format!(
                "num_experts_per_tok ({top_k}) is more than the {reachable} experts of the `topk_group` best groups"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_limits_that_cannot_route_are_refused_by_name() {
        let limit = |n_group, topk_group| GroupLimit {
            n_group,
            topk_group,
            rank: GroupRank::Best,
        };
        assert!(limit(8, 3).check(64, 6).is_ok());
        assert!(
            limit(3, 1)
                .check(64, 2)
                .unwrap_err()
                .contains("`n_group` 3")
        );
        assert!(
            limit(0, 1)
                .check(64, 2)
                .unwrap_err()
                .contains("`n_group` 0")
        );
        assert!(
            limit(8, 9)
                .check(64, 2)
                .unwrap_err()
                .contains("`topk_group` 9")
        );
        // One group of 8 experts cannot supply 9.
        assert!(
            limit(8, 1)
                .check(64, 9)
                .unwrap_err()
                .contains("num_experts_per_tok")
        );
    }
}
