//! Training small MoE language models from scratch on candle's autograd:
//! a byte-level BPE tokeniser, an all-sparse `qwen3_moe` (or `qwen2_moe` with a
//! shared expert) built by the ordinary model loader from trainable vars,
//! Switch-style load balancing and router z-loss, AdamW with a cosine schedule,
//! and checkpoints that resume bit-for-bit.

mod bpe;
mod checkpoint;
mod data;
mod loss;
mod optim;
mod rng;
mod trainer;
mod vars;

pub use bpe::{train_tokenizer, write_tokenizer_files};
pub use checkpoint::{CHECKPOINT_DIR, has_checkpoint, saved_config};
pub use data::{Corpus, read_texts};
pub use loss::{RouterLosses, router_losses};
pub use optim::{AdamW, AdamWParams, cosine_lr};
pub use rng::SplitMix64;
pub use trainer::{StepStats, Trainer};
pub use vars::{RandomLike, VarStore};

use serde::{Deserialize, Serialize};

use crate::config::family::{QWEN2_MOE, QWEN3_MOE};
use crate::config::{AttentionConfig, ModelConfig, MoeConfig, RouterSpec, format_bytes};
use crate::error::{Error, Result};
use crate::weights::StoredDtype;

/// Token ids of the special tokens every trained tokeniser starts with.
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const SPECIAL_TOKENS: [&str; 3] = [ENDOFTEXT, IM_START, IM_END];

/// Everything a run needs: model shape and optimisation. Field names are the
/// keys of a `--config` TOML file; a preset supplies the ones it leaves out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    // Model shape.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// Width of one routed expert; fine-grained experts are more and narrower
    /// at equal active width (DeepSeekMoE).
    pub expert_ffn: usize,
    /// Width of an always-on shared expert; 0 for none. Non-zero writes `qwen2_moe`.
    pub shared_expert_ffn: usize,
    pub rope_theta: f64,
    // Optimisation.
    pub steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    /// Switch-Transformer load-balancing loss coefficient (0 turns it off).
    pub balance_coef: f64,
    /// Router z-loss coefficient (ST-MoE).
    pub z_loss_coef: f64,
    pub seed: u64,
    /// Fraction of each data file held out (its tail) for evaluation.
    pub holdout_fraction: f64,
    pub eval_every: usize,
    /// Held-out windows per evaluation, in batches.
    pub eval_batches: usize,
    pub checkpoint_every: usize,
    /// dtype of the exported `model.safetensors`: "float32" or "bfloat16".
    pub export_dtype: String,
}

