//! Structured fuzzing (proptest, no nightly toolchain) of everything a file or a
//! flag controls: config.json, the safetensors header, the GGUF header and
//! metadata, tokenizer.json, chat templates, the size flags' parsers and the
//! server's request bodies. The property is the same everywhere: any input ends
//! in a value or an error, never a panic, an abort or a hang; what is accepted
//! is also consistent.
//!
//! `cargo test --test fuzz` runs a few hundred cases per target (seconds); the
//! long run is `SWITCHYARD_FUZZ_CASES=1000000 cargo test --release --test fuzz -- --ignored`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;
use switchyard::config::{ByteSize, config_from_gguf, parse_config};
use switchyard::generate::{
    ChatMessage, ChatTemplate, Sampler, TemplateLimits, TextTokenizer, chat_template_from_gguf,
    tokenizer_from_gguf,
};
use switchyard::model::check_checkpoint;
use switchyard::server::{CompletionPrompt, Generation};
use switchyard::train::TrainConfig;
use switchyard::weights::{GgufFile, SafetensorsFiles, TensorSource};

use common::fixture;

/// Cases per target: a CI-sized default, or `SWITCHYARD_FUZZ_CASES` for the long run.
fn cases(default: u32) -> u32 {
    std::env::var("SWITCHYARD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let start = Instant::now();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("fuzz target {name}: {e}");
    }
    eprintln!(
        "fuzz target {name}: {cases} cases, 0 failures, {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}", std::process::id()))
}

/// A file a target rewrites every case. Only the bytes that differ from the last
/// case are written (and the length set): a fixture-sized `fs::write` per case
/// (truncate, rewrite, and ext4's flush on close) was most of the safetensors
/// target's time and a tenth of the GGUF target's.
struct ScratchFile {
    path: PathBuf,
    file: std::fs::File,
    last: Vec<u8>,
}

impl ScratchFile {
    fn new(name: &str) -> Self {
        let path = scratch(name);
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        Self {
            path,
            file,
            last: Vec::new(),
        }
    }

    fn set(&mut self, bytes: &[u8]) -> &Path {
        use std::os::unix::fs::FileExt;
        let common = bytes.len().min(self.last.len());
        let (new, old) = (&bytes[..common], &self.last[..common]);
        if let Some(first) = new.iter().zip(old).position(|(a, b)| a != b) {
            let end = common - new.iter().zip(old).rev().position(|(a, b)| a != b).unwrap();
            self.file
                .write_all_at(&new[first..end], first as u64)
                .unwrap();
        }
        if bytes.len() > common {
            self.file
                .write_all_at(&bytes[common..], common as u64)
                .unwrap();
        }
        if bytes.len() != self.last.len() {
            self.file.set_len(bytes.len() as u64).unwrap();
        }
        self.last.clear();
        self.last.extend_from_slice(bytes);
        &self.path
    }
}

// --- JSON documents: a fixture with a few nodes replaced, deleted or added ---

/// What one mutation puts at a node.
fn replacement() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None), // delete
        Just(Some(Value::Null)),
        any::<bool>().prop_map(|b| Some(b.into())),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(2),
            Just(1 << 31),
            Just(1 << 40),
            Just(i64::MAX),
            Just(i64::MIN),
            any::<i64>()
        ]
        .prop_map(|n| Some(n.into())),
        prop_oneof![Just(u64::MAX), Just(1u64 << 63), any::<u64>()].prop_map(|n| Some(n.into())),
        prop_oneof![
            Just(0.0f64),
            Just(-0.5),
            Just(1e-300),
            Just(1e300),
            any::<f64>()
        ]
        .prop_map(|f| Some(serde_json::json!(f))),
        "[ -~]{0,16}".prop_map(|s| Some(s.into())),
        Just(Some(serde_json::json!([]))),
        Just(Some(serde_json::json!({}))),
        Just(Some(serde_json::json!([1, 2, 3]))),
        Just(Some(serde_json::json!({"type": "Sequence"}))),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<(usize, Option<Value>)>> {
    prop::collection::vec((any::<usize>(), replacement()), 1..5)
}

