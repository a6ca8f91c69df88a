//! Routing traces and what they say: the Parquet trace writer and reader, and
//! the analyses `switchyard analyze` reports (expert load, local routing
//! consistency, cache hit-rate curves, cross-layer co-activation) with plots.

mod active;
mod coactivation;
mod load;
mod observer;
mod parquet;
mod plot;
mod report;
mod routes;
mod srp;
mod stack;

pub use active::{ActiveExperts, LayerPicks};
pub use coactivation::{Coactivation, PairStat};
pub use load::{ExpertLoad, consecutive_reuse, entropy_bits, uniform_reuse};
pub use observer::{ActiveSummary, RunObserver};
pub use parquet::{Trace, TraceMeta, TraceRow, TraceRows, TraceWriter, read_trace};
pub use plot::write_plots;
pub use report::{
    CoactivationSummary, HitRates, LayerCurves, LayerSch, LayerSrp, LayerValue, PolicyCurves,
    SchCurve, SchSummary, SrpSummary, Summary,
};
pub use routes::{Routes, SequenceRoutes, TokenExperts};
pub use srp::{SEGMENT_LENGTHS, SegmentHistogram, Srp};
pub use stack::{StackPolicy, hit_curve, mean_hit_curve};
