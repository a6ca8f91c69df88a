//! Bad input gets a one-line error naming the problem and a non-zero exit,
//! never a panic, and never a half-written output file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture;

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn switchyard(args: &[&str]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("binary runs");
    Outcome {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts a clean failure whose single error line mentions every `needle`.
fn assert_fails_with(outcome: &Outcome, needles: &[&str]) {
    assert_eq!(outcome.code, Some(1), "stderr: {}", outcome.stderr);
    assert!(
        !outcome.stderr.contains("panicked"),
        "panic: {}",
        outcome.stderr
    );
    let lines: Vec<&str> = outcome
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line, got: {}",
        outcome.stderr
    );
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{needle:?} not in {:?}",
            lines[0]
        );
    }
}

/// A writable copy of a fixture.
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

/// Rewrites `model.safetensors` through `edit`, which may rename, drop or reshape tensors.
fn rewrite_weights(
    dir: &Path,
    edit: impl Fn(
        &str,
        Vec<usize>,
        Vec<u8>,
    ) -> Option<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)>,
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(t) = edit(&name, view.shape().to_vec(), view.data().to_vec()) {
            tensors.push(t);
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn missing_model_directory_is_named() {
    let o = run_ids(Path::new("/definitely/not/here"), "1,2");
    assert_fails_with(&o, &["/definitely/not/here", "not found"]);
}

#[test]
fn missing_weight_files_are_reported() {
    let (_tmp, dir) = copy_fixture("mixtral");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_fails_with(&run_ids(&dir, "1,2"), &["safetensors"]);
}

#[test]
fn missing_config_is_reported() {
    let (_tmp, dir) = copy_fixture("mixtral");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_fails_with(&run_ids(&dir, "1,2"), &["config.json"]);
}

#[test]
fn unknown_architecture_lists_supported_ones() {
    let (_tmp, dir) = copy_fixture("mixtral");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"mixtral\"", "\"gpt2\""),
    )
    .unwrap();
    assert_fails_with(
        &run_ids(&dir, "1,2"),
        &["\"gpt2\"", "qwen3_moe", "mixtral", "qwen2_moe", "olmoe"],
    );
}

#[test]
fn config_field_of_wrong_type_is_named() {
    let (_tmp, dir) = copy_fixture("olmoe");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = serde_json::json!("sixty-four");
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    assert_fails_with(
        &run_ids(&dir, "1,2"),
        &["config.json", "hidden_size", "invalid type"],
    );
}

#[test]
fn malformed_config_json_is_reported() {
    let (_tmp, dir) = copy_fixture("olmoe");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"olmoe\", ").unwrap();
    assert_fails_with(&run_ids(&dir, "1,2"), &["config.json", "invalid JSON"]);
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    rewrite_weights(&dir, |name, shape, data| {
        (name != "model.layers.0.self_attn.k_proj.weight")
            .then(|| (name.to_string(), shape, safetensors::Dtype::F32, data))
    });
    assert_fails_with(
        &run_ids(&dir, "1,2"),
        &["model.layers.0.self_attn.k_proj.weight", "not found"],
    );
}

#[test]
fn wrong_tensor_shape_names_both_shapes() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    rewrite_weights(&dir, |name, shape, data| {
        let shape = if name == "model.layers.2.self_attn.o_proj.weight" {
            vec![96, 64]
        } else {
            shape
        };
        Some((name.to_string(), shape, safetensors::Dtype::F32, data))
    });
    assert_fails_with(
        &run_ids(&dir, "1,2"),
        &[
            "model.layers.2.self_attn.o_proj.weight",
            "[96, 64]",
            "[64, 96]",
        ],
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let (_tmp, dir) = copy_fixture("qwen3_moe");
    rewrite_weights(&dir, |name, shape, data| {
        let dtype = if name == "model.norm.weight" {
            safetensors::Dtype::I32
        } else {
            safetensors::Dtype::F32
        };
        Some((name.to_string(), shape, dtype, data))
    });
    assert_fails_with(&run_ids(&dir, "1,2"), &["model.norm.weight", "I32"]);
}

#[test]
fn truncated_safetensors_is_rejected() {
    let (_tmp, dir) = copy_fixture("mixtral");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails_with(
        &run_ids(&dir, "1,2"),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn corrupt_safetensors_header_is_rejected() {
    let (_tmp, dir) = copy_fixture("mixtral");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[8..40] {
        *b = b'#';
    }
    std::fs::write(&path, &bytes).unwrap();
    assert_fails_with(
        &run_ids(&dir, "1,2"),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn missing_shard_is_named() {
    let (_tmp, dir) = copy_fixture("qwen3_moe_bf16_sharded");
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    assert_fails_with(&run_ids(&dir, "1,2"), &["model-00002-of-00003.safetensors"]);
}

#[test]
fn out_of_vocabulary_prompt_id_is_rejected() {
    let o = run_ids(&fixture("olmoe"), "1,384,2");
    assert_fails_with(&o, &["token id 384", "vocabulary of 384"]);
}

#[test]
fn unparsable_prompt_ids_are_rejected() {
    let o = run_ids(&fixture("olmoe"), "1,two,3");
    assert_fails_with(&o, &["\"two\""]);
}

#[test]
fn prompt_longer_than_context_is_rejected() {
    let ids: Vec<String> = (0..70).map(|i| (i % 300).to_string()).collect();
    let o = run_ids(&fixture("olmoe"), &ids.join(","));
    assert_fails_with(&o, &["70 tokens", "64"]);
}

#[test]
fn failed_logits_run_leaves_no_output_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.npy");
    let o = switchyard(&[
        "logits",
        "--model",
        fixture("olmoe").to_str().unwrap(),
        "--prompt-ids",
        "1,999",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_fails_with(&o, &["token id 999"]);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn chat_without_template_is_reported() {
    let (_tmp, dir) = copy_fixture("olmoe");
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    let o = switchyard(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--chat",
        "--max-tokens",
        "1",
    ]);
    assert_fails_with(&o, &["chat_template"]);
}
