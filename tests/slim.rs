//! Slimming: pruned checkpoints, dynamic expert top-p, perplexity, and the
//! routing flags every model-running command shares.

mod common;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture;
use switchyard::eval::{PerplexityOptions, perplexity};
use switchyard::model::moe::{ExpertTopP, TopPMode};
use switchyard::model::{LoadOptions, Model, NoObserver};
use switchyard::slim::{PRUNING_KEY, PrunePlan, sidecar_path, write_pruned};
use switchyard::trace::{ActiveExperts, read_trace};
use switchyard::weights::{GgufFile, GgufTensorOut, GgufValue};

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
/// checkpoint (a directory, or `pruned.gguf` for a GGUF source), checks it
/// gives the original's logits on that prompt, and returns the plan and the
/// temporary directory holding the output.
fn pruned_logits_match(src: &Path, prompt: &[u32]) -> (PrunePlan, tempfile::TempDir, PathBuf) {
    let name = src.display();
    let original = load(src, None);
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
    let gguf = GgufFile::is_gguf(src);
    let out = tmp.path().join(if gguf { "pruned.gguf" } else { "pruned" });
    let summary = write_pruned(src, &plan, &out, false, serde_json::json!({})).unwrap();
    assert_eq!(summary.experts_after, n - remove);
    assert!(summary.bytes_after < summary.bytes_before);
    if gguf {
        assert!(out.is_file() && sidecar_path(&out).is_file());
    } else {
        assert!(summary.copied.contains(&"tokenizer.json".to_string()));
        assert!(out.join("tokenizer.json").exists() && out.join("pruning.json").exists());
    }

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
    (plan, tmp, out)
}

#[test]
fn pruned_qwen3_moe_logits_equal_the_original_where_routing_avoided_removed_experts() {
    pruned_logits_match(&fixture("qwen3_moe"), &[3, 17, 250]);
}

#[test]
fn pruned_fused_qwen3_moe_logits_equal_the_original() {
    pruned_logits_match(&fixture("qwen3_moe_fused"), &[3, 17, 250]);
}

#[test]
fn pruned_mixtral_logits_equal_the_original_where_routing_avoided_removed_experts() {
    pruned_logits_match(&fixture("mixtral"), &[42, 7]);
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
    // GGUF in: a file out, and the same plan checks before anything is written.
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
    assert!(err.contains(".gguf"), "{err}");
    let bad_layers = PrunePlan::new(8, [(0, vec![0]), (1, vec![0])].into()).unwrap();
    let err = write_pruned(
        &gguf,
        &bad_layers,
        &tmp.path().join("g.gguf"),
        false,
        serde_json::json!({}),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("[0, 2]"), "{err}");
    // And a safetensors checkpoint is not written as a GGUF file.
    let err = write_pruned(
        &src,
        &plan,
        &tmp.path().join("s.gguf"),
        false,
        serde_json::json!({}),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("Hugging Face directory"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "files left: {leftovers:?}");
}

/// The merged expert tensors, the router and its selection bias of a MoE
/// layer: what pruning cuts.
fn expert_indexed(name: &str) -> bool {
    [
        "ffn_gate_exps",
        "ffn_up_exps",
        "ffn_down_exps",
        "ffn_gate_inp",
    ]
    .iter()
    .any(|base| name.ends_with(&format!(".{base}.weight")))
        || name.ends_with(".exp_probs_b.bias")
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// `out` is `src` pruned by `plan`: every expert-indexed tensor of a MoE layer
/// holds exactly the kept experts' bytes of the original, in order, in the
/// original's encoding; every other tensor and metadata entry is the original's;
/// the expert count is the kept count and the record names the kept experts.
fn check_gguf_copy(src: &Path, out: &Path, plan: &PrunePlan) {
    let (a, b) = (GgufFile::open(src).unwrap(), GgufFile::open(out).unwrap());
    let n = plan.num_experts();
    let keep = plan.keep_per_layer();
    let mut names: Vec<&str> = a.tensor_names().collect();
    names.sort_unstable();
    let mut names_b: Vec<&str> = b.tensor_names().collect();
    names_b.sort_unstable();
    assert_eq!(names, names_b);
    let mut cut = 0;
    for name in names {
        let (ia, ib) = (a.tensor_info(name).unwrap(), b.tensor_info(name).unwrap());
        assert_eq!(ia.dtype, ib.dtype, "{name}");
        let kept = layer_of(name).and_then(|l| plan.kept(l));
        match kept.filter(|_| expert_indexed(name)) {
            Some(kept) => {
                assert_eq!(ia.shape[0], n, "{name}");
                assert_eq!(ib.shape[0], keep, "{name}");
                assert_eq!(ia.shape[1..], ib.shape[1..], "{name}");
                let want: Vec<u8> = kept
                    .iter()
                    .flat_map(|&e| a.part_bytes(name, e as usize, n).unwrap().into_owned())
                    .collect();
                assert!(
                    *b.bytes(name).unwrap() == want[..],
                    "{name}: kept experts' bytes differ"
                );
                cut += 1;
            }
            None => {
                assert_eq!(ia.shape, ib.shape, "{name}");
                assert!(
                    a.bytes(name).unwrap() == b.bytes(name).unwrap(),
                    "{name} changed"
                );
            }
        }
    }
    let moe_layers: Vec<usize> = (0..64).filter(|&l| plan.kept(l).is_some()).collect();
    let biases = (moe_layers.iter())
        .filter(|l| a.contains(&format!("blk.{l}.exp_probs_b.bias")))
        .count();
    assert_eq!(
        cut,
        4 * moe_layers.len() + biases,
        "gate, up, down, router (and selection bias) in every MoE layer"
    );
    let arch = a.get("general.architecture").unwrap().as_str().unwrap();
    let (count, used) = (
        format!("{arch}.expert_count"),
        format!("{arch}.expert_used_count"),
    );
    assert_eq!(b.get(&count).unwrap().as_u64(), Some(keep as u64));
    let top_k = a.get(&used).unwrap().as_u64().unwrap();
    assert_eq!(b.get(&used).unwrap().as_u64(), Some(top_k.min(keep as u64)));
    for (key, value) in a.metadata() {
        if *key != count && *key != used {
            assert_eq!(b.get(key), Some(value), "metadata `{key}`");
        }
    }
    let record: serde_json::Value =
        serde_json::from_str(b.get(PRUNING_KEY).unwrap().as_str().unwrap()).unwrap();
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sidecar_path(out)).unwrap()).unwrap();
    assert_eq!(record, sidecar);
    for l in 0..64 {
        if let Some(kept) = plan.kept(l) {
            assert_eq!(record["kept"][l.to_string()], serde_json::json!(kept));
        }
    }
}

