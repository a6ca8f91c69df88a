//! `switchyard bench`: prefill and decode speed against the machine's memory
//! bandwidth, optionally next to candle-transformers' own model in the same process.
//!
//! The tests follow `llama-bench`, so its figures compare directly: prefill is one
//! forward of the whole prompt (`pp`), decode generates from an empty cache
//! (`tg`). Decode after the prompt (`tg @ depth`) is reported beside it: there
//! every step also reads the prompt's KV cache.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::DType;
use clap::builder::RangedU64ValueParser;
use clap::{Args, ValueEnum};
use switchyard::Engine;
use switchyard::config::ModelConfig;
use switchyard::experts::CacheReport;
use switchyard::generate::{SamplingParams, SchedulerOptions, SequenceRequest, StepEvent};
use switchyard::model::{LoadOptions, NoObserver, RoutingObserver, SequenceId};
use switchyard::ops::{QuantKind, bandwidth};
use switchyard::trace::RunObserver;
use switchyard::weights::GgufFile;

use super::expert_memory::{ExpertMemoryArgs, MemoryBound, process_read_bytes};
use super::routing_flags::{self, RoutingFlags};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model directory (config.json + safetensors) or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Quantize experts, attention and lm_head at load: q8_0, q4_0 or q4_k.
    #[arg(long)]
    quant: Option<QuantKind>,
    /// Element type of the unquantized weights: f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Threads (default: all cores), 1 to 1024.
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_THREADS))]
    pub threads: Option<usize>,
    /// Prompt length; with --gen-tokens, at most the model's context.
    #[arg(long, default_value_t = 512, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    gen_tokens: usize,
    /// Timed runs after one warm-up; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    repeat: usize,
    /// Also run another engine on the same weights and dtype, in this process.
    #[arg(long)]
    peer: Option<Peer>,
    /// After the timed runs, one decode run of --gen-tokens steps with phase
    /// timers on: where a step's time goes, per phase and per layer.
    #[arg(long)]
    profile: bool,
    #[command(flatten)]
    experts: ExpertMemoryArgs,
    #[command(flatten)]
    routing: RoutingFlags,
}

/// More threads than this is a typo, not a machine (rayon spawns them all up front).
const MAX_THREADS: u64 = 1024;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Peer {
    /// candle-transformers' `qwen3_moe` (build with `--features peer-candle`).
    Candle,
}

/// One engine's medians.
pub struct Measured {
    pub prefill_tokens_per_s: f64,
    /// From an empty cache, as `llama-bench`'s `tg`.
    pub decode_tokens_per_s: f64,
    /// After the prompt: every step also attends over its cache.
    pub decode_at_depth_tokens_per_s: f64,
    pub peak_rss_bytes: u64,
}

/// What a benchmarked engine does, given a prompt and a number of tokens to decode.
pub trait Runner {
    /// Prefill seconds, decode seconds.
    fn run_once(&mut self, prompt: &[u32], gen_tokens: usize) -> anyhow::Result<(f64, f64)>;

    /// The warm-up is done; the timed rounds follow.
    fn after_warmup(&mut self) {}
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let dtype = parse_dtype(&args.dtype)?;
    let threads = switchyard::ops::num_threads();
    eprintln!("measuring read bandwidth ({threads} threads, 1 GiB, median of 7)...");
    let bw_gbs = bandwidth::measure_read_gbs(1 << 30, 7);

    reset_peak_rss();
    let opts = LoadOptions {
        dtype,
        progress: true,
        quant: args.quant,
        expert_memory: args.experts.memory(),
        expert_top_p: args.routing.expert_top_p()?,
    };
    let start = Instant::now();
    let engine = Engine::load(&args.model, &opts)
        .with_context(|| format!("loading {}", args.model.display()))?;
    eprintln!("loaded in {:.1} s", start.elapsed().as_secs_f64());
    let active = engine.active_bytes_per_token();
    let vocab = engine.config().vocab_size;
    let context = engine.config().max_position_embeddings;
    anyhow::ensure!(
        args.prompt_tokens.saturating_add(args.gen_tokens) <= context,
        "--prompt-tokens {} + --gen-tokens {} exceed the model's context of {context} positions",
        args.prompt_tokens,
        args.gen_tokens
    );
    let prompt = random_ids(args.prompt_tokens, vocab);
    let observer = args
        .routing
        .observer(engine.model(), &args.model.display().to_string())?;
    let mut runner = Ours {
        engine: &engine,
        tokens: 0,
        process_read_at_warmup: 0,
        observer,
        runs: 0,
    };
    let ours = measure(&mut runner, &prompt, &args)?;
    let routed = routing_flags::finish(runner.observer, engine.model())?;
    eprintln!("{}", routed.line(engine.model()));
    // Under --expert-top-p tokens use fewer experts than top_k: the row shows
    // the expert bytes the runs actually routed to (prefill and decode alike).
    let active_routed =
        active - engine.expert_bytes_per_token() + routed.expert_bytes_per_token.round() as usize;
    let experts = engine.model().experts();
    if let Some(report) = experts.cache_report() {
        eprintln!("{}", report.summary_line(runner.tokens));
        eprintln!(
            "reads: engine {} bytes of experts, process read_bytes {} (/proc/self/io; the checkpoint's pages dropped before each run)",
            report.read.bytes,
            process_read_bytes().saturating_sub(runner.process_read_at_warmup)
        );
        let cfg = engine.config();
        let embed_bytes = engine.model().embedding().resident_bytes();
        let positions = (args.prompt_tokens + args.gen_tokens) as u64;
        MemoryBound {
            non_expert_bytes: (active - engine.expert_bytes_per_token() + embed_bytes) as u64,
            budget_bytes: report.budget_bytes,
            kv_bytes: 2 * cfg.num_layers as u64 * cfg.attention.kv_dim() as u64 * positions * 4,
            read_buffer_bytes: read_buffer_bytes(&report, cfg),
        }
        .check(ours.peak_rss_bytes)?;
    }

