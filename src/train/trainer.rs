//! One optimisation step at a time, with evaluation, checkpointing and export.
//!
//! Cost per step: forward and backward over `batch_size * seq_len` tokens through
//! the attention, router and `top_k` experts of each layer, and the output projection.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::TrainConfig;
use super::checkpoint::{Checkpoint, TrainState, export_hf};
use super::data::Corpus;
use super::loss::router_losses;
use super::optim::{AdamW, AdamWParams, cosine_lr, grad_norm};
use super::rng::SplitMix64;
use super::vars::VarStore;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{
    ForwardOptions, LoadOptions, LogitsFor, Model, NoObserver, SequenceId, SequenceInput,
};
use crate::trace::entropy_bits;

/// What one step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Steps completed, this one included.
    pub step: usize,
    /// Cross-entropy of the batch (nats per token).
    pub loss: f64,
    pub balance_loss: f64,
    pub z_loss: f64,
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    /// Per layer: entropy (bits) of the batch's expert load.
    pub load_entropy_bits: Vec<f64>,
}

pub struct Trainer {
    config: TrainConfig,
    model_config: ModelConfig,
    vars: VarStore,
    opt: AdamW,
    corpus: Corpus,
    rng: SplitMix64,
    step: usize,
}

impl Trainer {
    /// A fresh run: parameters initialised from `config.seed`.
    pub fn new(config: TrainConfig, corpus: Corpus) -> Result<Self> {
        config.validate()?;
        let model_config = config.model_config();
        let vars = VarStore::init(&model_config, config.seed, &Device::Cpu)?;
        let opt = AdamW::new(&vars, adamw_params(&config))?;
        // The sampler's stream differs from the initialiser's.
        let rng = SplitMix64::new(config.seed.wrapping_add(0x5EED));
        Ok(Self {
            config,
            model_config,
            vars,
            opt,
            corpus,
            rng,
            step: 0,
        })
    }

