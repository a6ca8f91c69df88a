//! Slimming a model: score experts on calibration text (routed frequency, or
//! REAP saliency), choose the same number to drop in every MoE layer, and write
//! a smaller checkpoint that loads like the original.

mod gguf;
mod score;
mod write;

pub use gguf::{PRUNING_KEY, sidecar_path};
pub use score::{ExpertScores, PruneCriterion};
pub use write::{PrunePlan, PruneSummary, check_out, write_pruned};
