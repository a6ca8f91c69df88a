//! What an expert cache did over a run: the summary line, `--json` and
//! `/metrics` fields. A report is built from a [`CacheSnapshot`], a value taken
//! under the cache's lock in O(1) (counters, and a shared handle on the routing
//! history); the optimal yardstick is replayed from it afterwards, outside the
//! lock, so a report never stalls the model thread.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::policy::PolicyKind;
use super::replay::{CacheCounts, RoutingHistory, replay_optimal_history};
use super::resident::Capacity;
use crate::config::format_bytes;
use crate::weights::ReadTotals;

/// How well next-layer prediction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchCounts {
    /// Experts predicted, experts then used, and both.
    pub predicted: u64,
    pub used: u64,
    pub correct: u64,
    /// Predicted experts not resident, read in the background.
    pub reads: u64,
    /// Lookups served by an expert a prefetch brought in.
    pub hits: u64,
    /// Prefetched experts evicted before any call asked for them.
    pub wasted: u64,
}

impl PrefetchCounts {
    /// Of the experts predicted, the share then used.
    pub fn precision(&self) -> f64 {
        self.correct as f64 / self.predicted.max(1) as f64
    }

    /// Of the experts used, the share predicted.
    pub fn recall(&self) -> f64 {
        self.correct as f64 / self.used.max(1) as f64
    }

    pub(super) fn score(&mut self, predicted: &[u32], used: &BTreeSet<u32>) {
        self.predicted += predicted.len() as u64;
        self.used += used.len() as u64;
        self.correct += predicted.iter().filter(|e| used.contains(e)).count() as u64;
    }
}

/// Low-precision stand-ins (`--miss-precision q4`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StandInCounts {
    /// The stand-in pool's share of the budget, and the stand-ins it holds.
    pub budget_bytes: u64,
    pub capacity_experts: usize,
    /// Lookups computed with a stand-in (counted as misses of the full copies).
    pub served: u64,
    /// Full copies read in the background after a stand-in served.
    pub background_reads: u64,
}

/// What an expert cache did since it was opened or last reset.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheReport {
    pub policy: PolicyKind,
    /// The whole budget: full copies, stand-ins and reads in flight together.
    pub budget_bytes: u64,
    /// Full-precision experts the budget holds (of the largest layer's size).
    pub capacity_experts: usize,
    pub total_expert_bytes: u64,
    /// Lookups of full copies; hits include those served by a prefetched expert.
    pub counts: CacheCounts,
    /// Belady's MIN on the same layer calls with the same capacity and counting
    /// (demand reads only: a prefetching cache may beat it). `None` when the
    /// routing was not recorded (a server) or outgrew its bound.
    pub optimal: Option<CacheCounts>,
    /// Positioned reads of expert bytes since the last reset, prefetches included.
    pub read: ReadTotals,
    /// Experts read on demand (the caller waited), and the time spent reading
    /// plus converting every expert read (prefetched ones too).
    pub loads: u64,
    pub load_nanos: u64,
    pub resident_bytes: usize,
    pub peak_resident_bytes: usize,
    /// `None` without `--prefetch`.
    pub prefetch: Option<PrefetchCounts>,
    /// `None` without `--miss-precision`.
    pub stand_ins: Option<StandInCounts>,
    /// The packed expert file misses read, when they read one.
    pub expert_file: Option<ExpertFileReport>,
}

/// The packed expert file an expert cache reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertFileReport {
    pub path: std::path::PathBuf,
    /// Read with `O_DIRECT` (else buffered, where the file system refused it).
    pub direct: bool,
}

impl CacheReport {
    /// Bytes read per token over `tokens` tokens run through the model.
    pub fn read_bytes_per_token(&self, tokens: usize) -> f64 {
        self.read.bytes as f64 / tokens.max(1) as f64
    }

    /// Time converting what was read into the kernels' layout (bf16 to f32,
    /// `--quant`, GGUF blocks into tiles), as a share of the read time.
    pub fn repack_over_read(&self) -> f64 {
        let repack = self.load_nanos.saturating_sub(self.read.nanos);
        repack as f64 / self.read.nanos.max(1) as f64
    }

    /// Of all expert lookups, the share computed with a stand-in.
    pub fn stand_in_share(&self) -> Option<f64> {
        self.stand_ins
            .map(|s| s.served as f64 / self.counts.lookups.max(1) as f64)
    }

