//! `switchyard analyze` as a user drives it: routing a text, writing and reading
//! back a trace, the outputs, and the trace's bad-input cases.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::fixture;

fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn stdout_ok(args: &[&str]) -> String {
    let out = switchyard(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_err(args: &[&str]) -> String {
    let out = switchyard(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const TEXT: &str = "The quick brown fox jumps over the lazy dog. In the beginning was the word, \
and the word was with the model, and the experts were many. fn main() { println!(\"hello\"); } \
Der schnelle braune Fuchs springt über den faulen Hund. El rápido zorro marrón salta.";

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Routes a text with the qwen3_moe fixture (8 experts top-2, layer 1 dense),
/// saves the trace, and checks that analysing the saved trace reports exactly
/// what the in-process analysis did.
#[test]
fn analyze_routes_a_text_and_reads_its_trace_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT.repeat(4)).unwrap();
    let model = fixture("qwen3_moe");
    let (trace, out) = (dir.path().join("t.parquet"), dir.path().join("direct"));
    let table = stdout_ok(&[
        "analyze",
        "--text",
        text.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--seq-len",
        "24",
        "--max-tokens",
        "120",
        "--save-trace",
        trace.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(table.contains("SRP at m = 4 / 16 / 64 / 256"), "{table}");
    assert!(
        table.contains("Belady, engine") && table.contains("0->2"),
        "{table}"
    );

    let direct = json(&out.join("summary.json"));
    assert_eq!(
        direct["moe_layers"],
        serde_json::json!([0, 2]),
        "layer 1 is dense"
    );
    assert_eq!(
        (direct["tokens"].as_u64(), direct["sequences"].as_u64()),
        (Some(120), Some(5))
    );
    assert_eq!(direct["cache_in_top_k"].as_array().map(Vec::len), Some(8));
    // A cache holding every expert hits everything under the paper's warm start.
    let lru = direct["paper_counting"]["model"]["lru"].as_array().unwrap();
    assert_eq!(lru.last().and_then(|v| v.as_f64()), Some(1.0));
    // Belady bounds LRU at every size, under both countings.
    for counting in ["paper_counting", "engine_counting"] {
        let m = &direct[counting]["model"];
        for (b, l) in m["belady"]
            .as_array()
            .unwrap()
            .iter()
            .zip(m["lru"].as_array().unwrap())
        {
            assert!(
                b.as_f64().unwrap() + 1e-12 >= l.as_f64().unwrap(),
                "{counting}"
            );
        }
    }
    for png in ["expert_load", "sch", "hit_rates", "srp", "coactivation"] {
        let bytes = std::fs::read(out.join(format!("{png}.png"))).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 2000,
            "{png}"
        );
    }

    // The saved trace, analysed as a file, gives the same summary (model name aside).
    let from_file = stdout_ok(&[
        "analyze",
        trace.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--json",
    ]);
    let mut from_file: serde_json::Value = serde_json::from_str(&from_file).unwrap();
    let mut direct = direct;
    from_file["model"] = serde_json::Value::Null;
    direct["model"] = serde_json::Value::Null;
    assert_eq!(from_file, direct);
    // Without --out, a trace's outputs go beside it.
    assert!(dir.path().join("t.analysis/summary.json").exists());
}

#[test]
fn routing_stats_still_runs_as_analyze() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT).unwrap();
    // The demo model (the default): random init needs the trained family's names.
    let out = stdout_ok(&[
        "routing-stats",
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "32",
        "--random-init",
        "3",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["model"].as_str().unwrap().contains("random init, seed 3"));
    assert_eq!(v["load"].as_array().map(Vec::len), Some(4));
    // Nothing is written with --text unless --out says where.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_trace_of_another_model_is_refused_with_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT).unwrap();
    let trace = dir.path().join("qwen3.parquet");
    let qwen3 = fixture("qwen3_moe");
    stdout_ok(&[
        "analyze",
        "--text",
        text.to_str().unwrap(),
        "--model",
        qwen3.to_str().unwrap(),
        "--seq-len",
        "32",
        "--save-trace",
        trace.to_str().unwrap(),
    ]);
    let mixtral = fixture("mixtral");
    let err = stderr_err(&[
        "analyze",
        trace.to_str().unwrap(),
        "--model",
        mixtral.to_str().unwrap(),
    ]);
    assert!(
        err.contains("the trace is of a model with 8 experts in MoE layers [0,2] (3 layers), the model has 4 experts in MoE layers [0,1] (2 layers)"),
        "{err}"
    );
    assert!(err.contains("qwen3.parquet"), "{err}");
}

#[test]
fn a_file_that_is_not_a_trace_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("notes.parquet");
    std::fs::write(&bogus, "sequence,position,layer\n0,0,0\n").unwrap();
    let err = stderr_err(&["analyze", bogus.to_str().unwrap()]);
    assert!(
        err.contains("notes.parquet") && err.contains("not a Parquet file"),
        "{err}"
    );
    let err = stderr_err(&[
        "analyze",
        dir.path().join("absent.parquet").to_str().unwrap(),
    ]);
    assert!(err.contains("absent.parquet"), "{err}");
    let err = stderr_err(&["analyze"]);
    assert!(err.contains("--text"), "{err}");
}
