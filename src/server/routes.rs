//! The HTTP routes. A generation request is checked, tokenized, submitted to the
//! model thread and answered as one JSON body or as server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::AppState;
use super::api::{
    ChatBody, CompletionBody, CompletionPrompt, Generation, chat_body, completion_body,
};
use super::error::ApiError;
use super::output::{TextAssembler, ToolCall};
use super::worker::{SequenceEvent, Submission};
use crate::generate::{FinishReason, SequenceRequest, TextTokenizer, TokenLogprobs};

type Shared = Arc<AppState>;

pub(crate) fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.opts.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}

async fn count_responses(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(req).await;
    st.metrics
        .record_request(&route, response.status().as_u16());
    response
}

async fn require_key(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.opts.api_key {
        let sent = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if sent != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(
        format!("no route {} {}", req.method(), req.uri().path()),
        "not_found",
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::invalid(
        "",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

async fn health(State(st): State<Shared>) -> Response {
    if st.shutting_down.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(st): State<Shared>) -> Response {
    let mut text = st.metrics.render();
    // Read at scrape time: the cache keeps its own counts.
    if let Some(report) = st.engine.model().experts().cache_report() {
        text.push_str(&super::metrics::expert_cache_lines(&report));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn models(State(st): State<Shared>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.opts.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "switchyard",
            "max_model_len": st.engine.config().max_position_embeddings,
        }],
    }))
    .into_response()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

/// A request ready for the model thread.
struct Prepared {
    endpoint: Endpoint,
    prompt: Vec<u32>,
    generation: Generation,
    tools: bool,
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than this server accepts (--max-body-bytes)".to_string()
        } else {
            e.body_text()
        };
        ApiError::invalid("", message).with_status(status)
    })
}

fn check_model(st: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != st.opts.model_id => Err(ApiError::not_found(
            format!(
                "the model {m:?} does not exist; this server serves {:?}",
                st.opts.model_id
            ),
            "model_not_found",
        )),
        _ => Ok(()),
    }
}

async fn completions(State(st): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let prepared = (|| {
        let body = body_bytes(body)?;
        let CompletionBody { prompt, generation } =
            completion_body(&body, |model| check_model(&st, model))?;
        let prompt = match prompt {
            CompletionPrompt::Ids(ids) => ids,
            CompletionPrompt::Text(text) => st
                .engine
                .encode_prompt(&text, false)
                .map_err(|e| ApiError::from_engine(&e, "prompt"))?,
        };
        Ok(Prepared {
            endpoint: Endpoint::Completions,
            prompt,
            generation,
            tools: false,
        })
    })();
    respond(st, prepared).await
}

async fn chat_completions(
    State(st): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = (|| {
        let body = body_bytes(body)?;
        let ChatBody {
            messages,
            tools,
            generation,
        } = chat_body(&body, |model| check_model(&st, model))?;
        let prompt = st
            .engine
            .encode_chat_with_tools(&messages, tools.tools.as_ref())
            .map_err(|e| ApiError::from_engine(&e, "messages"))?;
        Ok(Prepared {
            endpoint: Endpoint::Chat,
            prompt,
            generation,
            tools: tools.tools.is_some(),
        })
    })();
    respond(st, prepared).await
}

