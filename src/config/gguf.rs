//! GGUF metadata (keys as llama.cpp's `convert_hf_to_gguf.py` writes them,
//! `{arch}.block_count`, `{arch}.expert_count`, ...) mapped to [`ModelConfig`].
//! What the metadata does not say is read off the tensor table: which layers are
//! sparse (`blk.N.ffn_gate_inp`), q/k/v biases, tied embeddings. What differs
//! by family (its `general.architecture`, which keys hold the expert width) is
//! in its [`Family`] file.

use super::family::{FAMILIES, Family, GgufKeys, GgufVariant};
use super::{
    AttentionConfig, GroupLimit, MlaDims, ModelConfig, MoeConfig, QkNorm, RouterSpec, ScoreFn,
};
use crate::error::{Error, Result};
use crate::ops::Yarn;
use crate::weights::{GgufFile, GgufSource, GgufValue, QkHeads, StoredDtype};

use super::limits::{MAX_CONTEXT, MAX_EXPERTS};

/// `general.file_type` (llama.cpp `LlamaFileType`) for unquantized files.
fn stored_dtype(file_type: u64) -> Option<StoredDtype> {
    match file_type {
        0 => Some(StoredDtype::F32),
        1 => Some(StoredDtype::F16),
        32 => Some(StoredDtype::BF16),
        _ => None,
    }
}

struct Meta<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl Meta<'_> {
    fn err(&self, reason: String) -> Error {
        Error::config(self.file.path(), reason)
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }

    fn get(&self, suffix: &str) -> Option<&GgufValue> {
        self.file.get(&self.key(suffix))
    }

    fn typed<T>(
        &self,
        suffix: &str,
        what: &str,
        conv: impl Fn(&GgufValue) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(suffix) {
            None => Ok(None),
            Some(v) => conv(v).map(Some).ok_or_else(|| {
                self.err(format!(
                    "GGUF metadata `{}` is a {}, expected {what}",
                    self.key(suffix),
                    v.type_name()
                ))
            }),
        }
    }

    fn usize_opt(&self, suffix: &str) -> Result<Option<usize>> {
        self.typed(suffix, "a non-negative integer", |v| {
            v.as_u64().and_then(|n| usize::try_from(n).ok())
        })
    }

    fn usize(&self, suffix: &str) -> Result<usize> {
        self.usize_opt(suffix)?
            .ok_or_else(|| self.err(format!("missing GGUF metadata `{}`", self.key(suffix))))
    }

    fn f64_opt(&self, suffix: &str) -> Result<Option<f64>> {
        self.typed(suffix, "a number", GgufValue::as_f64)
    }

    fn bool_opt(&self, suffix: &str) -> Result<Option<bool>> {
        self.typed(suffix, "a bool", GgufValue::as_bool)
    }
}

fn token_id(file: &GgufFile, key: &str) -> Result<Option<u32>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                Error::config(
                    file.path(),
                    format!("GGUF metadata `{key}` is not a token id: {v:?}"),
                )
            }),
    }
}

/// Token texts llama.cpp treats as end of generation wherever they appear in
/// the vocabulary (`llama-vocab.cpp`, `special_eog_ids`): GGUF files name one EOS
/// id, while chat models also stop at their end-of-turn token.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
];

fn end_of_generation_tokens(file: &GgufFile) -> Vec<u32> {
    let Some(tokens) = file
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
    else {
        return Vec::new();
    };
    tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| {
            t.as_str()
                .is_some_and(|t| END_OF_GENERATION_TEXTS.contains(&t))
        })
        .filter_map(|(id, _)| u32::try_from(id).ok())
        .collect()
}