/// Every node's path, in document order.
fn paths(v: &Value, here: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                here.push(PathStep::Key(k.clone()));
                paths(child, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                here.push(PathStep::Index(i));
                paths(child, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn mutate(doc: &Value, edits: &[(usize, Option<Value>)]) -> Value {
    let mut doc = doc.clone();
    for (pick, with) in edits {
        let mut all = Vec::new();
        paths(&doc, &mut Vec::new(), &mut all);
        let path = &all[pick % all.len()];
        let Some((last, parent_path)) = path.split_last() else {
            doc = with.clone().unwrap_or(Value::Null);
            continue;
        };
        let mut parent = &mut doc;
        for step in parent_path {
            parent = match step {
                PathStep::Key(k) => &mut parent[k.as_str()],
                PathStep::Index(i) => &mut parent[*i],
            };
        }
        match (last, with, parent) {
            (PathStep::Key(k), None, Value::Object(m)) => {
                m.remove(k);
            }
            (PathStep::Index(i), None, Value::Array(a)) => {
                a.remove(*i);
            }
            (PathStep::Key(k), Some(v), p) => p[k.as_str()] = v.clone(),
            (PathStep::Index(i), Some(v), p) => p[*i] = v.clone(),
            _ => {}
        }
    }
    doc
}

fn fixture_json(name: &str, file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join(file)).unwrap()).unwrap()
}

// --- config.json ---

fn mixtral_weights() -> &'static SafetensorsFiles {
    static FILES: OnceLock<SafetensorsFiles> = OnceLock::new();
    FILES.get_or_init(|| SafetensorsFiles::open_dir(&fixture("mixtral")).unwrap())
}

fn config_target(n: u32) {
    let base = fixture_json("mixtral", "config.json");
    let path = Path::new("config.json");
    run("config.json", n, mutations(), |edits| {
        let text = mutate(&base, &edits).to_string();
        if let Ok(cfg) = parse_config(&text, path) {
            // Accepted configs are bounded: their counts cannot overflow, and the
            // dry run against the checkpoint ends in a value or an error.
            let counts = cfg.parameter_counts();
            prop_assert!(counts.total >= counts.routed_experts);
            let _ = check_checkpoint(&cfg, mixtral_weights());
        }
        Ok(())
    });
}

#[test]
fn fuzz_config_json() {
    config_target(2048);
}

#[test]
#[ignore]
fn fuzz_config_json_long() {
    config_target(cases(1_000_000));
}

// --- safetensors header ---

/// Byte edits of a file's first `within` bytes: (offset, xor mask), or a truncation.
fn byte_edits(within: usize) -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>)> {
    (
        prop::collection::vec((0..within, 1u8..=255), 0..6),
        prop::option::weighted(0.1, any::<usize>()),
    )
}

fn edited(bytes: &[u8], edits: &(Vec<(usize, u8)>, Option<usize>)) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for &(at, mask) in &edits.0 {
        if let Some(x) = b.get_mut(at) {
            *x ^= mask;
        }
    }
    if let Some(len) = edits.1 {
        b.truncate(len % (bytes.len() + 1));
    }
    b
}

