//! The MoE transformer: embedding, decoder layers (attention + dense MLP or MoE
//! block), final norm, output projection. Families differ only in the data
//! their `config::family` file declares.

mod attention;
mod batch;
mod check;
mod kv_cache;
mod layer;
mod load;
mod mla;
pub mod moe;
mod observer;
pub mod profile;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

pub use attention::{Attention, AttentionInput, LayerAttention};
pub use batch::{BatchLayout, SequenceRows};
pub use check::{CheckReport, check_checkpoint};
pub use kv_cache::KvCache;
pub use layer::{AttentionBlock, DecoderLayer, LayerFfn, LayerNorms};
pub use load::LoadOptions;
pub use mla::{LatentAttention, LatentQuery};
pub use observer::{NoObserver, RoutingObserver, RoutingSite, SequenceId};
pub use profile::Phase;

use crate::config::{ModelConfig, load_model_config, open_gguf};
use crate::error::{Error, Result};
use crate::experts::ExpertProvider;
use crate::ops::{Embedding, Linear, RmsNorm, RopeTable};
use crate::weights::{GgufFile, SafetensorsFiles, TensorSource};

/// Forwards of at most this many tokens keep the pool's threads polling
/// between parallel sections ([`crate::ops::spin_workers`]).
const SPIN_MAX_TOKENS: usize = 64;

#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    /// Element type weights were converted to at load.
    dtype: DType,
    embed: Embedding, // [vocab, hidden]
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RopeTable,
    experts: Arc<dyn ExpertProvider>,
}

/// One sequence of a batched forward.
pub struct SequenceInput<'a> {
    /// Reported to the observer with every routing of these tokens.
    pub id: SequenceId,
    pub tokens: &'a [u32],
    /// The sequence's cache: its length is where `tokens` start, and they are
    /// appended to it. `None` runs the tokens as a whole sequence from position 0.
    pub cache: Option<&'a mut KvCache>,
}

/// Which positions get output logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// The last token of each sequence (generation): `[n_sequences, vocab]`.
    LastOfEachSequence,
    /// Every token (scoring, training): `[n_tokens, vocab]`.
    AllTokens,
}

#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    pub logits: LogitsFor,
    /// Keep each MoE layer's router logits (`[n_tokens, n_experts]`) for auxiliary losses.
    pub keep_router_logits: bool,
}

pub struct ForwardOutput {
    pub logits: Tensor,
    pub router_logits: Vec<Tensor>,
}

