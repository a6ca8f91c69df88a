//! The all-resident expert provider: every routed expert read at load.

use std::sync::Arc;

use super::{CallExperts, ExpertId, ExpertProvider};
use crate::error::{Error, Result};
use crate::ops::Ffn;

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

    /// All experts of a layer, in id order (for training and export).
    pub fn layer(&self, layer: usize) -> &[Arc<Ffn>] {
        self.layers.get(layer).map_or(&[], Vec::as_slice)
    }
}

impl ExpertProvider for ExpertStore {
    fn num_experts(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, Vec::len)
    }

    fn expert_bytes(&self, id: ExpertId) -> usize {
        self.get(id).map_or(0, |e| e.weight_bytes())
    }

    fn resident_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|e| e.weight_bytes()).sum()
    }

    fn experts_for_call(&self, layer: u32, experts: &[u32]) -> Result<CallExperts> {
        Ok(CallExperts {
            ffns: experts
                .iter()
                .map(|&expert| self.get(ExpertId { layer, expert }))
                .collect::<Result<_>>()?,
            outcomes: None,
        })
    }
}
