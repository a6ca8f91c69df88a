//! Slimming a model: score experts on calibration text (routed frequency, or
//! REAP saliency), choose the same number to drop in every MoE layer, and write
//! a smaller checkpoint that loads like the original.

mod score;
mod write;

pub use score::{ExpertScores, PruneCriterion};
pub use write::{PrunePlan, PruneSummary, write_pruned};
