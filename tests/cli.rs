//! The command line as a user drives it, checked against the golden fixtures.

mod common;

use std::process::Command;

use common::{ALL_FIXTURES, fixture, golden, golden_logits};

fn run_ok(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    (stdout, stderr)
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn run_json_reproduces_greedy_continuation_until_eos() {
    for name in ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"] {
        let dir = fixture(name);
        let cfg = switchyard::config::load_model_config(&dir).unwrap();
        let p = &golden(name).prompts[1];
        let (stdout, _) = run_ok(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &ids_arg(&p.input_ids),
            "--max-tokens",
            "32",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let ids: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
        // Generation stops after the first EOS id, if the continuation has one.
        let stop = p
            .greedy
            .iter()
            .position(|t| cfg.eos_token_ids.contains(t))
            .map_or(p.greedy.len(), |i| i + 1);
        assert_eq!(ids, p.greedy[..stop], "{name}");
        assert!(v["text"].is_string());
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let dir = fixture("qwen3_moe");
    let sample = |seed: &str| {
        let (stdout, _) = run_ok(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            "5,6,7",
            "--max-tokens",
            "24",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ]);
        stdout
    };
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"));
}

#[test]
fn run_streams_text_and_reports_speed_on_stderr() {
    let (stdout, stderr) = run_ok(&[
        "run",
        "--model",
        fixture("qwen2_moe").to_str().unwrap(),
        "--prompt",
        "A mixture of experts",
        "--max-tokens",
        "8",
    ]);
    assert!(!stdout.trim().is_empty());
    let summary = stderr.lines().last().unwrap();
    for field in [
        "prompt tokens:",
        "generated tokens:",
        "prefill:",
        "decode:",
        "tokens/s",
    ] {
        assert!(summary.contains(field), "{summary}");
    }
}

#[test]
fn logits_npy_matches_golden_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("l.npy");
    let p = &golden("qwen2_moe").prompts[0];
    run_ok(&[
        "logits",
        "--model",
        fixture("qwen2_moe").to_str().unwrap(),
        "--prompt-ids",
        &ids_arg(&p.input_ids),
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = candle_core::Tensor::read_npy(&out).unwrap();
    assert_eq!(t.dims(), &[p.input_ids.len(), 384]);
    let ours = t.to_vec2::<f32>().unwrap();
    let theirs = golden_logits("qwen2_moe", 0);
    for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
        assert!((a - b).abs() < 1e-4);
    }
    // A standard .npy: magic, version 1.0, little-endian f32, C order.
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header = String::from_utf8_lossy(&bytes[10..80]);
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
}

#[test]
fn info_json_agrees_with_torch_parameter_counts() {
    for name in ALL_FIXTURES {
        let (stdout, _) = run_ok(&["info", "--model", fixture(name).to_str().unwrap(), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let g = golden(name);
        assert_eq!(v["total_parameters"], g.num_parameters, "{name}");
        assert_eq!(
            v["active_parameters_per_token"], g.num_active_parameters,
            "{name}"
        );
        assert_eq!(v["architecture"], g.model_type);
        // Every value of every tensor transformers wrote (tied embeddings once,
        // DeepSeek-V3's `e_score_correction_bias` buffers too, which torch
        // does not count as parameters).
        let text = std::fs::read_to_string(fixture(name).join("golden.json")).unwrap();
        let tensors: serde_json::Value = serde_json::from_str(&text).unwrap();
        let written: u64 = tensors["tensors"]
            .as_object()
            .unwrap()
            .values()
            .map(|shape| {
                shape
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .product::<u64>()
            })
            .sum();
        assert_eq!(v["stored_parameters"], written, "{name}");
    }
}

/// MLA caches the normed latent and the shared rotary key per token and layer;
/// full attention of the same shape would cache every head's key and value.
#[test]
fn info_prints_latent_kv_cache_bytes_beside_full_attention() {
    let dir = fixture("deepseek_v3");
    let (stdout, _) = run_ok(&["info", "--model", dir.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // config.json: 3 layers, kv_lora_rank 32, qk_rope_head_dim 8, 4 heads of
    // qk_nope 16 + rope 8 keys and 12-wide values; the cache holds f32.
    assert_eq!(v["kv_cache_bytes_per_token"], 3 * (32 + 8) * 4);
    assert_eq!(
        v["kv_cache_bytes_per_token_full_attention"],
        3 * 4 * ((16 + 8) + 12) * 4
    );
    let (text, _) = run_ok(&["info", "--model", dir.to_str().unwrap()]);
    assert!(
        text.contains("480 B per token (latent 32 + rotary key 8 per layer)")
            && text.contains("full multi-head attention: 1.69 KiB (1728 bytes)")
            && text.contains("multi-head latent, q_lora_rank 24, kv_lora_rank 32"),
        "{text}"
    );
    // Grouped-query attention: the two numbers agree (qwen2_moe: 2 layers,
    // 2 KV heads of 16, keys and values).
    let (stdout, _) = run_ok(&[
        "info",
        "--model",
        fixture("qwen2_moe").to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["kv_cache_bytes_per_token"], 2 * 2 * 2 * 16 * 4);
    assert_eq!(
        v["kv_cache_bytes_per_token_full_attention"],
        v["kv_cache_bytes_per_token"]
    );
}

/// gpt-oss: only the full-attention layer's cache grows with the sequence; the
/// sliding one (window 4) is bounded, and `info` says so.
#[test]
fn info_states_the_sliding_layers_kv_bound() {
    let dir = fixture("gpt_oss");
    let (stdout, _) = run_ok(&["info", "--model", dir.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // 2 KV heads of 16, keys and values, f32; one layer of each kind.
    let row = 2 * 2 * 16 * 4;
    assert_eq!(v["kv_cache_bytes_per_token"], row);
    assert_eq!(v["sliding_window_layers"], 1);
    assert_eq!(v["sliding_window"], 4);
    assert_eq!(v["kv_cache_bytes_sliding_layers_bound"], 2 * 4 * row);
    let (text, _) = run_ok(&["info", "--model", dir.to_str().unwrap()]);
    assert!(
        text.contains("256 B per token in full-attention layers (1); sliding-window layers (1, window 4) keep at most twice their window while decoding: 2.00 KiB (2048 bytes) whatever the length"),
        "{text}"
    );
}

#[test]
fn chat_prompt_renders_like_transformers() {
    let dir = fixture("qwen3_moe");
    let engine = switchyard::Engine::load(&dir, &Default::default()).unwrap();
    let text = std::fs::read_to_string(dir.join("golden.json")).unwrap();
    let g: serde_json::Value = serde_json::from_str(&text).unwrap();
    let messages: Vec<switchyard::generate::ChatMessage> =
        serde_json::from_value(g["chat_example"]["messages"].clone()).unwrap();
    let rendered = engine
        .chat_template()
        .unwrap()
        .render(&messages, true)
        .unwrap();
    assert_eq!(rendered, g["chat_example"]["text"].as_str().unwrap());
    let ids: Vec<u32> = serde_json::from_value(g["chat_example"]["input_ids"].clone()).unwrap();
    assert_eq!(engine.encode_chat(&messages).unwrap(), ids);
    let example: Vec<u32> = serde_json::from_value(g["tokenizer_example"]["ids"].clone()).unwrap();
    let plain = g["tokenizer_example"]["text"].as_str().unwrap();
    assert_eq!(engine.encode_prompt(plain, false).unwrap(), example);
}

#[test]
fn eos_ids_come_from_config_and_generation_config() {
    // qwen3_moe's generation_config.json lists eos_token_id as [2, 0].
    let cfg = switchyard::config::load_model_config(&fixture("qwen3_moe")).unwrap();
    assert!(cfg.eos_token_ids.contains(&2) && cfg.eos_token_ids.contains(&0));
}

#[test]
fn bench_prints_prefill_decode_and_bandwidth_columns() {
    let dir = fixture("qwen3_moe");
    let (stdout, _) = run_ok(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--quant",
        "q8_0",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--repeat",
        "1",
        "--threads",
        "2",
    ]);
    let header = stdout
        .lines()
        .find(|l| l.starts_with("| engine"))
        .expect("table header");
    assert!(
        header.contains("pp8 tok/s") && header.contains("tg4 tok/s") && header.contains("depth 8"),
        "{header}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| switchyard | q8_0 |"))
        .expect("our row");
    let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
    assert_eq!(cells.len(), 9, "{row}");
    // pp, tg, tg at depth, active MB per token, GB/s, share, peak RSS: all measured.
    for cell in [cells[2], cells[3], cells[4], cells[5], cells[6], cells[8]] {
        let v: f64 = cell.parse().unwrap_or_else(|_| panic!("{cell:?} in {row}"));
        assert!(v > 0.0, "{row}");
    }
    assert!(cells[7].ends_with('%'), "{row}");
}

#[test]
fn bench_profile_breaks_a_decode_step_into_phases_and_layers() {
    let dir = fixture("qwen3_moe");
    let layers = switchyard::config::load_model_config(&dir)
        .unwrap()
        .num_layers;
    let (stdout, _) = run_ok(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--quant",
        "q4_0",
        "--prompt-tokens",
        "4",
        "--gen-tokens",
        "3",
        "--repeat",
        "1",
        "--threads",
        "2",
        "--profile",
    ]);
    assert!(stdout.contains("decode step profile: 3 steps"), "{stdout}");
    let phase_us = |name: &str| -> f64 {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no {name:?} row in {stdout}"));
        row.split('|').nth(2).unwrap().trim().parse().unwrap()
    };
    for name in [
        "norms",
        "attention q/k/v/o projections",
        "router",
        "routed experts (wall)",
        "lm_head",
        "sampling",
    ] {
        assert!(phase_us(name) > 0.0, "{name}: {stdout}");
    }
    // One row per layer, each with time in attention and experts.
    let layer_rows: Vec<Vec<f64>> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && l[2..].starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(layer_rows.len(), layers, "{stdout}");
    for (l, row) in layer_rows.iter().enumerate() {
        assert_eq!(row[0], l as f64);
        assert!(row[2] > 0.0 && row[5] > 0.0, "layer {l}: {row:?}");
        // MoE layers (with a router) have expert matmuls; dense ones have neither.
        assert_eq!(row[4] > 0.0, row[6] > 0.0, "layer {l}: {row:?}");
        // The layer's total covers its parts.
        assert!(
            row[7] + 0.3 >= row[1] + row[2] + row[3] + row[4] + row[5],
            "{row:?}"
        );
    }
}

#[test]
fn bench_refuses_an_empty_prompt() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["bench", "--model", fixture("qwen3_moe").to_str().unwrap()])
        .args(["--prompt-tokens", "0", "--repeat", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--prompt-tokens"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// GLM-4 MoE turns only the first half of each head (`partial_rotary_factor`
/// 0.5) and has one shared expert of the expert width.
#[test]
fn info_states_partial_rotary_and_the_shared_expert_width() {
    let dir = fixture("glm4_moe");
    let (stdout, _) = run_ok(&["info", "--model", dir.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (v["head_dim"].as_u64(), v["rotary_dim"].as_u64()),
        (Some(16), Some(8))
    );
    assert_eq!(v["shared_expert_ffn"], 32);
    let (text, _) = run_ok(&["info", "--model", dir.to_str().unwrap()]);
    assert!(
        text.contains("4 query / 2 KV heads of 16, rotary on the first 8")
            && text.contains("width 32, shared expert width 32"),
        "{text}"
    );
    let (text, _) = run_ok(&["info", "--model", fixture("mixtral").to_str().unwrap()]);
    assert!(
        text.contains("no shared expert") && !text.contains("rotary on"),
        "{text}"
    );
}