fn safetensors_target(n: u32) {
    let bytes = std::fs::read(fixture("mixtral").join("model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let scratch = std::cell::RefCell::new(ScratchFile::new("model.safetensors"));
    let cfg = switchyard::config::load_model_config(&fixture("mixtral")).unwrap();
    run("safetensors header", n, byte_edits(header), |edits| {
        let mut scratch = scratch.borrow_mut();
        let path = scratch.set(&edited(&bytes, &edits)).to_path_buf();
        if let Ok(files) = SafetensorsFiles::open_files(std::slice::from_ref(&path)) {
            // Whatever the header claims, reading what it lists is a value or an error.
            for name in TensorSource::names(&files) {
                if let Some(meta) = files.meta(&name) {
                    let _ = files.load(&name, &meta.shape.clone(), candle_core::DType::F32);
                }
            }
            let _ = check_checkpoint(&cfg, &files);
        }
        Ok(())
    });
}

#[test]
fn fuzz_safetensors_header() {
    safetensors_target(256);
}

#[test]
#[ignore]
fn fuzz_safetensors_header_long() {
    safetensors_target(cases(1_000_000));
}

// --- GGUF header and metadata ---

fn gguf_target(n: u32) {
    let bytes = std::fs::read(fixture("gguf").join("mixtral-f16.gguf")).unwrap();
    let scratch = std::cell::RefCell::new(ScratchFile::new("m.gguf"));
    // Header, metadata (vocabulary included) and tensor table; past them is tensor
    // data, which nothing here reads (the old bound, 48 KB, spent four edits in
    // five there).
    let within = gguf_tables_end(&bytes);
    run("GGUF header and metadata", n, byte_edits(within), |edits| {
        let mut scratch = scratch.borrow_mut();
        let path = scratch.set(&edited(&bytes, &edits)).to_path_buf();
        if let Ok(file) = GgufFile::open(&path) {
            let _ = config_from_gguf(&file);
            if let Ok(Some(tok)) = tokenizer_from_gguf(&file) {
                let _ = tok.encode("hello world", true);
                if let Ok(Some(t)) = chat_template_from_gguf(&file, Some(&tok)) {
                    let _ = t.render(&[ChatMessage::new("user", "hi")], true);
                }
            }
        }
        Ok(())
    });
}

/// Where a well-formed GGUF file's tensor table ends (its data section follows).
fn gguf_tables_end(b: &[u8]) -> usize {
    let mut p = 8; // magic, version
    let u64_at = |p: &mut usize| {
        let v = u64::from_le_bytes(b[*p..*p + 8].try_into().unwrap());
        *p += 8;
        v as usize
    };
    let (n_tensors, n_kv) = (u64_at(&mut p), u64_at(&mut p));
    fn skip_value(b: &[u8], p: &mut usize, ty: u32) {
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
        match ty {
            0 | 1 | 7 => *p += 1,
            2 | 3 => *p += 2,
            4..=6 => *p += 4,
            10..=12 => *p += 8,
            8 => *p += 8 + u64_at(*p),
            9 => {
                let elem = u32::from_le_bytes(b[*p..*p + 4].try_into().unwrap());
                let n = u64_at(*p + 4);
                *p += 12;
                for _ in 0..n {
                    skip_value(b, p, elem);
                }
            }
            other => panic!("GGUF value type {other}"),
        }
    }
    for _ in 0..n_kv {
        skip_value(b, &mut p, 8); // key
        let ty = u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
        p += 4;
        skip_value(b, &mut p, ty);
    }
    for _ in 0..n_tensors {
        skip_value(b, &mut p, 8); // name
        let dims = u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) as usize;
        p += 4 + 8 * dims + 4 + 8; // dimensions, type, offset
    }
    p
}

/// Found by the long run: a flipped dimension whose byte size overflows
/// (element count times block bytes) panicked in the tensor table.
#[test]
fn gguf_tensor_byte_size_overflow_is_an_error() {
    let bytes = std::fs::read(fixture("gguf").join("mixtral-f16.gguf")).unwrap();
    let path = scratch("overflow.gguf");
    std::fs::write(&path, edited(&bytes, &(vec![(8324, 205)], None))).unwrap();
    let Err(err) = GgufFile::open(&path) else {
        panic!("a corrupt tensor table is refused");
    };
    assert!(err.to_string().contains("overflows"), "{err}");
}

#[test]
fn fuzz_gguf_header_and_metadata() {
    gguf_target(256);
}

#[test]
#[ignore]
fn fuzz_gguf_header_and_metadata_long() {
    gguf_target(cases(1_000_000));
}

// --- tokenizer.json ---

fn tokenizer_target(n: u32) {
    let base = fixture_json("mixtral", "tokenizer.json");
    // The vocabulary and merges hold most nodes; mutate the structure around them
    // as often as their entries.
    let mut small = base.clone();
    small["model"]["vocab"] = serde_json::json!({"a": 0, "b": 1, "ab": 2, "<s>": 3});
    small["model"]["merges"] = serde_json::json!(["a b"]);
    let strategy = (any::<bool>(), mutations(), "[ -~]{0,24}");
    run("tokenizer.json", n, strategy, |(full, edits, text)| {
        let doc = mutate(if full { &base } else { &small }, &edits).to_string();
        if let Ok(tok) = TextTokenizer::from_json(&doc, "tokenizer.json") {
            if let Ok(ids) = tok.encode(&text, true) {
                let _ = tok.decode(&ids, false);
                let mut stream = tok.stream();
                for id in ids {
                    let _ = stream.push(id);
                }
            }
            let _ = tok.decode(&[0, 1, 2, u32::MAX], true);
        }
        Ok(())
    });
}

#[test]
fn fuzz_tokenizer_json() {
    tokenizer_target(512);
}

#[test]
#[ignore]
fn fuzz_tokenizer_json_long() {
    tokenizer_target(cases(1_000_000));
}

// --- chat templates ---

fn template_piece() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        "[ -~]{0,8}",
        Just("{{ messages[0].content }}".to_string()),
        Just("{{ messages[7].content }}".to_string()),
        Just("{{ bos_token ~ eos_token }}".to_string()),
        Just("{{ 'ab' * 100000 }}".to_string()),
        Just("{{ 'ab' * 10000000000 }}".to_string()),
        Just("{% set ns.s = ns.s ~ ns.s %}".to_string()),
        // Not `ns.l + ns.l`: minijinja 3.1 spins on doubled lazy lists without
        // charging fuel; the render's time bound catches it (tests/harden.rs), but
        // each case would leave a spinning thread behind.
        Just("{% set ns.l = ns.l + [ns.s] %}".to_string()),
        Just("{{ ns.s|length }}".to_string()),
        Just("{{ raise_exception('no') }}".to_string()),
        Just("{{ m.content.strip().split('a')|join('b') }}".to_string()),
        Just("{{ messages|tojson }}".to_string()),
        Just("{{ range(1000000)|list|length }}".to_string()),
        Just("{{ x.y.z }}".to_string()),
        Just("{% if %}".to_string()),
        Just("{{".to_string()),
        Just("{% endfor %}".to_string()),
        Just("{{ 1 / 0 }}".to_string()),
        Just("{{ f(3) }}".to_string()),
        Just("{% break %}".to_string()),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| v.concat()),
            inner
                .clone()
                .prop_map(|b| format!("{{% for m in messages %}}{b}{{% endfor %}}")),
            (inner.clone(), 0u64..1_000_000)
                .prop_map(|(b, n)| format!("{{% for i in range({n}) %}}{b}{{% endfor %}}")),
            inner.clone().prop_map(|b| format!(
                "{{% if add_generation_prompt %}}{b}{{% else %}}x{{% endif %}}"
            )),
            inner.prop_map(|b| format!(
                "{{% macro f(n) %}}{b}{{{{ f(n + 1) }}}}{{% endmacro %}}{{{{ f(0) }}}}"
            )),
        ]
    })
}

