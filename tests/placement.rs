//! `switchyard plan` and `simulate` as a user drives them: a trace routed by
//! the qwen3_moe fixture (8 experts, 3 MoE layers), planned in every export
//! format and replayed, and the bad input each command refuses.

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

fn ok(args: &[&str]) -> String {
    let out = switchyard(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(args: &[&str]) -> String {
    let out = switchyard(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn trace(dir: &Path) -> std::path::PathBuf {
    let text = dir.join("text.txt");
    let words = "the experts route tokens between devices and back again; ".repeat(40);
    std::fs::write(&text, words).unwrap();
    let trace = dir.join("t.parquet");
    let model = fixture("qwen3_moe");
    ok(&[
        "analyze",
        "--text",
        s(&text),
        "--model",
        s(&model),
        "--seq-len",
        "32",
        "--save-trace",
        s(&trace),
    ]);
    trace
}

#[test]
fn plans_in_every_format_replay_no_worse_than_eplb() {
    let dir = tempfile::tempdir().unwrap();
    let trace = trace(dir.path());
    for format in ["switchyard", "sglang", "vllm"] {
        let plan = dir.path().join(format!("{format}.json"));
        ok(&[
            "plan",
            "--trace",
            s(&trace),
            "--devices",
            "4",
            "--nodes",
            "2",
            "--batch",
            "32",
            "--time-limit",
            "4",
            "--format",
            format,
            "--out",
            s(&plan),
        ]);
        let out = ok(&[
            "simulate",
            "--trace",
            s(&trace),
            "--plan",
            s(&plan),
            "--devices",
            "4",
            "--nodes",
            "2",
            "--batch",
            "32",
            "--json",
        ]);
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        let names: Vec<&str> = (rows.as_array().unwrap().iter())
            .map(|r| r["placement"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["plan", "contiguous", "round-robin", "EPLB greedy"]);
        // No replicas: the search's per-step loads are the replay's and are
        // capped at EPLB's layer by layer.
        let max = |i: usize| rows[i]["max_load"].as_f64().unwrap();
        assert!(max(0) <= max(3) + 1e-9, "{format}: {out}");
    }
    let sglang: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("sglang.json")).unwrap()).unwrap();
    let keys: Vec<&String> = sglang.as_object().unwrap().keys().collect();
    // SGLang passes the file's keys to init_by_mapping as keyword arguments.
    assert_eq!(keys, ["physical_to_logical_map"]);
    assert_eq!(
        sglang["physical_to_logical_map"].as_array().unwrap().len(),
        3
    );
}

#[test]
fn bad_plans_and_shapes_are_refused_naming_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let trace = trace(dir.path());
    let out = dir.path().join("p.json");
    let plan = |extra: &[&str]| {
        let mut args = vec!["plan", "--trace", s(&trace), "--out", s(&out)];
        args.extend_from_slice(extra);
        err(&args)
    };
    let e = plan(&["--devices", "16"]);
    assert!(e.contains("16 devices but only 8 experts"), "{e}");
    let e = plan(&["--devices", "4", "--capacity", "1"]);
    assert!(
        e.contains("1 experts per device x 4 devices = 4 slots cannot hold the 8 experts"),
        "{e}"
    );
    let e = plan(&["--devices", "4", "--redundant", "1"]);
    assert!(
        e.contains("9 physical experts do not split evenly over 4"),
        "{e}"
    );
    let e = plan(&["--devices", "4", "--load-cap", "2"]);
    assert!(e.contains("--load-cap must be between 0"), "{e}");
    assert!(!out.exists(), "nothing written on refusal");

    ok(&[
        "plan",
        "--trace",
        s(&trace),
        "--devices",
        "2",
        "--time-limit",
        "2",
        "--out",
        s(&out),
    ]);
    let e = err(&[
        "simulate",
        "--trace",
        s(&trace),
        "--plan",
        s(&out),
        "--devices",
        "4",
    ]);
    assert!(
        e.contains("the plan is for 8 experts on 2 devices, the replay has 8 experts on 4"),
        "{e}"
    );
}