impl TrainConfig {
    pub const PRESETS: [&'static str; 2] = ["tiny", "small"];

    /// `tiny`: seconds per run, for tests. `small`: the demo model (~20 MB in bf16).
    pub fn preset(name: &str) -> Result<Self> {
        let tiny = Self {
            vocab_size: 512,
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            num_experts: 8,
            top_k: 2,
            expert_ffn: 32,
            shared_expert_ffn: 0,
            rope_theta: 10_000.0,
            steps: 200,
            batch_size: 8,
            seq_len: 64,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            weight_decay: 0.1,
            grad_clip: 1.0,
            balance_coef: 0.01,
            z_loss_coef: 1e-3,
            seed: 0,
            holdout_fraction: 0.05,
            eval_every: 50,
            eval_batches: 2,
            checkpoint_every: 50,
            export_dtype: "float32".into(),
        };
        match name {
            "tiny" => Ok(tiny),
            "small" => Ok(Self {
                vocab_size: 4096,
                hidden_size: 256,
                num_layers: 4,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 64,
                num_experts: 16,
                top_k: 2,
                expert_ffn: 128,
                steps: 2000,
                batch_size: 16,
                seq_len: 128,
                lr: 2e-3,
                warmup_steps: 50,
                holdout_fraction: 0.02,
                eval_every: 100,
                eval_batches: 4,
                checkpoint_every: 50,
                export_dtype: "bfloat16".into(),
                ..tiny
            }),
            other => Err(Error::InvalidInput(format!(
                "unknown preset {other:?}; known: {}",
                Self::PRESETS.join(", ")
            ))),
        }
    }

    /// `base` with the keys of a TOML document replacing its values.
    pub fn with_toml(base: &Self, text: &str, path: &std::path::Path) -> Result<Self> {
        let bad = |e: String| Error::config(path, e);
        let mut table = toml::Table::try_from(base).map_err(|e| bad(e.to_string()))?;
        let overrides: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        for (k, v) in overrides {
            if !table.contains_key(&k) {
                return Err(bad(format!("unknown key `{k}`")));
            }
            table.insert(k, v);
        }
        table
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.to_string()))
    }

    /// Checks every field before anything is allocated or written: sizes positive
    /// and bounded (a run must fit in memory), rates and coefficients finite.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidInput(format!("training config: {m}")));
        for (name, value, max) in [
            ("vocab_size", self.vocab_size, 1 << 20),
            ("hidden_size", self.hidden_size, 1 << 14),
            ("num_layers", self.num_layers, 256),
            ("num_heads", self.num_heads, 1 << 10),
            ("num_kv_heads", self.num_kv_heads, 1 << 10),
            ("head_dim", self.head_dim, 1 << 10),
            ("num_experts", self.num_experts, 1 << 12),
            ("top_k", self.top_k, 1 << 12),
            ("expert_ffn", self.expert_ffn, 1 << 16),
            ("steps", self.steps, 1 << 40),
            ("batch_size", self.batch_size, 1 << 16),
            ("seq_len", self.seq_len, 1 << 20),
            ("eval_every", self.eval_every, usize::MAX),
            ("eval_batches", self.eval_batches, 1 << 16),
            ("checkpoint_every", self.checkpoint_every, usize::MAX),
        ] {
            if value == 0 || value > max {
                return bad(format!("`{name}` = {value} must be in 1..={max}"));
            }
        }
        if self.shared_expert_ffn > 1 << 16 {
            return bad(format!(
                "`shared_expert_ffn` = {} must be at most {}",
                self.shared_expert_ffn,
                1 << 16
            ));
        }
        if self.top_k > self.num_experts {
            return bad(format!(
                "`top_k` ({}) must be in 1..={} (num_experts)",
                self.top_k, self.num_experts
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad("`num_heads` must be a multiple of `num_kv_heads`".into());
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad("`head_dim` must be even".into());
        }
        if self.vocab_size < 256 + SPECIAL_TOKENS.len() {
            return bad("`vocab_size` must cover the 256 bytes and 3 special tokens".into());
        }
        if self.seq_len < 2 {
            return bad("`seq_len` must be at least 2".into());
        }
        let positive = [("lr", self.lr), ("rope_theta", self.rope_theta)];
        for (name, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return bad(format!("`{name}` = {value} must be a positive number"));
            }
        }
        if self.lr > 1.0 {
            return bad(format!("`lr` = {} must be at most 1", self.lr));
        }
        let non_negative = [
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
            ("balance_coef", self.balance_coef),
            ("z_loss_coef", self.z_loss_coef),
        ];
        for (name, value) in non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return bad(format!(
                    "`{name}` = {value} must be a non-negative number (0 turns it off)"
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "`min_lr_ratio` = {} must be in [0, 1]",
                self.min_lr_ratio
            ));
        }
        if !(0.0..1.0).contains(&self.holdout_fraction) {
            return bad("`holdout_fraction` must be in [0, 1)".into());
        }
        self.export_dtype()?;
        let bytes = self.memory_bytes();
        if bytes.is_none_or(|b| b > Self::MAX_MEMORY_BYTES) {
            return bad(format!(
                "this model and batch need about {} (parameters, gradients, AdamW moments and the batch's logits), over the {} a run may take",
                bytes.map_or("more than 16 EiB".into(), |b| format_bytes(b as u64)),
                format_bytes(Self::MAX_MEMORY_BYTES as u64)
            ));
        }
        Ok(())
    }

    /// The largest run `validate` accepts: a little more than the `small` preset
    /// needs a thousand times over, far less than would abort on allocation.
    pub const MAX_MEMORY_BYTES: usize = 64 << 30;

    /// A lower bound on what a run holds in f32: parameters four times (values,
    /// gradients, two AdamW moments) and the logits of one batch twice (forward and
    /// backward). `None` on overflow.
    pub fn memory_bytes(&self) -> Option<usize> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let expert = 3usize.checked_mul(h)?.checked_mul(self.expert_ffn)?;
        let shared = 3usize.checked_mul(h)?.checked_mul(self.shared_expert_ffn)?;
        let q = self.num_heads.checked_mul(self.head_dim)?;
        let kv = self.num_kv_heads.checked_mul(self.head_dim)?;
        let attention = h.checked_mul(2usize.checked_mul(q)?.checked_add(2 * kv)?)?;
        let layer = self
            .num_experts
            .checked_mul(expert)?
            .checked_add(shared)?
            .checked_add(attention)?
            .checked_add(self.num_experts.checked_mul(h)?)?;
        let params = self
            .num_layers
            .checked_mul(layer)?
            .checked_add(2usize.checked_mul(v)?.checked_mul(h)?)?;
        let logits = self.batch_size.checked_mul(self.seq_len)?.checked_mul(v)?;
        params
            .checked_mul(4)?
            .checked_add(logits.checked_mul(2)?)?
            .checked_mul(4)
    }

    pub fn export_dtype(&self) -> Result<StoredDtype> {
        match self.export_dtype.as_str() {
            "float32" => Ok(StoredDtype::F32),
            "bfloat16" => Ok(StoredDtype::BF16),
            other => Err(Error::InvalidInput(format!(
                "export_dtype {other:?}: expected \"float32\" or \"bfloat16\""
            ))),
        }
    }

    /// The model this run trains: every layer sparse; `qwen2_moe` when it has a
    /// shared expert, `qwen3_moe` otherwise.
    pub fn model_config(&self) -> ModelConfig {
        let shared = (self.shared_expert_ffn > 0).then_some(self.shared_expert_ffn);
        let family = if shared.is_some() {
            &QWEN2_MOE
        } else {
            &QWEN3_MOE
        };
        ModelConfig {
            family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            max_position_embeddings: self.seq_len.max(512),
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            attention: AttentionConfig {
                num_heads: self.num_heads,
                num_kv_heads: self.num_kv_heads,
                head_dim: self.head_dim,
                rotary_dim: self.head_dim,
                rope_theta: self.rope_theta,
                qkv_bias: family.hf.qkv_bias.default,
                o_bias: false,
                sinks: false,
                layer_windows: Vec::new(),
                qk_norm: family.attention.qk_norm,
                clip_qkv: None,
                yarn: None,
                rope_interleaved: false,
                mla: None,
            },
            moe: MoeConfig {
                num_experts: self.num_experts,
                top_k: self.top_k,
                expert_ffn: self.expert_ffn,
                expert_activation: Default::default(),
                router: RouterSpec {
                    norm_topk_prob: true,
                    ..family.router
                },
                shared_expert_ffn: shared,
                sparse_layers: vec![true; self.num_layers],
                dense_ffn: 0,
            },
            bos_token_id: None,
            // <|endoftext|> ends a document; <|im_end|> ends a chat turn.
            eos_token_ids: vec![0, 2],
            stored_dtype: Some(StoredDtype::F32),
        }
    }
}
