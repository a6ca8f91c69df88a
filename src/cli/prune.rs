//! `switchyard prune`: score experts on calibration text, drop the same number
//! of lowest-scoring experts in every MoE layer, write the smaller checkpoint.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use switchyard::Engine;
use switchyard::model::{ForwardOptions, LogitsFor, SequenceId, SequenceInput};
use switchyard::slim::{ExpertScores, PruneCriterion, check_out, sidecar_path, write_pruned};
use switchyard::weights::GgufFile;

use super::model_arg::{load_engine, model_name, resolve};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("amount").required(true).args(["keep", "keep_per_layer"])))]
pub struct PruneArgs {
    /// Hugging Face model directory (config.json + safetensors) or GGUF file. Default: the bundled demo model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Plain text the experts are scored on.
    #[arg(long)]
    calibration: PathBuf,
    /// Fraction of each layer's experts to keep, in (0, 1] (rounded to the nearest count, at least 1).
    #[arg(long)]
    keep: Option<f64>,
    /// Experts to keep in every MoE layer.
    #[arg(long)]
    keep_per_layer: Option<usize>,
    /// Score: how many calibration tokens an expert received (frequency), or
    /// REAP saliency (mean router probability times expert output norm over them).
    #[arg(long, value_enum, default_value_t = By::Frequency)]
    by: By,
    /// Output: a directory (a Hugging Face checkpoint with pruning.json) for a
    /// safetensors model; a file ending in .gguf (its record in NAME.pruning.json
    /// beside it and in the metadata) for a GGUF model.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Tokens per calibration window (each routed from position 0). Default: the model's context.
    #[arg(long)]
    context: Option<usize>,
    /// Use only the first N tokens of the calibration text.
    #[arg(long, default_value_t = 65536)]
    max_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum By {
    Frequency,
    Reap,
}

/// Windows per forward during calibration.
const WINDOWS_PER_FORWARD: usize = 4;

pub fn run(args: PruneArgs) -> anyhow::Result<()> {
    let dir = resolve(args.model.clone())?;
    if let Some(f) = args.keep {
        anyhow::ensure!(
            f > 0.0 && f <= 1.0,
            "--keep {f}: must be a fraction in (0, 1] of each layer's experts"
        );
    }
    // Before the calibration run, which is most of the time.
    check_out(&dir, &args.out, args.force)?;
    let engine = load_engine(&dir)?;
    let cfg = engine.model().config().clone();
    let n_experts = cfg.moe.num_experts;
    let keep = match (args.keep, args.keep_per_layer) {
        (Some(f), _) => ((n_experts as f64 * f).round() as usize).max(1),
        (None, Some(n)) => {
            anyhow::ensure!(
                (1..=n_experts).contains(&n),
                "--keep-per-layer {n}: the model has {n_experts} experts per MoE layer; keep between 1 and {n_experts}"
            );
            n
        }
        (None, None) => anyhow::bail!("give --keep FRACTION or --keep-per-layer N"),
    };
    let criterion = match args.by {
        By::Frequency => PruneCriterion::Frequency,
        By::Reap => PruneCriterion::Reap,
    };
    let context = args.context.unwrap_or(cfg.max_position_embeddings);
    let (scores, tokens) = calibrate(
        &engine,
        &args.calibration,
        context,
        args.max_tokens,
        criterion,
    )?;
    let moe_layers: Vec<usize> = (cfg.moe.sparse_layers.iter().enumerate())
        .filter_map(|(l, &sparse)| sparse.then_some(l))
        .collect();
    let plan = scores.plan(&moe_layers, keep)?;
    let per_layer: serde_json::Map<String, serde_json::Value> = moe_layers
        .iter()
        .map(|&l| (l.to_string(), serde_json::json!(scores.scores(l))))
        .collect();
    let record = serde_json::json!({
        "by": format!("{:?}", args.by).to_lowercase(),
        "calibration": args.calibration.display().to_string(),
        "calibration_tokens": tokens,
        "context": context,
        "scores": per_layer,
        "model": model_name(args.model.as_deref()),
    });
    drop(engine);
    let summary = write_pruned(&dir, &plan, &args.out, args.force, record)
        .with_context(|| format!("writing the pruned checkpoint to {}", args.out.display()))?;
    println!(
        "pruned by {} on {tokens} calibration tokens: {} -> {} experts per MoE layer, top_k {} -> {}, weights {:.1} MB -> {:.1} MB; wrote {} ({})",
        format!("{:?}", args.by).to_lowercase(),
        summary.experts_before,
        summary.experts_after,
        summary.top_k_before,
        summary.top_k_after,
        summary.bytes_before as f64 / 1e6,
        summary.bytes_after as f64 / 1e6,
        args.out.display(),
        if GgufFile::is_gguf(&dir) {
            format!(
                "record in {} and the metadata",
                sidecar_path(&args.out).display()
            )
        } else if summary.copied.is_empty() {
            "no tokenizer files copied".to_string()
        } else {
            format!("{} copied", summary.copied.join(", "))
        }
    );
    Ok(())
}

/// Routes the calibration text in windows of `context` tokens, scoring experts.
fn calibrate(
    engine: &Engine,
    text: &Path,
    context: usize,
    max_tokens: usize,
    criterion: PruneCriterion,
) -> anyhow::Result<(ExpertScores, usize)> {
    let content =
        std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let mut ids = engine.tokenizer()?.encode(&content, false)?;
    ids.truncate(max_tokens);
    anyhow::ensure!(
        !ids.is_empty(),
        "{}: the calibration text has no tokens",
        text.display()
    );
    let max_context = engine.model().config().max_position_embeddings;
    anyhow::ensure!(
        (1..=max_context).contains(&context),
        "--context {context}: must be between 1 and the model's context ({max_context})"
    );
    let mut scores = ExpertScores::new(engine.model().config().moe.num_experts, criterion);
    let windows: Vec<&[u32]> = ids.chunks(context).collect();
    for (b, batch) in windows.chunks(WINDOWS_PER_FORWARD).enumerate() {
        let mut seqs: Vec<SequenceInput> = (batch.iter().enumerate())
            .map(|(i, w)| SequenceInput {
                id: SequenceId((b * WINDOWS_PER_FORWARD + i) as u64),
                tokens: w,
                cache: None,
            })
            .collect();
        let opts = ForwardOptions {
            logits: LogitsFor::LastOfEachSequence,
            keep_router_logits: false,
        };
        engine.model().forward(&mut seqs, &mut scores, opts)?;
    }
    Ok((scores, ids.len()))
}
