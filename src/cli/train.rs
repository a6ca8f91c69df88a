//! `switchyard train`: tokeniser, model and loop, with a progress bar,
//! periodic evaluation, checkpoints and Ctrl-C handling.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use switchyard::train::{
    Corpus, ENDOFTEXT, TrainConfig, Trainer, has_checkpoint, read_texts, saved_config,
    train_tokenizer, write_tokenizer_files,
};
use tokenizers::Tokenizer;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Text files or directories of them.
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Output directory: the Hugging Face checkpoint, plus `checkpoint/` to resume from.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "tiny", value_parser = TrainConfig::PRESETS)]
    preset: String,
    /// TOML file whose keys override the preset (see `TrainConfig`).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Continue from `OUT/checkpoint/` (the saved configuration wins; --steps may extend it).
    #[arg(long)]
    resume: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let resuming = args.resume && has_checkpoint(&args.out);
    if args.resume && !resuming {
        eprintln!("no checkpoint in {}; starting afresh", args.out.display());
    }
    // The whole configuration is checked before anything is read or written.
    let config = if resuming {
        None
    } else {
        Some(config_from_args(&args)?)
    };
    let texts = read_texts(&args.data)?;
    let fresh = FreshOutput::create(&args.out, resuming)?;
    let result = train(&args, config, &texts);
    if result.is_err() && !has_checkpoint(&args.out) {
        fresh.undo();
    }
    result
}

/// What a fresh run adds to `--out` before its first checkpoint, so that a run
/// failing before then leaves the directory as it found it.
struct FreshOutput {
    dir: std::path::PathBuf,
    created_dir: bool,
    new_files: Vec<PathBuf>,
}

impl FreshOutput {
    const FILES: [&str; 3] = ["tokenizer.json", "tokenizer_config.json", "train_log.jsonl"];

    fn create(out: &Path, resuming: bool) -> anyhow::Result<Self> {
        let created_dir = !out.exists();
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let new_files = if resuming {
            Vec::new()
        } else {
            Self::FILES
                .iter()
                .map(|f| out.join(f))
                .filter(|p| !p.exists())
                .collect()
        };
        Ok(Self {
            dir: out.to_path_buf(),
            created_dir,
            new_files,
        })
    }

    fn undo(self) {
        for path in &self.new_files {
            let _ = std::fs::remove_file(path);
        }
        if self.created_dir {
            // Only if empty: never delete anything the run did not write.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

fn train(args: &TrainArgs, config: Option<TrainConfig>, texts: &[String]) -> anyhow::Result<()> {
    if let Some(config) = &config {
        eprintln!(
            "training a {}-entry byte-level BPE on {} files",
            config.vocab_size,
            texts.len()
        );
        let tok = train_tokenizer(texts, config.vocab_size)?;
        write_tokenizer_files(&tok, &args.out, config.seq_len)?;
    }
    // Always tokenise with the tokenizer as saved, so a resumed run sees the same ids.
    let tok_path = args.out.join("tokenizer.json");
    let tok = Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let eot = tok
        .token_to_id(ENDOFTEXT)
        .context("tokenizer has no <|endoftext|>")?;
    let holdout = match &config {
        Some(c) => c.holdout_fraction,
        None => saved_config(&args.out)?.holdout_fraction,
    };
    let corpus = Corpus::build(texts, &tok, holdout, eot)?;
    eprintln!(
        "corpus: {} training tokens, {} held out",
        corpus.train.len(),
        corpus.heldout.len()
    );
    let mut trainer = match config {
        Some(c) => Trainer::new(c, corpus)?,
        None => Trainer::resume(&args.out, corpus, args.steps)?,
    };
    train_loop(&mut trainer, &args.out)
}

fn config_from_args(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut c = TrainConfig::preset(&args.preset)?;
    if let Some(path) = &args.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        c = TrainConfig::with_toml(&c, &text, path)?;
    }
    c.steps = args.steps.unwrap_or(c.steps);
    c.batch_size = args.batch.unwrap_or(c.batch_size);
    c.seq_len = args.seq_len.unwrap_or(c.seq_len);
    c.lr = args.lr.unwrap_or(c.lr);
    c.seed = args.seed.unwrap_or(c.seed);
    c.validate()?;
    Ok(c)
}

fn train_loop(trainer: &mut Trainer, out: &Path) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let c = trainer.config().clone();
    let mcfg = trainer.model_config().clone();
    let params = trainer.vars().num_parameters();
    let counts = mcfg.parameter_counts();
    eprintln!(
        "{}: {} layers, {} experts top-{} (width {}), {:.2}M parameters ({:.2}M active)",
        mcfg.family.model_type(),
        mcfg.num_layers,
        mcfg.moe.num_experts,
        mcfg.moe.top_k,
        mcfg.moe.expert_ffn,
        params as f64 / 1e6,
        counts.active as f64 / 1e6
    );
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("train_log.jsonl"))
        .context("opening train_log.jsonl")?;
    let bar = ProgressBar::new(c.steps as u64);
    bar.set_position(trainer.step_count() as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    )?);
    let started = Instant::now();
    let first_step = trainer.step_count();
    let mut tokens = 0usize;
    while !trainer.is_done() && !stop.load(Ordering::SeqCst) {
        let s = trainer.step()?;
        tokens += s.tokens;
        let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let entropy: Vec<String> = s
            .load_entropy_bits
            .iter()
            .map(|e| format!("{e:.2}"))
            .collect();
        bar.set_position(s.step as u64);
        bar.set_message(format!(
            "loss {:.3} | {:.0} tok/s | lr {:.1e} | H(load) [{}] bits",
            s.loss,
            tokens_per_s,
            s.lr,
            entropy.join(" ")
        ));
        let mut record = serde_json::json!({
            "step": s.step, "loss": s.loss, "balance_loss": s.balance_loss, "z_loss": s.z_loss,
            "lr": s.lr, "grad_norm": s.grad_norm, "tokens_per_s": tokens_per_s,
            "load_entropy_bits": s.load_entropy_bits,
            "elapsed_s": started.elapsed().as_secs_f64(),
        });
        if s.step % c.eval_every == 0 || s.step == c.steps {
            let eval = trainer.eval_loss()?;
            record["eval_loss"] = eval.into();
            let line = format!(
                "step {}: train loss {:.3}, held-out loss {:.3} (perplexity {:.1}), load entropy [{}] bits of {:.2}",
                s.step,
                s.loss,
                eval,
                eval.exp(),
                entropy.join(" "),
                (mcfg.moe.num_experts as f64).log2()
            );
            // A hidden bar (stderr not a terminal) drops println: write plainly.
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
        writeln!(log, "{record}")?;
        if s.step % c.checkpoint_every == 0 {
            save(trainer, out)?;
        }
    }
    save(trainer, out)?;
    bar.finish_and_clear();
    let steps = trainer.step_count() - first_step;
    eprintln!(
        "{} after {steps} steps in {:.0}s: step {}/{}; checkpoint and model in {}",
        if trainer.is_done() { "done" } else { "stopped" },
        started.elapsed().as_secs_f64(),
        trainer.step_count(),
        c.steps,
        out.display()
    );
    Ok(())
}

fn save(trainer: &Trainer, out: &Path) -> anyhow::Result<()> {
    trainer.save_checkpoint(out)?;
    trainer.export(out)?;
    Ok(())
}
