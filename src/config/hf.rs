//! `config.json` as Hugging Face writes it, mapped to [`ModelConfig`].
//! Field names follow the upstream `configuration_*.py` files; transformers 5
//! renames a few (`rope_parameters`, `num_local_experts`), so both spellings load.

use std::path::Path;

use serde::Deserialize;

use super::{Arch, AttentionConfig, ModelConfig, MoeConfig, QkNorm};
use crate::error::{Error, Result};
use crate::weights::StoredDtype;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(id) => vec![id],
            OneOrMany::Many(ids) => ids,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

/// The union of the fields the supported architectures use.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[allow(dead_code)] // read first, by `parse_config`, to pick the architecture
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<RopeParameters>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    qkv_bias: Option<bool>,
    clip_qkv: Option<f64>,
    use_sliding_window: Option<bool>,
    sliding_window: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GenerationConfig {
    eos_token_id: Option<OneOrMany>,
}

/// Reads `config.json` (and the EOS ids of `generation_config.json`, if present).
pub fn load_model_config(dir: &Path) -> Result<ModelConfig> {
    if dir.is_file() {
        return Err(Error::config(
            dir,
            "is a file, not a model directory or GGUF file: pass the directory that holds config.json",
        ));
    }
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        ));
    }
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut cfg = parse_config(&text, &path)?;
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let text = std::fs::read_to_string(&gen_path).map_err(|e| Error::io(&gen_path, e))?;
        let gen_cfg: GenerationConfig = from_json(&text, &gen_path)?;
        for id in gen_cfg
            .eos_token_id
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
        {
            if !cfg.eos_token_ids.contains(&id) {
                cfg.eos_token_ids.push(id);
            }
        }
    }
    Ok(cfg)
}

fn from_json<'a, T: Deserialize<'a>>(text: &'a str, path: &Path) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        if field == "." {
            Error::config(path, inner.to_string())
        } else {
            Error::config(path, format!("field `{field}`: {inner}"))
        }
    })
}

/// `config.json` text (`path` names it in errors) mapped and validated.
pub fn parse_config(text: &str, path: &Path) -> Result<ModelConfig> {
    // Check the architecture first: an unknown model_type should say so, not
    // complain about a field that architecture happens not to have.
    let probe: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
    let model_type = probe
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::config(path, "missing string field `model_type`"))?;
    let arch = Arch::from_model_type(model_type).ok_or_else(|| Error::UnknownArchitecture {
        found: model_type.to_string(),
        supported: Arch::ALL.iter().map(|a| a.model_type()).collect(),
    })?;
    let raw: HfConfig = from_json(text, path)?;
    map_config(arch, raw, path)
}

