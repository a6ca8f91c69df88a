//! The observer every model run uses: it counts the experts each token used
//! and, when asked, writes every routing decision to a trace file. `run`,
//! `logits`, `bench`, `perplexity` and the server's model thread share it, so
//! all of them write the same rows.

use std::path::{Path, PathBuf};

use super::{ActiveExperts, TraceMeta, TraceWriter};
use crate::error::Result;
use crate::experts::ExpertId;
use crate::model::moe::Routing;
use crate::model::{Model, RoutingObserver, RoutingSite, SequenceId};

/// Records the trace (when asked) and counts the experts each token used.
#[derive(Default)]
pub struct RunObserver {
    trace: Option<(TraceWriter, PathBuf)>,
    active: ActiveExperts,
    /// Reports every routing as this sequence (bench's repeated runs would
    /// otherwise all be sequence 0 at the same positions).
    sequence: Option<SequenceId>,
}

/// What [`RunObserver::finish`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveSummary {
    pub mean_active_per_token: f64,
    pub expert_bytes_per_token: f64,
    /// The trace written, with its row count; `None` without one.
    pub trace: Option<(PathBuf, u64)>,
}

impl ActiveSummary {
    /// `experts/token: 1.62 (top_k 2) | expert MB/token: 0.52`
    pub fn line(&self, model: &Model) -> String {
        format!(
            "experts/token: {:.2} (top_k {}) | expert MB/token: {:.3}",
            self.mean_active_per_token,
            model.config().moe.top_k,
            self.expert_bytes_per_token / 1e6
        )
    }
}

impl RunObserver {
    /// An observer of `model` (named `model_name` in the trace's metadata) that
    /// writes a trace to `trace` when given; the file is created now, so a path
    /// that cannot be written fails before any work is done.
    pub fn create(model: &Model, model_name: &str, trace: Option<&Path>) -> Result<Self> {
        let trace = match trace {
            Some(path) => {
                let mut meta = TraceMeta::of_model(model.config(), model_name);
                meta.top_k = max_experts_per_token(model);
                Some((TraceWriter::create(path, &meta)?, path.to_path_buf()))
            }
            None => None,
        };
        Ok(Self {
            trace,
            ..Self::default()
        })
    }

    pub fn set_sequence(&mut self, id: SequenceId) {
        self.sequence = Some(id);
    }

    /// Every routing observed so far, counted by layer and expert.
    pub fn active(&self) -> &ActiveExperts {
        &self.active
    }

    /// Finishes the trace file, if any (row groups flushed, temp file renamed
    /// into place), and returns the expert counts.
    pub fn finish(self, model: &Model) -> Result<ActiveSummary> {
        let trace = match self.trace {
            Some((writer, path)) => Some((path, writer.finish()?)),
            None => None,
        };
        let experts = model.experts();
        Ok(ActiveSummary {
            mean_active_per_token: self.active.mean_active_per_token(),
            expert_bytes_per_token: self.active.expert_bytes_per_token(|layer, expert| {
                experts.expert_bytes(ExpertId {
                    layer: layer as u32,
                    expert,
                })
            }),
            trace,
        })
    }
}

impl RoutingObserver for RunObserver {
    fn on_routing(&mut self, mut site: RoutingSite<'_>, routing: &Routing) {
        if let Some(id) = self.sequence {
            site.sequence = id;
        }
        self.active.on_routing(site, routing);
        if let Some((writer, _)) = self.trace.as_mut() {
            writer.on_routing(site, routing);
        }
    }
}

/// Slots per token of the model's routers (more than `top_k` under DynaMoE).
fn max_experts_per_token(model: &Model) -> usize {
    let top_k = model.config().moe.top_k;
    model
        .layers()
        .iter()
        .filter_map(|l| l.moe())
        .map(|moe| moe.config().max_experts_per_token(moe.num_experts()))
        .max()
        .unwrap_or(top_k)
}
