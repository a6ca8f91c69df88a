//! Prompt in, tokens out: prefill, then one cached decode step per token.
//!
//! Cost per decoded token: one forward over a single row, i.e. the attention
//! weights, the router and `top_k` experts per layer, plus the cached keys/values.

pub mod chat;
mod gguf_tokenizer;
pub mod sampler;
pub mod tokenizer;

use std::time::Instant;

pub use chat::{ChatMessage, ChatTemplate};
pub use gguf_tokenizer::{chat_template_from_gguf, tokenizer_from_gguf};
pub use sampler::{Sampler, SamplingParams};
pub use tokenizer::{TextStream, TextTokenizer};

use crate::error::{Error, Result};
use crate::model::{Model, RoutingObserver};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends after emitting one of these (usually the EOS ids).
    pub stop_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl GenerationStats {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_s)
    }

    /// Decode rate over the tokens produced by decode steps (the first token
    /// comes out of the prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode_s)
    }
}

fn rate(tokens: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

/// What the caller wants done with each new token.
pub enum Flow {
    Continue,
    Stop,
}

/// Generates up to `opts.max_tokens` tokens after `prompt`, calling `on_token`
/// with each as soon as it is chosen.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    observer: &mut dyn RoutingObserver,
    on_token: &mut dyn FnMut(u32) -> Result<Flow>,
) -> Result<GenerationStats> {
    opts.sampling.validate().map_err(Error::InvalidInput)?;
    let context = model.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(Error::InvalidInput("the prompt is empty".into()));
    }
    if prompt.len() >= context {
        return Err(Error::InvalidInput(format!(
            "prompt has {} tokens but the model's context is {context} positions (max_position_embeddings); nothing is left to generate",
            prompt.len()
        )));
    }
    // The last generated token is never fed back, so the context holds prompt + max_tokens - 1.
    let max_tokens = opts.max_tokens.min(context - prompt.len() + 1);
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    if max_tokens == 0 {
        return Ok(stats);
    }
    let mut sampler = Sampler::new(opts.sampling);
    let mut cache = model.new_cache(prompt.len() + max_tokens);

    let start = Instant::now();
    let mut logits = model.forward_last(prompt, &mut cache, observer)?;
    stats.prefill_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    loop {
        let next = sampler.sample(&logits.to_vec1::<f32>()?);
        stats.generated_tokens += 1;
        let flow = on_token(next)?;
        if matches!(flow, Flow::Stop)
            || opts.stop_ids.contains(&next)
            || stats.generated_tokens >= max_tokens
        {
            break;
        }
        logits = model.forward_last(&[next], &mut cache, observer)?;
    }
    stats.decode_s = start.elapsed().as_secs_f64();
    Ok(stats)
}