fn template_target(n: u32) {
    // Small limits so that cases reaching them stay quick; the property does not
    // depend on the values.
    let limits = TemplateLimits {
        fuel: 50_000,
        max_bytes: 1 << 20,
        recursion: 50,
        timeout: Duration::from_secs(2),
        ..TemplateLimits::default()
    };
    let messages = [
        ChatMessage::new("system", "be brief"),
        ChatMessage::new("user", "hi"),
    ];
    run("chat template", n, template_piece(), |body| {
        let source = format!("{{% set ns = namespace(s='x', l=[1]) %}}{body}");
        let t = ChatTemplate::new(source, Some("<s>".into()), None)
            .unwrap()
            .with_limits(limits);
        if std::env::var_os("SWITCHYARD_FUZZ_TRACE").is_some() {
            std::fs::write(scratch("current-template"), &body).unwrap();
        }
        let start = Instant::now();
        let _ = t.render(&messages, true);
        prop_assert!(
            start.elapsed() < Duration::from_secs(10),
            "render took {:?}",
            start.elapsed()
        );
        Ok(())
    });
}

#[test]
fn fuzz_chat_template() {
    template_target(1024);
}

#[test]
#[ignore]
fn fuzz_chat_template_long() {
    template_target(cases(1_000_000));
}

