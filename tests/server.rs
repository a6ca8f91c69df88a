//! The HTTP server on a loopback port, driven by a real HTTP client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::DType;
use serde_json::{Value, json};
use switchyard::Engine;
use switchyard::generate::{Flow, GenerateOptions, SamplingParams};
use switchyard::model::moe::{ExpertTopP, TopPMode};
use switchyard::model::{LoadOptions, NoObserver};
use switchyard::server::{ServerOptions, serve};

fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/demo")
}

fn load_engine() -> Engine {
    let opts = LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::default()
    };
    Engine::load(&demo_dir(), &opts).unwrap()
}

struct TestServer {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    fn start(opts: ServerOptions) -> Self {
        Self::start_with(load_engine(), opts)
    }

    fn start_with(engine: Engine, opts: ServerOptions) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let _ = addr_tx.send(listener.local_addr()?);
                serve(engine, opts, listener, async move {
                    let _ = stop_rx.await;
                })
                .await
            })
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server started");
        Self {
            base: format!("http://{addr}"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Triggers shutdown; returns what `serve` returned.
    fn shutdown(&mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread.take().unwrap().join().unwrap()
    }
}

fn opts() -> ServerOptions {
    ServerOptions {
        model_id: "demo".into(),
        max_concurrent: 32,
        ..ServerOptions::default()
    }
}

/// One server for the tests that need nothing special.
fn shared() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start(opts()))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

async fn post(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    post_url(server.url(path), body).await
}

