//! `switchyard serve`: the OpenAI-compatible HTTP server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use switchyard::Engine;
use switchyard::config::ByteSize;
use switchyard::model::LoadOptions;
use switchyard::ops::QuantKind;
use switchyard::server::{ServerOptions, serve_observed};

use super::expert_memory::ExpertMemoryArgs;
use super::model_arg::resolve;
use super::routing_flags::{self, ExpertTopPFlags};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model directory or GGUF file. Default: the bundled demo model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Quantize experts, attention and lm_head at load: q8_0, q4_0 or q4_k.
    #[arg(long)]
    quant: Option<QuantKind>,
    /// Element type of the unquantized weights: f32, bf16 (the demo model's own) or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model id clients send as `model`. Default: the model's file or directory name.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Sequences decoded together in one batch; more requests wait.
    #[arg(long, default_value_t = 16)]
    max_concurrent: usize,
    /// Requests that may wait beyond --max-concurrent; more get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Longest prompt accepted, in tokens (default: the model's context).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// KV-cache memory for all running sequences (e.g. 2GiB); new requests wait when it is full.
    #[arg(long, default_value = "1GiB")]
    kv_memory: ByteSize,
    /// Every /v1 route wants `Authorization: Bearer KEY`.
    #[arg(long)]
    api_key: Option<String>,
    /// Larger request bodies get 413.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Prompt tokens a sequence feeds per step, so long prompts do not stall running streams.
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// Write every routing decision of every request to this Parquet file, as
    /// `run --trace` does (sequence: the request's sequence id); finished on shutdown.
    #[arg(long)]
    trace: Option<PathBuf>,
    #[command(flatten)]
    experts: ExpertMemoryArgs,
    #[command(flatten)]
    top_p: ExpertTopPFlags,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Before the model loads and long before the port is bound: a bad P fails at once.
    let expert_top_p = args.top_p.resolve()?;
    let dir = resolve(args.model)?;
    let dtype = super::bench::parse_dtype(&args.dtype)?;
    let opts = LoadOptions {
        dtype,
        progress: true,
        quant: args.quant,
        expert_memory: args.experts.server_memory(),
        expert_top_p,
    };
    let engine = Engine::load(&dir, &opts)
        .with_context(|| format!("loading model from {}", dir.display()))?;
    engine
        .tokenizer()
        .context("the server needs the model's tokenizer")?;
    let model_id = args.served_model_name.unwrap_or_else(|| {
        dir.file_stem()
            .map_or("switchyard".into(), |s| s.to_string_lossy().into_owned())
    });
    // Created before the port is bound: a trace that cannot be written refuses to serve.
    let observer = routing_flags::observer(engine.model(), &model_id, args.trace.as_deref())?;
    let kv_budget = match args.kv_memory {
        ByteSize::Bytes(b) => b as usize,
        ByteSize::Fraction(_) => {
            anyhow::bail!("--kv-memory takes a size (e.g. 2GiB), not a percentage")
        }
    };
    let server_opts = ServerOptions {
        model_id,
        max_concurrent: args.max_concurrent.max(1),
        max_queue: args.max_queue,
        max_prompt_tokens: args.max_prompt_tokens,
        kv_budget_bytes: Some(kv_budget),
        api_key: args.api_key,
        max_body_bytes: args.max_body_bytes,
        prefill_chunk: args.prefill_chunk.max(1),
        batch_invariant: true,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "serving {} on http://{local}/v1 (max {} running, {} queued)",
            server_opts.model_id, server_opts.max_concurrent, server_opts.max_queue
        );
        let summary = serve_observed(engine, server_opts, observer, listener, shutdown_signal())
            .await
            .context("serving")?;
        routing_flags::report_trace(&summary);
        eprintln!("shut down");
        Ok(())
    })
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
