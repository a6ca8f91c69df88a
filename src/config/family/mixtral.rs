//! `mixtral`: plain attention, every layer sparse, experts `w1` (gate), `w3`
//! (up), `w2` (down) under `block_sparse_moe` (transformers 5 may write `mlp`).
//! Upstream: transformers `configuration_mixtral.py`; in GGUF it is llama.cpp's
//! `llama` with experts, q/k rows permuted by the converter.

use super::qwen3_moe::QWEN_NAMES;
use super::{
    AttentionKind, ExpertKind, Family, Flag, GgufKeys, HfKeys, NUM_EXPERTS, NormPlacement,
    RouterKeys, SparseLayers, TOP_K,
};
use crate::config::{QkNorm, RouterSpec};
use crate::weights::MoeNames;

pub static MIXTRAL: Family = Family {
    model_types: &["mixtral"],
    hf: HfKeys {
        class: "MixtralForCausalLM",
        num_experts: NUM_EXPERTS,
        top_k: TOP_K,
        expert_ffn: &["intermediate_size"],
        dense_ffn: &[],
        shared_expert_ffn: &[],
        shared_experts: &[],
        router: RouterKeys::NONE,
        qkv_bias: Flag {
            keys: &[],
            default: false,
        },
        norm_topk_prob: &[],
        sparse_layers: SparseLayers::All,
        sliding_window_switch: None,
        unsupported_switches: &[],
        export: None,
    },
    gguf: Some(GgufKeys {
        // `feed_forward_length` is the expert width: every layer is sparse.
        expert_ffn: &["expert_feed_forward_length", "feed_forward_length"],
        dense_ffn: None,
        permuted_qk: true,
        ..GgufKeys::standard("llama")
    }),
    names: MoeNames {
        modules: &["block_sparse_moe", "mlp"],
        experts: [
            ("w1", "ffn_gate_exps"),
            ("w3", "ffn_up_exps"),
            ("w2", "ffn_down_exps"),
        ],
        ..QWEN_NAMES
    },
    attention: AttentionKind::grouped(QkNorm::None),
    experts: ExpertKind::SWIGLU,
    // Mixtral's softmax runs over the top-k logits only, which equals a full
    // softmax followed by renormalising the top-k.
    router: RouterSpec {
        norm_topk_prob: true,
        ..RouterSpec::SOFTMAX
    },
    norm: NormPlacement::Pre,
};
