//! Helpers shared by the integration tests: fixture paths and golden records.
#![allow(dead_code)]

use std::path::PathBuf;

use serde::Deserialize;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
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

pub const ALL_FIXTURES: [&str; 6] = [
    "qwen3_moe",
    "qwen3_moe_fused",
    "qwen3_moe_bf16_sharded",
    "mixtral",
    "qwen2_moe",
    "olmoe",
];