async fn respond(st: Shared, prepared: Result<Prepared, ApiError>) -> Response {
    match generate(st, prepared).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Held while a request is accepted; frees its place when dropped.
struct InFlight(Shared);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn admit(st: &Shared) -> Result<InFlight, ApiError> {
    if st.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let limit = st.opts.max_concurrent + st.opts.max_queue;
    let before = st.in_flight.fetch_add(1, Ordering::SeqCst);
    let guard = InFlight(st.clone());
    if before >= limit {
        st.metrics.rejected_full.inc();
        return Err(ApiError::overloaded(format!(
            "{before} requests are running or queued and the limit is {limit} ({} running + {} queued); retry later",
            st.opts.max_concurrent, st.opts.max_queue
        )));
    }
    Ok(guard)
}

fn check_lengths(st: &AppState, p: &Prepared) -> Result<usize, ApiError> {
    let param = match p.endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    let n = p.prompt.len();
    let context = st.engine.config().max_position_embeddings;
    if let Some(limit) = st.opts.max_prompt_tokens
        && n > limit
    {
        return Err(ApiError::invalid(
            param,
            format!("the prompt has {n} tokens, more than this server's limit of {limit} (--max-prompt-tokens)"),
        )
        .with_code("context_length_exceeded"));
    }
    if n >= context {
        return Err(ApiError::invalid(
            param,
            format!("the prompt has {n} tokens but the model's context is {context} tokens, which leaves none to generate"),
        )
        .with_code("context_length_exceeded"));
    }
    match p.generation.max_tokens {
        Some(m) if n + m > context => Err(ApiError::invalid(
            "max_tokens",
            format!("the prompt has {n} tokens and max_tokens asks for {m}, more than the model's context of {context} tokens"),
        )
        .with_code("context_length_exceeded")),
        Some(m) => Ok(m),
        None => Ok(context - n),
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn new_id(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{t:x}{n:04x}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn generate(st: Shared, prepared: Result<Prepared, ApiError>) -> Result<Response, ApiError> {
    let p = prepared?;
    let max_tokens = check_lengths(&st, &p)?;
    let guard = admit(&st)?;
    let stop_ids = st.engine.stop_ids();
    let (events_tx, events) = mpsc::unbounded_channel();
    let (accepted_tx, accepted) = oneshot::channel();
    let submitted = st.worker.submit(Submission {
        request: SequenceRequest {
            prompt: p.prompt.clone(),
            max_tokens,
            sampling: p.generation.sampling,
            stop_ids,
            top_logprobs: p.generation.top_logprobs,
        },
        accepted: accepted_tx,
        events: events_tx,
    });
    if !submitted {
        return Err(ApiError::unavailable("the model thread has stopped"));
    }
    match accepted.await {
        Err(_) => return Err(ApiError::unavailable("the model thread has stopped")),
        Ok(Err(e)) => return Err(ApiError::from_engine(&e, "")),
        Ok(Ok(_)) => {}
    }
    st.metrics.prompt_tokens.add(p.prompt.len() as u64);
    let reply = Reply {
        id: new_id(match p.endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        }),
        created: unix_now(),
        model: st.opts.model_id.clone(),
        endpoint: p.endpoint,
        prompt_tokens: p.prompt.len(),
        logprobs: p.generation.top_logprobs.is_some(),
        include_usage: p.generation.include_usage,
    };
    st.engine
        .tokenizer()
        .map_err(|e| ApiError::from_engine(&e, ""))?;
    if p.generation.stream {
        let (tx, rx) = mpsc::channel::<Event>(64);
        tokio::spawn(stream(st, p, reply, events, tx, guard));
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
        });
        return Ok(Sse::new(body).into_response());
    }
    let out = collect(&st, &p, events).await?;
    drop(guard);
    let logprobs = st
        .engine
        .tokenizer()
        .ok()
        .and_then(|t| reply.logprobs_json(t, &out.logprobs));
    Ok(axum::Json(reply.whole(out, logprobs)).into_response())
}

/// The fixed parts of every response to one request.
struct Reply {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    prompt_tokens: usize,
    logprobs: bool,
    include_usage: bool,
}

#[derive(Default)]
struct Output {
    text: String,
    tool_calls: Vec<ToolCall>,
    completion_tokens: usize,
    finish: Option<&'static str>,
    /// `(token, logprobs)` of every generated token.
    logprobs: Vec<(u32, TokenLogprobs)>,
}

/// Follows one sequence's events: text, logprobs, finish.
struct Follower<'t> {
    text: TextAssembler<'t>,
    completion_tokens: usize,
    logprobs: Vec<(u32, TokenLogprobs)>,
    tools: bool,
}

enum Progress {
    /// Text to hand out now.
    Text(String),
    /// The generation ended (`finish_reason`) with this last text.
    Done(String, &'static str),
}

impl<'t> Follower<'t> {
    fn new(tokenizer: &'t TextTokenizer, p: &Prepared) -> Self {
        Self {
            text: TextAssembler::new(tokenizer, p.generation.stop.clone(), p.tools),
            completion_tokens: 0,
            logprobs: Vec::new(),
            tools: p.tools,
        }
    }