#[test]
fn pruned_gguf_logits_equal_the_original_and_tensors_are_the_originals_slices() {
    for (file, prompt) in [
        ("qwen3_moe-f16.gguf", &[3u32, 17, 250][..]),
        ("mixtral-f16.gguf", &[42, 7][..]),
    ] {
        let src = fixture("gguf").join(file);
        let (plan, _tmp, out) = pruned_logits_match(&src, prompt);
        check_gguf_copy(&src, &out, &plan);
    }
}

#[test]
fn pruned_quantized_gguf_keeps_the_kept_experts_blocks_as_stored() {
    // qwen3_moe's GGUF with its routed experts in Q8_0 (34-byte blocks of 32
    // weights): an expert is a run of whole blocks, copied without re-encoding.
    let f16 = fixture("gguf").join("qwen3_moe-f16.gguf");
    let file = GgufFile::open(&f16).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let q8 = tmp.path().join("q8.gguf");
    let tensors: Vec<GgufTensorOut> = file
        .tensor_names_in_file_order()
        .into_iter()
        .map(|name| {
            let info = file.tensor_info(name).unwrap();
            let (dtype, data) = if name.contains("_exps.") {
                let t = file.load(name, candle_core::DType::F32).unwrap();
                let q = candle_core::quantized::QTensor::quantize(
                    &t,
                    candle_core::quantized::GgmlDType::Q8_0,
                )
                .unwrap();
                (q.dtype().into(), Cow::Owned(q.data().unwrap().into_owned()))
            } else {
                (info.dtype, file.bytes(name).unwrap())
            };
            GgufTensorOut {
                name: name.to_string(),
                dtype,
                shape: info.shape.clone(),
                data: vec![data],
            }
        })
        .collect();
    file.write_edited(&q8, &[], &tensors).unwrap();
    let (plan, _out_dir, out) = pruned_logits_match(&q8, &[3, 17, 250]);
    check_gguf_copy(&q8, &out, &plan);
    let pruned = GgufFile::open(&out).unwrap();
    let gate = pruned.tensor_info("blk.0.ffn_gate_exps.weight").unwrap();
    assert_eq!(gate.dtype, candle_core::quantized::GgmlDType::Q8_0.into());
}

