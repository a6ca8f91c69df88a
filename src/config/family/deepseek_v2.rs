//! `deepseek_v2`: multi-head latent attention (with or without `q_lora_rank`),
//! interleaved rotary pairs, softmax routing `greedy` or `group_limited_greedy`
//! scaled by `routed_scaling_factor` and never renormalised (transformers'
//! `DeepseekV2TopkRouter` ignores `norm_topk_prob`), `n_shared_experts`
//! ungated shared experts, the first `first_k_dense_replace` layers dense.
//! Upstream: transformers `configuration_deepseek_v2.py` / `modeling_deepseek_v2.py`;
//! llama.cpp `LLM_ARCH_DEEPSEEK2` (shared with V3, told apart by the router).

use super::qwen3_moe::QWEN_NAMES;
use super::{
    AttentionKind, ExpertKind, Family, Flag, GgufKeys, GgufVariant, HfKeys, NormPlacement,
    RouterKeys, SparseLayers, TOP_K,
};
use crate::config::{GroupRank, QkNorm, RouterSpec};
use crate::weights::{MoeNames, SharedExpertNames};

pub static DEEPSEEK_V2: Family = Family {
    model_types: &["deepseek_v2"],
    hf: DEEPSEEK_HF,
    gguf: Some(GgufKeys {
        variant: Some(GgufVariant::Softmax(GroupRank::Best)),
        ..DEEPSEEK_GGUF
    }),
    names: DEEPSEEK_NAMES,
    attention: AttentionKind {
        latent: true,
        // transformers' V2 always rotates adjacent pairs (`view_as_complex`).
        rope_interleave: Flag {
            keys: &[],
            default: true,
        },
        ..AttentionKind::grouped(QkNorm::None)
    },
    experts: ExpertKind::SWIGLU,
    router: RouterSpec::SOFTMAX,
    norm: NormPlacement::Pre,
};

/// The `config.json` keys both DeepSeek generations share.
pub(super) const DEEPSEEK_HF: HfKeys = HfKeys {
    class: "DeepseekV2ForCausalLM",
    // transformers' `attribute_map` sends `num_experts` to `n_routed_experts`.
    num_experts: &["n_routed_experts", "num_experts"],
    top_k: TOP_K,
    expert_ffn: &["moe_intermediate_size"],
    dense_ffn: &["intermediate_size"],
    shared_expert_ffn: &[],
    shared_experts: &["n_shared_experts"],
    router: RouterKeys::DEEPSEEK,
    // MLA's biases (on q_a / kv_a / o) are refused at load when set.
    qkv_bias: Flag {
        keys: &["attention_bias"],
        default: false,
    },
    norm_topk_prob: &[],
    sparse_layers: SparseLayers::FirstDense {
        first_dense: "first_k_dense_replace",
        step: "moe_layer_freq",
    },
    sliding_window_switch: None,
    unsupported_switches: &[],
    export: None,
};

/// llama.cpp's `deepseek2` metadata, both generations. Its converter writes
/// no `mscale` (only `mscale_all_dim`, as the log multiplier), rotates
/// adjacent pairs (`LLAMA_ROPE_TYPE_NORM`) without permuting rows, and splits
/// `kv_b_proj` into `attn_k_b` / `attn_v_b` (joined again at load).
pub(super) const DEEPSEEK_GGUF: GgufKeys = GgufKeys {
    norm_topk_prob: false,
    yarn_log_mul_tenth: true,
    ..GgufKeys::standard("deepseek2")
};

/// DeepSeek's MoE tensors; the GGUF side is llama.cpp's `deepseek2` naming.
pub(super) const DEEPSEEK_NAMES: MoeNames = MoeNames {
    shared_expert: Some(SharedExpertNames {
        module: "shared_experts",
        projections: [
            ("gate_proj", "ffn_gate_shexp"),
            ("up_proj", "ffn_up_shexp"),
            ("down_proj", "ffn_down_shexp"),
        ],
        gate: None,
    }),
    ..QWEN_NAMES
};
