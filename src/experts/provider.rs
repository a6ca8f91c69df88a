//! The seam between the MoE block and wherever experts' bytes live.

use std::fmt;
use std::sync::Arc;

use super::{CacheOutcome, ExpertId};
use crate::error::Result;
use crate::ops::Ffn;

/// The experts one MoE layer call computes with.
#[derive(Debug, Default)]
pub struct CallExperts {
    /// One per expert asked for, in the order asked.
    pub ffns: Vec<Arc<Ffn>>,
    /// `(expert, outcome)` sorted by expert id when an expert cache served the
    /// call (reported in [`RoutingSite::cache`](crate::model::RoutingSite));
    /// `None` when every expert is resident.
    pub outcomes: Option<Vec<(u32, CacheOutcome)>>,
}

/// Where a model's routed experts come from. The MoE block asks once per layer
/// call with the call's distinct experts and computes with what it is handed;
/// it never knows whether they were resident, read from disk or stood in for.
pub trait ExpertProvider: Send + Sync + fmt::Debug {
    /// Routed experts of `layer` (0 for a dense layer).
    fn num_experts(&self, layer: usize) -> usize;

    /// Bytes expert `id` occupies once in the kernels' layout.
    fn expert_bytes(&self, id: ExpertId) -> usize;

    /// Bytes of expert weights resident right now.
    fn resident_bytes(&self) -> usize;

    /// The experts of one call of `layer`; `experts` are distinct and ascending.
    fn experts_for_call(&self, layer: u32, experts: &[u32]) -> Result<CallExperts>;

    /// All routed experts' bytes together (what `--expert-memory 25%` is of).
    fn total_expert_bytes(&self, num_layers: usize) -> u64 {
        (0..num_layers)
            .flat_map(|l| {
                (0..self.num_experts(l)).map(move |e| ExpertId {
                    layer: l as u32,
                    expert: e as u32,
                })
            })
            .map(|id| self.expert_bytes(id) as u64)
            .sum()
    }
}