    /// Continues the run saved in `out/checkpoint/`. `steps` may extend the
    /// schedule; everything else comes from the checkpoint.
    pub fn resume(out: &Path, corpus: Corpus, steps: Option<usize>) -> Result<Self> {
        let ckpt = Checkpoint::load(out)?;
        let mut config = ckpt.state.config;
        if let Some(steps) = steps {
            config.steps = steps;
        }
        config.validate()?;
        let model_config = config.model_config();
        let vars = VarStore::from_tensors(&model_config, ckpt.weights)?;
        let mut opt = AdamW::new(&vars, adamw_params(&config))?;
        opt.load_state(&ckpt.optimizer, ckpt.state.step)?;
        Ok(Self {
            config,
            model_config,
            vars,
            opt,
            corpus,
            rng: SplitMix64::new(ckpt.state.rng_state),
            step: ckpt.state.step,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    pub fn step_count(&self) -> usize {
        self.step
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.config.steps
    }

    pub fn vars(&self) -> &VarStore {
        &self.vars
    }

    /// The current parameters as an inference model (no autograd graph).
    pub fn model(&self) -> Result<Model> {
        Model::from_source(
            &self.model_config,
            &self.vars.frozen(),
            &LoadOptions::default(),
        )
    }

    /// One optimisation step on a fresh random batch.
    pub fn step(&mut self) -> Result<StepStats> {
        let c = &self.config;
        let windows = self
            .corpus
            .sample(&mut self.rng, c.batch_size, c.seq_len + 1)?;
        // Rebuilt from the vars every step, so it never holds stale fused copies.
        let model = Model::from_source(&self.model_config, &self.vars, &LoadOptions::default())?;
        let (ce, logits) = cross_entropy(&model, &windows, true)?;
        let router = router_losses(&logits, self.model_config.moe.top_k)?;
        let total = ((&ce + (&router.balance * c.balance_coef)?)? + (&router.z * c.z_loss_coef)?)?;
        let total_loss = scalar(&total)?;
        let grads = total.backward()?;
        let norm = grad_norm(&self.vars, &grads)?;
        // One non-finite update poisons every weight: refuse it, leaving the vars
        // (and so the last checkpoint's lineage) as they were.
        if !total_loss.is_finite() || !norm.is_finite() {
            return Err(Error::Training(format!(
                "step {}: loss {total_loss}, gradient norm {norm} are not finite (lr {} may be too high); the weights were not updated",
                self.step + 1,
                c.lr
            )));
        }
        let scale = if c.grad_clip > 0.0 && norm > c.grad_clip {
            c.grad_clip / norm
        } else {
            1.0
        };
        let lr = cosine_lr(self.step, c.warmup_steps, c.steps, c.lr, c.min_lr_ratio);
        self.opt.step(&self.vars, &grads, lr, scale)?;
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss: scalar(&ce)?,
            balance_loss: scalar(&router.balance)?,
            z_loss: scalar(&router.z)?,
            lr,
            grad_norm: norm,
            tokens: c.batch_size * c.seq_len,
            load_entropy_bits: router.loads.iter().map(|l| entropy_bits(l)).collect(),
        })
    }

    /// Mean cross-entropy (nats per token) over the fixed held-out windows.
    pub fn eval_loss(&self) -> Result<f64> {
        let c = &self.config;
        let windows = self
            .corpus
            .eval_windows(c.eval_batches * c.batch_size, c.seq_len + 1)?;
        let model = self.model()?;
        let mut total = 0.0;
        for batch in windows.chunks(c.batch_size) {
            total += scalar(&cross_entropy(&model, batch, false)?.0)? * batch.len() as f64;
        }
        Ok(total / windows.len().max(1) as f64)
    }

    /// Saves the resumable state into `out/checkpoint/`.
    pub fn save_checkpoint(&self, out: &Path) -> Result<()> {
        Checkpoint {
            state: TrainState {
                step: self.step,
                rng_state: self.rng.state,
                config: self.config.clone(),
            },
            weights: self.vars.tensors(),
            optimizer: self.opt.state_tensors(),
        }
        .save(out)
    }

    /// Writes `config.json`, `generation_config.json` and `model.safetensors`
    /// (in the configured export dtype) into `out`.
    pub fn export(&self, out: &Path) -> Result<()> {
        let stored = self.config.export_dtype()?;
        let dtype = stored.candle();
        let mut cfg = self.model_config.clone();
        cfg.stored_dtype = Some(stored);
        export_hf(&cfg, &self.vars.tensors(), dtype, out)
    }
}

fn adamw_params(c: &TrainConfig) -> AdamWParams {
    AdamWParams {
        weight_decay: c.weight_decay,
        ..AdamWParams::default()
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Next-token cross-entropy over windows of `seq_len + 1` tokens, and the
/// router logits of every MoE layer when `keep_router_logits`.
fn cross_entropy(
    model: &Model,
    windows: &[Vec<u32>],
    keep_router_logits: bool,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut seqs: Vec<SequenceInput> = windows
        .iter()
        .zip(0..)
        .map(|(w, i)| SequenceInput {
            id: SequenceId(i),
            tokens: &w[..w.len() - 1],
            cache: None,
        })
        .collect();
    let targets: Vec<u32> = windows
        .iter()
        .flat_map(|w| w[1..].iter().copied())
        .collect();
    let out = model.forward(
        &mut seqs,
        &mut NoObserver,
        ForwardOptions {
            logits: LogitsFor::AllTokens,
            keep_router_logits,
        },
    )?;
    let targets = Tensor::new(targets.as_slice(), model.device())?;
    let logits = out.logits.to_dtype(DType::F32)?; // [n_tokens, vocab]
    let ce = candle_nn::loss::cross_entropy(&logits, &targets)?;
    Ok((ce, out.router_logits))
}
