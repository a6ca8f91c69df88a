//! `config.json` as Hugging Face writes it, mapped to [`ModelConfig`].
//! Field names follow the upstream `configuration_*.py` files; transformers 5
//! renames a few (`rope_parameters`, `num_local_experts`), so both spellings load.
//! The fields every family reads alike are the serde struct below; the ones
//! families spell or default differently are read by the keys their
//! [`Family`] file declares.

use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::family::{Family, Flag, GluKind, RouterKeys, SparseLayers};
use super::{
    AttentionConfig, GroupLimit, GroupRank, MlaDims, ModelConfig, MoeConfig, QkNorm, RouterSpec,
    ScoreFn,
};
use crate::error::{Error, Result};
use crate::ops::{GluActivation, Yarn};
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

/// `rope_parameters` (transformers 5) or `rope_scaling` (Hub configs, which
/// spell `rope_type` as `type`).
#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    truncate: Option<bool>,
    /// transformers 5 moves GLM's top-level `partial_rotary_factor` here.
    partial_rotary_factor: Option<f64>,
    attention_factor: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
}

impl RopeParameters {
    /// The YaRN scaling these parameters describe; `None` for plain RoPE.
    fn yarn(&self, max_position_embeddings: usize) -> std::result::Result<Option<Yarn>, String> {
        match self.rope_type.as_deref() {
            None | Some("default") => Ok(None),
            Some("yarn") => {
                let original = self.original_max_position_embeddings.ok_or(
                    "rope_type \"yarn\" needs `original_max_position_embeddings`".to_string(),
                )?;
                // transformers: a missing factor is the context growth.
                let factor = self
                    .factor
                    .unwrap_or(max_position_embeddings as f64 / original.max(1) as f64);
                if !(factor.is_finite() && factor > 0.0) || original == 0 {
                    return Err(format!(
                        "yarn `factor` {factor} and `original_max_position_embeddings` {original} must be positive"
                    ));
                }
                Ok(Some(Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: self.beta_fast.unwrap_or(32.0),
                    beta_slow: self.beta_slow.unwrap_or(1.0),
                    truncate: self.truncate.unwrap_or(true),
                    attention_factor: self.attention_factor,
                    mscale: self.mscale,
                    mscale_all_dim: self.mscale_all_dim,
                }))
            }
            Some(kind) => Err(format!(
                "rope_type {kind:?} is not supported (only \"default\" and \"yarn\")"
            )),
        }
    }
}

/// The fields every family reads the same way.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[allow(dead_code)] // read first, by `parse_config`, to pick the family
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
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    clip_qkv: Option<f64>,
    sliding_window: Option<usize>,
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
    let family = Family::by_model_type(model_type).ok_or_else(|| Error::UnknownArchitecture {
        found: model_type.to_string(),
        supported: Family::supported_model_types(),
    })?;
    let raw: HfConfig = from_json(text, path)?;
    let keyed = Keyed { json: &probe, path };
    map_config(family, raw, &keyed, path)
}

/// `config.json` read by the keys a family file names.
struct Keyed<'a> {
    json: &'a serde_json::Value,
    path: &'a Path,
}

impl Keyed<'_> {
    /// The value of the first of `keys` present and not null; every one
    /// present must have the type.
    fn get<T: DeserializeOwned>(&self, keys: &[&str]) -> Result<Option<T>> {
        let mut first = None;
        for key in keys {
            let Some(value) = self.json.get(key) else {
                continue;
            };
            let parsed: Option<T> = serde_json::from_value(value.clone())
                .map_err(|e| Error::config(self.path, format!("field `{key}`: {e}")))?;
            if first.is_none() {
                first = parsed;
            }
        }
        Ok(first)
    }

    fn flag(&self, flag: Flag) -> Result<bool> {
        Ok(self.get(flag.keys)?.unwrap_or(flag.default))
    }
}

