//! What an architecture family is, as data: one file per family declares its
//! Hugging Face and GGUF config keys, its MoE tensor names on both sides, its
//! attention kind, router rule and norm placement. `config::hf`, `config::gguf`,
//! `weights` (through [`MoeNames`]) and `model` read these values; none of
//! them names a family. Adding one is a file here plus a line in [`FAMILIES`].

mod deepseek_v2;
mod deepseek_v3;
mod ernie4_5_moe;
mod flex_olmo;
mod glm4_moe;
mod gpt_oss;
mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_moe;

pub use deepseek_v2::DEEPSEEK_V2;
pub use deepseek_v3::DEEPSEEK_V3;
pub use ernie4_5_moe::ERNIE4_5_MOE;
pub use flex_olmo::FLEX_OLMO;
pub use glm4_moe::GLM4_MOE;
pub use gpt_oss::GPT_OSS;
pub use mixtral::MIXTRAL;
pub use olmoe::OLMOE;
pub use qwen2_moe::QWEN2_MOE;
pub use qwen3_moe::QWEN3_MOE;

use super::{GroupRank, ModelConfig, QkNorm, RouterSpec};
use crate::weights::MoeNames;

/// Every family Switchyard runs, in the order errors list them.
pub static FAMILIES: &[&Family] = &[
    &QWEN3_MOE,
    &MIXTRAL,
    &QWEN2_MOE,
    &OLMOE,
    &DEEPSEEK_V2,
    &DEEPSEEK_V3,
    &GLM4_MOE,
    &GPT_OSS,
    &FLEX_OLMO,
    &ERNIE4_5_MOE,
];

/// One architecture family.
pub struct Family {
    /// Hugging Face `model_type`s it loads from; the first names the family.
    pub model_types: &'static [&'static str],
    pub hf: HfKeys,
    /// `None`: Switchyard does not read this family from GGUF (yet).
    pub gguf: Option<GgufKeys>,
    /// Router, routed-expert and shared-expert tensor names, HF and GGUF.
    pub names: MoeNames,
    pub attention: AttentionKind,
    pub experts: ExpertKind,
    /// The router's rule; `norm_topk_prob` is the default the config may override.
    pub router: RouterSpec,
    pub norm: NormPlacement,
}

impl Family {
    pub fn model_type(&self) -> &'static str {
        self.model_types[0]
    }

    pub fn by_model_type(model_type: &str) -> Option<&'static Family> {
        FAMILIES
            .iter()
            .copied()
            .find(|f| f.model_types.contains(&model_type))
    }

    /// The first family read from GGUF architecture `arch`.
    pub fn by_gguf_arch(arch: &str) -> Option<&'static Family> {
        FAMILIES
            .iter()
            .copied()
            .find(|f| f.gguf.is_some_and(|g| g.arch == arch))
    }

    /// The family of a GGUF file of architecture `arch` whose router is, or is
    /// not, `sigmoid_or_biased` ([`GgufVariant`]); that only matters between
    /// families that share `arch`.
    pub fn by_gguf(arch: &str, sigmoid_or_biased: bool) -> Option<&'static Family> {
        FAMILIES.iter().copied().find(|f| {
            f.gguf.is_some_and(|g| {
                g.arch == arch
                    && g.variant
                        .is_none_or(|v| v.sigmoid_or_biased() == sigmoid_or_biased)
            })
        })
    }

    /// Every `model_type` some family loads, for errors that list them.
    pub fn supported_model_types() -> Vec<&'static str> {
        FAMILIES
            .iter()
            .flat_map(|f| f.model_types.iter().copied())
            .collect()
    }
}

// By name, not field by field: each family is one static value.
impl PartialEq for Family {
    fn eq(&self, other: &Self) -> bool {
        self.model_type() == other.model_type()
    }
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Family({})", self.model_type())
    }
}

/// `config.json` keys for one value, tried in order; the first present wins.
/// Empty: the family does not have the value.
pub type Keys = &'static [&'static str];

/// A switch `config.json` may set (the first present of `keys`), else `default`.
/// With no keys the family fixes it at `default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag {
    pub keys: Keys,
    pub default: bool,
}