    let dtype_name = format!("{dtype:?}").to_lowercase();
    let quant_name = args.quant.map_or("-".to_string(), |q| q.to_string());
    println!(
        "\nswitchyard bench: {} | pp{} = prefill of {} tokens, tg{} = decode of {} tokens from an empty cache (as llama-bench), tg @ depth = the same after the prompt | median of {} | {threads} threads",
        args.model.display(),
        args.prompt_tokens,
        args.prompt_tokens,
        args.gen_tokens,
        args.gen_tokens,
        args.repeat
    );
    println!("machine read bandwidth: {bw_gbs:.1} GB/s (median of 7 streaming reads of 1 GiB)\n");
    println!(
        "| engine | weights | pp{} tok/s | tg{} tok/s | tg{} @ depth {} tok/s | active MB/token | tg GB/s | share of read bw | peak RSS GiB |",
        args.prompt_tokens, args.gen_tokens, args.gen_tokens, args.prompt_tokens
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    // A GGUF file's weights are as stored (unless --quant re-quantizes them).
    let gguf_type = GgufFile::is_gguf(&args.model)
        .then(|| GgufFile::open(&args.model).ok())
        .flatten()
        .map(|f| format!("gguf {}", f.file_type_name().unwrap_or("?")));
    let weights = match (&args.quant, gguf_type) {
        (Some(_), _) => quant_name.clone(),
        (None, Some(gguf)) => gguf,
        (None, None) => dtype_name.clone(),
    };
    print_row("switchyard", &weights, &ours, active_routed, bw_gbs);
    if args.profile {
        super::bench_profile::run(&engine, prompt[0], args.gen_tokens)?;
    }
    drop(engine);

    if let Some(Peer::Candle) = args.peer {
        anyhow::ensure!(
            args.quant.is_none(),
            "--peer candle runs candle-transformers' float model; drop --quant"
        );
        let theirs = peer_candle(&args, dtype, &prompt)?;
        print_row("candle-transformers", &weights, &theirs, active, bw_gbs);
        println!(
            "\nswitchyard / candle: prefill {:.2}x, decode {:.2}x, decode at depth {:.2}x",
            ours.prefill_tokens_per_s / theirs.prefill_tokens_per_s,
            ours.decode_tokens_per_s / theirs.decode_tokens_per_s,
            ours.decode_at_depth_tokens_per_s / theirs.decode_at_depth_tokens_per_s
        );
    }
    Ok(())
}

#[cfg(feature = "peer-candle")]
fn peer_candle(args: &BenchArgs, dtype: DType, prompt: &[u32]) -> anyhow::Result<Measured> {
    reset_peak_rss();
    let mut peer = super::bench_peer::CandleQwen3Moe::load(&args.model, dtype)?;
    measure(&mut peer, prompt, args)
}

#[cfg(not(feature = "peer-candle"))]
fn peer_candle(_: &BenchArgs, _: DType, _: &[u32]) -> anyhow::Result<Measured> {
    anyhow::bail!("--peer candle needs a build with `--features peer-candle`")
}

struct Ours<'a> {
    engine: &'a Engine,
    /// Run through the model since the warm-up (for the expert cache's bytes per token).
    tokens: usize,
    process_read_at_warmup: u64,
    observer: RunObserver,
    /// Each run is its own sequence in the trace.
    runs: u64,
}

/// A greedy sequence that never stops early: the prompt's step yields the first
/// token, then `gen_tokens` decode steps.
pub fn greedy_request(prompt: &[u32], gen_tokens: usize) -> SequenceRequest {
    SequenceRequest {
        prompt: prompt.to_vec(),
        max_tokens: gen_tokens + 1,
        sampling: SamplingParams::default(),
        stop_ids: Vec::new(),
        top_logprobs: None,
    }
}

/// One scheduler step; a sequence's failure is this run's error.
pub fn step(scheduler: &mut switchyard::generate::Scheduler<'_>) -> anyhow::Result<()> {
    step_observed(scheduler, &mut NoObserver)
}

