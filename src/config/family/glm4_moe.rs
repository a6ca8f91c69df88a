//! `glm4_moe` (GLM-4.5, 4.6, 4.7): DeepSeek-V3's MoE block (sigmoid scores
//! plus the `e_score_correction_bias` selection bias, `noaux_tc` groups,
//! `norm_topk_prob`, `routed_scaling_factor`, ungated shared experts, the
//! first `first_k_dense_replace` layers dense) under grouped-query attention
//! with q/k/v biases, per-head q/k norms when `use_qk_norm`, and rotary on the
//! first `partial_rotary_factor` of each head in halves.
//! Upstream: transformers `configuration_glm4_moe.py` / `modeling_glm4_moe.py`;
//! llama.cpp `LLM_ARCH_GLM4_MOE`.

use super::deepseek_v2::{DEEPSEEK_HF, DEEPSEEK_NAMES};
use super::deepseek_v3::V3_ROUTER;
use super::{AttentionKind, ExpertKind, Family, Flag, GgufKeys, HfKeys, NormPlacement, RouterKeys};
use crate::config::QkNorm;
use crate::weights::MoeNames;

pub static GLM4_MOE: Family = Family {
    model_types: &["glm4_moe"],
    hf: HfKeys {
        class: "Glm4MoeForCausalLM",
        norm_topk_prob: &["norm_topk_prob"],
        // Like DeepSeek-V3's, its router has no `scoring_func` / `topk_method`.
        router: RouterKeys {
            scoring_func: &[],
            topk_method: &[],
            ..RouterKeys::DEEPSEEK
        },
        qkv_bias: Flag {
            keys: &["attention_bias"],
            default: false,
        },
        ..DEEPSEEK_HF
    },
    // llama.cpp's `glm4moe`: rotary in halves (`LLAMA_ROPE_TYPE_NEOX`) with
    // q/k rows as transformers has them; the file's q/k norms stand for
    // `use_qk_norm`, its `nextn_predict_layers` are left out of the layers run.
    // YaRN truncates: transformers' default where `rope_parameters` has no `truncate`.
    gguf: Some(GgufKeys::standard("glm4moe")),
    names: MoeNames {
        selection_bias: Some(("gate.e_score_correction_bias", "exp_probs_b.bias")),
        post_attention_norm: "post_attention_norm",
        ..DEEPSEEK_NAMES
    },
    attention: AttentionKind {
        qk_norm_switch: Some("use_qk_norm"),
        ..AttentionKind::grouped(QkNorm::PerHead)
    },
    experts: ExpertKind::SWIGLU,
    router: V3_ROUTER,
    norm: NormPlacement::Pre,
};
