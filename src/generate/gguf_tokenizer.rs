//! The tokenizer and chat template a GGUF file carries in its metadata
//! (`tokenizer.ggml.*`, `tokenizer.chat_template`), rebuilt as a Hugging Face
//! `tokenizers` BPE: `tokenizer.ggml.model = gpt2` (byte-level BPE with merges) or
//! `llama` (SentencePiece: pieces with scores, byte fallback), as llama.cpp reads them.

use serde_json::{Value, json};

use super::{ChatTemplate, TextTokenizer};
use crate::error::{Error, Result};
use crate::weights::{GgufFile, GgufValue};

/// llama.cpp `llama_token_type`.
const TOKEN_NORMAL: u64 = 1;
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

/// Merges for a SentencePiece vocabulary, from its scores: every split of a
/// token into two vocabulary tokens, the better-scored merged token first (as
/// `tokenizers`' `SentencePieceExtractor` derives them, which reproduces
/// SentencePiece's and llama.cpp's highest-score-first merging).
fn merges_from_scores(tokens: &[&str], scores: &[f32], types: &[u64]) -> Vec<Value> {
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (id, &token) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(TOKEN_NORMAL) != TOKEN_NORMAL {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (split, _) in token.char_indices().skip(1) {
            let (l, r) = token.split_at(split);
            if let (Some(&il), Some(&ir)) = (ids.get(l), ids.get(r)) {
                merges.push((score, il, ir, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| json!([l, r]))
        .collect()
}

/// The GGUF file's tokenizer: `gpt2` (byte-level BPE) or `llama` (SentencePiece
/// BPE with byte fallback). `None` when it has no vocabulary, or one of another
/// kind, which is reported as a warning.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Option<TextTokenizer>> {
    let Some(kind) = file.get("tokenizer.ggml.model").and_then(GgufValue::as_str) else {
        return Ok(None);
    };
    if kind != "gpt2" && kind != "llama" {
        tracing::warn!(
            "{}: tokenizer.ggml.model {kind:?} is not supported (\"gpt2\" and \"llama\" are); \
             pass token ids instead of text",
            file.path().display()
        );
        return Ok(None);
    }
    let spm = kind == "llama";
    let tokens = strings(file, "tokenizer.ggml.tokens")?
        .ok_or_else(|| bad(file, "missing `tokenizer.ggml.tokens`".into()))?;
    let numbers = |key: &str| -> Result<Vec<f64>> {
        match file.get(key) {
            None => Ok(Vec::new()),
            Some(v) => v
                .as_array()
                .map(|a| a.iter().map(|t| t.as_f64().unwrap_or(0.0)).collect())
                .ok_or_else(|| bad(file, format!("`{key}` is not an array"))),
        }
    };
    let types: Vec<u64> = numbers("tokenizer.ggml.token_type")?
        .into_iter()
        .map(|t| t as u64)
        .collect();

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, &token) in tokens.iter().enumerate() {
        vocab.insert(token.to_string(), json!(id));
        let ty = types.get(id).copied().unwrap_or(TOKEN_NORMAL);
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == TOKEN_CONTROL,
            }));
        }
    }
    let merges = if spm {
        let scores: Vec<f32> = numbers("tokenizer.ggml.scores")?
            .into_iter()
            .map(|s| s as f32)
            .collect();
        merges_from_scores(&tokens, &scores, &types)
    } else {
        strings(file, "tokenizer.ggml.merges")?
            .unwrap_or_default()
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
            .collect::<Result<Vec<_>>>()?
    };

    let bos_id = token_id(file, "tokenizer.ggml.bos_token_id");
    let bos = bos_id.and_then(|id| tokens.get(id as usize).copied());
    let eos = token_id(file, "tokenizer.ggml.eos_token_id")
        .and_then(|id| tokens.get(id as usize).copied());
    let flag = |key: &str, default: bool| {
        file.get(key)
            .and_then(GgufValue::as_bool)
            .unwrap_or(default)
    };
    // llama.cpp's defaults: SentencePiece vocabularies add BOS and a leading space.
    let add_bos = flag("tokenizer.ggml.add_bos_token", spm);
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
    let (normalizer, pre_tokenizer, decoder, unk) = if spm {
        let mut steps =
            vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
        if flag("tokenizer.ggml.add_space_prefix", true) {
            steps.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        let unk = token_id(file, "tokenizer.ggml.unknown_token_id")
            .and_then(|id| tokens.get(id as usize).copied());
        (
            json!({"type": "Sequence", "normalizers": steps}),
            Value::Null,
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]}),
            unk,
        )
    } else {
        let pre = file
            .get("tokenizer.ggml.pre")
            .and_then(GgufValue::as_str)
            .unwrap_or("default");
        (
            Value::Null,
            pre_tokenizer(pre),
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            None,
        )
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": spm, "byte_fallback": spm,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    let inner = super::tokenizer::tokenizer_from_json(&spec.to_string(), "GGUF").map_err(|e| {
        bad(
            file,
            format!("cannot build a {kind} tokenizer from the metadata: {e}"),
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
    let origin = format!("{}: tokenizer.chat_template", file.path().display());
    Ok(Some(
        ChatTemplate::new(source.to_string(), bos, eos)?.with_origin(origin),
    ))
}