fn map_config(arch: Arch, raw: HfConfig, path: &Path) -> Result<ModelConfig> {
    let bad = |reason: String| Error::config(path, reason);
    let require = |value: Option<usize>, field: &str| {
        value.ok_or_else(|| Error::config(path, format!("missing field `{field}`")))
    };

    let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
    if let Some(kind) = rope.and_then(|r| r.rope_type.as_deref())
        && kind != "default"
    {
        return Err(bad(format!(
            "rope_type {kind:?} is not supported (only \"default\")"
        )));
    }
    let rope_theta = raw
        .rope_parameters
        .as_ref()
        .and_then(|r| r.rope_theta)
        .or(raw.rope_theta)
        .ok_or_else(|| bad("missing `rope_theta` (or `rope_parameters.rope_theta`)".into()))?;
    if raw.use_sliding_window == Some(true) && raw.sliding_window.is_some() {
        return Err(bad("sliding-window attention is not supported".into()));
    }
    if arch == Arch::Mixtral && raw.sliding_window.is_some() {
        return Err(bad(
            "sliding-window attention is not supported (`sliding_window` is set)".into(),
        ));
    }

    let num_heads = raw.num_attention_heads;
    let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(bad(format!(
            "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
        )));
    }
    let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / num_heads);
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(bad(format!(
            "head_dim {head_dim} must be even and positive"
        )));
    }

    let num_experts = require(raw.num_experts.or(raw.num_local_experts), "num_experts")?;
    let top_k = require(raw.num_experts_per_tok, "num_experts_per_tok")?;
    if top_k == 0 || top_k > num_experts {
        return Err(bad(format!(
            "num_experts_per_tok ({top_k}) must be between 1 and num_experts ({num_experts})"
        )));
    }

    let (expert_ffn, dense_ffn, qk_norm, qkv_bias, norm_topk_prob, shared_expert_ffn) = match arch {
        Arch::Qwen3Moe => (
            require(raw.moe_intermediate_size, "moe_intermediate_size")?,
            raw.intermediate_size.unwrap_or(0),
            QkNorm::PerHead,
            raw.attention_bias.unwrap_or(false),
            raw.norm_topk_prob.unwrap_or(false),
            None,
        ),
        // Mixtral's softmax runs over the top-k logits only, which equals a full
        // softmax followed by renormalising the top-k.
        Arch::Mixtral => (
            require(raw.intermediate_size, "intermediate_size")?,
            0,
            QkNorm::None,
            false,
            true,
            None,
        ),
        // Qwen2 always has q/k/v biases.
        Arch::Qwen2Moe => (
            require(raw.moe_intermediate_size, "moe_intermediate_size")?,
            raw.intermediate_size.unwrap_or(0),
            QkNorm::None,
            raw.qkv_bias.unwrap_or(true),
            raw.norm_topk_prob.unwrap_or(false),
            raw.shared_expert_intermediate_size.filter(|&w| w > 0),
        ),
        Arch::Olmoe => (
            require(raw.intermediate_size, "intermediate_size")?,
            0,
            QkNorm::Full,
            raw.attention_bias.unwrap_or(false),
            raw.norm_topk_prob.unwrap_or(false),
            None,
        ),
    };

    // Before the per-layer table below is allocated from it.
    super::limits::check_size(
        "num_hidden_layers",
        raw.num_hidden_layers,
        super::limits::MAX_LAYERS,
    )
    .map_err(bad)?;
    let sparse_layers = match arch {
        Arch::Qwen3Moe | Arch::Qwen2Moe => {
            let step = raw.decoder_sparse_step.unwrap_or(1);
            let dense = raw.mlp_only_layers.clone().unwrap_or_default();
            if let Some(&l) = dense.iter().find(|&&l| l >= raw.num_hidden_layers) {
                return Err(bad(format!(
                    "mlp_only_layers names layer {l}, but the model has {} layers",
                    raw.num_hidden_layers
                )));
            }
            (0..raw.num_hidden_layers)
                .map(|l| !dense.contains(&l) && step > 0 && (l + 1) % step == 0)
                .collect()
        }
        Arch::Mixtral | Arch::Olmoe => vec![true; raw.num_hidden_layers],
    };
    let moe = MoeConfig {
        num_experts,
        top_k,
        expert_ffn,
        norm_topk_prob,
        shared_expert_ffn,
        sparse_layers,
        dense_ffn,
    };
    if moe.sparse_layers.iter().any(|s| !s) && moe.dense_ffn == 0 {
        return Err(bad(
            "a dense layer needs `intermediate_size`, which is missing".into(),
        ));
    }

    let stored_dtype = match raw.dtype.as_deref().or(raw.torch_dtype.as_deref()) {
        Some("float32") => Some(StoredDtype::F32),
        Some("float16") => Some(StoredDtype::F16),
        Some("bfloat16") => Some(StoredDtype::BF16),
        _ => None,
    };

    let cfg = ModelConfig {
        arch,
        vocab_size: raw.vocab_size,
        hidden_size: raw.hidden_size,
        num_layers: raw.num_hidden_layers,
        max_position_embeddings: raw.max_position_embeddings,
        rms_norm_eps: raw.rms_norm_eps,
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        attention: AttentionConfig {
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            qkv_bias,
            qk_norm,
            clip_qkv: raw.clip_qkv,
        },
        moe,
        bos_token_id: raw.bos_token_id,
        eos_token_ids: raw
            .eos_token_id
            .map(OneOrMany::into_vec)
            .unwrap_or_default(),
        stored_dtype,
    };
    super::limits::validate(&cfg).map_err(bad)?;
    Ok(cfg)
}

/// `config.json` for a model Switchyard trained, with the fields transformers 5
/// writes for `qwen3_moe` / `qwen2_moe` (the only architectures `train` emits).
/// Every layer is sparse; `intermediate_size` is required by transformers but unused.
pub fn to_hf_json(cfg: &ModelConfig) -> Result<serde_json::Value> {
    let a = &cfg.attention;
    let m = &cfg.moe;
    if m.sparse_layers.iter().any(|s| !s) {
        return Err(Error::InvalidInput(
            "to_hf_json writes all-sparse models only".into(),
        ));
    }
    let dtype = match cfg.stored_dtype {
        Some(StoredDtype::BF16) => "bfloat16",
        Some(StoredDtype::F16) => "float16",
        _ => "float32",
    };
    let mut json = serde_json::json!({
        "model_type": cfg.arch.model_type(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": { "rope_theta": a.rope_theta, "rope_type": "default" },
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "use_sliding_window": false,
        "sliding_window": null,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "intermediate_size": m.expert_ffn * m.top_k,
        "moe_intermediate_size": m.expert_ffn,
        "num_experts_per_tok": m.top_k,
        "norm_topk_prob": m.norm_topk_prob,
        "output_router_logits": false,
        "router_aux_loss_coef": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids.first(),
        "pad_token_id": null,
        "dtype": dtype,
    });
    let obj = json
        .as_object_mut()
        .ok_or_else(|| Error::InvalidInput("config JSON is not an object".into()))?;
    match cfg.arch {
        Arch::Qwen3Moe => {
            obj.insert(
                "architectures".into(),
                serde_json::json!(["Qwen3MoeForCausalLM"]),
            );
            obj.insert("attention_bias".into(), a.qkv_bias.into());
            obj.insert("num_local_experts".into(), m.num_experts.into());
        }
        Arch::Qwen2Moe => {
            obj.insert(
                "architectures".into(),
                serde_json::json!(["Qwen2MoeForCausalLM"]),
            );
            obj.insert("qkv_bias".into(), a.qkv_bias.into());
            obj.insert("num_experts".into(), m.num_experts.into());
            obj.insert(
                "shared_expert_intermediate_size".into(),
                m.shared_expert_ffn.unwrap_or(0).into(),
            );
            obj.insert(
                "layer_types".into(),
                serde_json::json!(vec!["full_attention"; cfg.num_layers]),
            );
            obj.insert("max_window_layers".into(), cfg.num_layers.into());
        }
        other => {
            return Err(Error::InvalidInput(format!(
                "to_hf_json: {} is not an architecture train writes",
                other.model_type()
            )));
        }
    }
    Ok(json)
}
