//! `flex_olmo`: OLMo-2's norm placement (no input norm; RMS-norms on the
//! attention and expert outputs before each residual add), q/k RMS-norms over
//! the whole projections, softmax top-k routing, every layer sparse,
//! Qwen-style expert names.
//! Upstream: transformers `configuration_flex_olmo.py` / `modeling_flex_olmo.py`.

use super::olmoe::OLMOE_HF;
use super::qwen3_moe::QWEN_NAMES;
use super::{AttentionKind, ExpertKind, Family, HfKeys, NormPlacement};
use crate::config::{QkNorm, RouterSpec};

pub static FLEX_OLMO: Family = Family {
    model_types: &["flex_olmo"],
    // transformers' `attribute_map` sends `num_local_experts` to `num_experts`,
    // as OLMoE's does.
    hf: HfKeys {
        class: "FlexOlmoForCausalLM",
        sliding_window_switch: None,
        ..OLMOE_HF
    },
    // llama.cpp has no FlexOlmo architecture.
    gguf: None,
    names: QWEN_NAMES,
    attention: AttentionKind::grouped(QkNorm::Full),
    experts: ExpertKind::SWIGLU,
    router: RouterSpec::SOFTMAX,
    norm: NormPlacement::Post,
};
