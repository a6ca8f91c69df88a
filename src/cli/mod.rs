//! Subcommands, one file each.

mod analyze;
mod bench;
#[cfg(feature = "peer-candle")]
mod bench_peer;
mod bench_profile;
mod expert_memory;
mod info;
mod logits;
mod model_arg;
mod perplexity;
mod plan;
mod prune;
mod routing_flags;
mod run;
mod serve;
mod simulate;
mod train;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Run, inspect and slim Mixture-of-Experts language models"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt (the bundled demo model when no --model is given).
    Run(run::RunArgs),
    /// OpenAI-compatible HTTP server with continuous batching (the demo model when no --model is given).
    Serve(serve::ServeArgs),
    /// Write the float32 logits of every prompt position to a .npy file.
    Logits(logits::LogitsArgs),
    /// Describe a model: architecture, experts, parameter counts and bytes.
    Info(info::InfoArgs),
    /// Prefill and decode speed against the memory-bandwidth roofline (and a peer engine).
    Bench(bench::BenchArgs),
    /// Sliding-window perplexity of a text (transformers' method) and tokens/s.
    Perplexity(perplexity::PerplexityArgs),
    /// Drop the lowest-scoring experts (by routed frequency or REAP saliency on
    /// calibration text) in every MoE layer and write the smaller checkpoint.
    Prune(prune::PruneArgs),
    /// Train a small MoE model from scratch on text files.
    Train(train::TrainArgs),
    /// Routing analysis of a trace (or of a model on a text): expert load, SRP/SCH
    /// locality, expert-cache hit rates, cross-layer co-activation; table, JSON, PNG plots.
    #[command(alias = "routing-stats")]
    Analyze(analyze::AnalyzeArgs),
    /// Expert placement for expert-parallel serving (SGLang, vLLM) from a routing trace:
    /// an integer program over load and cross-layer traffic; JSON in their formats.
    Plan(plan::PlanArgs),
    /// Replay a trace on a placement beside contiguous, round-robin and EPLB placements:
    /// per-step device load, tokens and bytes between devices and nodes.
    Simulate(simulate::SimulateArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    // Before any other work: candle reads the count on every matmul, rayon once.
    let threads = match &cli.command {
        Command::Bench(args) => args.threads,
        _ => None,
    };
    switchyard::ops::set_num_threads(
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    );
    // The server's model thread enters the pool per step; parking this thread on a
    // pool worker for the server's whole life would take one from the kernels.
    if let Command::Serve(args) = cli.command {
        return serve::run(args);
    }
    switchyard::ops::on_pool(|| run_command(cli.command))
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Bench(args) => bench::run(args),
        Command::Run(args) => run::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Info(args) => info::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Prune(args) => prune::run(args),
        Command::Train(args) => train::run(args),
        Command::Analyze(args) => analyze::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Simulate(args) => simulate::run(args),
    }
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWITCHYARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