/// llama.cpp's `deepseek2` files and `glm4moe` (V3's router): their experts,
/// router and selection bias (`exp_probs_b.bias`, one value per expert) cut to
/// the kept experts, everything else (shared experts, `attn_k_b` / `attn_v_b`)
/// copied, and the result loads and runs. V3 and GLM keep three of each group
/// of four, so their four expert groups stay groups. (Their logits are not the original's: V2's
/// softmax over all experts is not renormalised over the chosen, and V3 ranks
/// groups by experts it may not choose.)
#[test]
fn pruned_deepseek_ggufs_cut_the_selection_bias_with_the_experts() {
    for (file, n) in [
        ("deepseek_v2_lite-f16.gguf", 8),
        ("deepseek_v3-f16.gguf", 16),
        ("glm4_moe-f16.gguf", 16),
    ] {
        let src = fixture("gguf").join(file);
        let kept: Vec<u32> = (0..n).filter(|e| e % 4 != 3).collect();
        let plan = PrunePlan::new(n as usize, [(1, kept.clone()), (2, kept)].into()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pruned.gguf");
        write_pruned(&src, &plan, &out, false, serde_json::json!({})).unwrap();
        check_gguf_copy(&src, &out, &plan);
        let model = load(&out, None);
        assert_eq!(model.config().moe.num_experts, plan.keep_per_layer());
        let l = logits(&model, &[5, 6], &mut ActiveExperts::default());
        assert!(l.iter().all(|x| x.is_finite()), "{file}");
    }
}

#[test]
fn pruned_gguf_lowers_expert_used_count_when_keeping_fewer_than_top_k() {
    let src = fixture("gguf").join("mixtral-f16.gguf");
    let plan = PrunePlan::new(4, [(0, vec![2]), (1, vec![0])].into()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("one.gguf");
    let summary =
        write_pruned(&src, &plan, &out, false, serde_json::json!({"by": "test"})).unwrap();
    assert_eq!((summary.top_k_before, summary.top_k_after), (2, 1));
    check_gguf_copy(&src, &out, &plan);
    let model = load(&out, None);
    assert_eq!(
        (model.config().moe.num_experts, model.config().moe.top_k),
        (1, 1)
    );
    let l = logits(&model, &[5, 6], &mut ActiveExperts::default());
    assert!(l.iter().all(|x| x.is_finite()));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sidecar_path(&out)).unwrap()).unwrap();
    assert_eq!(record["removed"]["0"], serde_json::json!([0, 1, 3]));
    assert_eq!(record["how"]["by"], "test");
    let metadata = GgufFile::open(&out).unwrap();
    assert!(matches!(
        metadata.get("llama.expert_count"),
        Some(GgufValue::U32(1))
    ));
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
    let text = calibration_text(tmp.path());
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
    let fresh = tmp.path().join("fresh");
    let mut nine = with(&["--keep-per-layer", "9", "--out"]);
    nine.push(fresh.to_str().unwrap());
    fails_with(&nine, "8 experts");
    assert!(!fresh.exists());
    // An output directory under a directory that does not exist.
    fails_with(
        &with(&["--keep", "0.5", "--out", "/nonexistent/x"]),
        "/nonexistent does not exist",
    );
    fails_with(&with(&["--keep", "0.5"]), "--out");
    fails_with(&with(&["--out", "/nonexistent/x"]), "--keep");
    let mut exists = with(&["--keep", "0.5", "--out"]);
    exists.push(out);
    fails_with(&exists, "--force");
}

/// A short calibration text in `dir`.
fn calibration_text(dir: &Path) -> PathBuf {
    let path = dir.join("calibration.txt");
    std::fs::write(
        &path,
        "The quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    path
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walk(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn prune_cli_prunes_gguf_to_gguf_and_bad_input_leaves_the_disk_as_it_was() {
    let gguf = fixture("gguf").join("qwen3_moe-f16.gguf");
    let model = gguf.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let text = calibration_text(tmp.path());
    let text = text.to_str().unwrap();
    let out = tmp.path().join("half.gguf");
    let out_s = out.to_str().unwrap();
    for by in ["frequency", "reap"] {
        let (stdout, _) = ok(&[
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
            out_s,
            "--force",
        ]);
        assert!(stdout.contains("8 -> 4 experts"), "{stdout}");
        let pruned = GgufFile::open(&out).unwrap();
        assert_eq!(
            pruned.get("qwen3moe.expert_count").unwrap().as_u64(),
            Some(4)
        );
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sidecar_path(&out)).unwrap()).unwrap();
        assert_eq!(record["how"]["by"], by);
        assert_eq!(record["kept"]["0"].as_array().unwrap().len(), 4);
        load(&out, None);
    }
    let truncated = tmp.path().join("truncated.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let missing = tmp.path().join("missing.gguf");
    let before = snapshot(tmp.path());
    let prune = |model: &Path, extra: &[&str], needle: &str| {
        let mut args = vec![
            "prune",
            "--model",
            model.to_str().unwrap(),
            "--calibration",
            text,
        ];
        args.extend(extra);
        fails_with(&args, needle);
        assert!(snapshot(tmp.path()) == before, "{args:?} changed the disk");
    };
    let fresh = tmp.path().join("new.gguf");
    let fresh = fresh.to_str().unwrap();
    prune(&missing, &["--keep", "0.5", "--out", fresh], "missing.gguf");
    prune(&truncated, &["--keep", "0.5", "--out", fresh], "truncated");
    prune(&gguf, &["--keep", "0", "--out", fresh], "(0, 1]");
    prune(&gguf, &["--keep", "1.5", "--out", fresh], "(0, 1]");
    prune(&gguf, &["--keep", "0.5", "--out", out_s], "--force");
    let dir_out = tmp.path().join("dir");
    prune(
        &gguf,
        &["--keep", "0.5", "--out", dir_out.to_str().unwrap()],
        ".gguf",
    );
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