impl Model {
    /// Loads a Hugging Face model directory (`config.json` + safetensors), or a
    /// GGUF file.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if GgufFile::is_gguf(dir) {
            let (config, src) = open_gguf(dir)?;
            return Self::from_source(&config, &src, opts);
        }
        let config = load_model_config(dir)?;
        let files = SafetensorsFiles::open_dir(dir)?;
        // Every tensor checked from the header before any is read.
        let report = check_checkpoint(&config, &files)?;
        if let Some(warning) = report.unused_warning() {
            tracing::warn!("{}: {warning}", dir.display());
        }
        Self::from_source(&config, &files, opts)
    }

    pub fn from_source(
        config: &ModelConfig,
        src: &dyn TensorSource,
        opts: &LoadOptions,
    ) -> Result<Self> {
        load::build(config, src, opts)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    pub fn experts(&self) -> &Arc<dyn ExpertProvider> {
        &self.experts
    }

    pub fn embedding(&self) -> &Embedding {
        &self.embed
    }

    pub fn final_norm(&self) -> &RmsNorm {
        &self.norm
    }

    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// A KV cache sized for this model, allocating `initial_capacity` positions
    /// (sliding-window layers: about twice their window). It holds f32 like the activations.
    pub fn new_cache(&self, initial_capacity: usize) -> KvCache {
        let windows = self
            .layers
            .iter()
            .map(|l| l.attention.sliding_window())
            .collect();
        KvCache::new(&self.config, initial_capacity, DType::F32).with_windows(windows)
    }

    /// Convenience: one sequence (reported as `SequenceId::default()`), logits
    /// of its last token, `[vocab]`.
    pub fn forward_last(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        observer: &mut dyn RoutingObserver,
    ) -> Result<Tensor> {
        let mut seqs = [SequenceInput {
            id: SequenceId::default(),
            tokens,
            cache: Some(cache),
        }];
        let out = self.forward(
            &mut seqs,
            observer,
            ForwardOptions {
                logits: LogitsFor::LastOfEachSequence,
                keep_router_logits: false,
            },
        )?;
        Ok(out.logits.squeeze(0)?)
    }

    /// Logits of every position of one uncached sequence (scoring, golden
    /// checks), reported as `SequenceId::default()`.
    ///
    /// # Shapes
    /// `tokens: [n] -> [n, vocab]`
    pub fn score(&self, tokens: &[u32], observer: &mut dyn RoutingObserver) -> Result<Tensor> {
        let mut seqs = [SequenceInput {
            id: SequenceId::default(),
            tokens,
            cache: None,
        }];
        let opts = ForwardOptions {
            logits: LogitsFor::AllTokens,
            keep_router_logits: false,
        };
        Ok(self.forward(&mut seqs, observer, opts)?.logits)
    }

    /// Runs a batch of sequences. Every linear layer and MoE block sees all their
    /// tokens at once; attention runs per sequence against its own cache.
    ///
    /// # Shapes
    /// logits `[n_sequences, vocab]` or `[n_tokens, vocab]` (see [`LogitsFor`]).
    pub fn forward(
        &self,
        seqs: &mut [SequenceInput<'_>],
        observer: &mut dyn RoutingObserver,
        opts: ForwardOptions,
    ) -> Result<ForwardOutput> {
        // Decode-sized forwards are many short parallel sections; a prefill's
        // are long enough that waking a parked thread costs nothing, and
        // polling beside them measured 15 % slower prefill. An expert cache's
        // background reader needs a core the pollers would hold.
        let n_tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let spin = n_tokens <= SPIN_MAX_TOKENS && !self.experts.reads_in_background();
        let _spinning = spin.then(crate::ops::spin_workers);
        let mut layout = BatchLayout::default();
        let mut ids: Vec<u32> = Vec::new();
        for seq in seqs.iter() {
            let start = seq.cache.as_ref().map_or(0, |c| c.len());
            self.check_input(seq.tokens, start)?;
            layout.push(seq.id, seq.tokens.len(), start);
            ids.extend_from_slice(seq.tokens);
        }
        // Activations are f32 whatever the weights' type, as in llama.cpp: the
        // kernels widen bf16/f16 weights in registers and quantize activations per block.
        let mut x = self.embed.lookup(&ids)?; // [n_tokens, hidden]
        let mut router_logits = Vec::new();

        for (l, layer) in self.layers.iter().enumerate() {
            let norm = profile::span(Phase::Norm, Some(l));
            let h = layer.norms.attention_input(&x)?;
            drop(norm);
            let inputs = seqs
                .iter_mut()
                .zip(layout.sequences())
                .map(|(seq, rows)| {
                    let input = AttentionInput {
                        layer: l,
                        start_position: rows.start_position,
                        rope: &self.rope,
                        cache: seq.cache.as_deref_mut(),
                    };
                    (rows.row_start, rows.n_tokens, input)
                })
                .collect();
            let attn = layer.attention.forward_batch(&h, inputs)?;
            let norm = profile::span(Phase::Norm, Some(l));
            x = layer.norms.add_attention(&x, &attn)?;
            let h = layer.norms.ffn_input(&x)?;
            drop(norm);
            let ffn = match &layer.ffn {
                LayerFfn::Dense(ffn) => {
                    let _span = profile::span(Phase::DenseFfn, Some(l));
                    ffn.forward(&h)?
                }
                LayerFfn::Moe(block) => block.forward(
                    &h,
                    &layout,
                    observer,
                    opts.keep_router_logits.then_some(&mut router_logits),
                )?,
            };
            let _norm = profile::span(Phase::Norm, Some(l));
            x = layer.norms.add_ffn(&x, &ffn)?;
        }
        for (seq, rows) in seqs.iter_mut().zip(layout.sequences()) {
            if let Some(cache) = seq.cache.as_deref_mut() {
                cache.advance(rows.n_tokens);
            }
        }

        let x = match opts.logits {
            LogitsFor::AllTokens => x,
            LogitsFor::LastOfEachSequence => {
                let last: Vec<u32> = layout
                    .sequences()
                    .iter()
                    .map(|s| (s.row_start + s.n_tokens - 1) as u32)
                    .collect();
                x.index_select(&Tensor::new(last.as_slice(), self.device())?, 0)?
            }
        };
        let norm = profile::span(Phase::Norm, None);
        let x = self.norm.forward(&x)?;
        drop(norm);
        let _span = profile::span(Phase::LmHead, None);
        let logits = self.lm_head.forward(&x)?;
        // NaN logits would sample token 0 forever; load checks only the cheap
        // tensors (norms, routers, embedding), so the rest show up here.
        if crate::ops::all_finite(&logits) == Some(false) {
            return Err(Error::InvalidInput(
                "the model produced non-finite logits (NaN or Inf): its weights hold non-finite values or overflow".into(),
            ));
        }
        Ok(ForwardOutput {
            logits,
            router_logits,
        })
    }

    fn check_input(&self, tokens: &[u32], start: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::InvalidInput("empty token sequence".into()));
        }
        let vocab = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
        let context = self.config.max_position_embeddings;
        if start + tokens.len() > context {
            return Err(Error::InvalidInput(format!(
                "{} tokens (after {start} cached) exceed the model's context of {context} positions (max_position_embeddings)",
                tokens.len()
            )));
        }
        Ok(())
    }
}
