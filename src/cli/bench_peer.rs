//! The `--peer candle` engine: candle-transformers' own `qwen3_moe` model, loaded
//! from the same safetensors in the same dtype (weights read through our mmap).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::qwen3_moe::{Config, ModelForCausalLM};
use switchyard::weights::SafetensorsFiles;

use super::bench::Runner;

pub struct CandleQwen3Moe {
    model: ModelForCausalLM,
}

impl CandleQwen3Moe {
    pub fn load(dir: &Path, dtype: DType) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(dir.join("config.json"))
            .with_context(|| format!("reading {}/config.json", dir.display()))?;
        let cfg: Config = serde_json::from_str(&text)
            .context("config.json is not a candle-transformers qwen3_moe Config")?;
        let files = SafetensorsFiles::open_dir(dir)?;
        let mut tensors = std::collections::HashMap::new();
        for name in files.names() {
            let shape = files
                .meta(name)
                .map(|m| m.shape.clone())
                .unwrap_or_default();
            tensors.insert(name.to_string(), files.load(name, &shape, dtype)?);
        }
        let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
        let start = Instant::now();
        let model = ModelForCausalLM::new(&cfg, vb)?;
        eprintln!(
            "candle-transformers model built in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        Ok(Self { model })
    }

    fn next_token(logits: &Tensor) -> anyhow::Result<u32> {
        Ok(logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?)
    }
}

impl Runner for CandleQwen3Moe {
    fn run_once(&mut self, prompt: &[u32], gen_tokens: usize) -> anyhow::Result<(f64, f64)> {
        self.model.clear_kv_cache();
        let start = Instant::now();
        let input = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
        let mut logits = self.model.forward(&input, 0)?;
        let prefill = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for i in 0..gen_tokens {
            let next = Self::next_token(&logits)?;
            let input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
            logits = self.model.forward(&input, prompt.len() + i)?;
        }
        Ok((prefill, start.elapsed().as_secs_f64()))
    }
}
