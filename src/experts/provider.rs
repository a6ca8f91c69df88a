//! The seam between the MoE block and wherever experts' bytes live.

use std::fmt;
use std::sync::Arc;

use super::{CacheOutcome, CacheReport, ExpertId};
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

    /// The most experts one call may ask for. The block computes a wider layer
    /// call in groups of at most this many, dropping each group's experts
    /// before asking for the next, so a budgeted cache never holds more.
    fn max_experts_per_call(&self) -> usize {
        usize::MAX
    }

    /// A prediction that `layer`'s next call uses `experts` (distinct,
    /// ascending): a cache may start reading them in the background.
    fn prefetch(&self, _layer: u32, _experts: &[u32]) {}

    /// Whether a background thread reads experts while the model computes
    /// (prefetch, stand-ins' full copies): it needs a core of its own now and
    /// then, so the compute threads must not poll for work between sections.
    fn reads_in_background(&self) -> bool {
        false
    }

    /// Hit rate, optimal hit rate and bytes read since the cache was opened
    /// or last reset; `None` when every expert is resident.
    fn cache_report(&self) -> Option<CacheReport> {
        None
    }

    /// Empties an expert cache and zeroes its counters (before a measured run).
    fn reset_cache(&self) {}

    /// Drops the checkpoint an expert cache reads from out of the page cache,
    /// so that its misses cost disk reads (before a measured run).
    fn drop_cached_pages(&self) -> Result<()> {
        Ok(())
    }

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
