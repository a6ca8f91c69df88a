//! Where routed experts' weights live. The MoE block asks the store for an
//! expert by id, so that a store backed by disk and an expert cache can replace
//! the all-resident one without changing the model.

mod outcome;
mod policy;
mod replay;
mod resident;

use std::sync::Arc;

pub use outcome::CacheOutcome;
pub use policy::{Admission, CachePolicy, Lfu, Lru, PolicyKind};
pub use replay::{CacheCounts, LayerCall, replay, replay_call, replay_optimal};
pub use resident::{Admit, Capacity, Lookup, ResidentSet};

use crate::error::{Error, Result};
use crate::ops::Ffn;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertId {
    pub layer: u32,
    pub expert: u32,
}

/// Every routed expert held in memory.
#[derive(Debug, Default)]
pub struct ExpertStore {
    /// `[layer][expert]`; empty for dense layers.
    layers: Vec<Vec<Arc<Ffn>>>,
}

impl ExpertStore {
    pub fn new(layers: Vec<Vec<Ffn>>) -> Self {
        Self {
            layers: layers
                .into_iter()
                .map(|l| l.into_iter().map(Arc::new).collect())
                .collect(),
        }
    }

    pub fn get(&self, id: ExpertId) -> Result<Arc<Ffn>> {
        self.layers
            .get(id.layer as usize)
            .and_then(|l| l.get(id.expert as usize))
            .cloned()
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "no expert {} in layer {} of the expert store",
                    id.expert, id.layer
                ))
            })
    }

    pub fn num_experts(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, Vec::len)
    }

    /// Bytes of expert weights resident in memory.
    pub fn resident_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|e| e.weight_bytes()).sum()
    }

    /// All experts of a layer, in id order (for training and export).
    pub fn layer(&self, layer: usize) -> &[Arc<Ffn>] {
        self.layers.get(layer).map_or(&[], Vec::as_slice)
    }
}
