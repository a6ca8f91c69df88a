//! `qwen3_moe`: per-head q/k RMS-norm, no shared expert, dense layers by
//! `decoder_sparse_step` / `mlp_only_layers`. Upstream: transformers
//! `configuration_qwen3_moe.py`; llama.cpp `LLM_ARCH_QWEN3MOE`.

use super::{
    AttentionKind, ExpertKind, Family, Flag, GgufKeys, HfKeys, NUM_EXPERTS, NormPlacement,
    RouterKeys, SparseLayers, TOP_K,
};
use crate::config::{ModelConfig, QkNorm, RouterSpec};
use crate::weights::MoeNames;

pub static QWEN3_MOE: Family = Family {
    model_types: &["qwen3_moe"],
    hf: HfKeys {
        class: "Qwen3MoeForCausalLM",
        num_experts: NUM_EXPERTS,
        top_k: TOP_K,
        expert_ffn: &["moe_intermediate_size"],
        dense_ffn: &["intermediate_size"],
        shared_expert_ffn: &[],
        shared_experts: &[],
        router: RouterKeys::NONE,
        qkv_bias: Flag {
            keys: &["attention_bias"],
            default: false,
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
    gguf: Some(GgufKeys::standard("qwen3moe")),
    names: QWEN_NAMES,
    attention: AttentionKind::grouped(QkNorm::PerHead),
    experts: ExpertKind::SWIGLU,
    router: RouterSpec::SOFTMAX,
    norm: NormPlacement::Pre,
};

/// Qwen-style MoE names, shared by the families that copied them.
pub(super) const QWEN_NAMES: MoeNames = MoeNames {
    modules: &["mlp"],
    router: ("gate", "ffn_gate_inp"),
    experts: [
        ("gate_proj", "ffn_gate_exps"),
        ("up_proj", "ffn_up_exps"),
        ("down_proj", "ffn_down_exps"),
    ],
    fused: ["gate_up_proj", "down_proj"],
    shared_expert: None,
    post_attention_norm: "ffn_norm",
    selection_bias: None,
    selection_bias_is_parameter: false,
};

/// The fields transformers 5 writes for `qwen3_moe` beyond the common ones.
fn export(cfg: &ModelConfig, obj: &mut serde_json::Map<String, serde_json::Value>) {
    obj.insert(
        "architectures".into(),
        serde_json::json!([QWEN3_MOE.hf.class]),
    );
    obj.insert("attention_bias".into(), cfg.attention.qkv_bias.into());
    obj.insert("num_local_experts".into(), cfg.moe.num_experts.into());
}
