//! Where routed experts' weights live. The MoE block asks an
//! [`ExpertProvider`] for each layer call's experts, so that a store backed by
//! disk and an expert cache can replace the all-resident one without changing
//! the model. Expert tensor naming lives here too (`naming`), as data the
//! architecture files fill in.

mod cache;
mod naming;
mod outcome;
mod policy;
mod provider;
mod replay;
mod resident;
mod store;

pub use cache::{CacheReport, ExpertCache, ExpertMemory, ExpertReads, Prefetch, PrefetchCounts};
pub use naming::{ExpertDims, ExpertLayout, ExpertNaming, LayerExperts};
pub use outcome::CacheOutcome;
pub use policy::{Admission, CachePolicy, Lfu, Lru, PolicyKind};
pub use provider::{CallExperts, ExpertProvider};
pub use replay::{CacheCounts, LayerCall, replay, replay_call, replay_optimal};
pub use resident::{Admit, Capacity, Lookup, ResidentSet};
pub use store::ExpertStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertId {
    pub layer: u32,
    pub expert: u32,
}
