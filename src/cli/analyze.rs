//! `switchyard analyze`: what a routing trace says about a model's experts
//! (load, local routing consistency, expert-cache hit rates, cross-layer
//! co-activation), as a table, `summary.json` and PNG plots. With `--text` it
//! routes a text in-process first (what `routing-stats` did).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use switchyard::config::{ModelConfig, load_model_config, open_gguf};
use switchyard::model::{ForwardOptions, LoadOptions, LogitsFor, Model, SequenceId, SequenceInput};
use switchyard::trace::{
    Routes, Summary, Trace, TraceMeta, TraceRows, TraceWriter, read_trace, write_plots,
};
use switchyard::train::RandomLike;
use switchyard::weights::{GgufFile, SafetensorsFiles, TensorSource};

use super::model_arg::{load_engine, resolve};

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// Routing trace (.parquet) written with --trace by run, logits, bench or perplexity.
    #[arg(conflicts_with = "text")]
    trace: Option<PathBuf>,
    /// Route this text with the model instead of reading a trace.
    #[arg(long)]
    text: Option<PathBuf>,
    /// With a trace: a model directory or GGUF file whose shape the trace must match.
    /// With --text: the model that routes it (default: the bundled demo model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// With --text: replace the weights by a random initialisation (normal(0, 0.02)) from this seed.
    #[arg(long, requires = "text")]
    random_init: Option<u64>,
    /// With --text: tokens per sequence (each routed from position 0).
    #[arg(long, default_value_t = 256, requires = "text")]
    seq_len: usize,
    /// With --text: stop after this many tokens of the text.
    #[arg(long, default_value_t = 32768, requires = "text")]
    max_tokens: usize,
    /// With --text: also write the routing as a Parquet trace here.
    #[arg(long, requires = "text")]
    save_trace: Option<PathBuf>,
    /// Directory for summary.json and the plots. Default: beside the trace,
    /// `NAME.analysis/`; with --text nothing is written unless this is given.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the summary as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run(args: AnalyzeArgs) -> anyhow::Result<()> {
    let (routes, source, default_out) = match (&args.trace, &args.text) {
        (Some(path), _) => {
            let trace = read_trace(path)?;
            if let Some(model) = &args.model {
                trace.meta.check_model(&model_config(model)?, path)?;
            }
            let routes = Routes::from_trace(&trace, path)?;
            (
                routes,
                path.display().to_string(),
                Some(path.with_extension("analysis")),
            )
        }
        (None, Some(text)) => (route_text(&args, text)?, text.display().to_string(), None),
        (None, None) => {
            anyhow::bail!("nothing to analyze: give a trace file (.parquet) or --text FILE")
        }
    };
    anyhow::ensure!(routes.n_tokens() > 0, "{source}: the trace has no rows");
    let summary = Summary::of(&routes);
    if let Some(dir) = args.out.or(default_out) {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join("summary.json");
        write_atomically(&json, serde_json::to_string_pretty(&summary)?.as_bytes())?;
        let plots = write_plots(&summary, &dir)?;
        eprintln!(
            "wrote {} and {} plots to {}",
            json.display(),
            plots.len(),
            dir.display()
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_tables(&summary, &source);
    }
    Ok(())
}

