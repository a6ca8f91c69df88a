//! Prompt in, tokens out: the scheduler batches sequences (prefill in chunks,
//! then one cached decode step per token), the sampler picks each token.
//!
//! Cost per decoded token: one forward over a single row, i.e. the attention
//! weights, the router and `top_k` experts per layer, plus the cached keys/values;
//! batched sequences share the weight reads.

pub mod chat;
mod gguf_tokenizer;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate, TemplateLimits, stuck_renders};
pub use gguf_tokenizer::{chat_template_from_gguf, tokenizer_from_gguf};
pub use sampler::{Sampler, SamplingParams};
pub use scheduler::{
    FinishReason, Scheduler, SchedulerOptions, SequenceRequest, StepEvent, TokenEvent,
    TokenLogprobs,
};
pub use tokenizer::{TextStream, TextTokenizer};

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