/// Owns its arguments, so a spawned task can send it.
async fn post_url(url: String, body: Value) -> (u16, Value) {
    let r = client().post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The `data:` payloads of a finished SSE body.
fn sse_events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

async fn post_stream(server: &TestServer, path: &str, body: Value) -> Vec<String> {
    let r = client()
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    sse_events(&r.text().await.unwrap())
}

async fn metric(server: &TestServer, name: &str) -> f64 {
    let text = client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    switchyard::server::metrics::sample(&text, name).unwrap_or_else(|| panic!("{name} in {text}"))
}

fn greedy_chat(content: &str, max_tokens: usize) -> Value {
    json!({
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics_answer() {
    let s = shared();
    let v: Value = client()
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "demo");
    let h = client().get(s.url("/health")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    let text = client()
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "switchyard_running_sequences",
        "switchyard_queue_depth",
        "switchyard_kv_cache_reserved_bytes",
        "switchyard_time_to_first_token_seconds_count",
        "switchyard_inter_token_latency_seconds_bucket",
        "switchyard_decode_tokens_per_second",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_matches_the_engine_and_counts_usage() {
    let s = shared();
    let engine = load_engine();
    let prompt = engine.encode_prompt("Once upon a time", false).unwrap();
    let mut ids = Vec::new();
    let opts = GenerateOptions {
        max_tokens: 12,
        sampling: SamplingParams::default(),
        stop_ids: engine.stop_ids(),
    };
    engine
        .generate(&prompt, &opts, &mut NoObserver, &mut |t| {
            ids.push(t);
            Ok(Flow::Continue)
        })
        .unwrap();
    let want = engine.tokenizer().unwrap().decode(&ids, true).unwrap();

    let (status, v) = post(
        s,
        "/v1/completions",
        json!({"model": "demo", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], ids.len());
    let reason = if ids.len() == 12 { "length" } else { "stop" };
    assert_eq!(v["choices"][0]["finish_reason"], reason);

    // The same through the stream, chunk by chunk.
    let events = post_stream(
        s,
        "/v1/completions",
        json!({"model": "demo", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(text, want);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_the_same_text_as_the_whole_answer_with_usage() {
    let s = shared();
    let (status, whole) = post(
        s,
        "/v1/chat/completions",
        greedy_chat("Tell me a story.", 16),
    )
    .await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty());

    let mut body = greedy_chat("Tell me a story.", 16);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = post_stream(s, "/v1/chat/completions", body).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(*finish, whole["choices"][0]["finish_reason"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_match_their_single_runs() {
    // Its own server: "alone" means alone, and the step count is this test's.
    let mut server = TestServer::start(opts());
    let s = &server;
    let prompts: Vec<String> = (0..32)
        .map(|i| format!("Story number {i}: the little fox"))
        .collect();
    let body = |p: &str| json!({"model": "demo", "prompt": p, "max_tokens": 10, "temperature": 0});
    let mut alone = Vec::new();
    for p in &prompts {
        let (status, v) = post(s, "/v1/completions", body(p)).await;
        assert_eq!(status, 200);
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let steps_before = metric(s, "switchyard_decode_steps_total").await;
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let b = body(p);
            let url = s.url("/v1/completions");
            tokio::spawn(async move {
                let (_, v) = post_url(url, b).await;
                (
                    v["choices"][0]["text"].as_str().unwrap().to_string(),
                    v["usage"]["completion_tokens"].as_u64().unwrap(),
                )
            })
        })
        .collect();
    let mut tokens = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let (text, n) = t.await.unwrap();
        assert_eq!(text, alone[i], "prompt {i}");
        tokens += n;
    }
    // Batched: far fewer forward steps than tokens.
    let steps = metric(s, "switchyard_decode_steps_total").await - steps_before;
    assert!(
        steps < tokens as f64 / 4.0,
        "{steps} steps for {tokens} tokens"
    );
    server.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_cut_the_answer() {
    let s = shared();
    let (_, v) = post(s, "/v1/chat/completions", greedy_chat("Hello there", 24)).await;
    let full = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // A stop sequence from the middle of the greedy answer.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 6, "answer too short: {full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let mut body = greedy_chat("Hello there", 24);
    body["stop"] = json!([stop, "\u{1F600}never"]);
    let (status, v) = post(s, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let events = post_stream(s, "/v1/chat/completions", body).await;
    let streamed: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            let c: Value = serde_json::from_str(e).ok()?;
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, cut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_reported_per_token() {
    let s = shared();
    let mut body = greedy_chat("Hi", 5);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (status, v) = post(s, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(entry["logprob"], top[0]["logprob"]);
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
    }
    let (status, v) = post(
        s,
        "/v1/completions",
        json!({"model": "demo", "prompt": "The", "max_tokens": 4, "temperature": 0, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, 200);
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_reproduces() {
    let s = shared();
    let body =
        json!({"model": "demo", "prompt": "The", "max_tokens": 12, "temperature": 1.0, "seed": 7});
    let (_, a) = post(s, "/v1/completions", body.clone()).await;
    let (_, b) = post(s, "/v1/completions", body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_messages_render_and_answer() {
    let s = shared();
    let body = json!({
        "model": "demo",
        "max_tokens": 4,
        "temperature": 0,
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    });
    let (status, v) = post(s, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string());
}

async fn expect_error(
    server: &TestServer,
    path: &str,
    body: &str,
    status: u16,
    needle: &str,
) -> Value {
    let r = client()
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), status, "{body}");
    let v: Value = r.json().await.unwrap();
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    assert!(v["error"]["type"].is_string());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_shaped_4xx() {
    let s = shared();
    let chat = "/v1/chat/completions";
    expect_error(s, chat, "{\"messages\": [", 400, "not valid JSON").await;
    let v = expect_error(
        s,
        chat,
        r#"{"messages": [{"role": "user", "content": 5}]}"#,
        400,
        "messages[0].content",
    )
    .await;
    assert_eq!(v["error"]["param"], "messages[0].content");
    expect_error(s, chat, r#"{"messages": "hi"}"#, 400, "messages").await;
    expect_error(
        s,
        chat,
        r#"{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}"#,
        404,
        "gpt-9",
    )
    .await;
    expect_error(
        s,
        chat,
        r#"{"messages": []}"#,
        400,
        "messages must not be empty",
    )
    .await;
    expect_error(
        s,
        chat,
        r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}"#,
        400,
        "max_tokens must be at least 1",
    )
    .await;
    expect_error(
        s,
        chat,
        r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
        400,
        "wizard",
    )
    .await;
    expect_error(
        s,
        chat,
        r#"{"messages": [{"role": "user", "content": "x"}], "n": 3}"#,
        400,
        "n must be 1",
    )
    .await;
    expect_error(
        s,
        chat,
        r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
        400,
        "temperature",
    )
    .await;
    expect_error(
        s,
        chat,
        r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}"#,
        400,
        "context",
    )
    .await;
    expect_error(s, "/v1/completions", r#"{"prompt": [99999]}"#, 400, "99999").await;
    expect_error(
        s,
        "/v1/completions",
        r#"{"prompt": ""}"#,
        400,
        "prompt is empty",
    )
    .await;
    let long = "word ".repeat(2000);
    expect_error(
        s,
        "/v1/completions",
        &json!({"prompt": long}).to_string(),
        400,
        "context",
    )
    .await;
    let r = client().get(s.url("/v1/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let r = client().get(s.url("/v1/completions")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    // Still serving.
    let (status, _) = post(s, chat, greedy_chat("still there?", 2)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_give_413_400_and_429() {
    let mut s = TestServer::start(ServerOptions {
        max_concurrent: 1,
        max_queue: 0,
        max_prompt_tokens: Some(8),
        max_body_bytes: 2048,
        ..opts()
    });
    let big = json!({"prompt": "x".repeat(4096)}).to_string();
    expect_error(&s, "/v1/completions", &big, 413, "larger").await;
    let v = expect_error(
        &s,
        "/v1/completions",
        r#"{"prompt": "one two three four five six seven eight nine ten eleven"}"#,
        400,
        "limit of 8",
    )
    .await;
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // One long stream holds the only slot; the next request is turned away.
    let mut first = client()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "The", "max_tokens": 400, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    first.chunk().await.unwrap().unwrap();
    let r = client()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "The", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    drop(first);
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_cancels_the_sequence_and_frees_its_cache() {
    let mut s = TestServer::start(opts());
    let mut r = client()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "The", "max_tokens": 500, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    r.chunk().await.unwrap().unwrap();
    assert_eq!(metric(&s, "switchyard_running_sequences").await, 1.0);
    assert!(metric(&s, "switchyard_kv_cache_reserved_bytes").await > 0.0);
    drop(r);
    let start = Instant::now();
    loop {
        if metric(&s, "switchyard_running_sequences").await == 0.0
            && metric(&s, "switchyard_kv_cache_reserved_bytes").await == 0.0
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "sequence still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(&s, "switchyard_cancelled_sequences_total").await,
        1.0
    );
    let generated = metric(&s, "switchyard_generated_tokens_total").await;
    assert!(generated < 500.0, "{generated} tokens: not cancelled");
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_v1_routes() {
    let mut s = TestServer::start(ServerOptions {
        api_key: Some("sekrit".into()),
        ..opts()
    });
    let r = client().get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let r = client()
        .get(s.url("/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(s.url("/v1/models"))
        .bearer_auth("sekrit")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        client()
            .get(s.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    s.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_with_a_final_event() {
    let mut s = TestServer::start(opts());
    let mut r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "go"}], "max_tokens": 500, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = String::from_utf8(r.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    let stopper = std::thread::spawn(move || s.shutdown());
    while let Some(chunk) = r.chunk().await.unwrap() {
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events = sse_events(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{last}"
    );
    stopper.join().unwrap().unwrap();
}

#[test]
fn the_binary_serves_and_exits_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--port", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("serve printed its address").unwrap();
        if let Some(at) = line.find("http://") {
            break line[at..].split_whitespace().next().unwrap().to_string();
        }
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v: Value = rt.block_on(async {
        client()
            .get(format!("{url}/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(v["data"][0]["id"], "demo");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// A server on the demo model loaded with `--expert-top-p p`.
fn start_with_expert_top_p(p: f32) -> TestServer {
    let opts = LoadOptions {
        dtype: DType::BF16,
        expert_top_p: Some(ExpertTopP::new(p, TopPMode::TopK).unwrap()),
        ..LoadOptions::default()
    };
    TestServer::start_with(Engine::load(&demo_dir(), &opts).unwrap(), self::opts())
}

fn greedy_completion(prompt: &str) -> Value {
    json!({"model": "demo", "prompt": prompt, "max_tokens": 10, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expert_top_p_one_serves_plain_top_k_text_and_counts_top_k_experts() {
    let plain = shared();
    let mut one = start_with_expert_top_p(1.0);
    let body = greedy_completion("The old lighthouse keeper");
    let (status, want) = post(plain, "/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{want}");
    let (status, got) = post(&one, "/v1/completions", body).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"][0]["text"], want["choices"][0]["text"]);

    let engine = load_engine();
    let top_k = engine.config().moe.top_k as f64;
    assert_eq!(metric(&one, "switchyard_expert_top_k").await, top_k);
    assert_eq!(
        metric(&one, "switchyard_active_experts_per_token").await,
        top_k
    );
    // Every token the model was fed (the prompt, then each sampled token but
    // the last) passed through every MoE layer.
    let moe_layers = engine
        .model()
        .layers()
        .iter()
        .filter(|l| l.moe().is_some())
        .count();
    let fed = got["usage"]["prompt_tokens"].as_u64().unwrap()
        + got["usage"]["completion_tokens"].as_u64().unwrap()
        - 1;
    let routed = metric(&one, "switchyard_routed_tokens_total").await;
    assert_eq!(routed, (fed * moe_layers as u64) as f64);
    assert_eq!(
        metric(&one, "switchyard_routed_expert_slots_total").await,
        routed * top_k
    );
    // The server without the flag uses all top_k experts too.
    assert_eq!(
        metric(plain, "switchyard_active_experts_per_token").await,
        top_k
    );
    one.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_expert_top_p_lowers_the_active_experts_metric() {
    let mut low = start_with_expert_top_p(0.3);
    let (status, v) = post(
        &low,
        "/v1/completions",
        greedy_completion("Once upon a time"),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let top_k = metric(&low, "switchyard_expert_top_k").await;
    let active = metric(&low, "switchyard_active_experts_per_token").await;
    assert!((1.0..top_k).contains(&active), "{active} of top_k {top_k}");
    // The demo model picks 2 experts, and the best of two always holds at least
    // half their probability, so P = 0.3 keeps exactly one.
    assert_eq!(top_k, 2.0);
    assert_eq!(active, 1.0);
    assert!(metric(&low, "switchyard_routed_tokens_total").await > 0.0);
    low.shutdown().unwrap();
}

#[test]
fn serve_refuses_an_expert_top_p_outside_zero_to_one() {
    for p in ["0", "1.5", "NaN", "-1"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["serve", "--port", "0", "--expert-top-p", p])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("serve --expert-top-p {p} still running after 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "--expert-top-p {p}: {status:?}");
        assert!(
            stderr.contains("--expert-top-p"),
            "--expert-top-p {p}: {stderr}"
        );
        // Refused before the model loads, so no port was ever bound.
        assert!(!stderr.contains("serving"), "--expert-top-p {p}: {stderr}");
    }
}

/// Each sequence's routing in a trace: (position, layer, rank) -> expert.
type SequenceExperts = std::collections::BTreeMap<(u32, u32, u32), u32>;

fn experts_by_sequence(
    trace: &switchyard::trace::Trace,
) -> std::collections::BTreeMap<u64, SequenceExperts> {
    let mut by_sequence = std::collections::BTreeMap::<u64, SequenceExperts>::new();
    for row in trace.rows.iter() {
        let previous = by_sequence
            .entry(row.sequence)
            .or_default()
            .insert((row.position, row.layer, row.rank), row.expert);
        assert!(previous.is_none(), "row {row:?} written twice");
    }
    by_sequence
}

/// `switchyard run --trace` of `prompt` alone, at f32 as the traced server below.
fn run_trace(
    dir: &std::path::Path,
    name: &str,
    prompt: &str,
    max_tokens: usize,
) -> SequenceExperts {
    let path = dir.join(name);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", "--prompt", prompt, "--max-tokens"])
        .arg(max_tokens.to_string())
        .arg("--trace")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = switchyard::trace::read_trace(&path).unwrap();
    let mut by_sequence = experts_by_sequence(&trace);
    assert_eq!(by_sequence.len(), 1, "run traces one sequence");
    by_sequence.pop_first().unwrap().1
}

#[test]
fn serve_trace_writes_every_request_routing_as_run_does() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("serve.parquet");
    // f32, as `run` loads the model, so the two traces can be compared.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--port", "0", "--dtype", "f32", "--trace"])
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("serve printed its address").unwrap();
        if let Some(at) = line.find("http://") {
            break line[at..].split_whitespace().next().unwrap().to_string();
        }
    };
    // The rest of stderr, read as it comes so the pipe never fills.
    let rest = std::thread::spawn(move || lines.map_while(|l| l.ok()).collect::<Vec<_>>());
    let prompts = [
        "The old lighthouse keeper",
        "Once upon a time in a small town",
    ];
    let max_tokens = 5;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let usage: Vec<(u64, u64)> = rt.block_on(async {
        let tasks: Vec<_> = prompts
            .iter()
            .map(|p| {
                let body = json!({"prompt": p, "max_tokens": max_tokens, "temperature": 0});
                let url = format!("{url}/completions");
                tokio::spawn(async move {
                    let (_, v) = post_url(url, body).await;
                    (
                        v["usage"]["prompt_tokens"].as_u64().unwrap(),
                        v["usage"]["completion_tokens"].as_u64().unwrap(),
                    )
                })
            })
            .collect();
        let mut usage = Vec::new();
        for t in tasks {
            usage.push(t.await.unwrap());
        }
        usage
    });
    // Until the server shuts down gracefully the trace is a temporary file.
    assert!(!path.exists(), "the trace appeared before shutdown");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let stderr = rest.join().unwrap().join("\n");
    assert!(status.success(), "{status:?}: {stderr}");

    let trace = switchyard::trace::read_trace(&path).unwrap();
    assert!(
        stderr.contains(&format!("wrote {} trace rows", trace.rows.len())),
        "{stderr}"
    );
    let top_k = trace.meta.top_k;
    let moe_layers: Vec<u32> = trace.meta.moe_layers.iter().map(|&l| l as u32).collect();
    let served = experts_by_sequence(&trace);
    assert_eq!(served.len(), 2, "two requests, two sequence ids");
    let mut fed: Vec<u64> = usage.iter().map(|(p, c)| p + c - 1).collect();
    let mut lengths = Vec::new();
    for (sequence, experts) in &served {
        // Rows per (position, layer): exactly top_k, in every MoE layer.
        let mut per_site = std::collections::BTreeMap::<(u32, u32), usize>::new();
        for &(position, layer, _) in experts.keys() {
            *per_site.entry((position, layer)).or_default() += 1;
        }
        assert!(
            per_site.values().all(|&n| n == top_k),
            "sequence {sequence}"
        );
        let positions: std::collections::BTreeSet<u32> = per_site.keys().map(|&(p, _)| p).collect();
        let len = positions.len() as u32;
        // Contiguous from 0: the request's tokens, in order, none missing.
        assert_eq!(
            positions,
            (0..len).collect(),
            "sequence {sequence} positions"
        );
        for p in 0..len {
            let layers: Vec<u32> = (per_site.keys())
                .filter(|&&(q, _)| q == p)
                .map(|&(_, l)| l)
                .collect();
            assert_eq!(layers, moe_layers, "sequence {sequence} position {p}");
        }
        lengths.push(len as u64);
    }
    // Every token the model was fed (the prompt, then each sampled token but the last).
    lengths.sort_unstable();
    fed.sort_unstable();
    assert_eq!(lengths, fed);

    // Batched with each other, each request routed as its prompt does alone.
    let mut alone: Vec<SequenceExperts> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| run_trace(tmp.path(), &format!("run{i}.parquet"), p, max_tokens))
        .collect();
    assert_ne!(alone[0], alone[1], "the two prompts route differently");
    let mut served: Vec<SequenceExperts> = served.into_values().collect();
    alone.sort();
    served.sort();
    assert!(served == alone, "the server's routing differs from run's");
}

#[test]
fn serve_refuses_a_trace_it_cannot_create_before_binding() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("no/such/dir/serve.parquet");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--port", "0", "--trace"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("creating the trace"), "{stderr}");
    assert!(stderr.contains("no/such/dir"), "{stderr}");
    assert!(!stderr.contains("serving"), "{stderr}");
}