/// How a family's `config.json` says what the shared blocks do not all read
/// the same way (dimensions, RoPE and norms are read once, in `config::hf`).
pub struct HfKeys {
    /// The `architectures` class transformers writes for it.
    pub class: &'static str,
    pub num_experts: Keys,
    /// Experts each token is routed to.
    pub top_k: Keys,
    /// Width of one routed expert's SwiGLU.
    pub expert_ffn: Keys,
    /// Width of the dense MLP of non-MoE layers.
    pub dense_ffn: Keys,
    /// Width of the shared expert; absent or 0 means none.
    pub shared_expert_ffn: Keys,
    /// Number of shared experts, each `expert_ffn` wide, run as one SwiGLU of
    /// their summed width (DeepSeek's `n_shared_experts`); absent or 0 means none.
    pub shared_experts: Keys,
    /// Keys that complete the family's [`RouterSpec`].
    pub router: RouterKeys,
    /// q/k/v projection biases.
    pub qkv_bias: Flag,
    /// Where the config may override the router's `norm_topk_prob`.
    pub norm_topk_prob: Keys,
    pub sparse_layers: SparseLayers,
    /// The key that turns `sliding_window` on; `None`: a set `sliding_window` is on.
    pub sliding_window_switch: Option<&'static str>,
    /// Switches of the family Switchyard does not implement: a config that
    /// sets one true is refused by its name (ERNIE's `use_bias`).
    pub unsupported_switches: Keys,
    /// The family-specific fields `train` writes when exporting a model of this
    /// family; `None` where `train` does not write it.
    pub export: Option<ExportFields>,
}

/// Router settings `config.json` may give; empty keys leave the family's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterKeys {
    /// `"softmax"` or `"sigmoid"`.
    pub scoring_func: Keys,
    /// `"greedy"`, `"group_limited_greedy"` (groups by their best score) or
    /// `"noaux_tc"` (by the sum of their two best biased scores).
    pub topk_method: Keys,
    pub n_group: Keys,
    pub topk_group: Keys,
    pub routed_scaling_factor: Keys,
    /// The floor of the renormalising denominator ([`RouterSpec::norm_min`]).
    pub norm_min: Keys,
}

impl RouterKeys {
    pub const NONE: RouterKeys = RouterKeys {
        scoring_func: &[],
        topk_method: &[],
        n_group: &[],
        topk_group: &[],
        routed_scaling_factor: &[],
        norm_min: &[],
    };
    /// DeepSeek's spellings, as its Hub configs write them.
    pub const DEEPSEEK: RouterKeys = RouterKeys {
        scoring_func: &["scoring_func"],
        topk_method: &["topk_method"],
        n_group: &["n_group"],
        topk_group: &["topk_group"],
        routed_scaling_factor: &["routed_scaling_factor"],
        norm_min: &[],
    };
}

/// Adds a family's own fields to the `config.json` object `train` writes.
pub type ExportFields = fn(&ModelConfig, &mut serde_json::Map<String, serde_json::Value>);

/// Which decoder layers carry the routed MoE block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseLayers {
    All,
    /// Layer `l` is sparse when `(l + 1) % step == 0` (`step` defaults to 1)
    /// and `l` is not in the `dense` list (Qwen's `decoder_sparse_step`,
    /// `mlp_only_layers`).
    Step {
        step: &'static str,
        dense: &'static str,
    },
    /// Layer `l` is sparse when `l >= first_dense` and `l % step == 0`
    /// (DeepSeek's `first_k_dense_replace`, `moe_layer_freq`; both default to
    /// 0 and 1).
    FirstDense {
        first_dense: &'static str,
        step: &'static str,
    },
    /// Layer `l` is sparse when `start <= l <= end` and `(l + 1) % interval
    /// == 0` (ERNIE's `moe_layer_start_index`, `moe_layer_end_index`,
    /// `moe_layer_interval`; they default to 1, the last layer (also for -1)
    /// and 1, as transformers' `Ernie4_5_MoeConfig`).
    Interval {
        start: &'static str,
        end: &'static str,
        interval: &'static str,
    },
}