fn map_config(
    family: &'static Family,
    raw: HfConfig,
    keyed: &Keyed<'_>,
    path: &Path,
) -> Result<ModelConfig> {
    let bad = |reason: String| Error::config(path, reason);
    let keys = &family.hf;

    for &switch in keys.unsupported_switches {
        if keyed.get::<bool>(&[switch])? == Some(true) {
            return Err(bad(format!(
                "`{switch}: true` is not supported for {}",
                family.model_type()
            )));
        }
    }
    let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
    let yarn = match rope {
        Some(r) => r.yarn(raw.max_position_embeddings).map_err(bad)?,
        None => None,
    };
    let rope_theta = raw
        .rope_parameters
        .as_ref()
        .and_then(|r| r.rope_theta)
        .or(raw.rope_theta)
        .ok_or_else(|| bad("missing `rope_theta` (or `rope_parameters.rope_theta`)".into()))?;
    let layer_windows = if family.attention.layer_types {
        layer_windows(keyed, raw.sliding_window, raw.num_hidden_layers)?
    } else {
        Vec::new()
    };
    if raw.sliding_window.is_some() && !family.attention.layer_types {
        match keys.sliding_window_switch {
            Some(switch) if keyed.get::<bool>(&[switch])? == Some(true) => {
                return Err(bad(format!(
                    "sliding-window attention is not supported (`{switch}` is true)"
                )));
            }
            Some(_) => {}
            None => {
                return Err(bad(
                    "sliding-window attention is not supported (`sliding_window` is set)".into(),
                ));
            }
        }
    }

    let num_heads = raw.num_attention_heads;
    let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(bad(format!(
            "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
        )));
    }
    let mla = if family.attention.latent {
        Some(mla_dims(keyed)?)
    } else {
        None
    };
    if mla.is_some() && keyed.flag(keys.qkv_bias)? {
        return Err(bad(
            "`attention_bias` with multi-head latent attention is not supported".into(),
        ));
    }
    // MLA's rotary table spans the rotary part of each head, as transformers
    // sets `head_dim = qk_rope_head_dim`.
    let head_dim = match mla {
        Some(m) => m.qk_rope_head_dim,
        None => raw.head_dim.unwrap_or(raw.hidden_size / num_heads),
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(bad(format!(
            "head_dim {head_dim} must be even and positive"
        )));
    }
    let rotary_dim = rotary_dim(
        head_dim,
        rope.and_then(|r| r.partial_rotary_factor)
            .or(raw.partial_rotary_factor),
    )
    .map_err(bad)?;
    let qk_norm = match family.attention.qk_norm_switch {
        Some(switch) if keyed.get::<bool>(&[switch])? != Some(true) => QkNorm::None,
        _ => family.attention.qk_norm,
    };

    let required = |keys: &[&str]| -> Result<usize> {
        keyed.get(keys)?.ok_or_else(|| {
            let names: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
            bad(format!("missing field {}", names.join(" or ")))
        })
    };
    let num_experts = required(keys.num_experts)?;
    let top_k = required(keys.top_k)?;
    if top_k == 0 || top_k > num_experts {
        return Err(bad(format!(
            "{} ({top_k}) must be between 1 and the number of experts ({num_experts})",
            keys.top_k.first().unwrap_or(&"num_experts_per_tok")
        )));
    }
    let expert_ffn = required(keys.expert_ffn)?;
    let expert_activation = match family.experts.activation {
        GluKind::SiLU => GluActivation::SiLU,
        GluKind::Clamped { alpha, limit } => {
            let read = |(keys, default): (&[&str], f32)| -> Result<f32> {
                let v = keyed.get::<f32>(keys)?.unwrap_or(default);
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad(format!(
                        "`{}` is {v}, expected a positive number",
                        keys.join("` / `")
                    )));
                }
                Ok(v)
            };
            GluActivation::Clamped {
                alpha: read(alpha)?,
                limit: read(limit)?,
            }
        }
    };
    let dense_ffn = keyed.get(keys.dense_ffn)?.unwrap_or(0);
    let shared_expert_ffn = match keyed.get::<usize>(keys.shared_experts)? {
        Some(n) => Some(n * expert_ffn),
        None => keyed.get(keys.shared_expert_ffn)?,
    }
    .filter(|&w| w > 0);

    // Before the per-layer table below is allocated from it.
    super::limits::check_size(
        "num_hidden_layers",
        raw.num_hidden_layers,
        super::limits::MAX_LAYERS,
    )
    .map_err(bad)?;
    let sparse_layers = match keys.sparse_layers {
        SparseLayers::Step { step, dense } => {
            let step = keyed.get::<usize>(&[step])?.unwrap_or(1);
            let dense_layers = keyed.get::<Vec<usize>>(&[dense])?.unwrap_or_default();
            if let Some(&l) = dense_layers.iter().find(|&&l| l >= raw.num_hidden_layers) {
                return Err(bad(format!(
                    "{dense} names layer {l}, but the model has {} layers",
                    raw.num_hidden_layers
                )));
            }
            (0..raw.num_hidden_layers)
                .map(|l| !dense_layers.contains(&l) && step > 0 && (l + 1) % step == 0)
                .collect()
        }
        SparseLayers::FirstDense { first_dense, step } => {
            let first = keyed.get::<usize>(&[first_dense])?.unwrap_or(0);
            let every = keyed.get::<usize>(&[step])?.unwrap_or(1);
            if every == 0 {
                return Err(bad(format!("`{step}` must be at least 1")));
            }
            (0..raw.num_hidden_layers)
                .map(|l| l >= first && l.is_multiple_of(every))
                .collect()
        }
        SparseLayers::Interval {
            start,
            end,
            interval,
        } => {
            let first = keyed.get::<usize>(&[start])?.unwrap_or(1);
            let last = match keyed.get::<i64>(&[end])? {
                None | Some(-1) => raw.num_hidden_layers.saturating_sub(1),
                Some(l) => usize::try_from(l)
                    .map_err(|_| bad(format!("`{end}` {l} must be a layer index or -1")))?,
            };
            let every = keyed.get::<usize>(&[interval])?.unwrap_or(1);
            if every == 0 {
                return Err(bad(format!("`{interval}` must be at least 1")));
            }
            (0..raw.num_hidden_layers)
                .map(|l| (first..=last).contains(&l) && (l + 1).is_multiple_of(every))
                .collect()
        }
        SparseLayers::All => vec![true; raw.num_hidden_layers],
    };
    let moe = MoeConfig {
        num_experts,
        top_k,
        expert_ffn,
        expert_activation,
        router: router_spec(
            family,
            keyed,
            RouterSpec {
                norm_topk_prob: (keyed.get(keys.norm_topk_prob)?)
                    .unwrap_or(family.router.norm_topk_prob),
                ..family.router
            },
        )?,
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
        family,
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
            rotary_dim,
            rope_theta,
            qkv_bias: keyed.flag(keys.qkv_bias)?,
            o_bias: family.attention.output_bias && keyed.flag(keys.qkv_bias)?,
            sinks: family.attention.sinks,
            layer_windows,
            qk_norm,
            clip_qkv: raw.clip_qkv,
            yarn,
            rope_interleaved: keyed.flag(family.attention.rope_interleave)?,
            mla,
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

/// The rotated width of each head: transformers' `int(head_dim * factor)`,
/// which must leave whole rotary pairs.
fn rotary_dim(head_dim: usize, factor: Option<f64>) -> std::result::Result<usize, String> {
    let Some(f) = factor else {
        return Ok(head_dim);
    };
    let dim = (head_dim as f64 * f) as usize;
    if !(f > 0.0 && f <= 1.0) || dim == 0 || !dim.is_multiple_of(2) {
        return Err(format!(
            "`partial_rotary_factor` {f} must be in (0, 1] and turn an even number of head_dim {head_dim}'s dimensions (got {dim})"
        ));
    }
    Ok(dim)
}

/// Per layer, `sliding_window` where `layer_types` says `sliding_attention`
/// (without `layer_types`, every other layer from the first, as transformers'
/// `GptOssConfig` defaults it).
fn layer_windows(
    keyed: &Keyed<'_>,
    window: Option<usize>,
    num_layers: usize,
) -> Result<Vec<Option<usize>>> {
    let bad = |reason: String| Error::config(keyed.path, reason);
    let types = match keyed.get::<Vec<String>>(&["layer_types"])? {
        Some(types) => types,
        None => (0..num_layers)
            .map(|l| ["sliding_attention", "full_attention"][l % 2].to_string())
            .collect(),
    };
    if types.len() != num_layers {
        return Err(bad(format!(
            "`layer_types` lists {} layers, but the model has {num_layers}",
            types.len()
        )));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(None),
            "sliding_attention" => match window {
                Some(w) if w > 0 => Ok(Some(w)),
                _ => Err(bad(
                    "a `sliding_attention` layer needs a positive `sliding_window`".into(),
                )),
            },
            other => Err(bad(format!(
                "layer type {other:?} is not supported (\"sliding_attention\" or \"full_attention\")"
            ))),
        })
        .collect()
}

