//! Issue 13, one test per defect found probing the CLI as a careless or hostile
//! user would: each failed (panic, abort, hang, wrong success) before its fix.
//! Every failure must be one clean `error:` line and a non-zero exit.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::fixture;

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn switchyard(args: &[&str]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("binary runs");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A clean failure (exit 1 from our error path, or 2 from clap's argument
/// check) whose message mentions every needle; never a panic or an abort.
fn assert_fails_with(o: &Outcome, needles: &[&str]) {
    assert!(
        matches!(o.code, Some(1) | Some(2)),
        "exit {:?}, stderr: {}",
        o.code,
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "panic: {}", o.stderr);
    for needle in needles {
        assert!(o.stderr.contains(needle), "{needle:?} not in {}", o.stderr);
    }
}

fn assert_ok(o: &Outcome) {
    assert_eq!(o.code, Some(0), "stderr: {}", o.stderr);
}

fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    (tmp, dir)
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    edit_json(&dir.join("config.json"), edit);
}

fn run_ids(dir: &Path, ids: &str) -> Outcome {
    switchyard(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        ids,
        "--max-tokens",
        "2",
        "--json",
    ])
}

/// Overwrites tensor `name` of a safetensors file (f32) with `value` everywhere.
fn poison_tensor(path: &Path, name: &str, value: f32) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = Vec::new();
    for (n, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if n == name {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            for c in data.chunks_exact_mut(4) {
                c.copy_from_slice(&value.to_le_bytes());
            }
        }
        tensors.push((n, view.shape().to_vec(), view.dtype(), data));
    }
    assert!(tensors.iter().any(|t| t.0 == name), "{name} not in fixture");
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

// 1
#[test]
fn logits_of_a_one_token_prompt_with_several_kv_heads() {
    // qwen2_moe has 2 KV heads: a one-row K/V view has strides [hd, 2 hd, 1].
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.npy");
    let o = switchyard(&[
        "logits",
        "--model",
        fixture("qwen2_moe").to_str().unwrap(),
        "--prompt-ids",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_ok(&o);
    assert!(o.stderr.contains("[1, 384]"), "{}", o.stderr);
}

// 2
#[test]
fn unbounded_config_sizes_are_refused_by_name() {
    for (field, value) in [
        ("num_hidden_layers", serde_json::json!(1_000_000_000_000u64)),
        ("num_hidden_layers", serde_json::json!(1u64 << 63)),
        (
            "max_position_embeddings",
            serde_json::json!(1_000_000_000u64),
        ),
        ("max_position_embeddings", serde_json::json!(1u64 << 63)),
        ("vocab_size", serde_json::json!(1u64 << 40)),
        ("num_local_experts", serde_json::json!(1u64 << 40)),
    ] {
        let (_tmp, dir) = copy_fixture("qwen3_moe");
        edit_config(&dir, |c| c[field] = value.clone());
        assert_fails_with(&run_ids(&dir, "1,2"), &["config.json", field]);
    }
}

#[test]
fn a_long_claimed_context_is_not_allocated_up_front() {
    // 2^24 positions: an eager rotary table would be 1 GiB for this tiny model.
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |c| c["max_position_embeddings"] = (1u64 << 24).into());
    let start = Instant::now();
    assert_ok(&run_ids(&dir, "1,2"));
    assert!(start.elapsed() < Duration::from_secs(30));
}

// 3
#[test]
fn tokenizer_template_naming_an_undefined_special_token_is_an_error() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    edit_json(&dir.join("tokenizer.json"), |t| {
        t["post_processor"] = serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {},
        });
    });
    let o = switchyard(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-tokens",
        "1",
    ]);
    assert_fails_with(&o, &["tokenizer.json", "<bos>"]);
}

// 4
#[test]
fn runaway_chat_templates_stop_with_an_error_naming_the_template() {
    let loops = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
    let doubling = "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}";
    // Lazy list concatenation that fuel does not see (found by tests/fuzz.rs).
    let lists = "{% set ns = namespace(l=[1]) %}{% for i in range(100) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}";
    for (file, template) in [
        ("chat_template.jinja", loops),
        ("chat_template.jinja", doubling),
        ("chat_template.jinja", lists),
        ("tokenizer_config.json", loops),
    ] {
        let (_tmp, dir) = copy_fixture("qwen3_moe");
        if file == "chat_template.jinja" {
            std::fs::write(dir.join(file), template).unwrap();
        } else {
            edit_json(&dir.join(file), |t| t["chat_template"] = template.into());
        }
        let start = Instant::now();
        let o = switchyard(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--chat",
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
        ]);
        assert_fails_with(&o, &[file, "chat template"]);
        assert!(start.elapsed() < Duration::from_secs(60), "{template}");
    }
}

