//! The public engine API: a loaded model with its tokenizer, chat template and
//! stop tokens. The CLI and the server use only this.

use std::path::{Path, PathBuf};

use crate::config::open_gguf;
use crate::error::{Error, Result};
use crate::generate::{
    ChatMessage, ChatTemplate, TextTokenizer, chat_template_from_gguf, tokenizer_from_gguf,
};
use crate::model::{LoadOptions, Model};
use crate::weights::GgufFile;

pub struct Engine {
    pub model: Model,
    pub tokenizer: Option<TextTokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub dir: PathBuf,
}

impl Engine {
    /// Loads a Hugging Face model directory or a GGUF file. The tokenizer is
    /// optional so that id-only use (`--prompt-ids`, logits) works on bare checkpoints.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if GgufFile::is_gguf(dir) {
            return Self::load_gguf(dir, opts);
        }
        let model = Model::load(dir, opts)?;
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(TextTokenizer::from_dir(dir)?)
        } else {
            None
        };
        let chat_template = ChatTemplate::from_dir(dir)?;
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            dir: dir.to_path_buf(),
        })
    }

    /// A GGUF file: weights, hyper-parameters, tokenizer and chat template all
    /// come from the one file.
    fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let (config, src) = open_gguf(path)?;
        let model = Model::from_source(&config, &src, opts)?;
        let tokenizer = tokenizer_from_gguf(src.file())?;
        let chat_template = chat_template_from_gguf(src.file(), tokenizer.as_ref())?;
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            dir: path.to_path_buf(),
        })
    }

    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} has no tokenizer (tokenizer.json or GGUF gpt2 vocabulary); pass token ids instead of text",
                self.dir.display()
            ))
        })
    }

    /// Token ids for a plain-text prompt, or for a one-turn chat when `chat` is set.
    pub fn encode_prompt(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        if chat {
            return self.encode_chat(&[ChatMessage::new("user", text)]);
        }
        self.tokenizer()?.encode(text, true)
    }

    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::ChatTemplate(format!(
                "{} has no chat_template (tokenizer_config.json or chat_template.jinja)",
                self.dir.display()
            ))
        })?;
        let text = template.render(messages, true)?;
        // The template already wrote any BOS it wants.
        self.tokenizer()?.encode(&text, false)
    }

    /// Ids that end generation: the config's EOS ids, plus the tokenizer's EOS token.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.model.config().eos_token_ids.clone();
        if let Some(tok) = &self.tokenizer
            && let Some(id) = tok.eos_token().and_then(|t| tok.token_id(t))
            && !ids.contains(&id)
        {
            ids.push(id);
        }
        ids
    }
}
