//! Flags every model-running subcommand shares: `--trace` (record the routing)
//! and `--expert-top-p` (dynamic expert activation), and the command-line side
//! of the observer ([`RunObserver`]) that records the trace and counts the
//! experts actually used.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use switchyard::model::Model;
use switchyard::model::moe::{ExpertTopP, TopPMode};
use switchyard::trace::{ActiveSummary, RunObserver};

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
        observer(model, model_name, self.trace.as_deref())
    }
}

/// The observer of a run, its trace file (when given) created now.
pub fn observer(
    model: &Model,
    model_name: &str,
    trace: Option<&Path>,
) -> anyhow::Result<RunObserver> {
    RunObserver::create(model, model_name, trace).with_context(|| match trace {
        Some(path) => format!("creating the trace {}", path.display()),
        None => "starting the routing observer".into(),
    })
}

/// Finishes `observer`'s trace (reporting its rows on stderr) and returns the
/// expert counts.
pub fn finish(observer: RunObserver, model: &Model) -> anyhow::Result<ActiveSummary> {
    let summary = observer.finish(model).context("writing the trace")?;
    report_trace(&summary);
    Ok(summary)
}

pub fn report_trace(summary: &ActiveSummary) {
    if let Some((path, rows)) = &summary.trace {
        eprintln!("wrote {rows} trace rows to {}", path.display());
    }
}
