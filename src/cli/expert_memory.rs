//! `--expert-memory` and `--expert-cache`, shared by the commands that run a
//! model, and the summary line every such run ends with.

use clap::Args;
use switchyard::config::ByteSize;
use switchyard::experts::{
    ExpertFile, ExpertFileMode, ExpertMemory, ExpertProvider, MissPrecision, PolicyKind, Prefetch,
};

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
    /// Under --expert-memory: q4 keeps 4-bit stand-ins of experts in part of the
    /// budget and computes a miss with its stand-in while the full copy is read
    /// in the background (results then differ slightly); off waits for the read.
    #[arg(long, value_parser = parse_miss_precision, default_value = "off")]
    miss_precision: MissPrecision,
    /// Under --expert-memory: auto writes every expert once, already in the
    /// kernels' layout, to a packed expert file when reading the checkpoint
    /// would convert each expert (GGUF blocks, --quant), and reads misses from
    /// it; on does so for any checkpoint; off reads the checkpoint.
    #[arg(long, value_parser = parse_expert_file, default_value = "auto")]
    expert_file: ExpertFileMode,
    /// Directory of packed expert files. Default: $XDG_CACHE_HOME/switchyard
    /// (or ~/.cache/switchyard), else beside the checkpoint.
    #[arg(long)]
    expert_dir: Option<std::path::PathBuf>,
}

impl ExpertMemoryArgs {
    /// For a command that reports once, at its end: the routing is recorded
    /// for the optimal yardstick.
    pub fn memory(&self) -> Option<ExpertMemory> {
        self.expert_memory.map(|budget| ExpertMemory {
            budget,
            policy: self.expert_cache,
            prefetch: self.prefetch,
            miss_precision: self.miss_precision,
            record_routing: true,
            expert_file: ExpertFile {
                mode: self.expert_file,
                dir: self.expert_dir.clone(),
            },
        })
    }

    /// For the server: no routing history, which would grow for as long as
    /// it runs; `/metrics` carries no optimal hit rate.
    pub fn server_memory(&self) -> Option<ExpertMemory> {
        self.memory().map(|m| ExpertMemory {
            record_routing: false,
            ..m
        })
    }
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse().map_err(|e: switchyard::Error| e.to_string())
}

fn parse_prefetch(s: &str) -> Result<Prefetch, String> {
    s.parse().map_err(|e: switchyard::Error| e.to_string())
}

fn parse_expert_file(s: &str) -> Result<ExpertFileMode, String> {
    s.parse().map_err(|e: switchyard::Error| e.to_string())
}

fn parse_miss_precision(s: &str) -> Result<MissPrecision, String> {
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

/// What the process read from storage (`read_bytes` of `/proc/self/io`): the
/// page cache's misses, beside the engine's own count.
pub fn process_read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("read_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Resident memory a budgeted run may use besides its weights, KV cache and
/// expert budget: the binary and its libraries, thread stacks, per-thread
/// scratch, activations and logits. Measured ~60 MiB on the demo model.
pub const FIXED_OVERHEAD_BYTES: u64 = 256 << 20;

/// The peak RSS a budgeted run must stay within: resident non-expert weights,
/// the expert budget, the KV cache, the read buffers and [`FIXED_OVERHEAD_BYTES`].
pub struct MemoryBound {
    pub non_expert_bytes: u64,
    pub budget_bytes: u64,
    pub kv_bytes: u64,
    /// An expert's bytes as read, beside its converted copy, on each reading
    /// thread (the caller's, and the prefetch thread's): `2 x threads x largest expert`.
    pub read_buffer_bytes: u64,
}

impl MemoryBound {
    pub fn total(&self) -> u64 {
        self.non_expert_bytes
            + self.budget_bytes
            + self.kv_bytes
            + self.read_buffer_bytes
            + FIXED_OVERHEAD_BYTES
    }

    /// Prints peak RSS beside the bound; an error when it is exceeded.
    pub fn check(&self, peak_rss_bytes: u64) -> anyhow::Result<()> {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let within = peak_rss_bytes <= self.total();
        eprintln!(
            "memory: peak RSS {:.3} GiB {} bound {:.3} GiB = non-expert weights {:.3} + expert budget {:.3} + KV cache {:.3} + read buffers {:.3} + fixed {:.3}",
            gib(peak_rss_bytes),
            if within { "within" } else { "EXCEEDS" },
            gib(self.total()),
            gib(self.non_expert_bytes),
            gib(self.budget_bytes),
            gib(self.kv_bytes),
            gib(self.read_buffer_bytes),
            gib(FIXED_OVERHEAD_BYTES),
        );
        anyhow::ensure!(
            within,
            "peak RSS {peak_rss_bytes} bytes exceeds the bound of {} bytes",
            self.total()
        );
        Ok(())
    }
}
