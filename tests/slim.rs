//! Slimming: pruned checkpoints, dynamic expert top-p, perplexity, and the
//! routing flags every model-running command shares.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::fixture;
use switchyard::eval::{PerplexityOptions, perplexity};
use switchyard::model::moe::{ExpertTopP, TopPMode};
use switchyard::model::{LoadOptions, Model, NoObserver};
use switchyard::slim::{PrunePlan, write_pruned};
use switchyard::trace::{ActiveExperts, read_trace};

fn load(dir: &Path, expert_top_p: Option<ExpertTopP>) -> Model {
    let opts = LoadOptions {
        expert_top_p,
        ..LoadOptions::default()
    };
    Model::load(dir, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn logits(model: &Model, ids: &[u32], observer: &mut ActiveExperts) -> Vec<f32> {
    let t = model.score(ids, observer).unwrap();
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

/// Removes, in every MoE layer, experts the prompt's routing never used (the
/// same number per layer, keeping at least top_k), writes the pruned
/// checkpoint, and checks it gives the original's logits on that prompt.
fn pruned_logits_match(name: &str, prompt: &[u32]) {
    let src = fixture(name);
    let original = load(&src, None);
    let cfg = original.config().clone();
    let (n, k) = (cfg.moe.num_experts, cfg.moe.top_k);
    let mut used = ActiveExperts::default();
    let want = logits(&original, prompt, &mut used);
    let unused: BTreeMap<usize, Vec<u32>> = (used.layers().iter())
        .map(|(&l, picks)| {
            let mut picks = picks.picks.clone();
            picks.resize(n, 0);
            (
                l,
                (0..n as u32).filter(|&e| picks[e as usize] == 0).collect(),
            )
        })
        .collect();
    let remove = unused.values().map(Vec::len).min().unwrap().min(n - k);
    assert!(
        remove >= 1,
        "{name}: the prompt used every expert somewhere"
    );
    let kept: BTreeMap<usize, Vec<u32>> = (unused.iter())
        .map(|(&l, gone)| {
            let gone = &gone[..remove];
            (l, (0..n as u32).filter(|e| !gone.contains(e)).collect())
        })
        .collect();
    let plan = PrunePlan::new(n, kept.clone()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    let summary = write_pruned(&src, &plan, &out, false, serde_json::json!({})).unwrap();
    assert_eq!(summary.experts_after, n - remove);
    assert!(summary.bytes_after < summary.bytes_before);
    assert!(summary.copied.contains(&"tokenizer.json".to_string()));
    assert!(out.join("tokenizer.json").exists() && out.join("pruning.json").exists());

    let pruned = load(&out, None);
    assert_eq!(pruned.config().moe.num_experts, n - remove);
    assert_eq!(pruned.config().moe.top_k, k);
    let mut pruned_used = ActiveExperts::default();
    let got = logits(&pruned, prompt, &mut pruned_used);
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-5, "{name}: pruned logits differ by {diff}");
    // The same experts routed, under their new numbers.
    for (l, picks) in pruned_used.layers() {
        let original_picks = &used.layers()[l].picks;
        for (new, &count) in picks.picks.iter().enumerate() {
            let old = kept[l][new] as usize;
            assert_eq!(
                count,
                original_picks.get(old).copied().unwrap_or(0),
                "layer {l}"
            );
        }
    }
}

#[test]
fn pruned_qwen3_moe_logits_equal_the_original_where_routing_avoided_removed_experts() {
    pruned_logits_match("qwen3_moe", &[3, 17, 250]);
}

#[test]
fn pruned_fused_qwen3_moe_logits_equal_the_original() {
    pruned_logits_match("qwen3_moe_fused", &[3, 17, 250]);
}

#[test]
fn pruned_mixtral_logits_equal_the_original_where_routing_avoided_removed_experts() {
    pruned_logits_match("mixtral", &[42, 7]);
}

#[test]
fn pruned_config_keeps_the_family_field_and_lowers_top_k() {
    let src = fixture("mixtral");
    let kept: BTreeMap<usize, Vec<u32>> = [(0, vec![2]), (1, vec![0])].into();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("one");
    let summary = write_pruned(
        &src,
        &PrunePlan::new(4, kept).unwrap(),
        &out,
        false,
        serde_json::json!({"by": "test"}),
    )
    .unwrap();
    assert_eq!((summary.top_k_before, summary.top_k_after), (2, 1));
    let cfg = config_json(&out);
    assert_eq!(cfg["num_local_experts"], 1);
    assert_eq!(cfg["num_experts_per_tok"], 1);
    assert!(
        cfg.get("num_experts").is_none(),
        "no field of another family added"
    );
    let model = load(&out, None);
    let l = logits(&model, &[5, 6], &mut ActiveExperts::default());
    assert!(l.iter().all(|x| x.is_finite()));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("pruning.json")).unwrap()).unwrap();
    assert_eq!(record["removed"]["0"], serde_json::json!([0, 1, 3]));
    assert_eq!(record["how"]["by"], "test");
}

#[test]
fn prune_plans_that_cannot_be_written_are_refused() {
    let src = fixture("qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    // Unequal counts per layer.
    let err = PrunePlan::new(8, [(0, vec![0, 1]), (2, vec![3])].into()).unwrap_err();
    assert!(err.to_string().contains("same number"), "{err}");
    assert!(PrunePlan::new(8, [(0, vec![9])].into()).is_err());
    // Layers that are not the model's MoE layers (layer 1 is dense).
    let plan = PrunePlan::new(8, [(0, vec![0]), (1, vec![0])].into()).unwrap();
    let err = write_pruned(
        &src,
        &plan,
        &tmp.path().join("x"),
        false,
        serde_json::json!({}),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("[0, 2]"), "{err}");
    // An existing --out without --force, and nothing written beside it.
    let plan = PrunePlan::new(8, [(0, vec![0, 1]), (2, vec![0, 1])].into()).unwrap();
    let out = tmp.path().join("exists");
    std::fs::create_dir(&out).unwrap();
    let err = write_pruned(&src, &plan, &out, false, serde_json::json!({}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--force"), "{err}");
    write_pruned(&src, &plan, &out, true, serde_json::json!({})).unwrap();
    assert_eq!(config_json(&out)["num_local_experts"], 2);
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temp or old directories left: {leftovers:?}"
    );
    // GGUF in.
    let gguf = fixture("gguf").join("qwen3_moe-f16.gguf");
    let err = write_pruned(
        &gguf,
        &plan,
        &tmp.path().join("g"),
        false,
        serde_json::json!({}),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("GGUF"), "{err}");
}

#[test]
fn expert_top_p_one_gives_plain_top_k_logits() {
    let dir = fixture("qwen3_moe");
    let prompt = [1, 2, 3, 40, 41, 42, 100, 200];
    let plain = logits(&load(&dir, None), &prompt, &mut ActiveExperts::default());
    for mode in [TopPMode::TopK, TopPMode::Dynamoe] {
        let one = ExpertTopP::new(1.0, mode).unwrap();
        let mut active = ActiveExperts::default();
        let got = logits(&load(&dir, Some(one)), &prompt, &mut active);
        if mode == TopPMode::TopK {
            assert_eq!(got, plain, "bit-identical to plain top-k");
            assert_eq!(active.mean_active_per_token(), 2.0);
        } else {
            // DynaMoE at p = 1 uses every expert: a different model.
            assert_eq!(active.mean_active_per_token(), 8.0);
        }
    }
    let half = ExpertTopP::new(0.5, TopPMode::TopK).unwrap();
    let mut active = ActiveExperts::default();
    let got = logits(&load(&dir, Some(half)), &prompt, &mut active);
    let mean = active.mean_active_per_token();
    assert!((1.0..2.0).contains(&mean), "{mean}");
    assert!(max_abs_diff(&got, &plain) > 0.0);
}

#[test]
fn perplexity_of_one_window_is_the_exp_of_mean_token_nll() {
    let dir = fixture("qwen3_moe");
    let model = load(&dir, None);
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 384) as u32).collect();
    let opts = PerplexityOptions {
        context: 64,
        stride: 32,
        windows_per_forward: 4,
    };
    let report = perplexity(&model, &ids, opts, &mut NoObserver).unwrap();
    assert_eq!((report.windows, report.scored_tokens), (1, 39));
    let l = model.score(&ids, &mut NoObserver).unwrap();
    let rows: Vec<Vec<f32>> = l.to_vec2::<f32>().unwrap();
    let want = common::perplexity(&rows, &ids);
    assert!(
        (report.perplexity() - want).abs() < 1e-6 * want,
        "{} vs {want}",
        report.perplexity()
    );
    // Sliding windows see less context, but score the same tokens once each.
    let opts = PerplexityOptions {
        context: 16,
        stride: 8,
        windows_per_forward: 3,
    };
    let sliding = perplexity(&model, &ids, opts, &mut NoObserver).unwrap();
    assert_eq!(sliding.scored_tokens, 39);
    assert_eq!(sliding.windows, 4);
    assert!(sliding.perplexity().is_finite() && sliding.perplexity() > 1.0);
    // A window longer than the model's context is refused.
    let opts = PerplexityOptions {
        context: 65,
        stride: 32,
        windows_per_forward: 1,
    };
    let err = perplexity(&model, &ids, opts, &mut NoObserver).unwrap_err();
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
}

fn switchyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn ok(args: &[&str]) -> (String, String) {
    let out = switchyard(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

fn fails_with(args: &[&str], needle: &str) {
    let out = switchyard(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn prune_cli_writes_a_loadable_checkpoint_and_refuses_bad_input() {
    let model = fixture("qwen3_moe");
    let model = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("calibration.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let text = text.to_str().unwrap();
    let out = tmp.path().join("half");
    let out = out.to_str().unwrap();
    for by in ["frequency", "reap"] {
        let args = [
            "prune",
            "--model",
            model,
            "--calibration",
            text,
            "--keep",
            "0.5",
            "--by",
            by,
            "--out",
            out,
            "--force",
        ];
        let (stdout, _) = ok(&args);
        assert!(stdout.contains("8 -> 4 experts"), "{stdout}");
        assert_eq!(config_json(Path::new(out))["num_local_experts"], 4);
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(Path::new(out).join("pruning.json")).unwrap())
                .unwrap();
        assert_eq!(record["how"]["by"], by);
        load(Path::new(out), None);
    }
    let base = ["prune", "--model", model, "--calibration", text];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    fails_with(&with(&["--keep", "0", "--out", "/nonexistent/x"]), "(0, 1]");
    fails_with(
        &with(&["--keep", "1.5", "--out", "/nonexistent/x"]),
        "(0, 1]",
    );
    fails_with(
        &with(&["--keep-per-layer", "9", "--out", "/nonexistent/x"]),
        "8 experts",
    );
    fails_with(&with(&["--keep", "0.5"]), "--out");
    fails_with(&with(&["--out", "/nonexistent/x"]), "--keep");
    let mut exists = with(&["--keep", "0.5", "--out"]);
    exists.push(out);
    fails_with(&exists, "--force");
    let gguf = fixture("gguf").join("qwen3_moe-f16.gguf");
    let args = [
        "prune",
        "--model",
        gguf.to_str().unwrap(),
        "--calibration",
        text,
        "--keep",
        "0.5",
        "--out",
        "/nonexistent/x",
    ];
    fails_with(&args, "GGUF");
}

#[test]
fn run_and_logits_write_traces_and_count_active_experts() {
    let model = fixture("qwen3_moe");
    let model = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("run.parquet");
    let trace_s = trace.to_str().unwrap();
    let (_, stderr) = ok(&[
        "run",
        "--model",
        model,
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "4",
        "--trace",
        trace_s,
    ]);
    assert!(stderr.contains("experts/token: 2.00 (top_k 2)"), "{stderr}");
    let t = read_trace(&trace).unwrap();
    // 3 prompt tokens and 3 decoded ones fed back, 2 MoE layers, 2 experts each.
    assert_eq!(t.rows.len(), 6 * 2 * 2);
    let npy = tmp.path().join("l.npy");
    let (_, stderr) = ok(&[
        "logits",
        "--model",
        model,
        "--prompt-ids",
        "1,2,3,4,5",
        "--out",
        npy.to_str().unwrap(),
        "--trace",
        trace_s,
        "--expert-top-p",
        "0.5",
    ]);
    let t = read_trace(&trace).unwrap();
    assert!(
        t.rows.len() < 5 * 2 * 2 && t.rows.len() >= 5 * 2,
        "{}",
        t.rows.len()
    );
    assert!(stderr.contains("experts/token: 1."), "{stderr}");
    // The analysis reads it back.
    ok(&[
        "analyze",
        trace_s,
        "--json",
        "--out",
        tmp.path().join("a").to_str().unwrap(),
    ]);
    fails_with(
        &[
            "logits",
            "--model",
            model,
            "--prompt-ids",
            "1",
            "--out",
            npy.to_str().unwrap(),
            "--expert-top-p",
            "1.5",
        ],
        "(0, 1]",
    );
    fails_with(
        &[
            "logits",
            "--model",
            model,
            "--prompt-ids",
            "1",
            "--out",
            npy.to_str().unwrap(),
            "--expert-top-p-mode",
            "dynamoe",
        ],
        "--expert-top-p",
    );
}

#[test]
fn perplexity_cli_reports_json_and_top_p_one_changes_nothing() {
    let model = fixture("qwen3_moe");
    let model = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(
        &text,
        "Once upon a time there was a small model. ".repeat(30),
    )
    .unwrap();
    let text = text.to_str().unwrap();
    let base = [
        "perplexity",
        "--model",
        model,
        "--text",
        text,
        "--context",
        "32",
        "--stride",
        "16",
        "--max-tokens",
        "100",
        "--json",
    ];
    let parse = |s: &str| -> serde_json::Value { serde_json::from_str(s.trim()).unwrap() };
    let plain = parse(&ok(&base).0);
    assert_eq!(plain["scored_tokens"], 99);
    let ppl = plain["perplexity"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 384.0 * 4.0, "{ppl}");
    assert_eq!(plain["experts_per_token"], 2.0);
    let mut one: Vec<&str> = base.to_vec();
    one.extend(["--expert-top-p", "1"]);
    assert_eq!(parse(&ok(&one).0)["perplexity"], plain["perplexity"]);
    let mut low: Vec<&str> = base.to_vec();
    let trace = tmp.path().join("p.parquet");
    low.extend(["--expert-top-p", "0.6", "--trace", trace.to_str().unwrap()]);
    let low = parse(&ok(&low).0);
    assert!(low["experts_per_token"].as_f64().unwrap() < 2.0);
    assert!(
        low["expert_bytes_per_token"].as_f64().unwrap()
            < plain["expert_bytes_per_token"].as_f64().unwrap()
    );
    assert!(!read_trace(&trace).unwrap().rows.is_empty());
    let bad = [
        "perplexity",
        "--model",
        model,
        "--text",
        text,
        "--context",
        "32",
        "--stride",
        "64",
    ];
    fails_with(&bad, "--stride 64");
}
