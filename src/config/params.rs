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
        let attention = h * a.q_dim() + 2 * h * a.kv_dim() + a.q_dim() * h + qkv_bias + qk_norm;
        let per_expert = 3 * h * m.expert_ffn;
        let shared = m.shared_expert_ffn.map_or(0, |ffn| 3 * h * ffn + h);
        let router = m.num_experts * h;
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
