//! An OpenAI-compatible HTTP server (axum): `/v1/models`, `/v1/completions`,
//! `/v1/chat/completions` (streamed as server-sent events or not), `/health`,
//! `/metrics`. One model thread runs every request's sequence in one continuous
//! batch; the async runtime only parses, tokenizes and writes.

mod api;
mod error;
mod heap;
pub mod metrics;
mod output;
mod routes;
mod worker;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub use api::{
    ChatBody, CompletionBody, CompletionPrompt, Generation, ToolUse, chat_body, completion_body,
};
pub use error::ApiError;
pub use output::{ToolCall, parse_tool_calls};

use crate::Engine;
use crate::generate::SchedulerOptions;
use crate::trace::{ActiveSummary, RunObserver};
use metrics::Metrics;
use worker::WorkerHandle;

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The id clients name in `model` (and `/v1/models` lists).
    pub model_id: String,
    /// Sequences decoded together; more wait in the queue.
    pub max_concurrent: usize,
    /// Requests that may wait beyond `max_concurrent`; past that, 429.
    pub max_queue: usize,
    /// Longest prompt accepted (`None`: the model's context).
    pub max_prompt_tokens: Option<usize>,
    /// KV-cache bytes for all running sequences (`None`: unbounded).
    pub kv_budget_bytes: Option<usize>,
    /// With a key, every `/v1` route wants `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Prompt tokens a sequence feeds per step.
    pub prefill_chunk: usize,
    /// Dense kernels that compute each row as alone ([`crate::ops::set_batch_invariant`]),
    /// so greedy output does not depend on the batch. Process-wide.
    pub batch_invariant: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            model_id: "switchyard".into(),
            max_concurrent: 16,
            max_queue: 64,
            max_prompt_tokens: None,
            kv_budget_bytes: None,
            api_key: None,
            max_body_bytes: 4 << 20,
            prefill_chunk: 256,
            batch_invariant: true,
        }
    }
}

pub(crate) struct AppState {
    engine: Arc<Engine>,
    worker: WorkerHandle,
    metrics: Arc<Metrics>,
    opts: ServerOptions,
    /// Requests accepted and not yet answered (running or queued).
    in_flight: AtomicUsize,
    shutting_down: AtomicBool,
}

/// Serves `engine` on `listener` until `shutdown` resolves; then stops
/// accepting, ends every open stream with a final event and returns.
pub async fn serve(
    engine: Engine,
    opts: ServerOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run(engine, opts, RunObserver::default(), listener, shutdown)
        .await
        .0
}

/// [`serve`], with `observer` seeing every routing decision the model thread
/// makes, each under its request's sequence id (`serve --trace`). On shutdown
/// its trace, if any, is finished (row groups flushed, file renamed into
/// place), even when serving failed, since the rows already written are sound.
pub async fn serve_observed(
    engine: Engine,
    opts: ServerOptions,
    observer: RunObserver,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> crate::Result<ActiveSummary> {
    let (served, observer, engine) = run(engine, opts, observer, listener, shutdown).await;
    let summary = match observer {
        Some(observer) => observer.finish(engine.model())?,
        None => {
            return Err(crate::Error::Serve(std::io::Error::other(
                "the model thread panicked",
            )));
        }
    };
    served.map_err(crate::Error::Serve)?;
    Ok(summary)
}

/// Serves until shutdown; returns how serving ended, the observer back from the
/// model thread (`None` if it could not start or panicked) and the engine.
async fn run(
    engine: Engine,
    opts: ServerOptions,
    observer: RunObserver,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (std::io::Result<()>, Option<RunObserver>, Arc<Engine>) {
    if opts.batch_invariant {
        crate::ops::set_batch_invariant(true);
    }
    let engine = Arc::new(engine);
    let metrics = Arc::new(Metrics::default());
    metrics
        .kv_budget_bytes
        .set(opts.kv_budget_bytes.unwrap_or(0) as u64);
    metrics.expert_top_k.set(engine.config().moe.top_k as u64);
    let scheduler = SchedulerOptions {
        max_running: opts.max_concurrent.max(1),
        kv_budget_bytes: opts.kv_budget_bytes,
        prefill_chunk: opts.prefill_chunk.max(1),
        prefill_tokens_per_step: opts.prefill_chunk.max(1) * 2,
    };
    let spawned = WorkerHandle::spawn(engine.clone(), scheduler, metrics.clone(), observer);
    let (worker, thread) = match spawned {
        Ok(spawned) => spawned,
        Err(e) => return (Err(e), None, engine),
    };
    let state = Arc::new(AppState {
        engine: engine.clone(),
        worker,
        metrics,
        opts,
        in_flight: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
    });
    let app = routes::router(state.clone());
    let on_signal = state.clone();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            on_signal.shutting_down.store(true, Ordering::SeqCst);
            on_signal.worker.shutdown();
        })
        .await;
    state.worker.shutdown();
    drop(state);
    let observer = match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Ok(observer)) => Some(observer),
        _ => None,
    };
    (result, observer, engine)
}
