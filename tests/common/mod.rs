//! Helpers shared by the integration tests: fixture paths and golden records.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub fn fixture(name: &str) -> PathBuf {
    let committed = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    if name == FUSED {
        return fused_fixture(&committed);
    }
    committed
}

/// `qwen3_moe` in transformers' fused-experts layout. Its weights are qwen3_moe's
/// (the fixture script checks that byte for byte), so only its config and golden
/// records are committed and the safetensors file is rebuilt here, with exactly the
/// tensor names and shapes transformers wrote (recorded in its golden.json).
const FUSED: &str = "qwen3_moe_fused";

fn fused_fixture(committed: &Path) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(FUSED);
    if dir.join("model.safetensors").exists() {
        return dir;
    }
    // Built in a private directory and renamed into place, so concurrent test
    // binaries never see half a fixture.
    let staging = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for entry in std::fs::read_dir(committed).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, staging.path().join(path.file_name().unwrap())).unwrap();
    }
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(committed.join("golden.json")).unwrap()).unwrap();
    let src_bytes = std::fs::read(
        committed
            .with_file_name("qwen3_moe")
            .join("model.safetensors"),
    )
    .unwrap();
    let src = safetensors::SafeTensors::deserialize(&src_bytes).unwrap();
    let get = |name: &str| src.tensor(name).unwrap().data().to_vec();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape) in golden["tensors"].as_object().unwrap() {
        let shape: Vec<usize> = serde_json::from_value(shape.clone()).unwrap();
        let data = if let Some(prefix) = name.strip_suffix("gate_up_proj") {
            (0..shape[0])
                .flat_map(|e| {
                    [
                        get(&format!("{prefix}{e}.gate_proj.weight")),
                        get(&format!("{prefix}{e}.up_proj.weight")),
                    ]
                })
                .flatten()
                .collect()
        } else if let Some(prefix) = name
            .strip_suffix("down_proj")
            .filter(|p| p.ends_with("experts."))
        {
            (0..shape[0])
                .flat_map(|e| get(&format!("{prefix}{e}.down_proj.weight")))
                .collect()
        } else {
            get(name)
        };
        assert_eq!(data.len(), shape.iter().product::<usize>() * 4, "{name}");
        tensors.push((name.clone(), shape, data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &staging.path().join("model.safetensors")).unwrap();
    let staged = staging.keep();
    if std::fs::rename(&staged, &dir).is_err() {
        // Another test binary won the race; its copy is identical.
        let _ = std::fs::remove_dir_all(&staged);
    }
    dir
}

#[derive(Debug, Deserialize)]
pub struct GoldenPrompt {
    pub input_ids: Vec<u32>,
    /// `[layer][token][k]`, `None` for dense layers.
    pub router_topk: Vec<Option<Vec<Vec<u32>>>>,
    pub router_weights: Vec<Option<Vec<Vec<f32>>>>,
    pub greedy: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct Golden {
    pub model_type: String,
    pub num_parameters: usize,
    pub num_active_parameters: usize,
    pub prompts: Vec<GoldenPrompt>,
}

pub fn golden(name: &str) -> Golden {
    let path = fixture(name).join("golden.json");
    let text = std::fs::read_to_string(&path).expect("golden.json readable");
    serde_json::from_str(&text).expect("golden.json parses")
}

/// `prompt{i}.logits` as `[seq][vocab]`.
pub fn golden_logits(name: &str, prompt: usize) -> Vec<Vec<f32>> {
    let path = fixture(name).join("golden.safetensors");
    let files =
        switchyard::weights::SafetensorsFiles::open_files(&[path]).expect("golden.safetensors");
    let tname = format!("prompt{prompt}.logits");
    let shape = files.meta(&tname).expect("logits tensor").shape.clone();
    files
        .load(&tname, &shape, candle_core::DType::F32)
        .and_then(|t| Ok(t.to_vec2::<f32>()?))
        .expect("logits load")
}

pub const ALL_FIXTURES: [&str; 14] = [
    "qwen3_moe",
    "qwen3_moe_fused",
    "qwen3_moe_bf16_sharded",
    "mixtral",
    "qwen2_moe",
    "olmoe",
    "deepseek_v2_lite",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "gpt_oss_bf16",
    "flex_olmo",
    "ernie4_5_moe",
];

/// exp(mean negative log-likelihood of `ids[1..]`) under `logits` `[seq][vocab]`.
pub fn perplexity(logits: &[Vec<f32>], ids: &[u32]) -> f64 {
    let nll: f64 = (1..ids.len())
        .map(|i| {
            let row = &logits[i - 1];
            let max = row.iter().fold(f32::MIN, |m, &x| m.max(x));
            let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
            f64::from(max) + sum.ln() - f64::from(row[ids[i] as usize])
        })
        .sum();
    (nll / (ids.len() - 1) as f64).exp()
}

/// Each golden prompt followed by its greedy continuation (text the model finds likely).
pub fn texts(name: &str) -> Vec<Vec<u32>> {
    golden(name)
        .prompts
        .iter()
        .map(|p| p.input_ids.iter().chain(&p.greedy).copied().collect())
        .collect()
}
