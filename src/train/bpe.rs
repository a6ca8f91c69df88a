//! Byte-level BPE trained on the run's own data (GPT-2 style: every byte is a
//! token, so any text encodes), saved with a ChatML `tokenizer_config.json`.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use super::{ENDOFTEXT, IM_END, SPECIAL_TOKENS};
use crate::error::{Error, Result};

/// ChatML, as Qwen models use it.
const CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Trains a tokeniser of at most `vocab_size` tokens on `texts`; the special
/// tokens get ids 0, 1, 2 (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`).
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(t.to_string(), true))
                .collect(),
        )
        .build();
    // No prefix space: "The" at the start of a prompt stays "The".
    let byte_level = ByteLevel::new(false, true, true);
    let mut tok = TokenizerBuilder::<BPE, _, ByteLevel, ByteLevel, ByteLevelDecoder>::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(None)
        .with_decoder(Some(ByteLevelDecoder::default()))
        .build()
        .map_err(err)?;
    tok.train(&mut trainer, texts.iter()).map_err(err)?;
    let tok: Tokenizer = tok.into();
    Ok(tok)
}

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
pub fn write_tokenizer_files(tok: &Tokenizer, dir: &Path, max_length: usize) -> Result<()> {
    let path = dir.join("tokenizer.json");
    let text = tok
        .to_string(true)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    super::checkpoint::write_atomic(&path, text.as_bytes())?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": null,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": false,
        "chat_template": CHAT_TEMPLATE,
    });
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| Error::InvalidInput(e.to_string()))?;
    super::checkpoint::write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())
}