/// Multi-head latent attention's widths, as transformers' DeepSeek configs name them.
fn mla_dims(keyed: &Keyed<'_>) -> Result<MlaDims> {
    let need = |key: &str| -> Result<usize> {
        match keyed.get::<usize>(&[key])? {
            Some(v) if v > 0 => Ok(v),
            Some(_) => Err(Error::config(
                keyed.path,
                format!("`{key}` must be positive"),
            )),
            None => Err(Error::config(keyed.path, format!("missing field `{key}`"))),
        }
    };
    let dims = MlaDims {
        q_lora_rank: keyed.get::<usize>(&["q_lora_rank"])?.filter(|&r| r > 0),
        kv_lora_rank: need("kv_lora_rank")?,
        qk_nope_head_dim: need("qk_nope_head_dim")?,
        qk_rope_head_dim: need("qk_rope_head_dim")?,
        v_head_dim: need("v_head_dim")?,
    };
    if !dims.qk_rope_head_dim.is_multiple_of(2) {
        return Err(Error::config(
            keyed.path,
            format!("`qk_rope_head_dim` {} must be even", dims.qk_rope_head_dim),
        ));
    }
    Ok(dims)
}

/// The family's router completed by the config's [`RouterKeys`].
fn router_spec(family: &Family, keyed: &Keyed<'_>, mut spec: RouterSpec) -> Result<RouterSpec> {
    let keys: RouterKeys = family.hf.router;
    let bad = |reason: String| Error::config(keyed.path, reason);
    if let Some(f) = keyed.get::<String>(keys.scoring_func)? {
        spec.score = match f.as_str() {
            "softmax" => ScoreFn::Softmax,
            "sigmoid" => ScoreFn::Sigmoid,
            other => {
                return Err(bad(format!(
                    "scoring_func {other:?} is not supported (\"softmax\" or \"sigmoid\")"
                )));
            }
        };
    }
    // Checked with the rest of the limits (`limits::validate`).
    if let Some(s) = keyed.get::<f32>(keys.routed_scaling_factor)? {
        spec.routed_scaling_factor = s;
    }
    if let Some(m) = keyed.get::<f32>(keys.norm_min)? {
        if !(m.is_finite() && m >= 0.0) {
            return Err(bad(format!(
                "`{}` {m} must be finite and not negative",
                keys.norm_min[0]
            )));
        }
        spec.norm_min = m;
    }
    let rank = match keyed.get::<String>(keys.topk_method)?.as_deref() {
        None => spec.groups.map(|g| g.rank),
        Some("greedy") => None,
        Some("group_limited_greedy") => Some(GroupRank::Best),
        Some("noaux_tc") => Some(GroupRank::SumOfTopTwo),
        Some(other) => {
            return Err(bad(format!(
                "topk_method {other:?} is not supported (\"greedy\", \"group_limited_greedy\" or \"noaux_tc\")"
            )));
        }
    };
    spec.groups = match rank {
        Some(rank) => Some(GroupLimit {
            n_group: keyed.get(keys.n_group)?.unwrap_or(1),
            topk_group: keyed.get(keys.topk_group)?.unwrap_or(1),
            rank,
        }),
        None => None,
    };
    Ok(spec)
}

