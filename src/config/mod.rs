//! Typed model configuration, parsed once from `config.json` (or GGUF metadata)
//! and validated at load.
//! Nothing downstream reads JSON again.

pub mod family;
mod gguf;
mod hf;
pub mod limits;
mod params;
mod router;
mod size;

pub use family::{FAMILIES, Family};
pub use gguf::{config_from_gguf, open_gguf};
pub use hf::{load_model_config, parse_config, to_hf_json};
pub use params::ParameterCounts;
pub use router::{GroupLimit, GroupRank, RouterSpec, ScoreFn};
pub use size::{ByteSize, format_bytes};

use crate::ops::{GluActivation, Yarn};
use crate::weights::StoredDtype;

/// Where the query/key RMS-norms sit, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Qwen3: one RMS-norm of width `head_dim`, applied to every head.
    PerHead,
    /// OLMoE: one RMS-norm over the whole projection (all heads at once).
    Full,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Leading dimensions of each query/key head the rotary embedding turns;
    /// the rest pass through (GLM's `partial_rotary_factor`). `head_dim`
    /// for most families.
    pub rotary_dim: usize,
    pub rope_theta: f64,
    pub qkv_bias: bool,
    /// `o_proj` has a bias (gpt-oss).
    pub o_bias: bool,
    /// Each layer has one learned sink logit per query head (gpt-oss).
    pub sinks: bool,
    /// Per decoder layer, the sliding window its attention sees (`None`: every
    /// position); empty when no layer slides.
    pub layer_windows: Vec<Option<usize>>,
    pub qk_norm: QkNorm,
    /// OLMoE clamps q, k and v to `[-c, c]` right after projection.
    pub clip_qkv: Option<f64>,
    /// YaRN context extension of the rotary table (`rope_type: yarn`).
    pub yarn: Option<Yarn>,
    /// The rotary dimensions come in adjacent pairs `(x0, x1), (x2, x3), ..`
    /// (DeepSeek) rather than as two halves.
    pub rope_interleaved: bool,
    /// Multi-head latent attention (DeepSeek-V2/V3); `head_dim` is then its
    /// rotary part, `qk_rope_head_dim`, as transformers sets it.
    pub mla: Option<MlaDims>,
}

/// The widths of multi-head latent attention (DeepSeek-V2 section 2.1): keys and
/// values come from one latent of `kv_lora_rank` per token, each head's query and
/// key split into a non-rotary part and a rotary part shared by all heads' keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDims {
    /// Low-rank query (`q_a_proj` -> `q_a_layernorm` -> `q_b_proj`); `None`: one `q_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl MlaDims {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

impl AttentionConfig {
    /// Layer `layer`'s sliding window, if it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.layer_windows.get(layer).copied().flatten()
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// What the KV cache keeps per token and layer: `(heads, key width, value
    /// width)`. Under MLA one "head" of the normed latent and the rotary key.
    pub fn cache_row(&self) -> (usize, usize, usize) {
        match self.mla {
            Some(m) => (1, m.kv_lora_rank, m.qk_rope_head_dim),
            None => (self.num_kv_heads, self.head_dim, self.head_dim),
        }
    }

    /// Cached values per token and layer: [`Self::cache_row`]'s total.
    pub fn cache_values_per_token(&self) -> usize {
        let (heads, k, v) = self.cache_row();
        heads * (k + v)
    }

    /// What multi-head attention of the same shape would cache per token and
    /// layer: every head's key and value (for MLA, the up-projected ones).
    pub fn full_cache_values_per_token(&self) -> usize {
        match self.mla {
            Some(m) => self.num_heads * (m.qk_head_dim() + m.v_head_dim),
            None => self.cache_values_per_token(),
        }
    }

    /// The softmax scale: `1/sqrt(d)` of the query-key width, which DeepSeek's
    /// attention multiplies by YaRN's `mscale(factor, mscale_all_dim)^2`
    /// (transformers `yarn_apply_mscale`).
    pub fn softmax_scale(&self) -> f64 {
        let Some(m) = self.mla else {
            return 1.0 / (self.head_dim as f64).sqrt();
        };
        let base = 1.0 / (m.qk_head_dim() as f64).sqrt();
        match self.yarn {
            Some(y) => match y.mscale_all_dim.filter(|&a| a != 0.0) {
                Some(all) => {
                    let mscale = Yarn::mscale(y.factor, all);
                    base * mscale * mscale
                }
                None => base,
            },
            None => base,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Width of one routed expert's SwiGLU (`moe_intermediate_size`).
    pub expert_ffn: usize,
    /// How a routed expert combines its gate and up halves.
    pub expert_activation: GluActivation,
    /// How router logits become expert choices and weights.
    pub router: RouterSpec,
    /// Qwen2-MoE's always-on shared expert, gated by `sigmoid(shared_expert_gate(x))`.
    pub shared_expert_ffn: Option<usize>,
    /// Per decoder layer: true where the FFN is the routed MoE block, false for a dense MLP.
    pub sparse_layers: Vec<bool>,
    /// Width of the dense MLP in non-sparse layers (`intermediate_size`).
    pub dense_ffn: usize,
}

impl MoeConfig {
    pub fn num_sparse_layers(&self) -> usize {
        self.sparse_layers.iter().filter(|s| **s).count()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: &'static Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention: AttentionConfig,
    pub moe: MoeConfig,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint says it was saved in, if it says.
    pub stored_dtype: Option<StoredDtype>,
}

impl ModelConfig {
    pub fn parameter_counts(&self) -> ParameterCounts {
        ParameterCounts::of(self)
    }
}