// --- size flags: --expert-memory / --kv-memory sizes and the training config ---

fn size_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,12}",
        (
            any::<u64>(),
            prop::sample::select(vec!["", "k", "m", "g", "t", "kb", "GiB", "b", "%", " MB"])
        )
            .prop_map(|(n, u)| format!("{n}{u}")),
        (
            any::<f64>(),
            prop::sample::select(vec!["", "g", "%", "GiB"])
        )
            .prop_map(|(f, u)| format!("{f}{u}")),
    ]
}

fn train_config() -> impl Strategy<Value = TrainConfig> {
    let size = || {
        prop_oneof![
            Just(0usize),
            1usize..64,
            Just(1 << 20),
            Just(1 << 40),
            any::<usize>()
        ]
    };
    let real = || {
        prop_oneof![
            Just(0.0f64),
            Just(-1.0),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(1e30),
            0.0f64..1.0
        ]
    };
    (
        (size(), size(), size(), size(), size(), size()),
        (size(), size(), size(), size(), size(), size()),
        (real(), real(), real(), real(), real()),
    )
        .prop_map(|(a, b, c)| {
            let mut t = TrainConfig::preset("tiny").unwrap();
            (
                t.vocab_size,
                t.hidden_size,
                t.num_layers,
                t.num_heads,
                t.num_kv_heads,
                t.head_dim,
            ) = a;
            (
                t.num_experts,
                t.top_k,
                t.expert_ffn,
                t.batch_size,
                t.seq_len,
                t.eval_every,
            ) = b;
            (
                t.lr,
                t.rope_theta,
                t.grad_clip,
                t.weight_decay,
                t.min_lr_ratio,
            ) = c;
            t
        })
}