/// Reads the model configuration from a GGUF file's metadata and tensor table.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let path = file.path();
    let arch_name = file
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| {
            Error::config(path, "missing string GGUF metadata `general.architecture`")
        })?;
    let (family, keys) = family_of(file, arch_name)?;
    let names = &family.names;
    let m = Meta {
        file,
        arch: arch_name,
    };
    let bad = |reason: String| Error::config(path, reason);

    let hidden_size = m.usize("embedding_length")?;
    let block_count = m.usize("block_count")?;
    // Sanity bounds, so that a corrupt count fails here rather than in an
    // endless loop or an impossible allocation.
    let n_tensors = file.tensor_names().count();
    if block_count == 0 || block_count > n_tensors {
        return Err(bad(format!(
            "{arch_name}.block_count is {block_count}, but the file has {n_tensors} tensors"
        )));
    }
    // llama.cpp counts the multi-token-prediction blocks (GLM's
    // `num_nextn_predict_layers`, stored after the others) in `block_count`;
    // they only draft tokens, so the model runs without them.
    let nextn = m.usize_opt("nextn_predict_layers")?.unwrap_or(0);
    if nextn >= block_count {
        return Err(bad(format!(
            "{arch_name}.nextn_predict_layers ({nextn}) leaves none of the {block_count} blocks of {arch_name}.block_count"
        )));
    }
    let num_layers = block_count - nextn;
    let num_heads = m.usize("attention.head_count")?;
    let num_kv_heads = m.usize_opt("attention.head_count_kv")?.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(bad(format!(
            "attention.head_count ({num_heads}) must be a positive multiple of attention.head_count_kv ({num_kv_heads})"
        )));
    }
    // MLA: llama.cpp's converter writes its MQA view (one KV head of the latent
    // and the rotary key); every head reads that latent, as no KV head is grouped.
    let (num_kv_heads, mla) = if family.attention.latent {
        (num_heads, Some(mla_dims(&m)?))
    } else {
        (num_kv_heads, None)
    };
    // MLA's rotary table spans the rotary part of each head.
    let head_dim = match (mla, m.usize_opt("attention.key_length")?) {
        (Some(mla), _) => mla.qk_rope_head_dim,
        (None, Some(d)) => d,
        (None, None) => hidden_size / num_heads,
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(bad(format!(
            "head dimension {head_dim} must be even and positive"
        )));
    }
    let rotary_dim = m.usize_opt("rope.dimension_count")?.unwrap_or(head_dim);
    if rotary_dim == 0 || rotary_dim > head_dim || !rotary_dim.is_multiple_of(2) {
        return Err(bad(format!(
            "{arch_name}.rope.dimension_count {rotary_dim} must be even, positive and at most the head dimension {head_dim}"
        )));
    }
    // llama.cpp's default when the key is absent.
    let rope_theta = m.f64_opt("rope.freq_base")?.unwrap_or(10_000.0);
    let rms_norm_eps = m
        .f64_opt("attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| {
            bad(format!(
                "missing GGUF metadata `{arch_name}.attention.layer_norm_rms_epsilon`"
            ))
        })?;
    let max_position_embeddings = m.usize("context_length")?;
    if max_position_embeddings == 0 || max_position_embeddings > MAX_CONTEXT {
        return Err(bad(format!(
            "{arch_name}.context_length {max_position_embeddings} is outside 1..={MAX_CONTEXT}"
        )));
    }

    let num_experts = m.usize_opt("expert_count")?.ok_or_else(|| {
        bad(format!(
            "no `{arch_name}.expert_count`: a dense model, not a Mixture-of-Experts one"
        ))
    })?;
    let top_k = m.usize("expert_used_count")?;
    if num_experts > MAX_EXPERTS {
        return Err(bad(format!(
            "{arch_name}.expert_count {num_experts} is more than {MAX_EXPERTS}"
        )));
    }
    if num_experts == 0 {
        return Err(bad(format!(
            "{arch_name}.expert_count is 0: a model without experts is not a MoE model"
        )));
    }
    if top_k == 0 || top_k > num_experts {
        return Err(bad(format!(
            "expert_used_count ({top_k}) must be between 1 and expert_count ({num_experts})"
        )));
    }

    let router = format!("{}.weight", names.router.1);
    let sparse_layers: Vec<bool> = (0..num_layers)
        .map(|l| file.contains(&format!("blk.{l}.{router}")))
        .collect();
    let first_sparse = sparse_layers
        .iter()
        .position(|&s| s)
        .ok_or_else(|| bad(format!("no layer has a router (`blk.N.{router}`)")))?;
    // The expert width: metadata where the converter writes it, else the merged tensor.
    let mut expert_ffn = None;
    for key in keys.expert_ffn {
        if let Some(w) = m.usize_opt(key)? {
            expert_ffn = Some(w);
            break;
        }
    }
    let expert_ffn = match expert_ffn {
        Some(w) => w,
        None => {
            let name = format!("blk.{first_sparse}.{}.weight", names.experts[0].1);
            file.require(&name)?
                .shape
                .get(1)
                .copied()
                .ok_or_else(|| bad(format!("tensor `{name}` should have 3 dimensions")))?
        }
    };
    let dense_ffn = match keys.dense_ffn {
        Some(key) => m.usize_opt(key)?.unwrap_or(0),
        None => 0,
    };
    let shared_up = names
        .shared_expert
        .map(|s| format!("blk.{first_sparse}.{}.weight", s.projections[1].1));
    let shared_expert_ffn = match shared_up {
        Some(name) if file.contains(&name) => {
            Some(match m.usize_opt("expert_shared_feed_forward_length")? {
                Some(w) => w,
                // DeepSeek's `n_shared_experts`, each of the routed width, run as one.
                None => m.usize("expert_shared_count")? * expert_ffn,
            })
        }
        _ => None,
    };
    let router = router_spec(&m, family, keys)?;
    let moe = MoeConfig {
        num_experts,
        top_k,
        expert_ffn,
        expert_activation: family.experts.activation.with_defaults(),
        router,
        shared_expert_ffn,
        sparse_layers,
        dense_ffn,
    };
    if moe.sparse_layers.iter().any(|s| !s) && moe.dense_ffn == 0 {
        return Err(bad(format!(
            "a dense layer needs `{arch_name}.feed_forward_length`, which is missing"
        )));
    }

    let attention = AttentionConfig {
        num_heads,
        num_kv_heads,
        head_dim,
        rotary_dim,
        rope_theta,
        qkv_bias: file.contains("blk.0.attn_q.bias"),
        o_bias: family.attention.output_bias && file.contains("blk.0.attn_output.bias"),
        sinks: family.attention.sinks,
        // llama.cpp slides the even layers of the families that alternate
        // (`set_swa_pattern(2)`), as transformers' default `layer_types` does.
        layer_windows: match m.usize_opt("attention.sliding_window")? {
            Some(w) if family.attention.layer_types => (0..num_layers)
                .map(|l| l.is_multiple_of(2).then_some(w))
                .collect(),
            _ => Vec::new(),
        },
        // The file has the norms where the checkpoint's switch (GLM's
        // `use_qk_norm`) turned them on.
        qk_norm: match family.attention.qk_norm_switch {
            Some(_) if !file.contains("blk.0.attn_q_norm.weight") => QkNorm::None,
            _ => family.attention.qk_norm,
        },
        clip_qkv: m.f64_opt("attention.clamp_kqv")?,
        yarn: yarn(&m, keys, max_position_embeddings)?,
        // The file does not say; llama.cpp fixes the rotary layout per
        // architecture, and loading leaves q/k rows in Hugging Face's order
        // (undoing llama's permutation), so ERNIE still rotates adjacent pairs.
        rope_interleaved: family.attention.rope_interleave.default,
        mla,
    };

    let vocab_size = match m.usize_opt("vocab_size")? {
        Some(v) => v,
        None => file
            .require("token_embd.weight")?
            .shape
            .first()
            .copied()
            .unwrap_or(0),
    };
    let mut eos_token_ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = token_id(file, key)?
            && !eos_token_ids.contains(&id)
        {
            eos_token_ids.push(id);
        }
    }
    for id in end_of_generation_tokens(file) {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    let stored = file
        .get("general.file_type")
        .and_then(GgufValue::as_u64)
        .and_then(stored_dtype);

    let cfg = ModelConfig {
        family,
        vocab_size,
        hidden_size,
        num_layers,
        max_position_embeddings,
        rms_norm_eps,
        tie_word_embeddings: !file.contains("output.weight"),
        attention,
        moe,
        bos_token_id: token_id(file, "tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
        stored_dtype: stored,
    };
    super::limits::validate(&cfg).map_err(|e| bad(format!("{e} (from GGUF metadata)")))?;
    Ok(cfg)
}

/// The family of a file of architecture `arch`: where families share it, the
/// one its router ([`GgufVariant`]) says.
fn family_of(file: &GgufFile, arch: &str) -> Result<(&'static Family, &'static GgufKeys)> {
    let sigmoid = file
        .get(&format!("{arch}.expert_gating_func"))
        .and_then(GgufValue::as_u64)
        == Some(GATING_SIGMOID);
    let biased = |f: &Family| {
        f.names.selection_bias.is_some_and(|(_, bias)| {
            file.tensor_names()
                .filter_map(|n| n.strip_prefix("blk.")?.split_once('.'))
                .any(|(_, local)| local == bias)
        })
    };
    let sigmoid_or_biased = sigmoid || FAMILIES.iter().any(|f| biased(f));
    Family::by_gguf(arch, sigmoid_or_biased)
        .and_then(|f| Some((f, f.gguf.as_ref()?)))
        .ok_or_else(|| {
            let supported: Vec<String> = FAMILIES
                .iter()
                .filter_map(|f| Some(format!("{} ({})", f.gguf?.arch, f.model_type())))
                .collect();
            Error::config(
                file.path(),
                format!(
                    "GGUF architecture {arch:?} is not supported; supported: {}",
                    supported.join(", ")
                ),
            )
        })
}

/// llama.cpp's `llama_expert_gating_func_type`.
const GATING_SOFTMAX: u64 = 1;
const GATING_SIGMOID: u64 = 2;
/// Softmax over the chosen experts' logits only (gpt-oss).
const GATING_SOFTMAX_WEIGHT: u64 = 3;

/// The family's router completed by the file's `expert_*` keys, as llama.cpp's
/// `build_moe_ffn` reads them.
fn router_spec(m: &Meta<'_>, family: &Family, keys: &GgufKeys) -> Result<RouterSpec> {
    let mut spec = RouterSpec {
        norm_topk_prob: m
            .bool_opt("expert_weights_norm")?
            .unwrap_or(keys.norm_topk_prob),
        ..family.router
    };
    if let Some(func) = m.usize_opt("expert_gating_func")? {
        spec.score = match func as u64 {
            GATING_SOFTMAX => ScoreFn::Softmax,
            GATING_SIGMOID => ScoreFn::Sigmoid,
            GATING_SOFTMAX_WEIGHT => ScoreFn::SoftmaxOfTopK,
            other => {
                return Err(m.err(format!(
                    "{} {other} is not supported (1 softmax, 2 sigmoid, 3 softmax of the chosen)",
                    m.key("expert_gating_func")
                )));
            }
        };
    }
    // llama.cpp skips a scale of 0 as it does one of 1.
    if let Some(scale) = m.f64_opt("expert_weights_scale")?
        && scale != 0.0
    {
        spec.routed_scaling_factor = scale as f32;
    }
    if let Some(n_group) = m.usize_opt("expert_group_count")?
        && n_group > 1
    {
        let rank = match (family.router.groups, keys.variant) {
            (Some(g), _) => g.rank,
            (None, Some(GgufVariant::Softmax(rank))) => rank,
            _ => {
                return Err(m.err(format!(
                    "{} {n_group}: group-limited routing is not supported for {}",
                    m.key("expert_group_count"),
                    family.model_type()
                )));
            }
        };
        spec.groups = Some(GroupLimit {
            n_group,
            topk_group: m.usize("expert_group_used_count")?,
            rank,
        });
    }
    Ok(spec)
}

/// Multi-head latent attention's widths. llama.cpp's MQA view makes
/// `attention.key_length` the latent plus the rotary key; the per-head widths
/// are the `_mla` keys (files converted before the `kv_b` split wrote them as
/// `key_length` / `value_length`).
fn mla_dims(m: &Meta<'_>) -> Result<MlaDims> {
    let positive = |key: &str, v: usize| {
        if v == 0 {
            Err(m.err(format!("{} must be positive", m.key(key))))
        } else {
            Ok(v)
        }
    };
    let rope = positive("rope.dimension_count", m.usize("rope.dimension_count")?)?;
    let qk = match m.usize_opt("attention.key_length_mla")? {
        Some(k) => k,
        None => m.usize("attention.key_length")?,
    };
    let v = match m.usize_opt("attention.value_length_mla")? {
        Some(v) => v,
        None => m.usize("attention.value_length")?,
    };
    if qk <= rope {
        return Err(m.err(format!(
            "MLA key width {qk} ({}) must exceed its rotary part {rope}",
            m.key("attention.key_length_mla")
        )));
    }
    Ok(MlaDims {
        q_lora_rank: m.usize_opt("attention.q_lora_rank")?.filter(|&r| r > 0),
        kv_lora_rank: positive("attention.kv_lora_rank", m.usize("attention.kv_lora_rank")?)?,
        qk_nope_head_dim: qk - rope,
        qk_rope_head_dim: rope,
        v_head_dim: positive("attention.value_length_mla", v)?,
    })
}

/// YaRN from `rope.scaling.*`, as llama.cpp's converter writes transformers'
/// `rope_scaling` (`factor`, `original_max_position_embeddings`, `beta_fast`,
/// `beta_slow`, `attention_factor`; `mscale_all_dim` per [`GgufKeys`]).
fn yarn(m: &Meta<'_>, keys: &GgufKeys, context_length: usize) -> Result<Option<Yarn>> {
    let factor = m.f64_opt("rope.scaling.factor")?;
    let kind = match m.get("rope.scaling.type") {
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| {
            m.err(format!(
                "GGUF metadata `{}` is a {}, expected a string",
                m.key("rope.scaling.type"),
                v.type_name()
            ))
        })?),
    };
    match kind {
        // llama.cpp reads a factor without a type as linear scaling.
        None if factor.is_none_or(|f| f == 0.0 || f == 1.0) => return Ok(None),
        Some("none") => return Ok(None),
        Some("yarn") => {}
        kind => {
            return Err(m.err(format!(
                "rope scaling {:?} ({}) is not supported (only \"yarn\")",
                kind.unwrap_or("linear"),
                m.key("rope.scaling.type")
            )));
        }
    }
    let factor = factor
        .filter(|f| f.is_finite() && *f > 0.0)
        .ok_or_else(|| {
            m.err(format!(
                "YaRN needs a positive `{}`",
                m.key("rope.scaling.factor")
            ))
        })?;
    if let Some(ext) = m.f64_opt("rope.scaling.yarn_ext_factor")?
        && ext != 1.0
    {
        return Err(m.err(format!(
            "{} {ext} is not supported (only 1)",
            m.key("rope.scaling.yarn_ext_factor")
        )));
    }
    let original = m
        .usize_opt("rope.scaling.original_context_length")?
        .unwrap_or(context_length);
    if original == 0 {
        return Err(m.err(format!(
            "{} must be positive",
            m.key("rope.scaling.original_context_length")
        )));
    }
    let (mscale, mscale_all_dim) = match m.f64_opt("rope.scaling.yarn_log_multiplier")? {
        None => (None, None),
        // Only `mscale_all_dim` is in the file: the cos/sin scale
        // `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` is 1 and the
        // softmax scale carries `mscale(factor, mscale_all_dim)^2`, as in
        // llama.cpp and in DeepSeek's own configs (V2-Lite 0.707 / 0.707, V3 1 / 1).
        Some(mul) if keys.yarn_log_mul_tenth => {
            let all = mul / 0.1;
            (Some(all), Some(all))
        }
        Some(_) => {
            return Err(m.err(format!(
                "{} is not supported for this architecture",
                m.key("rope.scaling.yarn_log_multiplier")
            )));
        }
    };
    Ok(Some(Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: m.f64_opt("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
        beta_slow: m.f64_opt("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
        truncate: keys.yarn_truncate,
        attention_factor: m.f64_opt("rope.scaling.yarn_attn_factor")?,
        mscale,
        mscale_all_dim,
    }))
}

/// Opens a GGUF model: its configuration, and the file as a tensor source.
pub fn open_gguf(path: &std::path::Path) -> Result<(ModelConfig, GgufSource)> {
    let file = GgufFile::open(path)?;
    let cfg = config_from_gguf(&file)?;
    let permuted = cfg.family.gguf.is_some_and(|g| g.permuted_qk);
    let permuted_qk = permuted.then_some(QkHeads {
        num_heads: cfg.attention.num_heads,
        num_kv_heads: cfg.attention.num_kv_heads,
    });
    let family = cfg.family;
    Ok((cfg, GgufSource::new(file, &family.names, permuted_qk)))
}
