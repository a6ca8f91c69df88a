//! `switchyard routing-stats`: per-layer expert-load entropy and consecutive-token
//! expert reuse over a text, for a model or a random-weight model of its shape.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use switchyard::model::{ForwardOptions, LoadOptions, LogitsFor, Model, SequenceId, SequenceInput};
use switchyard::trace::{RoutingTrace, consecutive_reuse, load_entropy, uniform_reuse};
use switchyard::train::VarStore;

use super::model_arg::{load_engine, resolve};

#[derive(Debug, Args)]
pub struct RoutingStatsArgs {
    /// Model directory. Default: the bundled demo model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text to route.
    #[arg(long)]
    text: PathBuf,
    /// Replace the weights by a fresh random initialisation (normal(0, 0.02)) of the same shape, from this seed.
    #[arg(long)]
    random_init: Option<u64>,
    /// Tokens per sequence (each routed from position 0).
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Stop after this many tokens of the text.
    #[arg(long, default_value_t = 32768)]
    max_tokens: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: RoutingStatsArgs) -> anyhow::Result<()> {
    let dir = resolve(args.model)?;
    let engine = load_engine(&dir)?;
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let mut ids = engine.tokenizer()?.encode(&text, false)?;
    ids.truncate(args.max_tokens);
    anyhow::ensure!(args.seq_len >= 2, "--seq-len must be at least 2");
    let cfg = engine.model.config().clone();
    let random;
    let model: &Model = match args.random_init {
        Some(seed) => {
            let vars = VarStore::init(&cfg, seed, engine.model.device())?;
            random = Model::from_source(&cfg, &vars.frozen(), &LoadOptions::default())?;
            &random
        }
        None => &engine.model,
    };
    let windows: Vec<&[u32]> = ids.chunks(args.seq_len).filter(|w| w.len() >= 2).collect();
    anyhow::ensure!(!windows.is_empty(), "the text has fewer than 2 tokens");
    let mut trace = RoutingTrace::new(cfg.moe.num_experts);
    for (b, batch) in windows.chunks(16).enumerate() {
        let mut seqs: Vec<SequenceInput> = batch
            .iter()
            .zip(0..)
            .map(|(w, i)| SequenceInput {
                id: SequenceId((b * 16) as u64 + i),
                tokens: w,
                cache: None,
            })
            .collect();
        model.forward(
            &mut seqs,
            &mut trace,
            ForwardOptions {
                logits: LogitsFor::LastOfEachSequence,
                keep_router_logits: false,
            },
        )?;
    }
    let (e, k) = (cfg.moe.num_experts, cfg.moe.top_k);
    let layers: Vec<serde_json::Value> = trace
        .layers()
        .into_iter()
        .map(|l| {
            serde_json::json!({
                "layer": l,
                "load_entropy_bits": load_entropy(&trace, l),
                "consecutive_reuse": consecutive_reuse(&trace, l),
            })
        })
        .collect();
    let summary = serde_json::json!({
        "model": dir.display().to_string(),
        "random_init": args.random_init,
        "tokens": trace.layers().first().map_or(0, |&l| trace.n_tokens(l)),
        "num_experts": e,
        "top_k": k,
        "max_entropy_bits": (e as f64).log2(),
        "uniform_random_reuse": uniform_reuse(e, k),
        "layers": layers,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "{} tokens, {e} experts top-{k}: max entropy {:.3} bits, reuse under independent uniform routing {:.3}",
        summary["tokens"],
        (e as f64).log2(),
        uniform_reuse(e, k)
    );
    println!("layer  load-entropy(bits)  consecutive-reuse");
    for l in trace.layers() {
        println!(
            "{l:>5}  {:>18.3}  {:>17.3}",
            load_entropy(&trace, l),
            consecutive_reuse(&trace, l).unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
