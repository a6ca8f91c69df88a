//! `flex_olmo`: OLMo-2's norm placement (no input norm; RMS-norms on the
//! attention and expert outputs before each residual add), q/k RMS-norms over
//! the whole projections, softmax top-k routing, every layer sparse,
//! Qwen-style expert names.
//! Upstream: transformers `configuration_flex_olmo.py` / `modeling_flex_olmo.py`.

use super::qwen3_moe::QWEN_NAMES;
use super::{
    AttentionKind, ExpertKind, Family, Flag, HfKeys, NUM_EXPERTS, NormPlacement, RouterKeys,
    SparseLayers, TOP_K,
};
use crate::config::{QkNorm, RouterSpec};

pub static FLEX_OLMO: Family = Family {
    model_types: &["flex_olmo"],
    hf: HfKeys {
        class: "FlexOlmoForCausalLM",
        // transformers' `attribute_map` sends `num_local_experts` to `num_experts`.
        num_experts: NUM_EXPERTS,
        top_k: TOP_K,
        expert_ffn: &["intermediate_size"],
        dense_ffn: &[],
        shared_expert_ffn: &[],
        shared_experts: &[],
        router: RouterKeys::NONE,
        qkv_bias: Flag {
            keys: &["attention_bias"],
            default: false,
        },
        norm_topk_prob: &["norm_topk_prob"],
        sparse_layers: SparseLayers::All,
        sliding_window_switch: None,
        unsupported_switches: &[],
        export: None,
    },
    // llama.cpp has no FlexOlmo architecture.
    gguf: None,
    names: QWEN_NAMES,
    attention: AttentionKind::grouped(QkNorm::Full),
    experts: ExpertKind::SWIGLU,
    router: RouterSpec::SOFTMAX,
    norm: NormPlacement::Post,
};
