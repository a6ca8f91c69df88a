//! `gpt_oss` (gpt-oss-20b / -120b): attention sinks, `sliding_attention` and
//! `full_attention` layers by `layer_types`, biases on all four attention
//! projections, a router with a bias whose top-k logits are softmaxed alone,
//! and experts with biases and the clamped SwiGLU (`swiglu_alpha`,
//! `swiglu_limit`), fused as `[E, in, out]` with gate and up outputs
//! interleaved, or shipped as MXFP4 `*_blocks` / `*_scales`; YaRN.
//! Upstream: transformers `configuration_gpt_oss.py` / `modeling_gpt_oss.py`.

use super::qwen3_moe::QWEN_NAMES;
use super::{
    AttentionKind, ExpertKind, Family, Flag, GgufKeys, GluKind, HfKeys, NUM_EXPERTS, NormPlacement,
    RouterKeys, SparseLayers, TOP_K,
};
use crate::config::{QkNorm, RouterSpec, ScoreFn};
use crate::weights::MoeNames;

pub static GPT_OSS: Family = Family {
    model_types: &["gpt_oss"],
    hf: HfKeys {
        class: "GptOssForCausalLM",
        num_experts: NUM_EXPERTS,
        top_k: TOP_K,
        // Every layer is sparse; `intermediate_size` is the expert width.
        expert_ffn: &["intermediate_size"],
        dense_ffn: &[],
        shared_expert_ffn: &[],
        shared_experts: &[],
        router: RouterKeys::NONE,
        qkv_bias: Flag {
            keys: &["attention_bias"],
            default: true,
        },
        norm_topk_prob: &[],
        sparse_layers: SparseLayers::All,
        sliding_window_switch: None,
        unsupported_switches: &[],
        export: None,
    },
    // llama.cpp's `gpt-oss`: MXFP4 experts split into gate and up, the
    // post-attention norm named `post_attention_norm`, even layers sliding.
    gguf: Some(GgufKeys {
        dense_ffn: None,
        norm_topk_prob: false,
        yarn_truncate: false,
        ..GgufKeys::standard("gpt-oss")
    }),
    names: MoeNames {
        router: ("router", "ffn_gate_inp"),
        post_attention_norm: "post_attention_norm",
        ..QWEN_NAMES
    },
    attention: AttentionKind {
        sinks: true,
        output_bias: true,
        layer_types: true,
        ..AttentionKind::grouped(QkNorm::None)
    },
    experts: ExpertKind {
        // transformers' defaults; the Hub configs state only the limit.
        activation: GluKind::Clamped {
            alpha: (&["swiglu_alpha"], 1.702),
            limit: (&["swiglu_limit"], 7.0),
        },
        router_bias: true,
        biases: true,
        fused_transposed: true,
        gate_up_interleaved: true,
    },
    router: RouterSpec {
        score: ScoreFn::SoftmaxOfTopK,
        ..RouterSpec::SOFTMAX
    },
    norm: NormPlacement::Pre,
};
