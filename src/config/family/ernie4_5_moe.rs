//! `ernie4_5_moe` (ERNIE-4.5-21B-A3B and kin): MoE layers from
//! `moe_layer_start_index` to `moe_layer_end_index` every
//! `moe_layer_interval`, the others dense; softmax routing whose choices the
//! `moe_statics` selection bias shifts, always renormalised with the
//! denominator clamped at `moe_norm_min`; `moe_num_shared_experts` ungated
//! shared experts; rotary dimensions in adjacent pairs.
//! Upstream: transformers `configuration_ernie4_5_moe.py` / `modeling_ernie4_5_moe.py`;
//! llama.cpp `LLM_ARCH_ERNIE4_5_MOE`.

use super::deepseek_v2::DEEPSEEK_NAMES;
use super::{
    AttentionKind, ExpertKind, Family, Flag, GgufKeys, HfKeys, NormPlacement, RouterKeys,
    SparseLayers,
};
use crate::config::{QkNorm, RouterSpec};
use crate::weights::MoeNames;

pub static ERNIE4_5_MOE: Family = Family {
    model_types: &["ernie4_5_moe"],
    hf: HfKeys {
        class: "Ernie4_5_MoeForCausalLM",
        // transformers' `attribute_map` sends `num_experts` / `num_experts_per_tok`
        // to these.
        num_experts: &["moe_num_experts", "num_experts"],
        top_k: &["moe_k", "num_experts_per_tok"],
        expert_ffn: &["moe_intermediate_size"],
        dense_ffn: &["intermediate_size"],
        shared_expert_ffn: &[],
        shared_experts: &["moe_num_shared_experts"],
        router: RouterKeys {
            norm_min: &["moe_norm_min"],
            ..RouterKeys::NONE
        },
        qkv_bias: Flag {
            keys: &[],
            default: false,
        },
        // `Ernie4_5_MoeTopKRouter` always renormalises.
        norm_topk_prob: &[],
        sparse_layers: SparseLayers::Interval {
            start: "moe_layer_start_index",
            end: "moe_layer_end_index",
            interval: "moe_layer_interval",
        },
        sliding_window_switch: None,
        // Biases on every projection, attention and experts alike.
        unsupported_switches: &["use_bias"],
        export: None,
    },
    // q/k rows not permuted: llama.cpp rotates ERNIE's adjacent pairs as stored.
    gguf: Some(GgufKeys::standard("ernie4_5-moe")),
    names: MoeNames {
        selection_bias: Some(("moe_statics.e_score_correction_bias", "exp_probs_b.bias")),
        selection_bias_is_parameter: true,
        ..DEEPSEEK_NAMES
    },
    attention: AttentionKind {
        rope_interleave: Flag {
            keys: &[],
            default: true,
        },
        ..AttentionKind::grouped(QkNorm::None)
    },
    // transformers' `moe_norm_min` default.
    experts: ExpertKind::SWIGLU,
    router: RouterSpec {
        norm_topk_prob: true,
        norm_min: 1e-12,
        ..RouterSpec::SOFTMAX
    },
    norm: NormPlacement::Pre,
};