// 5
#[test]
fn a_broken_chat_template_only_fails_chat() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    std::fs::write(dir.join("chat_template.jinja"), "{% if %}").unwrap();
    assert_ok(&run_ids(&dir, "1,2"));
    let o = switchyard(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--chat",
        "--prompt",
        "hi",
    ]);
    assert_fails_with(&o, &["chat_template.jinja"]);
}

// 6
fn write_corpus(dir: &Path) -> PathBuf {
    let data = dir.join("data.txt");
    let text: String = (0..400)
        .map(|i| {
            format!(
                "the cat {i} sees the dog. a bird finds the moon {}. ",
                i % 7
            )
        })
        .collect();
    std::fs::write(&data, text).unwrap();
    data
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> Outcome {
    let mut args = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--preset",
        "tiny",
    ];
    args.extend_from_slice(extra);
    switchyard(&args)
}

#[test]
fn bad_training_configs_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_corpus(tmp.path());
    let toml = tmp.path().join("run.toml");
    let out = tmp.path().join("out");
    for (flags, toml_text, needle) in [
        (vec![], "eval_every = 0", "eval_every"),
        (vec![], "checkpoint_every = 0", "checkpoint_every"),
        (vec!["--lr", "NaN"], "", "lr"),
        (vec!["--lr", "inf"], "", "lr"),
        (vec!["--lr", "1e30"], "", "lr"),
        (vec!["--lr=-1"], "", "lr"),
        (vec![], "grad_clip = -1.0", "grad_clip"),
        (vec![], "rope_theta = 0.0", "rope_theta"),
        (vec![], "num_layers = 0", "num_layers"),
        (vec![], "hidden_size = 0", "hidden_size"),
        (vec!["--batch", "1099511627776"], "", "batch_size"),
        (vec![], "vocab_size = 1099511627776", "vocab_size"),
        (
            vec![],
            "num_experts = 4096\nexpert_ffn = 65536",
            "need about",
        ),
    ] {
        std::fs::write(&toml, toml_text).unwrap();
        let mut extra = flags.clone();
        extra.extend(["--config", toml.to_str().unwrap(), "--steps", "2"]);
        let o = train(&data, &out, &extra);
        assert_fails_with(&o, &[needle]);
        assert!(!out.exists(), "{flags:?} {toml_text}: --out was created");
    }
}

#[test]
fn a_diverging_run_stops_with_an_error_and_keeps_its_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_corpus(tmp.path());
    let out = tmp.path().join("out");
    let toml = tmp.path().join("run.toml");
    std::fs::write(&toml, "checkpoint_every = 1\neval_every = 1").unwrap();
    let cfg = toml.to_str().unwrap();
    assert_ok(&train(&data, &out, &["--steps", "2", "--config", cfg]));
    // An expert weight (not checked at load) turned to NaN: the next loss is NaN.
    let weights = out.join("checkpoint/weights.safetensors");
    poison_tensor(
        &weights,
        "model.layers.0.mlp.experts.0.down_proj.weight",
        f32::NAN,
    );
    let before = std::fs::read(&weights).unwrap();
    let state = std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap();
    let o = train(&data, &out, &["--resume", "--steps", "4"]);
    assert_fails_with(&o, &["finite"]);
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    assert_eq!(
        std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap(),
        state
    );
}

#[test]
fn a_run_failing_before_its_first_checkpoint_leaves_out_as_it_found_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Data that is all held out: the corpus has no training windows.
    let data = tmp.path().join("tiny.txt");
    std::fs::write(&data, "a").unwrap();
    let out = tmp.path().join("out");
    let o = train(&data, &out, &["--steps", "2"]);
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    assert!(
        !out.exists(),
        "left {:?}",
        std::fs::read_dir(&out).map(|d| d.count())
    );
}

// 7
#[test]
fn bench_size_flags_are_bounded() {
    let model = fixture("qwen3_moe");
    let model = model.to_str().unwrap();
    for (flag, value, needle) in [
        ("--prompt-tokens", "18446744073709551615", "context"),
        ("--repeat", "0", "--repeat"),
        ("--threads", "0", "--threads"),
        ("--threads", "100000000", "--threads"),
        ("--gen-tokens", "0", "--gen-tokens"),
    ] {
        let mut args = vec!["bench", "--model", model, flag, value];
        if flag != "--repeat" {
            args.extend(["--repeat", "1"]);
        }
        assert_fails_with(&switchyard(&args), &[needle]);
    }
}