/// [`step`] reporting the routing to `observer`.
fn step_observed(
    scheduler: &mut switchyard::generate::Scheduler<'_>,
    observer: &mut dyn RoutingObserver,
) -> anyhow::Result<()> {
    for event in scheduler.step(observer) {
        if let StepEvent::Failed { error, .. } = event {
            return Err(error.into());
        }
    }
    Ok(())
}

impl Runner for Ours<'_> {
    fn after_warmup(&mut self) {
        let experts = self.engine.model().experts();
        if experts.cache_report().is_some() {
            // The timed rounds start from an empty expert cache, as the optimal
            // yardstick does, and their peak RSS is checked against the bound.
            experts.reset_cache();
            reset_peak_rss();
        }
        self.tokens = 0;
        self.process_read_at_warmup = process_read_bytes();
    }

    fn run_once(&mut self, prompt: &[u32], gen_tokens: usize) -> anyhow::Result<(f64, f64)> {
        self.tokens += prompt.len() + gen_tokens;
        self.engine.model().experts().drop_cached_pages()?;
        self.observer.set_sequence(SequenceId(self.runs));
        self.runs += 1;
        let mut scheduler = self.engine.scheduler(SchedulerOptions::single_sequence());
        scheduler.add(greedy_request(prompt, gen_tokens))?;
        let start = Instant::now();
        step_observed(&mut scheduler, &mut self.observer)?;
        let prefill = start.elapsed().as_secs_f64();
        let start = Instant::now();
        while !scheduler.is_idle() {
            step_observed(&mut scheduler, &mut self.observer)?;
        }
        Ok((prefill, start.elapsed().as_secs_f64()))
    }
}

/// One warm-up on a short prompt, then `repeat` timed rounds; medians. A round is
/// the prompt then `gen_tokens` (prefill, decode at depth), and `gen_tokens` from a
/// one-token prompt (decode).
pub fn measure(
    runner: &mut dyn Runner,
    prompt: &[u32],
    args: &BenchArgs,
) -> anyhow::Result<Measured> {
    anyhow::ensure!(
        !prompt.is_empty() && args.gen_tokens > 0,
        "--prompt-tokens and --gen-tokens must be at least 1"
    );
    runner.run_once(&prompt[..prompt.len().min(16)], 4)?;
    runner.after_warmup();
    let (mut prefill, mut decode, mut depth) = (Vec::new(), Vec::new(), Vec::new());
    let gen_tokens = args.gen_tokens as f64;
    for r in 0..args.repeat.max(1) {
        let (p, d) = runner.run_once(prompt, args.gen_tokens)?;
        let (_, tg) = runner.run_once(&prompt[..1], args.gen_tokens)?;
        let (p, d, tg) = (prompt.len() as f64 / p, gen_tokens / d, gen_tokens / tg);
        eprintln!(
            "  run {}: prefill {p:.1} tok/s, decode {tg:.1} tok/s, at depth {d:.1} tok/s",
            r + 1
        );
        prefill.push(p);
        decode.push(tg);
        depth.push(d);
    }
    Ok(Measured {
        prefill_tokens_per_s: median(&mut prefill),
        decode_tokens_per_s: median(&mut decode),
        decode_at_depth_tokens_per_s: median(&mut depth),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

fn print_row(engine: &str, weights: &str, m: &Measured, active: usize, bw_gbs: f64) {
    let gbs = active as f64 * m.decode_tokens_per_s / 1e9;
    println!(
        "| {engine} | {weights} | {:.1} | {:.1} | {:.1} | {:.1} | {gbs:.1} | {:.0} % | {:.2} |",
        m.prefill_tokens_per_s,
        m.decode_tokens_per_s,
        m.decode_at_depth_tokens_per_s,
        active as f64 / 1e6,
        100.0 * gbs / bw_gbs,
        m.peak_rss_bytes as f64 / (1u64 << 30) as f64
    );
}

pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => anyhow::bail!("--dtype {s:?}: expected f32, bf16 or f16"),
    })
}

/// Deterministic pseudo-random token ids (an LCG), the same for every engine.
fn random_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut s = 4321u64;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process (`VmHWM`), in bytes.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Restarts `VmHWM` from the current resident size, so each engine's peak is its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Memory a run's expert reads hold outside the cache's count: per reading
/// thread (the caller, and the background reader under prefetch or stand-ins)
/// an expert's bytes as read beside its converted copy, and with stand-ins the
/// f32 copy of the expert that quantizing its 4-bit stand-in goes through.
fn read_buffer_bytes(report: &CacheReport, cfg: &ModelConfig) -> u64 {
    let background = report.prefetch.is_some() || report.stand_ins.is_some();
    let threads = 1 + u64::from(background);
    let expert = report.budget_bytes / report.capacity_experts.max(1) as u64;
    let f32_expert = if report.stand_ins.is_some() {
        (3 * cfg.hidden_size * cfg.moe.expert_ffn * 4) as u64
    } else {
        0
    };
    threads * (2 * expert + f32_expert)
}
