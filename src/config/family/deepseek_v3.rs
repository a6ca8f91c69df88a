//! `deepseek_v3` (also Moonlight, Kimi-K2): DeepSeek-V2's attention and
//! layout, routed by sigmoid scores plus the `e_score_correction_bias`
//! selection bias, group-limited by `noaux_tc` (groups ranked by the sum of
//! their two best biased scores), renormalised (`norm_topk_prob`) and scaled;
//! `rope_interleave` picks the rotary layout.
//! Upstream: transformers `configuration_deepseek_v3.py` / `modeling_deepseek_v3.py`.

use super::deepseek_v2::{DEEPSEEK_GGUF, DEEPSEEK_HF, DEEPSEEK_NAMES};
use super::{
    AttentionKind, ExpertKind, Family, Flag, GgufKeys, GgufVariant, HfKeys, NormPlacement,
    RouterKeys,
};
use crate::config::{GroupLimit, GroupRank, QkNorm, RouterSpec, ScoreFn};
use crate::weights::MoeNames;

pub static DEEPSEEK_V3: Family = Family {
    model_types: &["deepseek_v3"],
    hf: HfKeys {
        class: "DeepseekV3ForCausalLM",
        norm_topk_prob: &["norm_topk_prob"],
        // transformers' `DeepseekV3TopkRouter` always takes sigmoid scores and
        // `noaux_tc` groups, whatever `scoring_func` / `topk_method` say.
        router: RouterKeys {
            scoring_func: &[],
            topk_method: &[],
            ..RouterKeys::DEEPSEEK
        },
        ..DEEPSEEK_HF
    },
    // llama.cpp's `deepseek2`: the V3 files are those with sigmoid scores or
    // `exp_probs_b` (the converter writes `expert_gating_func` only from a
    // `scoring_func` key, which transformers 5's V3 config drops).
    gguf: Some(GgufKeys {
        variant: Some(GgufVariant::SigmoidOrBiased),
        ..DEEPSEEK_GGUF
    }),
    names: MoeNames {
        selection_bias: Some(("gate.e_score_correction_bias", "exp_probs_b.bias")),
        ..DEEPSEEK_NAMES
    },
    attention: AttentionKind {
        latent: true,
        rope_interleave: Flag {
            keys: &["rope_interleave"],
            default: true,
        },
        ..AttentionKind::grouped(QkNorm::None)
    },
    experts: ExpertKind::SWIGLU,
    router: V3_ROUTER,
    norm: NormPlacement::Pre,
};

/// V3's router, which GLM-4 MoE took over: sigmoid scores ranked with the
/// selection bias, `noaux_tc` groups, renormalised; `n_group`, `topk_group`
/// and `routed_scaling_factor` complete it from the config.
pub(super) const V3_ROUTER: RouterSpec = RouterSpec {
    score: ScoreFn::Sigmoid,
    norm_topk_prob: true,
    norm_min: 0.0,
    routed_scaling_factor: 1.0,
    groups: Some(GroupLimit {
        n_group: 1,
        topk_group: 1,
        rank: GroupRank::SumOfTopTwo,
    }),
};
