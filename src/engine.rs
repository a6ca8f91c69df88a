//! The public engine API: a loaded model with its tokenizer, chat template and
//! stop tokens, and the scheduler that runs sequences on it. The CLI and the
//! server use only this.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use crate::config::{ModelConfig, open_gguf};
use crate::error::{Error, Result};
use crate::experts::ExpertId;
use crate::generate::{
    ChatMessage, ChatTemplate, Flow, GenerateOptions, GenerationStats, Scheduler, SchedulerOptions,
    SequenceRequest, StepEvent, TextTokenizer, chat_template_from_gguf, tokenizer_from_gguf,
};
use crate::model::{LayerFfn, LoadOptions, Model, RoutingObserver};
use crate::weights::GgufFile;

pub struct Engine {
    model: Model,
    tokenizer: Option<TextTokenizer>,
    chat_template: Option<ChatTemplate>,
    dir: PathBuf,
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
        // The tokenizer first: building it frees ~13 MB of transient JSON, which
        // the weights' small allocations then reuse instead of adding to the peak.
        let tokenizer = tokenizer_from_gguf(src.file())?;
        let chat_template = chat_template_from_gguf(src.file(), tokenizer.as_ref())?;
        let model = Model::from_source(&config, &src, opts)?;
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            dir: path.to_path_buf(),
        })
    }

    /// The model itself, for analysis that walks its layers (`analyze`).
    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Where the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// A scheduler for this model: every front end runs sequences through one.
    pub fn scheduler(&self, opts: SchedulerOptions) -> Scheduler<'_> {
        Scheduler::new(&self.model, opts)
    }

    /// Generates up to `opts.max_tokens` tokens after `prompt` as one sequence,
    /// calling `on_token` with each as soon as it is chosen.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        observer: &mut dyn RoutingObserver,
        on_token: &mut dyn FnMut(u32) -> Result<Flow>,
    ) -> Result<GenerationStats> {
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        opts.sampling.validate().map_err(Error::InvalidInput)?;
        if crate::generate::scheduler::check_prompt(&self.model, prompt, opts.max_tokens)? == 0 {
            return Ok(stats);
        }
        let mut scheduler = self.scheduler(SchedulerOptions::single_sequence());
        let id = scheduler.add(SequenceRequest {
            prompt: prompt.to_vec(),
            max_tokens: opts.max_tokens,
            sampling: opts.sampling,
            stop_ids: opts.stop_ids.clone(),
            top_logprobs: None,
        })?;
        let mut start = Instant::now();
        while !scheduler.is_idle() {
            for event in scheduler.step(observer) {
                let token = match event {
                    StepEvent::Token(t) => t,
                    StepEvent::Failed { error, .. } => return Err(error),
                };
                stats.generated_tokens += 1;
                if stats.generated_tokens == 1 {
                    stats.prefill_s = start.elapsed().as_secs_f64();
                    start = Instant::now();
                }
                if matches!(on_token(token.token)?, Flow::Stop) {
                    scheduler.cancel(id);
                }
            }
        }
        if stats.generated_tokens > 0 {
            stats.decode_s = start.elapsed().as_secs_f64();
        }
        Ok(stats)
    }

    /// Logits of every position of `tokens` as one sequence (scoring, golden
    /// checks), reported to `observer` as `SequenceId::default()`.
    ///
    /// # Shapes
    /// `tokens: [n] -> [n, vocab]`
    pub fn score(&self, tokens: &[u32], observer: &mut dyn RoutingObserver) -> Result<Tensor> {
        self.model.score(tokens, observer)
    }

    /// Weight bytes one decoded token reads: attention, router, `top_k` average
    /// experts and any shared expert per layer, and the output projection.
    pub fn active_bytes_per_token(&self) -> usize {
        let model = &self.model;
        let top_k = model.config().moe.top_k;
        let mut total = model.lm_head().weight_bytes();
        for (l, layer) in model.layers().iter().enumerate() {
            total += layer.attention.weight_bytes();
            match layer.moe() {
                Some(moe) => {
                    total += moe.router().weight_bytes() + self.layer_expert_bytes(l, top_k);
                    if let Some(shared) = moe.shared() {
                        total += shared.ffn.weight_bytes()
                            + shared.gate.as_ref().map_or(0, |g| g.weight_bytes());
                    }
                }
                None => {
                    if let LayerFfn::Dense(ffn) = &layer.ffn {
                        total += ffn.weight_bytes();
                    }
                }
            }
        }
        total
    }

    /// Routed-expert weight bytes one decoded token reads: `top_k` average experts per layer.
    pub fn expert_bytes_per_token(&self) -> usize {
        let top_k = self.model.config().moe.top_k;
        (0..self.model.layers().len())
            .map(|l| self.layer_expert_bytes(l, top_k))
            .sum()
    }

    /// Bytes of expert weights resident now (all of them unless an expert
    /// budget keeps only a cache of hot ones).
    pub fn resident_expert_bytes(&self) -> usize {
        self.model.experts().resident_bytes()
    }

    fn layer_expert_bytes(&self, layer: usize, top_k: usize) -> usize {
        let experts = self.model.experts();
        let n = experts.num_experts(layer);
        let sum: usize = (0..n as u32)
            .map(|expert| {
                experts.expert_bytes(ExpertId {
                    layer: layer as u32,
                    expert,
                })
            })
            .sum();
        sum * top_k / n.max(1)
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
        self.encode_chat_with_tools(messages, None)
    }

    /// [`Engine::encode_chat`] with tool schemas handed to the template.
    pub fn encode_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::ChatTemplate(format!(
                "{} has no chat_template (tokenizer_config.json or chat_template.jinja)",
                self.dir.display()
            ))
        })?;
        let text = template.render_with_tools(messages, tools, true)?;
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