/// How a family's GGUF metadata (as llama.cpp's `convert_hf_to_gguf.py`
/// writes it) maps; the keys all families share are read in `config::gguf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufKeys {
    /// `general.architecture`, also the prefix of the family's keys.
    pub arch: &'static str,
    /// Keys (after `{arch}.`) holding the routed expert width, tried in order
    /// before the merged gate tensor's shape.
    pub expert_ffn: Keys,
    /// Key of the dense MLP width; `None`: the family has no dense layers.
    pub dense_ffn: Option<&'static str>,
    /// `norm_topk_prob` when the file has no `{arch}.expert_weights_norm`:
    /// llama.cpp hard-codes it per architecture (`build_moe_ffn`'s `norm_w`).
    pub norm_topk_prob: bool,
    /// The converter permuted q/k rows into llama.cpp's interleaved rotary
    /// order (`LlamaModel.permute`); loading undoes it.
    pub permuted_qk: bool,
    /// The checkpoint's YaRN `truncate` (the file does not record it; gpt-oss
    /// ships `false`), for files with `rope.scaling.type` `yarn`.
    pub yarn_truncate: bool,
    /// `Some` where several families share `arch`: which of its files are this one's.
    pub variant: Option<GgufVariant>,
    /// `{arch}.rope.scaling.yarn_log_multiplier` holds `0.1 * mscale_all_dim`
    /// and YaRN's `mscale` is taken equal to `mscale_all_dim` (llama.cpp's
    /// `deepseek2` reading, its `TAG_DEEPSEEK2_YARN_LOG_MUL_FIX`); false: the
    /// family's files have no such key, and one is refused.
    pub yarn_log_mul_tenth: bool,
}

impl GgufKeys {
    /// What llama.cpp's converter writes for most MoE architectures under
    /// `arch`: the expert width in `expert_feed_forward_length`, a dense width
    /// in `feed_forward_length`, normalised top-k weights, q/k rows as
    /// transformers has them, truncating YaRN. A family overrides what differs.
    pub const fn standard(arch: &'static str) -> Self {
        GgufKeys {
            arch,
            expert_ffn: &["expert_feed_forward_length"],
            dense_ffn: Some("feed_forward_length"),
            norm_topk_prob: true,
            permuted_qk: false,
            yarn_truncate: true,
            variant: None,
            yarn_log_mul_tenth: false,
        }
    }
}

/// One of the families sharing a GGUF architecture (llama.cpp's `deepseek2`
/// holds DeepSeek-V2 and V3), told apart by the file's router, as the
/// metadata names neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufVariant {
    /// Softmax scores (`expert_gating_func` absent or 1) and no selection
    /// bias; with `expert_group_count > 1` the groups are ranked by this
    /// (llama.cpp always sums each group's two best scores, DeepSeek-V2's own
    /// `group_limited_greedy` takes the best one).
    Softmax(GroupRank),
    /// Sigmoid scores (`expert_gating_func` 2) or a selection bias tensor.
    SigmoidOrBiased,
}

impl GgufVariant {
    pub fn sigmoid_or_biased(self) -> bool {
        matches!(self, GgufVariant::SigmoidOrBiased)
    }
}

/// Which attention block a family uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionKind {
    pub qk_norm: QkNorm,
    /// The `config.json` switch that turns `qk_norm` on (GLM's `use_qk_norm`,
    /// off when absent); `None`: the family always has it.
    pub qk_norm_switch: Option<&'static str>,
    /// Multi-head latent attention (`model::mla`) instead of grouped-query heads.
    pub latent: bool,
    /// Rotary dimensions in adjacent pairs rather than halves (DeepSeek's
    /// `rope_interleave`).
    pub rope_interleave: Flag,
    /// One learned logit per query head joins each softmax (gpt-oss's
    /// `self_attn.sinks`).
    pub sinks: bool,
    /// `o_proj` has a bias whenever q/k/v have theirs (gpt-oss's
    /// `attention_bias` covers all four projections).
    pub output_bias: bool,
    /// `layer_types` marks the `sliding_attention` layers, which see only the
    /// last `sliding_window` positions; without it every other layer from the
    /// first slides (transformers' `GptOssConfig` default). `false`: a set
    /// `sliding_window` is refused unless `sliding_window_switch` leaves it off.
    pub layer_types: bool,
}

impl AttentionKind {
    /// Grouped-query attention with `qk_norm`, rotary halves.
    pub const fn grouped(qk_norm: QkNorm) -> AttentionKind {
        AttentionKind {
            qk_norm,
            qk_norm_switch: None,
            latent: false,
            rope_interleave: Flag {
                keys: &[],
                default: false,
            },
            sinks: false,
            output_bias: false,
            layer_types: false,
        }
    }
}