    fn on_event(&mut self, event: SequenceEvent) -> Result<Progress, ApiError> {
        match event {
            SequenceEvent::Token(t) => {
                self.completion_tokens += 1;
                if let Some(lp) = t.logprobs {
                    self.logprobs.push((t.token, lp));
                }
                let text = self
                    .text
                    .push(t.token)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                if self.text.stopped() {
                    return Ok(Progress::Done(text, "stop"));
                }
                Ok(match t.finish {
                    Some(FinishReason::Stop) => Progress::Done(text, "stop"),
                    Some(FinishReason::Length) => Progress::Done(text, "length"),
                    None => Progress::Text(text),
                })
            }
            SequenceEvent::Failed(e) => Err(ApiError::internal(format!("generation failed: {e}"))),
            SequenceEvent::Aborted => Err(ApiError::unavailable(
                "the server is shutting down; the generation was cut short",
            )),
        }
    }

    /// The last text and the tool calls, once the generation has ended.
    fn finish(self, reason: &'static str) -> (String, Vec<ToolCall>, &'static str) {
        let (text, calls) = self.text.finish();
        let reason = if self.tools && !calls.is_empty() {
            "tool_calls"
        } else {
            reason
        };
        (text, calls, reason)
    }
}

async fn collect(
    st: &AppState,
    p: &Prepared,
    mut events: mpsc::UnboundedReceiver<SequenceEvent>,
) -> Result<Output, ApiError> {
    let tokenizer = st
        .engine
        .tokenizer()
        .map_err(|e| ApiError::from_engine(&e, ""))?;
    let mut f = Follower::new(tokenizer, p);
    let mut text = String::new();
    loop {
        let Some(event) = events.recv().await else {
            return Err(ApiError::internal("the model thread dropped the sequence"));
        };
        match f.on_event(event)? {
            Progress::Text(t) => text.push_str(&t),
            Progress::Done(t, reason) => {
                text.push_str(&t);
                let completion_tokens = f.completion_tokens;
                let logprobs = std::mem::take(&mut f.logprobs);
                let (tail, tool_calls, reason) = f.finish(reason);
                text.push_str(&tail);
                return Ok(Output {
                    text,
                    tool_calls,
                    completion_tokens,
                    finish: Some(reason),
                    logprobs,
                });
            }
        }
    }
}

/// Streams one request's events as server-sent events; ends when the sequence
/// does, or at once when the client goes away (which cancels the sequence).
async fn stream(
    st: Shared,
    p: Prepared,
    reply: Reply,
    mut events: mpsc::UnboundedReceiver<SequenceEvent>,
    tx: mpsc::Sender<Event>,
    _guard: InFlight,
) {
    let Ok(tokenizer) = st.engine.tokenizer() else {
        return;
    };
    let mut f = Follower::new(tokenizer, &p);
    let send = |v: Value| Event::default().data(v.to_string());
    if reply.endpoint == Endpoint::Chat
        && tx
            .send(send(reply.chunk(
                json!({"role": "assistant", "content": ""}),
                None,
                None,
            )))
            .await
            .is_err()
    {
        return;
    }
    let mut sent_logprobs = 0usize;
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = tx.closed() => return,
        };
        let Some(event) = event else {
            let _ = tx
                .send(send(
                    ApiError::internal("the model thread dropped the sequence").body(),
                ))
                .await;
            break;
        };
        let (text, done) = match f.on_event(event) {
            Ok(Progress::Text(t)) => (t, None),
            Ok(Progress::Done(t, reason)) => (t, Some(reason)),
            Err(e) => {
                let _ = tx.send(send(e.body())).await;
                break;
            }
        };
        let logprobs = reply.logprobs_json(tokenizer, &f.logprobs[sent_logprobs..]);
        if !text.is_empty() {
            sent_logprobs = f.logprobs.len();
            if tx
                .send(send(reply.text_chunk(&text, logprobs)))
                .await
                .is_err()
            {
                return;
            }
        }
        if let Some(reason) = done {
            let completion_tokens = f.completion_tokens;
            let (tail, calls, reason) = f.finish(reason);
            let mut finals = Vec::new();
            if !tail.is_empty() {
                finals.push(reply.text_chunk(&tail, None));
            }
            if !calls.is_empty() {
                let calls: Vec<Value> = calls
                    .iter()
                    .enumerate()
                    .map(|(i, c)| c.to_json(&new_id("call"), Some(i)))
                    .collect();
                finals.push(reply.chunk(json!({"tool_calls": calls}), None, None));
            }
            finals.push(match reply.endpoint {
                Endpoint::Chat => reply.chunk(json!({}), None, Some(reason)),
                Endpoint::Completions => reply.completion_chunk("", None, Some(reason)),
            });
            if reply.include_usage {
                let mut usage = reply.base("chunk");
                usage["choices"] = json!([]);
                usage["usage"] = reply.usage(completion_tokens);
                finals.push(usage);
            }
            for v in finals {
                if tx.send(send(v)).await.is_err() {
                    return;
                }
            }
            break;
        }
    }
    let _ = tx.send(Event::default().data("[DONE]")).await;
}