    /// `expert cache: hit 71.2 % (optimal 80.4 %) | read 3.1 GiB, 24.1 MiB/token | ...`.
    pub fn summary_line(&self, tokens: usize) -> String {
        let optimal = match &self.optimal {
            Some(o) => format!("optimal {:.1} %", 100.0 * o.hit_rate()),
            None => "optimal not recorded".to_string(),
        };
        let mut line = format!(
            "expert cache: hit {:.1} % ({optimal}) | read {}, {:.1} MiB/token",
            100.0 * self.counts.hit_rate(),
            format_bytes(self.read.bytes),
            self.read_bytes_per_token(tokens) / (1 << 20) as f64,
        );
        if let Some(p) = &self.prefetch {
            line += &format!(
                " | prefetch precision {:.2} recall {:.2}",
                p.precision(),
                p.recall()
            );
        }
        if let Some(share) = self.stand_in_share() {
            line += &format!(" | stand-ins {:.1} %", 100.0 * share);
        }
        line += &format!(
            " | {} of {} experts' bytes, {} | repack {:.2}x read time",
            format_bytes(self.budget_bytes),
            format_bytes(self.total_expert_bytes),
            self.policy,
            self.repack_over_read(),
        );
        line += match &self.expert_file {
            Some(f) if f.direct => " | packed expert file, O_DIRECT",
            Some(_) => " | packed expert file, buffered",
            None => " | checkpoint reads",
        };
        line
    }

    /// The same fields for `--json`.
    pub fn to_json(&self, tokens: usize) -> serde_json::Value {
        let prefetch = self.prefetch.map(|p| {
            serde_json::json!({
                "precision": p.precision(),
                "recall": p.recall(),
                "predicted": p.predicted,
                "used": p.used,
                "correct": p.correct,
                "reads": p.reads,
                "hits": p.hits,
                "wasted": p.wasted,
            })
        });
        let stand_ins = self.stand_ins.map(|s| {
            serde_json::json!({
                "share": self.stand_in_share(),
                "served": s.served,
                "background_reads": s.background_reads,
                "budget_bytes": s.budget_bytes,
                "capacity_experts": s.capacity_experts,
            })
        });
        serde_json::json!({
            "policy": self.policy.to_string(),
            "budget_bytes": self.budget_bytes,
            "capacity_experts": self.capacity_experts,
            "total_expert_bytes": self.total_expert_bytes,
            "lookups": self.counts.lookups,
            "hits": self.counts.hits,
            "misses": self.counts.misses,
            "evictions": self.counts.evictions,
            "hit_rate": self.counts.hit_rate(),
            "optimal_hit_rate": self.optimal.map(|o| o.hit_rate()),
            "read_bytes": self.read.bytes,
            "read_bytes_per_token": self.read_bytes_per_token(tokens),
            "read_seconds": self.read.nanos as f64 * 1e-9,
            "load_seconds": self.load_nanos as f64 * 1e-9,
            "repack_over_read": self.repack_over_read(),
            "peak_resident_bytes": self.peak_resident_bytes,
            "prefetch": prefetch,
            "stand_ins": stand_ins,
            "expert_file": self.expert_file.as_ref().map(|f| serde_json::json!({
                "path": f.path.display().to_string(),
                "direct": f.direct,
            })),
        })
    }
}

/// A cache's state at one moment, taken under its lock in O(1): the report
/// with its yardstick still to compute, and a shared handle on the routing
/// history as it was (the cache copies the history on its next call if this
/// handle is still alive, so the snapshot never changes).
#[derive(Debug, Clone)]
pub struct CacheSnapshot {
    /// Everything but `optimal`, which is `None` here.
    pub(super) report: CacheReport,
    pub(super) history: Option<Arc<RoutingHistory>>,
    pub(super) capacity: Capacity,
}

impl CacheSnapshot {
    /// Layer calls recorded for the yardstick (0 when not recorded).
    pub fn recorded_calls(&self) -> usize {
        self.history.as_ref().map_or(0, |h| h.len())
    }

    /// The report, Belady's MIN replayed over the recorded routing (without
    /// any lock: the snapshot is a value).
    pub fn into_report(self) -> CacheReport {
        let optimal = self
            .history
            .filter(|h| !h.overflowed())
            .map(|h| replay_optimal_history(&h, self.capacity));
        CacheReport {
            optimal,
            ..self.report
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_precision_and_recall_count_predicted_against_used() {
        let mut p = PrefetchCounts::default();
        // Predicted {1, 2, 3}, used {2, 3, 4, 5}: 2 of 3 right, 2 of 4 found.
        p.score(&[1, 2, 3], &[2, 3, 4, 5].into_iter().collect());
        assert_eq!((p.predicted, p.used, p.correct), (3, 4, 2));
        assert!((p.precision() - 2.0 / 3.0).abs() < 1e-12);
        assert!((p.recall() - 0.5).abs() < 1e-12);
        assert_eq!(PrefetchCounts::default().precision(), 0.0);
    }
}
