//! Where routed experts' weights live. The MoE block asks an
//! [`ExpertProvider`] for each layer call's experts, so that a store backed by
//! disk and an expert cache can replace the all-resident one without changing
//! the model. Locating a layer's experts by the family's tensor names lives
//! here too (`naming`).

mod cache;
mod memory;
mod naming;
mod outcome;
mod packed;
mod policy;
mod provider;
mod replay;
mod report;
mod resident;
mod store;

pub use cache::{ExpertCache, ExpertReads};
pub use memory::{ExpertMemory, MissPrecision, Prefetch};
pub use naming::{ExpertDims, ExpertLayout, ExpertStorage, LayerExperts, moe_prefix};
pub use outcome::CacheOutcome;
pub use packed::{ExpertFile, ExpertFileMode, PackedExperts, PackedPlan, default_dir};
pub use policy::{Admission, CachePolicy, Lfu, Lru, PolicyKind};
pub use provider::{CallExperts, ExpertProvider};
pub use replay::{
    CacheCounts, Calls, LayerCall, RoutingHistory, replay, replay_call, replay_optimal,
    replay_optimal_history,
};
pub use report::{CacheReport, CacheSnapshot, ExpertFileReport, PrefetchCounts, StandInCounts};
pub use resident::{Admit, Capacity, Lookup, ResidentSet};
pub use store::ExpertStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertId {
    pub layer: u32,
    pub expert: u32,
}