/// What a family's routed experts are beyond a SwiGLU of the expert width.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertKind {
    pub activation: GluKind,
    /// The router has a bias added to its logits (gpt-oss's `router.bias`).
    pub router_bias: bool,
    /// Gate-up and down projections have biases (`{fused}_bias`, gpt-oss).
    pub biases: bool,
    /// transformers 5's fused tensors are stored `[E, in, out]` (applied as
    /// `x @ W`, gpt-oss) rather than `[E, out, in]`.
    pub fused_transposed: bool,
    /// The fused gate-up outputs alternate gate and up (gpt-oss's
    /// `gate_up[..., ::2]` / `[..., 1::2]`) rather than gate then up.
    pub gate_up_interleaved: bool,
}

impl ExpertKind {
    /// `silu(gate) * up`, no biases, fused tensors `[E, out, in]`, gate rows first.
    pub const SWIGLU: ExpertKind = ExpertKind {
        activation: GluKind::SiLU,
        router_bias: false,
        biases: false,
        fused_transposed: false,
        gate_up_interleaved: false,
    };
}

/// The experts' gate/up activation as a family states it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GluKind {
    SiLU,
    /// gpt-oss's clamped SwiGLU: `alpha` and `limit` from the first present of
    /// their keys, else the defaults.
    Clamped {
        alpha: (Keys, f32),
        limit: (Keys, f32),
    },
}

impl GluKind {
    /// The activation with the defaults (what llama.cpp hard-codes, as GGUF
    /// files do not record them).
    pub fn with_defaults(self) -> crate::ops::GluActivation {
        match self {
            GluKind::SiLU => crate::ops::GluActivation::SiLU,
            GluKind::Clamped { alpha, limit } => crate::ops::GluActivation::Clamped {
                alpha: alpha.1,
                limit: limit.1,
            },
        }
    }
}

/// Where the decoder layer's RMS-norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// `x + attn(input_layernorm(x))`, then `h + ffn(post_attention_layernorm(h))`.
    Pre,
    /// OLMo-2: the blocks read the residual stream unnormed and their outputs
    /// are normed before the add: `x + post_attention_layernorm(attn(x))`, then
    /// `h + post_feedforward_layernorm(ffn(h))`.
    Post,
}

/// The `num_experts` spellings every family accepts: transformers 5 writes
/// `num_local_experts` where older configs wrote `num_experts`.
pub(super) const NUM_EXPERTS: Keys = &["num_experts", "num_local_experts"];

/// The top-k spelling of every family but ERNIE's.
pub(super) const TOP_K: Keys = &["num_experts_per_tok"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_across_families() {
        for (i, a) in FAMILIES.iter().enumerate() {
            for b in &FAMILIES[i + 1..] {
                assert!(a.model_types.iter().all(|t| !b.model_types.contains(t)));
                // A shared GGUF architecture tells its families apart by the router.
                if let (Some(ga), Some(gb)) = (a.gguf, b.gguf)
                    && ga.arch == gb.arch
                {
                    let (va, vb) = (ga.variant.unwrap(), gb.variant.unwrap());
                    assert_ne!(va.sigmoid_or_biased(), vb.sigmoid_or_biased());
                }
            }
        }
    }

    #[test]
    fn families_are_found_by_hf_and_gguf_name() {
        assert_eq!(Family::by_model_type("mixtral"), Some(&MIXTRAL));
        assert_eq!(Family::by_gguf_arch("llama"), Some(&MIXTRAL));
        assert_eq!(Family::by_gguf_arch("qwen2moe"), Some(&QWEN2_MOE));
        assert_eq!(Family::by_model_type("deepseek_v2"), Some(&DEEPSEEK_V2));
        assert_eq!(Family::by_model_type("glm4_moe"), Some(&GLM4_MOE));
        assert_eq!(Family::by_model_type("gpt_oss"), Some(&GPT_OSS));
        assert_eq!(Family::by_model_type("flex_olmo"), Some(&FLEX_OLMO));
        assert_eq!(Family::by_model_type("ernie4_5_moe"), Some(&ERNIE4_5_MOE));
        assert_eq!(Family::by_gguf("deepseek2", false), Some(&DEEPSEEK_V2));
        assert_eq!(Family::by_gguf("deepseek2", true), Some(&DEEPSEEK_V3));
        assert_eq!(Family::by_gguf("qwen2moe", true), Some(&QWEN2_MOE));
        assert_eq!(
            Family::supported_model_types(),
            [
                "qwen3_moe",
                "mixtral",
                "qwen2_moe",
                "olmoe",
                "deepseek_v2",
                "deepseek_v3",
                "glm4_moe",
                "gpt_oss",
                "flex_olmo",
                "ernie4_5_moe"
            ]
        );
    }
}