impl Reply {
    fn object(&self, kind: &str) -> &'static str {
        match (self.endpoint, kind) {
            (Endpoint::Chat, "chunk") => "chat.completion.chunk",
            (Endpoint::Chat, _) => "chat.completion",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn base(&self, kind: &str) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(kind),
            "created": self.created,
            "model": self.model,
        });
        if kind == "chunk" && self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    fn chunk(&self, delta: Value, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        let mut v = self.base("chunk");
        v["choices"] = json!([{
            "index": 0,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish,
        }]);
        v
    }

    fn completion_chunk(&self, text: &str, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        let mut v = self.base("chunk");
        v["choices"] = json!([{
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
        }]);
        v
    }

    fn text_chunk(&self, text: &str, logprobs: Option<Value>) -> Value {
        match self.endpoint {
            Endpoint::Chat => self.chunk(json!({"content": text}), logprobs, None),
            Endpoint::Completions => self.completion_chunk(text, logprobs, None),
        }
    }

    fn whole(&self, out: Output, logprobs: Option<Value>) -> Value {
        let mut v = self.base("whole");
        let finish = out.finish.unwrap_or("stop");
        v["choices"] = match self.endpoint {
            Endpoint::Chat => {
                let calls: Vec<Value> = out
                    .tool_calls
                    .iter()
                    .map(|c| c.to_json(&new_id("call"), None))
                    .collect();
                let content = if calls.is_empty() || !out.text.is_empty() {
                    json!(out.text)
                } else {
                    Value::Null
                };
                let mut message = json!({"role": "assistant", "content": content});
                if !calls.is_empty() {
                    message["tool_calls"] = json!(calls);
                }
                json!([{
                    "index": 0,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }])
            }
            Endpoint::Completions => json!([{
                "index": 0,
                "text": out.text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }]),
        };
        v["usage"] = self.usage(out.completion_tokens);
        v
    }

    /// Logprobs in the endpoint's own shape; `None` when not asked for.
    fn logprobs_json(&self, tok: &TextTokenizer, items: &[(u32, TokenLogprobs)]) -> Option<Value> {
        if !self.logprobs || items.is_empty() {
            return None;
        }
        let text = |id: u32| tok.decode(&[id], false).unwrap_or_default();
        Some(match self.endpoint {
            Endpoint::Chat => {
                let entry = |id: u32, lp: f32| {
                    let t = text(id);
                    json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
                };
                let content: Vec<Value> = items
                    .iter()
                    .map(|(id, lp)| {
                        let mut e = entry(*id, lp.logprob);
                        e["top_logprobs"] =
                            json!(lp.top.iter().map(|&(t, l)| entry(t, l)).collect::<Vec<_>>());
                        e
                    })
                    .collect();
                json!({"content": content})
            }
            Endpoint::Completions => {
                let tokens: Vec<String> = items.iter().map(|(id, _)| text(*id)).collect();
                let mut offset = 0;
                let offsets: Vec<usize> = tokens
                    .iter()
                    .map(|t| {
                        let at = offset;
                        offset += t.len();
                        at
                    })
                    .collect();
                json!({
                    "tokens": tokens,
                    "token_logprobs": items.iter().map(|(_, lp)| lp.logprob).collect::<Vec<_>>(),
                    "top_logprobs": items.iter().map(|(_, lp)| {
                        lp.top.iter().map(|&(t, l)| (text(t), json!(l))).collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        })
    }
}