fn model_config(path: &Path) -> anyhow::Result<switchyard::config::ModelConfig> {
    let config = if GgufFile::is_gguf(path) {
        open_gguf(path)?.0
    } else {
        load_model_config(path)?
    };
    Ok(config)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Routes `text` in windows of `--seq-len` tokens, 16 sequences per forward.
fn route_text(args: &AnalyzeArgs, text: &Path) -> anyhow::Result<Routes> {
    let dir = resolve(args.model.clone())?;
    let engine = load_engine(&dir)?;
    let content =
        std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let mut ids = engine.tokenizer()?.encode(&content, false)?;
    ids.truncate(args.max_tokens);
    anyhow::ensure!(args.seq_len >= 2, "--seq-len must be at least 2");
    let cfg = engine.config().clone();
    let random;
    let model: &Model = match args.random_init {
        Some(seed) => {
            // Shaped by the checkpoint itself, so every layout it loads from works.
            random = if GgufFile::is_gguf(&dir) {
                let (_, src) = open_gguf(&dir)?;
                random_model(&cfg, &src, seed)?
            } else {
                random_model(&cfg, &SafetensorsFiles::open_dir(&dir)?, seed)?
            };
            &random
        }
        None => engine.model(),
    };
    let windows: Vec<&[u32]> = ids.chunks(args.seq_len).filter(|w| w.len() >= 2).collect();
    anyhow::ensure!(
        !windows.is_empty(),
        "{}: fewer than 2 tokens",
        text.display()
    );
    let mut rows = TraceRows::default();
    for (b, batch) in windows.chunks(16).enumerate() {
        let mut seqs: Vec<SequenceInput> = (batch.iter().zip(0..))
            .map(|(w, i)| SequenceInput {
                id: SequenceId((b * 16) as u64 + i),
                tokens: w,
                cache: None,
            })
            .collect();
        let opts = ForwardOptions {
            logits: LogitsFor::LastOfEachSequence,
            keep_router_logits: false,
        };
        model.forward(&mut seqs, &mut rows, opts)?;
    }
    // The model as the user named it: no machine path in a summary made with the default.
    let mut name = match &args.model {
        Some(m) => m.display().to_string(),
        None => "the demo model (models/demo)".to_string(),
    };
    if let Some(seed) = args.random_init {
        name.push_str(&format!(" (random init, seed {seed})"));
    }
    let trace = Trace {
        meta: TraceMeta::of_model(&cfg, name),
        rows,
    };
    if let Some(path) = &args.save_trace {
        let mut writer = TraceWriter::create(path, &trace.meta)?;
        for row in trace.rows.iter() {
            writer.push(row);
        }
        let n = writer.finish()?;
        eprintln!("wrote {n} trace rows to {}", path.display());
    }
    Ok(Routes::from_trace(&trace, text)?)
}

fn random_model(cfg: &ModelConfig, like: &dyn TensorSource, seed: u64) -> anyhow::Result<Model> {
    Ok(Model::from_source(
        cfg,
        &RandomLike::new(like, seed),
        &LoadOptions::default(),
    )?)
}

/// Cache sizes shown in the tables: top_k, 2 top_k, 4 top_k, ... and all experts.
fn shown_sizes(summary: &Summary) -> Vec<usize> {
    let (k, e) = (summary.top_k.max(1), summary.num_experts);
    let mut sizes: Vec<usize> = std::iter::successors(Some(k), |&c| Some(c * 2))
        .take_while(|&c| c < e)
        .collect();
    sizes.push(e);
    sizes
}

fn print_tables(summary: &Summary, source: &str) {
    let k = summary.top_k.max(1);
    println!(
        "{source}: {} — {} MoE layers x {} experts, top-{k}; {} sequences, {} tokens",
        summary.model,
        summary.moe_layers.len(),
        summary.num_experts,
        summary.sequences,
        summary.tokens
    );
    println!();
    println!("Expert load and local routing consistency");
    println!(
        "{:>6}  {:>8}  {:>5}  {:>7}  {:>6}  {:>5}  {:>26}",
        "layer", "max/mean", "CV", "entropy", "unused", "reuse", "SRP at m = 4 / 16 / 64 / 256"
    );
    let srp_cells = |segments: &[switchyard::trace::Srp]| {
        segments
            .iter()
            .map(|s| {
                if s.windows > 0 {
                    format!("{:.3}", s.f1)
                } else {
                    "-".into()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    for ((load, reuse), srp) in summary
        .load
        .iter()
        .zip(&summary.consecutive_reuse)
        .zip(&summary.srp.layers)
    {
        println!(
            "{:>6}  {:>8.2}  {:>5.2}  {:>7.3}  {:>6}  {:>5}  {:>26}",
            load.layer,
            load.max_over_mean,
            load.coefficient_of_variation,
            load.normalized_entropy,
            load.unused_experts,
            reuse.value.map_or("-".into(), |r| format!("{r:.3}")),
            srp_cells(&srp.segments)
        );
    }
    println!(
        "{:>6}  {:>8}  {:>5}  {:>7}  {:>6}  {:>5}  {:>26}",
        "model",
        "",
        "",
        "",
        "",
        format!("{:.3}", summary.uniform_random_reuse),
        srp_cells(&summary.srp.model)
    );
    println!(
        "(entropy: normalised to log2 E; reuse: consecutive tokens sharing an expert, model row = uniform random routing)"
    );
    println!();

    let sizes = shown_sizes(summary);
    let header: Vec<String> = sizes
        .iter()
        .map(|&c| format!("{}k", c as f64 / k as f64))
        .collect();
    println!("Hit rate, whole model, cache of N experts per layer (N in multiples of k = {k})");
    println!(
        "{:<34} {}",
        "policy, counting",
        header.iter().map(|h| format!("{h:>6}")).collect::<String>()
    );
    let row = |label: &str, curve: &[f64]| {
        let cells: String = sizes
            .iter()
            .map(|&c| {
                curve
                    .get(c - 1)
                    .map_or("     -".into(), |v| format!("{v:>6.3}"))
            })
            .collect();
        println!("{label:<34} {cells}");
    };
    for c in &summary.sch.model {
        row(
            &format!("SCH next {} tokens, paper", c.segment),
            &c.hit_rate,
        );
    }
    let (p, e) = (
        &summary.paper_counting.model,
        &summary.engine_counting.model,
    );
    row("LRU, paper", &p.lru);
    row("LFU, paper", &p.lfu);
    row("Belady, paper", &p.belady);
    row("LRU, engine", &e.lru);
    row("LFU (ageing), engine", &e.lfu);
    row("Belady, engine", &e.belady);
    println!();

    if !summary.coactivation.is_empty() {
        println!("Cross-layer co-activation");
        println!(
            "{:>9}  {:>7}  {:>7}  most frequent pair i -> j: P(j | i), lift",
            "layers", "MI bits", "MI/H"
        );
        for c in &summary.coactivation {
            let top = c.top_pairs.first().map_or("-".into(), |p| {
                format!(
                    "{} -> {}: {:.3}, {:.2}x",
                    p.from_expert, p.to_expert, p.conditional, p.lift
                )
            });
            println!(
                "{:>9}  {:>7.3}  {:>7.3}  {top}",
                format!("{}->{}", c.from_layer, c.to_layer),
                c.mutual_information_bits,
                c.normalized_mutual_information
            );
        }
    }
}