/// `config.json` for a model Switchyard trained, with the fields transformers 5
/// writes for its family (`qwen3_moe` / `qwen2_moe`: those with an `export`).
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
        "model_type": cfg.family.model_type(),
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
        "norm_topk_prob": m.router.norm_topk_prob,
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
    let export = cfg.family.hf.export.ok_or_else(|| {
        Error::InvalidInput(format!(
            "to_hf_json: {} is not a family train writes",
            cfg.family.model_type()
        ))
    })?;
    export(cfg, obj);
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-V2-Lite's `config.json` as the Hub ships it (trimmed to tiny
    /// sizes): `rope_scaling` with `type`, a top-level `rope_theta`.
    const V2_LITE: &str = r#"{
        "model_type": "deepseek_v2", "vocab_size": 100, "hidden_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "q_lora_rank": null, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 24, "intermediate_size": 80,
        "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "topk_method": "greedy", "scoring_func": "softmax", "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "norm_topk_prob": false, "attention_bias": false
    }"#;

    fn parse(text: &str) -> Result<ModelConfig> {
        parse_config(text, Path::new("config.json"))
    }

    fn with(over: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(V2_LITE).unwrap();
        let over: serde_json::Value = serde_json::from_str(over).unwrap();
        for (k, x) in over.as_object().unwrap() {
            v[k] = x.clone();
        }
        v.to_string()
    }

    /// GLM-4.5-Air's `config.json` as the Hub ships it (trimmed to tiny sizes):
    /// a top-level `partial_rotary_factor`, `use_qk_norm` false, q/k/v biases.
    const GLM45_AIR: &str = r#"{
        "model_type": "glm4_moe", "vocab_size": 100, "hidden_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "partial_rotary_factor": 0.5, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000, "rope_scaling": null,
        "attention_bias": true, "use_qk_norm": false, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 24, "intermediate_size": 80,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "norm_topk_prob": true, "num_nextn_predict_layers": 1
    }"#;

    #[test]
    fn glm4_moe_hub_and_transformers_5_spellings_agree() {
        let hub = parse(GLM45_AIR).unwrap();
        let a = &hub.attention;
        assert_eq!((a.head_dim, a.rotary_dim), (16, 8));
        assert!(a.qkv_bias);
        assert_eq!(a.qk_norm, QkNorm::None);
        assert_eq!(hub.moe.sparse_layers, [false, true, true]);
        assert_eq!(hub.moe.shared_expert_ffn, Some(24));
        assert_eq!(hub.moe.router.score, ScoreFn::Sigmoid);
        // transformers 5 moves the factor into `rope_parameters`.
        let mut v: serde_json::Value = serde_json::from_str(GLM45_AIR).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("partial_rotary_factor");
        obj.remove("rope_theta");
        obj.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
        );
        obj.insert("use_qk_norm".into(), true.into());
        let t5 = parse(&v.to_string()).unwrap();
        assert_eq!(t5.attention.rotary_dim, 8);
        assert_eq!(t5.attention.rope_theta, 1e6);
        assert_eq!(t5.attention.qk_norm, QkNorm::PerHead);
        // A factor that leaves half a rotary pair is refused, naming the key.
        v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.1});
        let err = parse(&v.to_string()).unwrap_err().to_string();
        assert!(err.contains("partial_rotary_factor"), "{err}");
    }

    #[test]
    fn deepseek_v2_lite_hub_config_maps_every_key() {
        let cfg = parse(V2_LITE).unwrap();
        let a = &cfg.attention;
        let mla = a.mla.unwrap();
        assert_eq!(mla.q_lora_rank, None);
        assert_eq!(
            (mla.kv_lora_rank, mla.qk_head_dim(), mla.v_head_dim),
            (32, 24, 16)
        );
        // The rotary table spans qk_rope_head_dim, as transformers sets head_dim.
        assert_eq!(a.head_dim, 8);
        assert_eq!(a.rope_theta, 10000.0);
        assert!(a.rope_interleaved);
        let yarn = a.yarn.unwrap();
        assert_eq!(
            (yarn.factor, yarn.original_max_position_embeddings),
            (40.0, 4096)
        );
        // 1/sqrt(24) * (0.1 * 0.707 * ln 40 + 1)^2
        let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
        assert!((a.softmax_scale() - m * m / 24f64.sqrt()).abs() < 1e-12);
        let moe = &cfg.moe;
        assert_eq!(moe.sparse_layers, [false, true, true, true]);
        // Two shared experts of moe_intermediate_size each, one SwiGLU.
        assert_eq!(moe.shared_expert_ffn, Some(48));
        assert_eq!(moe.router, RouterSpec::SOFTMAX);
    }

    #[test]
    fn deepseek_router_keys_complete_the_family_spec() {
        let cfg = parse(&with(
            r#"{"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                "routed_scaling_factor": 16.0, "moe_layer_freq": 2, "first_k_dense_replace": 0}"#,
        ))
        .unwrap();
        let r = cfg.moe.router;
        assert_eq!(
            r.groups,
            Some(GroupLimit {
                n_group: 4,
                topk_group: 2,
                rank: GroupRank::Best
            })
        );
        assert_eq!(r.routed_scaling_factor, 16.0);
        assert_eq!(cfg.moe.sparse_layers, [true, false, true, false]);
        // V3: sigmoid and noaux_tc whatever the (ignored) method keys say, as
        // transformers; transformers 5's `rope_parameters` spelling.
        let v3 = parse(&with(
            r#"{"model_type": "deepseek_v3", "topk_method": "greedy", "n_group": 2,
                "topk_group": 1, "norm_topk_prob": true, "rope_scaling": null,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}"#,
        ))
        .unwrap();
        let r = v3.moe.router;
        assert_eq!(r.score, ScoreFn::Sigmoid);
        assert!(r.norm_topk_prob);
        assert_eq!(
            r.groups.map(|g| (g.n_group, g.rank)),
            Some((2, GroupRank::SumOfTopTwo))
        );
        assert_eq!(v3.attention.rope_theta, 5e5);
        assert_eq!(v3.attention.yarn, None);
    }

    /// ERNIE-4.5-21B-A3B's `config.json` keys as the Hub ships them (tiny sizes).
    const ERNIE: &str = r#"{
        "model_type": "ernie4_5_moe", "vocab_size": 100, "hidden_size": 64,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 500000, "use_bias": false, "tie_word_embeddings": true,
        "intermediate_size": 96, "moe_intermediate_size": 24, "moe_num_experts": 8,
        "moe_k": 2, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
        "moe_layer_end_index": 4, "moe_layer_interval": 1, "moe_norm_min": 1e-9
    }"#;

    fn ernie_with(over: &str) -> Result<ModelConfig> {
        let mut v: serde_json::Value = serde_json::from_str(ERNIE).unwrap();
        let over: serde_json::Value = serde_json::from_str(over).unwrap();
        for (k, x) in over.as_object().unwrap() {
            v[k] = x.clone();
        }
        parse(&v.to_string())
    }

    #[test]
    fn ernie_hub_config_maps_moe_layers_top_k_and_norm_min() {
        let cfg = parse(ERNIE).unwrap();
        let moe = &cfg.moe;
        assert_eq!((moe.num_experts, moe.top_k), (8, 2));
        assert_eq!(moe.sparse_layers, [false, true, true, true, true, false]);
        assert_eq!(moe.shared_expert_ffn, Some(48));
        assert!(moe.router.norm_topk_prob);
        assert_eq!(moe.router.norm_min, 1e-9);
        assert!(cfg.attention.rope_interleaved);
        // transformers' rule: layer l is sparse when (l + 1) % interval == 0,
        // and -1 ends at the last layer.
        let every_second = ernie_with(
            r#"{"moe_layer_interval": 2, "moe_layer_start_index": 0, "moe_layer_end_index": -1}"#,
        )
        .unwrap();
        assert_eq!(
            every_second.moe.sparse_layers,
            [false, true, false, true, false, true]
        );
        let defaults = ernie_with(
            r#"{"moe_layer_interval": null, "moe_layer_start_index": null,
                "moe_layer_end_index": null, "moe_norm_min": null}"#,
        )
        .unwrap();
        assert_eq!(
            defaults.moe.sparse_layers,
            [false, true, true, true, true, true]
        );
        assert_eq!(defaults.moe.router.norm_min, 1e-12);
    }

    #[test]
    fn ernie_config_errors_name_the_field() {
        for (over, needle) in [
            (r#"{"use_bias": true}"#, "`use_bias: true` is not supported"),
            (r#"{"moe_k": 9}"#, "moe_k (9)"),
            (r#"{"moe_k": null}"#, "`moe_k` or `num_experts_per_tok`"),
            (
                r#"{"moe_layer_interval": 0}"#,
                "`moe_layer_interval` must be at least 1",
            ),
            (r#"{"moe_layer_end_index": -3}"#, "`moe_layer_end_index` -3"),
            (r#"{"moe_norm_min": -1.0}"#, "`moe_norm_min` -1"),
        ] {
            let err = ernie_with(over).unwrap_err().to_string();
            assert!(err.contains(needle), "{over}: {err}");
        }
    }

    #[test]
    fn deepseek_config_errors_name_the_field() {
        for (over, needle) in [
            (r#"{"topk_method": "top1"}"#, "topk_method \"top1\""),
            (r#"{"scoring_func": "relu"}"#, "scoring_func \"relu\""),
            (r#"{"kv_lora_rank": null}"#, "`kv_lora_rank`"),
            (
                r#"{"qk_rope_head_dim": 7}"#,
                "`qk_rope_head_dim` 7 must be even",
            ),
            (r#"{"attention_bias": true}"#, "`attention_bias`"),
            (
                r#"{"moe_layer_freq": 0}"#,
                "`moe_layer_freq` must be at least 1",
            ),
            (
                r#"{"topk_method": "group_limited_greedy", "n_group": 3}"#,
                "`n_group` 3",
            ),
            (
                r#"{"rope_scaling": {"type": "dynamic", "factor": 2}}"#,
                "\"dynamic\"",
            ),
        ] {
            let err = parse(&with(over)).unwrap_err().to_string();
            assert!(err.contains(needle), "{over}: {err}");
        }
    }
}

#[cfg(test)]
mod gpt_oss_tests {
    use super::*;
    use crate::config::family::GPT_OSS;

    /// gpt-oss-20b's `config.json` as the Hub ships it, trimmed to tiny sizes.
    const GPT_OSS_20B: &str = r#"{
        "model_type": "gpt_oss", "vocab_size": 100, "hidden_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 32.0,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false,
            "original_max_position_embeddings": 64},
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "sliding_window": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
        "experts_per_token": 2, "intermediate_size": 32, "swiglu_limit": 7.0,
        "attention_bias": true
    }"#;

    fn parse(over: &str) -> Result<ModelConfig> {
        let mut v: serde_json::Value = serde_json::from_str(GPT_OSS_20B).unwrap();
        let over: serde_json::Value = serde_json::from_str(over).unwrap();
        for (k, x) in over.as_object().unwrap() {
            v[k] = x.clone();
        }
        parse_config(&v.to_string(), Path::new("config.json"))
    }

    #[test]
    fn hub_config_maps_windows_sinks_biases_and_the_clamped_swiglu() {
        let cfg = parse("{}").unwrap();
        assert_eq!(cfg.family, &GPT_OSS);
        let a = &cfg.attention;
        assert_eq!(a.layer_windows, [Some(8), None, Some(8)]);
        assert!(a.qkv_bias && a.o_bias && a.sinks);
        assert!(!a.yarn.unwrap().truncate);
        assert_eq!(cfg.moe.expert_ffn, 32);
        assert_eq!(cfg.moe.sparse_layers, [true; 3]);
        assert_eq!(
            cfg.moe.expert_activation,
            GluActivation::Clamped {
                alpha: 1.702,
                limit: 7.0
            }
        );
        assert_eq!(cfg.moe.router.score, ScoreFn::SoftmaxOfTopK);
        // Without `layer_types`, every other layer from the first slides.
        let cfg = parse(r#"{"layer_types": null, "swiglu_alpha": 2.0, "attention_bias": false}"#)
            .unwrap();
        assert_eq!(cfg.attention.layer_windows, [Some(8), None, Some(8)]);
        assert!(!cfg.attention.qkv_bias && !cfg.attention.o_bias);
        assert!(matches!(
            cfg.moe.expert_activation,
            GluActivation::Clamped { alpha: 2.0, .. }
        ));
    }

    #[test]
    fn gpt_oss_config_errors_name_the_field() {
        for (over, needle) in [
            (
                r#"{"layer_types": ["full_attention"]}"#,
                "`layer_types` lists 1",
            ),
            (
                r#"{"layer_types": ["chunked_attention", "full_attention", "full_attention"]}"#,
                "\"chunked_attention\"",
            ),
            (r#"{"sliding_window": null}"#, "positive `sliding_window`"),
            (r#"{"swiglu_limit": -1.0}"#, "`swiglu_limit` is -1"),
        ] {
            let err = parse(over).unwrap_err().to_string();
            assert!(err.contains(needle), "{over}: {err}");
        }
    }
}
