//! `olmoe`: q/k RMS-norm over the whole projection (all heads at once),
//! optional `clip_qkv`, every layer sparse, Qwen-style expert names.
//! Upstream: transformers `configuration_olmoe.py`; llama.cpp `LLM_ARCH_OLMOE`.

use super::qwen3_moe::QWEN_NAMES;
use super::{
    AttentionKind, ExpertKind, Family, Flag, GgufKeys, HfKeys, NUM_EXPERTS, NormPlacement,
    RouterKeys, SparseLayers, TOP_K,
};
use crate::config::{QkNorm, RouterSpec};

pub static OLMOE: Family = Family {
    model_types: &["olmoe"],
    hf: OLMOE_HF,

    gguf: Some(GgufKeys {
        // `feed_forward_length` is the expert width: every layer is sparse.
        dense_ffn: None,
        norm_topk_prob: false,
        ..GgufKeys::standard("olmoe")
    }),
    names: QWEN_NAMES,
    attention: AttentionKind::grouped(QkNorm::Full),
    experts: ExpertKind::SWIGLU,
    router: RouterSpec::SOFTMAX,
    norm: NormPlacement::Pre,
};

/// OLMoE's config keys; FlexOlmo, built on OLMoE, reads the same ones.
pub(super) const OLMOE_HF: HfKeys = HfKeys {
    class: "OlmoeForCausalLM",
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
    sliding_window_switch: Some("use_sliding_window"),
    unsupported_switches: &[],
    export: None,
};
