//! The tokenizer and chat template a GGUF file carries in its metadata
//! (`tokenizer.ggml.*`, `tokenizer.chat_template`), rebuilt as a Hugging Face
//! `tokenizers` byte-level BPE, the way llama.cpp reads `tokenizer.ggml.model = gpt2`.

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::{ChatTemplate, TextTokenizer};
use crate::error::{Error, Result};
use crate::weights::{GgufFile, GgufValue};

/// llama.cpp `llama_token_type`.
const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;

/// Pre-tokenizer split regexes by `tokenizer.ggml.pre` (llama.cpp `llama-vocab.cpp`).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn bad(file: &GgufFile, reason: String) -> Error {
    Error::Tokenizer(format!("{}: {reason}", file.path().display()))
}

fn strings<'a>(file: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(value) = file.get(key) else {
        return Ok(None);
    };
    let items = value.as_array().ok_or_else(|| {
        bad(
            file,
            format!("`{key}` is a {}, expected an array", value.type_name()),
        )
    })?;
    items
        .iter()
        .map(|v| {
            v.as_str().ok_or_else(|| {
                bad(
                    file,
                    format!("`{key}` holds a {}, expected strings", v.type_name()),
                )
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn token_id(file: &GgufFile, key: &str) -> Option<u32> {
    file.get(key)
        .and_then(GgufValue::as_u64)
        .and_then(|id| u32::try_from(id).ok())
}

fn pre_tokenizer(pre: &str) -> Value {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]})
    };
    match pre {
        "qwen2" => split(QWEN2_REGEX),
        "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => split(LLAMA3_REGEX),
        other => {
            if !matches!(other, "gpt2" | "default" | "olmo" | "gpt-2") {
                tracing::warn!(
                    "GGUF tokenizer.ggml.pre {other:?} is not known; splitting words like GPT-2"
                );
            }
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
    }
}

/// The GGUF file's tokenizer, `None` when it has no vocabulary or one of a kind
/// other than byte-level BPE (`gpt2`), which is reported as a warning.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Option<TextTokenizer>> {
    let Some(model) = file.get("tokenizer.ggml.model").and_then(GgufValue::as_str) else {
        return Ok(None);
    };
    if model != "gpt2" {
        tracing::warn!(
            "{}: tokenizer.ggml.model {model:?} is not supported (only \"gpt2\" byte-level BPE); \
             pass token ids instead of text",
            file.path().display()
        );
        return Ok(None);
    }
    let tokens = strings(file, "tokenizer.ggml.tokens")?
        .ok_or_else(|| bad(file, "missing `tokenizer.ggml.tokens`".into()))?;
    let merges = strings(file, "tokenizer.ggml.merges")?.unwrap_or_default();
    let types: Vec<u64> = match file.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .map(|a| a.iter().map(|t| t.as_u64().unwrap_or(1)).collect())
            .ok_or_else(|| bad(file, "`tokenizer.ggml.token_type` is not an array".into()))?,
    };

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, &token) in tokens.iter().enumerate() {
        vocab.insert(token.to_string(), json!(id));
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == TOKEN_CONTROL,
            }));
        }
    }
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| {
                    bad(
                        file,
                        format!("merge {m:?} is not two tokens separated by a space"),
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;

    let bos_id = token_id(file, "tokenizer.ggml.bos_token_id");
    let bos = bos_id.and_then(|id| tokens.get(id as usize).copied());
    let eos = token_id(file, "tokenizer.ggml.eos_token_id")
        .and_then(|id| tokens.get(id as usize).copied());
    let add_bos = file
        .get("tokenizer.ggml.add_bos_token")
        .and_then(GgufValue::as_bool)
        .unwrap_or(false);
    let post_processor = match (add_bos, bos, bos_id) {
        (true, Some(bos), Some(id)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}},
        }),
        _ => Value::Null,
    };
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre),
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    let inner: Tokenizer = spec.to_string().parse().map_err(|e| {
        bad(
            file,
            format!("cannot build a BPE tokenizer from the metadata: {e}"),
        )
    })?;
    Ok(Some(TextTokenizer::with_special_tokens(
        inner,
        bos.map(str::to_string),
        eos.map(str::to_string),
    )))
}

/// `tokenizer.chat_template`, if the file has one.
pub fn chat_template_from_gguf(
    file: &GgufFile,
    tokenizer: Option<&TextTokenizer>,
) -> Result<Option<ChatTemplate>> {
    let Some(source) = file.get("tokenizer.chat_template") else {
        return Ok(None);
    };
    let source = source.as_str().ok_or_else(|| {
        bad(
            file,
            format!(
                "`tokenizer.chat_template` is a {}, expected a string",
                source.type_name()
            ),
        )
    })?;
    let bos = tokenizer.and_then(|t| t.bos_token().map(str::to_string));
    let eos = tokenizer.and_then(|t| t.eos_token().map(str::to_string));
    ChatTemplate::new(source.to_string(), bos, eos).map(Some)
}
