//! Parameter counts derived from the configuration alone, so `info` can answer
//! without reading any weights.

use super::{ModelConfig, QkNorm};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ParameterCounts {
    /// Every parameter, tied embeddings counted once (as `sum(p.numel())` in torch).
    pub total: usize,
    /// Parameters one token touches: everything but the unselected routed experts,
    /// and without the input embedding (a row lookup, not a matrix read) unless it
    /// doubles as the tied output projection.
    pub active: usize,
    /// One routed expert (gate, up and down projections).
    pub per_expert: usize,
    /// All routed experts of all layers.
    pub routed_experts: usize,
    /// Everything that is not a routed expert.
    pub non_expert: usize,
}

impl ParameterCounts {
    pub fn of(cfg: &ModelConfig) -> Self {
        let h = cfg.hidden_size;
        let a = &cfg.attention;
        let m = &cfg.moe;
        let embedding = cfg.vocab_size * h;
        let lm_head = if cfg.tie_word_embeddings {
            0
        } else {
            embedding
        };
        let qkv_bias = if a.qkv_bias {
            a.q_dim() + 2 * a.kv_dim()
        } else {
            0
        };
        let qk_norm = match a.qk_norm {
            QkNorm::None => 0,
            QkNorm::PerHead => 2 * a.head_dim,
            QkNorm::Full => a.q_dim() + a.kv_dim(),
        };
        let attention = match a.mla {
            Some(mla) => {
                let q_width = a.num_heads * mla.qk_head_dim();
                let query = match mla.q_lora_rank {
                    // q_a_proj, q_a_layernorm, q_b_proj
                    Some(r) => h * r + r + r * q_width,
                    None => h * q_width,
                };
                let kv_a = h * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank;
                let kv_b = mla.kv_lora_rank * a.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim);
                query + kv_a + kv_b + a.num_heads * mla.v_head_dim * h
            }
            None => {
                let o_bias = if a.o_bias { h } else { 0 };
                let sinks = if a.sinks { a.num_heads } else { 0 };
                h * a.q_dim()
                    + 2 * h * a.kv_dim()
                    + a.q_dim() * h
                    + qkv_bias
                    + o_bias
                    + qk_norm
                    + sinks
            }
        };
        let experts = cfg.family.experts;
        // gpt-oss's expert biases: gate and up `[ffn]` each, down `[hidden]`.
        let expert_biases = if experts.biases {
            2 * m.expert_ffn + h
        } else {
            0
        };
        let per_expert = 3 * h * m.expert_ffn + expert_biases;
        // Qwen2-MoE's shared expert has a `[1, hidden]` gate; DeepSeek's none.
        let shared_gate = cfg
            .family
            .names
            .shared_expert
            .map_or(0, |s| if s.gate.is_some() { h } else { 0 });
        let shared = m
            .shared_expert_ffn
            .map_or(0, |ffn| 3 * h * ffn + shared_gate);
        let router = m.num_experts * (h + usize::from(experts.router_bias))
            + if cfg.family.names.selection_bias_is_parameter {
                m.num_experts
            } else {
                0
            };
        let dense_mlp = 3 * h * m.dense_ffn;
        let norms = 2 * h;

        let mut total = embedding + lm_head + h;
        let mut active = lm_head
            + h
            + if cfg.tie_word_embeddings {
                embedding
            } else {
                0
            };
        let mut routed_experts = 0;
        for &sparse in &m.sparse_layers {
            let common = attention + norms;
            total += common;
            active += common;
            if sparse {
                let experts = m.num_experts * per_expert;
                routed_experts += experts;
                total += router + shared + experts;
                active += router + shared + m.top_k * per_expert;
            } else {
                total += dense_mlp;
                active += dense_mlp;
            }
        }
        Self {
            total,
            active,
            per_expert,
            routed_experts,
            non_expert: total - routed_experts,
        }
    }
}
