//! `--expert-memory` and `--expert-cache`, shared by the commands that run a
//! model, and the summary line every such run ends with.

use clap::Args;
use switchyard::config::ByteSize;
use switchyard::experts::{ExpertMemory, ExpertProvider, PolicyKind, Prefetch};

#[derive(Debug, Clone, Args)]
pub struct ExpertMemoryArgs {
    /// Keep at most this many bytes of routed experts in memory and read the
    /// others from the checkpoint on demand: 512MiB, 4GiB, plain bytes, or 25%
    /// (of all routed experts' bytes). Default: every expert resident.
    #[arg(long, value_parser = parse_size)]
    expert_memory: Option<ByteSize>,
    /// Expert cache policy under --expert-memory: lru, lfu or lfu:HALF_LIFE.
    #[arg(long, value_parser = parse_policy, default_value = "lru")]
    expert_cache: PolicyKind,
    /// Under --expert-memory: next-layer applies the next MoE layer's router to
    /// this layer's input and reads the predicted misses in the background; off.
    #[arg(long, value_parser = parse_prefetch, default_value = "off")]
    prefetch: Prefetch,
}

impl ExpertMemoryArgs {
    pub fn memory(&self) -> Option<ExpertMemory> {
        self.expert_memory.map(|budget| ExpertMemory {
            budget,
            policy: self.expert_cache,
            prefetch: self.prefetch,
        })
    }
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse().map_err(|e: switchyard::Error| e.to_string())
}

fn parse_prefetch(s: &str) -> Result<Prefetch, String> {
    s.parse().map_err(|e: switchyard::Error| e.to_string())
}

fn parse_policy(s: &str) -> Result<PolicyKind, String> {
    s.parse().map_err(|e: switchyard::Error| e.to_string())
}

/// The expert cache's summary on stderr, when there is one; `tokens` ran
/// through the model.
pub fn print_summary(experts: &dyn ExpertProvider, tokens: usize) {
    if let Some(report) = experts.cache_report() {
        eprintln!("{}", report.summary_line(tokens));
    }
}

/// The same fields for `--json` (`null` when every expert is resident).
pub fn summary_json(experts: &dyn ExpertProvider, tokens: usize) -> serde_json::Value {
    experts
        .cache_report()
        .map_or(serde_json::Value::Null, |r| r.to_json(tokens))
}