// 8
#[test]
fn logits_into_a_directory_fails_without_leaving_a_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("here");
    std::fs::create_dir(&out).unwrap();
    let o = switchyard(&[
        "logits",
        "--model",
        fixture("mixtral").to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_fails_with(&o, &["directory"]);
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

// 9
fn info(dir: &Path) -> Outcome {
    switchyard(&["info", "--model", dir.to_str().unwrap(), "--json"])
}

#[test]
fn info_validates_the_config_against_the_checkpoint() {
    for (field, value, needle) in [
        ("num_local_experts", serde_json::json!(4), "mlp.gate.weight"),
        ("hidden_size", serde_json::json!(0), "hidden_size"),
        ("vocab_size", serde_json::json!(0), "vocab_size"),
        ("hidden_size", serde_json::json!(1u64 << 40), "hidden_size"),
        ("moe_intermediate_size", serde_json::json!(7), "experts"),
    ] {
        let (_tmp, dir) = copy_fixture("qwen3_moe");
        edit_config(&dir, |c| c[field] = value.clone());
        assert_fails_with(&info(&dir), &[needle]);
    }
    let o = info(&fixture("qwen3_moe"));
    assert_ok(&o);
    assert!(
        o.stdout.contains("\"experts_per_layer\": 8"),
        "{}",
        o.stdout
    );
}

#[test]
fn info_validates_gguf_metadata_against_its_tensors() {
    let src = fixture("gguf").join("mixtral-f16.gguf");
    let mut bytes = std::fs::read(&src).unwrap();
    let key = b"llama.expert_count";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("expert_count key")
        + key.len();
    // The value type (u32 = 4) then the value.
    assert_eq!(&bytes[at..at + 4], &4u32.to_le_bytes());
    let value = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
    bytes[at + 4..at + 8].copy_from_slice(&(value * 2).to_le_bytes());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    std::fs::write(&path, bytes).unwrap();
    assert_fails_with(&info(&path), &["blk.0.ffn_"]);
}

// 10
#[test]
fn random_init_routes_dense_layers_and_fused_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog ".repeat(20),
    )
    .unwrap();
    for name in [
        "qwen3_moe",
        "qwen3_moe_fused",
        "mixtral",
        "olmoe",
        "qwen2_moe",
    ] {
        let o = switchyard(&[
            "routing-stats",
            "--model",
            fixture(name).to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--random-init",
            "3",
            "--seq-len",
            "32",
            "--json",
        ]);
        assert_ok(&o);
        assert!(o.stdout.contains("random init, seed 3"), "{name}");
    }
}

#[test]
fn shared_expert_tensors_the_config_ignores_are_an_error() {
    let (_tmp, dir) = copy_fixture("qwen2_moe");
    edit_config(&dir, |c| c["shared_expert_intermediate_size"] = 0.into());
    assert_fails_with(&run_ids(&dir, "1,2"), &["shared_expert"]);
    assert_fails_with(&info(&dir), &["shared_expert"]);
}

// 11
#[test]
fn messages_say_what_is_wrong() {
    let (_tmp, dir) = copy_fixture("mixtral");
    let o = run_ids(&dir.join("config.json"), "1,2");
    assert_fails_with(&o, &["config.json", "is a file, not a model directory"]);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::create_dir(dir.join("model.safetensors")).unwrap();
    assert_fails_with(&run_ids(&dir, "1,2"), &["model.safetensors", "directory"]);
}

// 12
#[test]
fn non_positive_hyper_parameters_are_refused() {
    for (field, value) in [
        ("rms_norm_eps", serde_json::json!(-1e-6)),
        ("rms_norm_eps", serde_json::json!(0.0)),
        ("rope_theta", serde_json::json!(0.0)),
        ("rope_theta", serde_json::json!(-10000.0)),
    ] {
        let (_tmp, dir) = copy_fixture("mixtral");
        edit_config(&dir, |c| match c.get_mut("rope_parameters") {
            Some(rope) if field == "rope_theta" => rope[field] = value.clone(),
            _ => c[field] = value.clone(),
        });
        assert_fails_with(&run_ids(&dir, "1,2"), &["config.json", field]);
    }
}

#[test]
fn non_finite_weights_are_refused_not_turned_into_token_zero() {
    for (tensor, value, needle) in [
        ("model.norm.weight", f32::NAN, "model.norm.weight"),
        (
            "model.layers.1.block_sparse_moe.gate.weight",
            f32::INFINITY,
            "gate.weight",
        ),
        ("model.embed_tokens.weight", f32::NAN, "embed_tokens"),
        (
            "model.layers.0.self_attn.o_proj.weight",
            f32::NAN,
            "non-finite logits",
        ),
    ] {
        let (_tmp, dir) = copy_fixture("mixtral");
        poison_tensor(&dir.join("model.safetensors"), tensor, value);
        assert_fails_with(&run_ids(&dir, "1,2,3,4,5,6"), &[needle]);
    }
}

// 13
#[test]
fn setup_docs_name_no_machine_paths_or_outside_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![
        root.join("README.md"),
        root.join("models/demo/MODEL_CARD.md"),
    ];
    for entry in std::fs::read_dir(root.join("tools")).unwrap() {
        files.push(entry.unwrap().path());
    }
    for path in files.iter().filter(|p| p.is_file()) {
        let text = std::fs::read_to_string(path).unwrap();
        for bad in ["/work/", "/root/", "../shared/", "~/.rustup"] {
            assert!(!text.contains(bad), "{} names {bad}", path.display());
        }
    }
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("rust-version = \"1.89\""));
}
