//! Text <-> token ids with the checkpoint's own `tokenizer.json`, plus the
//! special tokens `tokenizer_config.json` names.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

pub struct TextTokenizer {
    inner: Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (and, if present, `tokenizer_config.json`) from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let inner = tokenizer_from_json(&text, &path.display().to_string())?;
        let config = TokenizerConfig::read(dir)?;
        Ok(Self {
            inner,
            bos_token: config.as_ref().and_then(|c| c.token("bos_token")),
            eos_token: config.as_ref().and_then(|c| c.token("eos_token")),
        })
    }

    /// A `tokenizer.json` document; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        Ok(Self::from_tokenizer(tokenizer_from_json(text, origin)?))
    }

    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        Self {
            inner,
            bos_token: None,
            eos_token: None,
        }
    }

    /// A tokenizer whose BOS / EOS tokens are known from elsewhere (GGUF metadata).
    pub fn with_special_tokens(
        inner: Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        Self {
            inner,
            bos_token,
            eos_token,
        }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = contained("encoding", || self.inner.encode(text, add_special_tokens))?
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        contained("decoding", || self.inner.decode(ids, skip_special_tokens))?
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Decodes one token at a time, holding back bytes that do not yet form
    /// whole characters, so streamed text is always valid UTF-8.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// A `tokenizer.json` document (`origin` names it in errors), checked for what
/// `tokenizers` would panic on later instead of reporting.
pub(crate) fn tokenizer_from_json(text: &str, origin: &str) -> Result<Tokenizer> {
    let bad = |reason: String| Error::Tokenizer(format!("{origin}: {reason}"));
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    if let Some(post) = value.get("post_processor") {
        check_post_processor(post).map_err(bad)?;
    }
    contained("loading", || text.parse::<Tokenizer>())
        .map_err(|e| bad(e.to_string()))?
        .map_err(|e| bad(e.to_string()))
}

/// `TemplateProcessing` looks every special token of its templates up in its
/// own `special_tokens` map and panics on a missing one (tokenizers 0.23,
/// `template.rs`); a `Sequence` of processors may hold one.
fn check_post_processor(post: &serde_json::Value) -> std::result::Result<(), String> {
    match post.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => {
            for p in post
                .get("processors")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
            {
                check_post_processor(p)?;
            }
            Ok(())
        }
        Some("TemplateProcessing") => {
            let specials = post.get("special_tokens").and_then(|s| s.as_object());
            for (key, spec) in specials.into_iter().flatten() {
                let ids = spec.get("ids").and_then(|v| v.as_array()).map(Vec::len);
                let tokens = spec.get("tokens").and_then(|v| v.as_array()).map(Vec::len);
                if ids != tokens {
                    return Err(format!(
                        "post_processor special token {key:?} has {} ids for {} tokens",
                        ids.unwrap_or(0),
                        tokens.unwrap_or(0)
                    ));
                }
            }
            for template in ["single", "pair"] {
                for name in template_special_tokens(post.get(template)) {
                    if !specials.is_some_and(|s| s.contains_key(&name)) {
                        return Err(format!(
                            "post_processor template `{template}` uses special token {name:?}, which its `special_tokens` does not define"
                        ));
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The special-token names of a template, written either as pieces
/// (`[{"SpecialToken": {"id": ..}}, ..]`) or as a string (`"<s> $A:0"`).
fn template_special_tokens(template: Option<&serde_json::Value>) -> Vec<String> {
    match template {
        Some(serde_json::Value::Array(pieces)) => pieces
            .iter()
            .filter_map(|p| p.get("SpecialToken")?.get("id")?.as_str())
            .map(str::to_string)
            .collect(),
        Some(serde_json::Value::String(s)) => s
            .split_whitespace()
            .filter(|p| !p.starts_with('$'))
            .map(|p| p.rsplit_once(':').map_or(p, |(name, _)| name).to_string())
            .collect(),
        _ => Vec::new(),
    }
}

/// Runs `f`, turning a panic inside `tokenizers` into an error: a tokenizer file
/// is data, and no malformed one may take the process (or a server) down.
fn contained<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Error::Tokenizer(format!("tokenizers panicked while {what}: {message}"))
    })
}

/// Incremental detokenisation that decodes only a short window per token:
/// the text of `ids[prefix_offset..]` minus that of `ids[prefix_offset..read_offset]`
/// (the scheme of text-generation-inference), so cost does not grow with length and
/// tokenizers that merge across token boundaries (byte fallback, leading spaces) stay right.
pub struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream<'_> {
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], true)?;
        // A trailing U+FFFD means an incomplete multi-byte sequence: wait for more.
        if text.len() <= prefix.len()
            || text.ends_with('\u{FFFD}')
            || !text.is_char_boundary(prefix.len())
        {
            return Ok(None);
        }
        let new = text[prefix.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(new))
    }
}

/// The parts of `tokenizer_config.json` generation needs.
pub(crate) struct TokenizerConfig {
    value: serde_json::Value,
}

impl TokenizerConfig {
    pub(crate) fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, format!("invalid JSON: {e}")))?;
        Ok(Some(Self { value }))
    }

    /// A special token, written either as a string or as `{"content": ...}`.
    pub(crate) fn token(&self, key: &str) -> Option<String> {
        match self.value.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    }

    /// `chat_template` as a string, or the one named "default" from a list.
    pub(crate) fn chat_template(&self) -> Option<String> {
        match self.value.get("chat_template")? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(items) => items
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| items.first())
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer() -> TextTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3_moe");
        TextTokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn streamed_text_equals_whole_decode() {
        let tok = fixture_tokenizer();
        for text in [
            "A mixture of experts sends every token.",
            "naïve café — 東京 ✓",
            "  spaced   out  ",
        ] {
            let ids = tok.encode(text, false).unwrap();
            let mut stream = tok.stream();
            let mut streamed = String::new();
            for &id in &ids {
                if let Some(piece) = stream.push(id).unwrap() {
                    streamed.push_str(&piece);
                }
            }
            assert_eq!(streamed, tok.decode(&ids, true).unwrap(), "{text}");
        }
    }
}
