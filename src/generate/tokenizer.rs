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
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let config = TokenizerConfig::read(dir)?;
        Ok(Self {
            inner,
            bos_token: config.as_ref().and_then(|c| c.token("bos_token")),
            eos_token: config.as_ref().and_then(|c| c.token("eos_token")),
        })
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
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
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
