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
    pub rope_theta: f64,
    pub qkv_bias: bool,
    pub qk_norm: QkNorm,
    /// OLMoE clamps q, k and v to `[-c, c]` right after projection.
    pub clip_qkv: Option<f64>,
}

impl AttentionConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Width of one routed expert's SwiGLU (`moe_intermediate_size`).
    pub expert_ffn: usize,
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