fn size_flags_target(n: u32) {
    run(
        "size flags",
        n,
        (size_text(), train_config()),
        |(text, cfg)| {
            if let Ok(size) = text.parse::<ByteSize>() {
                let _ = size.resolve(u64::MAX);
                let _ = size.resolve(0);
            }
            if cfg.validate().is_ok() {
                let bytes = cfg.memory_bytes();
                prop_assert!(bytes.is_some_and(|b| b <= TrainConfig::MAX_MEMORY_BYTES));
                let _ = cfg.model_config().parameter_counts();
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_size_flags() {
    size_flags_target(4096);
}

#[test]
#[ignore]
fn fuzz_size_flags_long() {
    size_flags_target(cases(1_000_000));
}

/// The flags themselves, through the binary (slow per case: a process each).
#[test]
fn size_flags_through_the_cli_fail_cleanly() {
    let model = fixture("qwen3_moe");
    let mut runner = TestRunner::new(Config {
        cases: cases(12).min(64),
        failure_persistence: None,
        ..Config::default()
    });
    let flag = prop::sample::select(vec![
        "--prompt-tokens",
        "--gen-tokens",
        "--repeat",
        "--threads",
    ]);
    // Values clap's range parsers refuse (a bounded value that passes would run a
    // benchmark: too slow for a fuzz case).
    let value = prop_oneof![
        Just("0".to_string()),
        Just("-1".into()),
        Just("nan".into()),
        Just("1e3".into()),
        "[1-9][0-9]{20,30}"
    ];
    runner
        .run(&(flag, value), |(flag, value)| {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
                .args(["bench", "--model", model.to_str().unwrap(), flag, &value])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            prop_assert!(!stderr.contains("panicked"), "{stderr}");
            prop_assert!(
                matches!(out.status.code(), Some(1) | Some(2)),
                "{flag} {value}: {stderr}"
            );
            Ok(())
        })
        .unwrap();
}

// --- request bodies (`/v1/completions`, `/v1/chat/completions`) ---

/// Valid bodies of both endpoints, with every field the API reads somewhere,
/// for the JSON mutations to break.
fn request_seeds() -> Vec<Value> {
    use serde_json::json;
    vec![
        json!({"model": "demo", "prompt": "The capital of France is", "max_tokens": 16,
               "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 7, "stop": ["\n", "."],
               "stream": true, "stream_options": {"include_usage": true}, "logprobs": 2, "n": 1}),
        json!({"prompt": [[1, 2, 3]], "max_tokens": 1, "echo": false, "suffix": "",
               "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}}),
        json!({"model": "demo", "max_completion_tokens": 8, "temperature": 0, "stop": "x",
               "logprobs": true, "top_logprobs": 3,
               "messages": [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        json!({"max_tokens": 4, "tool_choice": "auto",
               "tools": [{"type": "function", "function": {"name": "get_weather",
                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
               "messages": [
                   {"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                     "type": "function", "function": {"name": "get_weather",
                     "arguments": "{\"city\": \"Paris\"}"}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}),
    ]
}

/// A Hermes-style template that reads tools and tool calls, as Qwen's do.
const TOOL_TEMPLATE: &str = "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t|tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}\
{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}\
{% for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments|tojson }}}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn request_target(n: u32) {
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    let tokenizer = TextTokenizer::from_dir(&demo).unwrap();
    let demo_template = ChatTemplate::from_dir(&demo).unwrap().unwrap();
    let tool_template = ChatTemplate::new(TOOL_TEMPLATE.into(), None, None).unwrap();
    let seeds = request_seeds();
    let no_model_check = |_: Option<&str>| Ok(());
    let strategy = (
        0..seeds.len(),
        mutations(),
        prop::option::of(byte_edits(512)),
    );
    run("request body", n, strategy, |(seed, edits, bytes)| {
        let mut body = mutate(&seeds[seed], &edits).to_string().into_bytes();
        if let Some(bytes) = &bytes {
            body = edited(&body, bytes);
        }
        // Both endpoints see every body: a chat body sent to /v1/completions
        // is as likely as a well-formed one.
        match switchyard::server::completion_body(&body, no_model_check) {
            Ok(c) => {
                check_generation(&c.generation)?;
                match &c.prompt {
                    CompletionPrompt::Text(t) => {
                        prop_assert!(!t.is_empty());
                        let _ = tokenizer.encode(t, false);
                    }
                    CompletionPrompt::Ids(ids) => prop_assert!(!ids.is_empty()),
                }
            }
            Err(e) => check_refusal(&e)?,
        }
        match switchyard::server::chat_body(&body, no_model_check) {
            Ok(c) => {
                check_generation(&c.generation)?;
                prop_assert!(!c.messages.is_empty());
                for t in [&demo_template, &tool_template] {
                    if let Ok(text) = t.render_with_tools(&c.messages, c.tools.tools.as_ref(), true)
                    {
                        let _ = tokenizer.encode(&text, false);
                        let _ = switchyard::server::parse_tool_calls(&text);
                    }
                }
            }
            Err(e) => check_refusal(&e)?,
        }
        Ok(())
    });
}

/// An accepted body's generation is one the sampler can run as is.
fn check_generation(g: &Generation) -> Result<(), TestCaseError> {
    prop_assert!(g.sampling.validate().is_ok(), "{:?}", g.sampling);
    prop_assert!(g.max_tokens.is_none_or(|n| n >= 1));
    prop_assert!(g.stop.len() <= 4 && g.stop.iter().all(|s| !s.is_empty()));
    prop_assert!(g.top_logprobs.is_none_or(|k| k <= 20));
    let mut sampler = Sampler::new(g.sampling);
    let id = sampler.sample(&[0.5, -1.0, 2.0, 0.0]);
    prop_assert!(id < 4);
    Ok(())
}

/// A refusal is a client error that says what is wrong.
fn check_refusal(e: &switchyard::server::ApiError) -> Result<(), TestCaseError> {
    prop_assert!(e.status.is_client_error(), "{e:?}");
    prop_assert!(!e.message.is_empty());
    Ok(())
}

#[test]
fn fuzz_request_body() {
    request_target(2000);
}

#[test]
#[ignore]
fn fuzz_request_body_long() {
    request_target(cases(1_000_000));
}
