//! `qwen2_moe`: q/k/v biases, one shared expert scaled by
//! `sigmoid(shared_expert_gate(x))`, dense layers by `decoder_sparse_step` /
//! `mlp_only_layers`. Upstream: transformers `configuration_qwen2_moe.py`;
//! llama.cpp `LLM_ARCH_QWEN2MOE`.

use super::qwen3_moe::QWEN_NAMES;
use super::{
    AttentionKind, ExpertKind, Family, Flag, GgufKeys, HfKeys, NUM_EXPERTS, NormPlacement,
    RouterKeys, SparseLayers, TOP_K,
};
use crate::config::{ModelConfig, QkNorm, RouterSpec};
use crate::weights::{MoeNames, SharedExpertNames};

pub static QWEN2_MOE: Family = Family {
    model_types: &["qwen2_moe"],
    hf: HfKeys {
        class: "Qwen2MoeForCausalLM",
        num_experts: NUM_EXPERTS,
        top_k: TOP_K,
        expert_ffn: &["moe_intermediate_size"],
        dense_ffn: &["intermediate_size"],
        shared_expert_ffn: &["shared_expert_intermediate_size"],
        shared_experts: &[],
        router: RouterKeys::NONE,
        // Qwen2 always has q/k/v biases.
        qkv_bias: Flag {
            keys: &["qkv_bias"],
            default: true,
        },
        norm_topk_prob: &["norm_topk_prob"],
        sparse_layers: SparseLayers::Step {
            step: "decoder_sparse_step",
            dense: "mlp_only_layers",
        },
        sliding_window_switch: Some("use_sliding_window"),
        unsupported_switches: &[],
        export: Some(export),
    },
    gguf: Some(GgufKeys {
        norm_topk_prob: false,
        ..GgufKeys::standard("qwen2moe")
    }),
    names: MoeNames {
        shared_expert: Some(SharedExpertNames {
            module: "shared_expert",
            projections: [
                ("gate_proj", "ffn_gate_shexp"),
                ("up_proj", "ffn_up_shexp"),
                ("down_proj", "ffn_down_shexp"),
            ],
            // Stored 1-D in GGUF: `[hidden]`.
            gate: Some(("shared_expert_gate", "ffn_gate_inp_shexp")),
        }),
        ..QWEN_NAMES
    },
    attention: AttentionKind::grouped(QkNorm::None),
    experts: ExpertKind::SWIGLU,
    router: RouterSpec::SOFTMAX,
    norm: NormPlacement::Pre,
};

/// The fields transformers 5 writes for `qwen2_moe` beyond the common ones.
fn export(cfg: &ModelConfig, obj: &mut serde_json::Map<String, serde_json::Value>) {
    obj.insert(
        "architectures".into(),
        serde_json::json!([QWEN2_MOE.hf.class]),
    );
    obj.insert("qkv_bias".into(), cfg.attention.qkv_bias.into());
    obj.insert("num_experts".into(), cfg.moe.num_experts.into());
    obj.insert(
        "shared_expert_intermediate_size".into(),
        cfg.moe.shared_expert_ffn.unwrap_or(0).into(),
    );
    obj.insert(
        "layer_types".into(),
        serde_json::json!(vec!["full_attention"; cfg.num_layers]),
    );
    obj.insert("max_window_layers".into(), cfg.num_layers.into());
}
