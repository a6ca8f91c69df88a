//! Flags every model-running subcommand shares: `--trace` (record the routing)
//! and `--expert-top-p` (dynamic expert activation), and the observer that
//! records the trace and counts the experts actually used.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use switchyard::experts::ExpertId;
use switchyard::model::moe::{ExpertTopP, Routing, TopPMode};
use switchyard::model::{Model, RoutingObserver, RoutingSite, SequenceId};
use switchyard::trace::{ActiveExperts, TraceMeta, TraceWriter};

#[derive(Debug, Clone, Args)]
pub struct RoutingFlags {
    /// Write every routing decision to this Parquet file: one row per token,
    /// layer and chosen expert (schema in the README; read by `analyze`).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    #[command(flatten)]
    pub top_p: ExpertTopPFlags,
}

/// `--expert-top-p` and its mode: on every model-running subcommand and on `serve`.
#[derive(Debug, Clone, Args)]
pub struct ExpertTopPFlags {
    /// Dynamic expert activation: each token keeps the fewest of its top-k
    /// experts whose router probability reaches this fraction of the top-k
    /// total, in (0, 1]; 1 is plain top-k. Not the sampler's --top-p.
    // Negative numbers parse, so `-1` meets the range check's message, not clap's.
    #[arg(long, allow_negative_numbers = true)]
    pub expert_top_p: Option<f32>,
    /// The rule of --expert-top-p. dynamoe: DynaMoE's, the fewest of all
    /// experts whose softmax probability sums to P, mixed with raw probabilities.
    #[arg(long, value_enum, default_value_t = TopPModeArg::TopK, requires = "expert_top_p")]
    pub expert_top_p_mode: TopPModeArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TopPModeArg {
    TopK,
    Dynamoe,
}

impl ExpertTopPFlags {
    /// The validated rule; an error naming `--expert-top-p` when P is outside (0, 1].
    pub fn resolve(&self) -> anyhow::Result<Option<ExpertTopP>> {
        let mode = match self.expert_top_p_mode {
            TopPModeArg::TopK => TopPMode::TopK,
            TopPModeArg::Dynamoe => TopPMode::Dynamoe,
        };
        Ok(self
            .expert_top_p
            .map(|p| ExpertTopP::new(p, mode))
            .transpose()?)
    }
}

impl RoutingFlags {
    pub fn expert_top_p(&self) -> anyhow::Result<Option<ExpertTopP>> {
        self.top_p.resolve()
    }

    /// The observer for a run of `model` (named `model_name` in the trace).
    pub fn observer(&self, model: &Model, model_name: &str) -> anyhow::Result<RunObserver> {
        let trace = match &self.trace {
            Some(path) => {
                let mut meta = TraceMeta::of_model(model.config(), model_name);
                meta.top_k = max_experts_per_token(model);
                let writer = TraceWriter::create(path, &meta)
                    .with_context(|| format!("creating the trace {}", path.display()))?;
                Some((writer, path.clone()))
            }
            None => None,
        };
        Ok(RunObserver {
            trace,
            active: ActiveExperts::default(),
            sequence: None,
        })
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

/// Records the trace (when asked) and counts the experts each token used.
pub struct RunObserver {
    trace: Option<(TraceWriter, PathBuf)>,
    active: ActiveExperts,
    /// Reports every routing as this sequence (bench's repeated runs would
    /// otherwise all be sequence 0 at the same positions).
    sequence: Option<SequenceId>,
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

/// What [`RunObserver::finish`] measured.
pub struct ActiveSummary {
    pub mean_active_per_token: f64,
    pub expert_bytes_per_token: f64,
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
    pub fn set_sequence(&mut self, id: SequenceId) {
        self.sequence = Some(id);
    }

    /// Finishes the trace file (temp file renamed into place) and returns the
    /// expert counts.
    pub fn finish(self, model: &Model) -> anyhow::Result<ActiveSummary> {
        if let Some((writer, path)) = self.trace {
            let rows = writer
                .finish()
                .with_context(|| format!("writing the trace {}", path.display()))?;
            eprintln!("wrote {rows} trace rows to {}", path.display());
        }
        let experts = model.experts();
        Ok(ActiveSummary {
            mean_active_per_token: self.active.mean_active_per_token(),
            expert_bytes_per_token: self.active.expert_bytes_per_token(|layer, expert| {
                experts.expert_bytes(ExpertId {
                    layer: layer as u32,
                    expert,
                })
            }),
        })
    }
}
