//! Bounds on every size and hyper-parameter a config file or GGUF header states,
//! checked before anything is allocated from them. Each bound is far above any
//! released model (contexts of 10M positions, 512 experts, hidden size 16384), and
//! together they keep every product `ParameterCounts` forms below 2^62: a corrupt
//! or hostile value fails with the field's name instead of aborting an allocation
//! or wrapping the arithmetic.

use super::ModelConfig;

pub const MAX_VOCAB: usize = 1 << 22;
pub const MAX_HIDDEN: usize = 1 << 16;
pub const MAX_LAYERS: usize = 1 << 10;
pub const MAX_HEADS: usize = 1 << 10;
pub const MAX_HEAD_DIM: usize = 1 << 12;
pub const MAX_FFN: usize = 1 << 18;
pub const MAX_EXPERTS: usize = 1 << 16;
pub const MAX_CONTEXT: usize = 1 << 24;

/// `value` in `1..=max`, else a message naming `field`.
pub fn check_size(field: &str, value: usize, max: usize) -> Result<(), String> {
    if value == 0 || value > max {
        return Err(format!("`{field}` is {value}, expected 1..={max}"));
    }
    Ok(())
}

/// Checks a mapped configuration; `Err` names the field at fault (its Hugging Face
/// spelling; GGUF keys map one to one).
pub fn validate(cfg: &ModelConfig) -> Result<(), String> {
    let a = &cfg.attention;
    let m = &cfg.moe;
    check_size("vocab_size", cfg.vocab_size, MAX_VOCAB)?;
    check_size("hidden_size", cfg.hidden_size, MAX_HIDDEN)?;
    check_size("num_hidden_layers", cfg.num_layers, MAX_LAYERS)?;
    check_size(
        "max_position_embeddings",
        cfg.max_position_embeddings,
        MAX_CONTEXT,
    )?;
    check_size("num_attention_heads", a.num_heads, MAX_HEADS)?;
    check_size("num_key_value_heads", a.num_kv_heads, MAX_HEADS)?;
    check_size("head_dim", a.head_dim, MAX_HEAD_DIM)?;
    if let Some(mla) = a.mla {
        if let Some(r) = mla.q_lora_rank {
            check_size("q_lora_rank", r, MAX_FFN)?;
        }
        for (field, v) in [
            ("kv_lora_rank", mla.kv_lora_rank),
            ("qk_nope_head_dim", mla.qk_nope_head_dim),
            ("qk_rope_head_dim", mla.qk_rope_head_dim),
            ("v_head_dim", mla.v_head_dim),
        ] {
            check_size(field, v, MAX_FFN)?;
        }
    }
    let hf = &cfg.family.hf;
    check_size(&hf.num_experts.join("` / `"), m.num_experts, MAX_EXPERTS)?;
    check_size("num_experts_per_tok", m.top_k, m.num_experts)?;
    check_size(&hf.expert_ffn.join("` / `"), m.expert_ffn, MAX_FFN)?;
    if let Some(groups) = m.router.groups {
        groups.check(m.num_experts, m.top_k)?;
    }
    let scale = m.router.routed_scaling_factor;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(format!(
            "`routed_scaling_factor` is {scale}, expected a positive number"
        ));
    }
    if m.dense_ffn > MAX_FFN {
        return Err(format!(
            "`intermediate_size` is {}, expected at most {MAX_FFN}",
            m.dense_ffn
        ));
    }
    if let Some(w) = m.shared_expert_ffn {
        check_size("shared_expert_intermediate_size", w, MAX_FFN)?;
    }
    if m.sparse_layers.len() != cfg.num_layers {
        return Err(format!(
            "{} layers marked sparse or dense for {} layers",
            m.sparse_layers.len(),
            cfg.num_layers
        ));
    }
    // Non-positive values load "fine" and make every logit NaN or every token 0.
    if !(cfg.rms_norm_eps.is_finite() && cfg.rms_norm_eps > 0.0) {
        return Err(format!(
            "`rms_norm_eps` is {}, expected a positive number",
            cfg.rms_norm_eps
        ));
    }
    if !(a.rope_theta.is_finite() && a.rope_theta > 0.0) {
        return Err(format!(
            "`rope_theta` is {}, expected a positive number",
            a.rope_theta
        ));
    }
    if let Some(c) = a.clip_qkv
        && !(c.is_finite() && c > 0.0)
    {
        return Err(format!("`clip_qkv` is {c}, expected a positive number"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::family::QWEN2_MOE;
    use crate::config::{AttentionConfig, MoeConfig, QkNorm, RouterSpec};

    fn largest() -> ModelConfig {
        ModelConfig {
            family: &QWEN2_MOE,
            vocab_size: MAX_VOCAB,
            hidden_size: MAX_HIDDEN,
            num_layers: MAX_LAYERS,
            max_position_embeddings: MAX_CONTEXT,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            attention: AttentionConfig {
                num_heads: MAX_HEADS,
                num_kv_heads: MAX_HEADS,
                head_dim: MAX_HEAD_DIM,
                rotary_dim: MAX_HEAD_DIM,
                rope_theta: 1e6,
                qkv_bias: true,
                o_bias: true,
                sinks: true,
                layer_windows: vec![Some(MAX_CONTEXT); MAX_LAYERS],
                qk_norm: QkNorm::Full,
                clip_qkv: None,
                yarn: None,
                rope_interleaved: false,
                mla: None,
            },
            moe: MoeConfig {
                num_experts: MAX_EXPERTS,
                top_k: MAX_EXPERTS,
                expert_ffn: MAX_FFN,
                expert_activation: Default::default(),
                router: RouterSpec {
                    norm_topk_prob: true,
                    ..RouterSpec::SOFTMAX
                },
                shared_expert_ffn: Some(MAX_FFN),
                sparse_layers: vec![true; MAX_LAYERS],
                dense_ffn: MAX_FFN,
            },
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            stored_dtype: None,
        }
    }

    #[test]
    fn parameter_counts_of_the_largest_valid_config_do_not_overflow() {
        let cfg = largest();
        validate(&cfg).unwrap();
        // Overflow panics here (tests build with overflow checks).
        let counts = cfg.parameter_counts();
        assert!(counts.total > counts.routed_experts && counts.total < 1 << 62);
    }

    #[test]
    fn each_bound_and_hyper_parameter_is_refused_by_name() {
        type Edit = Box<dyn Fn(&mut ModelConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("vocab_size", Box::new(|c| c.vocab_size = 0)),
            ("hidden_size", Box::new(|c| c.hidden_size = MAX_HIDDEN + 1)),
            ("num_hidden_layers", Box::new(|c| c.num_layers = 0)),
            (
                "max_position_embeddings",
                Box::new(|c| c.max_position_embeddings = usize::MAX),
            ),
            (
                "num_experts",
                Box::new(|c| c.moe.num_experts = MAX_EXPERTS + 1),
            ),
            ("rms_norm_eps", Box::new(|c| c.rms_norm_eps = -1e-6)),
            ("rms_norm_eps", Box::new(|c| c.rms_norm_eps = f64::NAN)),
            ("rope_theta", Box::new(|c| c.attention.rope_theta = 0.0)),
            (
                "rope_theta",
                Box::new(|c| c.attention.rope_theta = f64::INFINITY),
            ),
            ("clip_qkv", Box::new(|c| c.attention.clip_qkv = Some(-1.0))),
        ];
        for (field, edit) in cases {
            let mut cfg = largest();
            edit(&mut cfg);
            let err = validate(&cfg).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
