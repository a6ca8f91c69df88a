//! Files a run writes. A training checkpoint (`checkpoint/`: f32 weights, AdamW
//! moments, step and data-sampler state) is swapped in whole by directory rename;
//! the Hugging Face export next to it is written file by file, each atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::TrainConfig;
use crate::error::{Error, Result};

/// Subdirectory of the output directory holding the resumable state.
pub const CHECKPOINT_DIR: &str = "checkpoint";
const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed.
    pub step: usize,
    /// Data sampler state after `step` steps.
    pub rng_state: u64,
    pub config: TrainConfig,
}

pub struct Checkpoint {
    pub state: TrainState,
    pub weights: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Saves tensors as safetensors, atomically.
pub fn save_tensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = tmp_path(path);
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn load_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "checkpoint file missing"),
        ));
    }
    let map =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(map.into_iter().collect())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Whether `out` holds a checkpoint to resume from (or the previous one, if a
/// save was interrupted mid-swap).
pub fn has_checkpoint(out: &Path) -> bool {
    out.join(CHECKPOINT_DIR).join(STATE).exists()
        || out
            .join(format!("{CHECKPOINT_DIR}.old"))
            .join(STATE)
            .exists()
}

impl Checkpoint {
    /// Writes `out/checkpoint.tmp/`, then swaps it in for `out/checkpoint/`.
    pub fn save(&self, out: &Path) -> Result<()> {
        let dir = out.join(CHECKPOINT_DIR);
        let tmp = out.join(format!("{CHECKPOINT_DIR}.tmp"));
        let old = out.join(format!("{CHECKPOINT_DIR}.old"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        save_tensors(&self.weights, &tmp.join(WEIGHTS))?;
        save_tensors(&self.optimizer, &tmp.join(OPTIMIZER))?;
        let state = serde_json::to_string_pretty(&self.state)
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        write_atomic(&tmp.join(STATE), state.as_bytes())?;
        if dir.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
            }
            std::fs::rename(&dir, &old).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        Ok(())
    }

    /// Reads `out/checkpoint/`, or `out/checkpoint.old/` if a save died mid-swap.
    pub fn load(out: &Path) -> Result<Self> {
        let dir = checkpoint_dir(out);
        let state = read_state(&dir)?;
        Ok(Self {
            state,
            weights: load_tensors(&dir.join(WEIGHTS))?,
            optimizer: load_tensors(&dir.join(OPTIMIZER))?,
        })
    }
}

fn checkpoint_dir(out: &Path) -> PathBuf {
    let dir = out.join(CHECKPOINT_DIR);
    if dir.join(STATE).exists() {
        dir
    } else {
        out.join(format!("{CHECKPOINT_DIR}.old"))
    }
}

fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(&path, e.to_string()))
}

/// The configuration of the run checkpointed in `out` (to rebuild its corpus split before resuming).
pub fn saved_config(out: &Path) -> Result<TrainConfig> {
    Ok(read_state(&checkpoint_dir(out))?.config)
}

/// Writes the Hugging Face files (`config.json`, `generation_config.json`,
/// `model.safetensors`) for `weights` into `out`.
pub fn export_hf(
    cfg: &crate::config::ModelConfig,
    weights: &BTreeMap<String, Tensor>,
    dtype: DType,
    out: &Path,
) -> Result<()> {
    let json = crate::config::to_hf_json(cfg)?;
    let text =
        serde_json::to_string_pretty(&json).map_err(|e| Error::InvalidInput(e.to_string()))?;
    write_atomic(&out.join("config.json"), text.as_bytes())?;
    let gen_cfg = serde_json::json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids,
        "do_sample": false,
    });
    let text =
        serde_json::to_string_pretty(&gen_cfg).map_err(|e| Error::InvalidInput(e.to_string()))?;
    write_atomic(&out.join("generation_config.json"), text.as_bytes())?;
    let cast = weights
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    save_tensors(&cast, &out.join("model.safetensors"))
}
