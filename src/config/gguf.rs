//! GGUF metadata (keys as llama.cpp's `convert_hf_to_gguf.py` writes them,
//! `{arch}.block_count`, `{arch}.expert_count`, ...) mapped to [`ModelConfig`].
//! What the metadata does not say is read off the tensor table: which layers are
//! sparse (`blk.N.ffn_gate_inp`), q/k/v biases, tied embeddings. What differs
//! by family (its `general.architecture`, which keys hold the expert width) is
//! in its [`Family`] file.

use super::family::{FAMILIES, Family};
use super::{AttentionConfig, ModelConfig, MoeConfig, RouterSpec};
use crate::error::{Error, Result};
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
    let (family, keys) = Family::by_gguf_arch(arch_name)
        .and_then(|f| Some((f, f.gguf.as_ref()?)))
        .ok_or_else(|| {
            let supported: Vec<String> = FAMILIES
                .iter()
                .filter_map(|f| Some(format!("{} ({})", f.gguf?.arch, f.model_type())))
                .collect();
            Error::config(
                path,
                format!(
                    "GGUF architecture {arch_name:?} is not supported; supported: {}",
                    supported.join(", ")
                ),
            )
        })?;
    let names = &family.names;
    let m = Meta {
        file,
        arch: arch_name,
    };
    let bad = |reason: String| Error::config(path, reason);

    let hidden_size = m.usize("embedding_length")?;
    let num_layers = m.usize("block_count")?;
    // Sanity bounds, so that a corrupt count fails here rather than in an
    // endless loop or an impossible allocation.
    let n_tensors = file.tensor_names().count();
    if num_layers == 0 || num_layers > n_tensors {
        return Err(bad(format!(
            "{arch_name}.block_count is {num_layers}, but the file has {n_tensors} tensors"
        )));
    }
    let num_heads = m.usize("attention.head_count")?;
    let num_kv_heads = m.usize_opt("attention.head_count_kv")?.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(bad(format!(
            "attention.head_count ({num_heads}) must be a positive multiple of attention.head_count_kv ({num_kv_heads})"
        )));
    }
    let head_dim = match m.usize_opt("attention.key_length")? {
        Some(d) => d,
        None => hidden_size / num_heads,
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
    if let Some(kind) = m.get("rope.scaling.type").and_then(GgufValue::as_str)
        && kind != "none"
    {
        return Err(bad(format!(
            "rope scaling {kind:?} ({arch_name}.rope.scaling.type) is not supported"
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
        Some(name) if file.contains(&name) => Some(m.usize("expert_shared_feed_forward_length")?),
        _ => None,
    };
    let router = RouterSpec {
        norm_topk_prob: m
            .bool_opt("expert_weights_norm")?
            .unwrap_or(keys.norm_topk_prob),
        ..family.router
    };
    let moe = MoeConfig {
        num_experts,
        top_k,
        expert_ffn,
        expert_activation: Default::default(),
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
        o_bias: false,
        sinks: false,
        layer_windows: Vec::new(),
        qk_norm: family.attention.qk_norm,
        clip_qkv: m.f64_opt("attention.clamp_kqv")?,
        yarn: None,
        rope_interleaved: false,
        mla: None,
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
