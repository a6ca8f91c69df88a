//! What an expert cache did for one expert of one MoE layer call (issue 8).
//! The cache reports it through the routing observer; traces record it.

/// One expert lookup's outcome, in the words of the trace's `cache` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheOutcome {
    /// Resident when the call asked for it.
    Hit,
    /// Read from the backing store on demand.
    Miss,
    /// Resident because a prefetch (e.g. next-layer, Pre-gated MoE) brought it in.
    Prefetched,
    /// A missing expert replaced by a low-precision stand-in (HOBBIT).
    StandIn,
}

impl CacheOutcome {
    pub const ALL: [CacheOutcome; 4] = [
        CacheOutcome::Hit,
        CacheOutcome::Miss,
        CacheOutcome::Prefetched,
        CacheOutcome::StandIn,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Prefetched => "prefetched",
            CacheOutcome::StandIn => "stand_in",
        }
    }

    pub fn parse(text: &str) -> Option<CacheOutcome> {
        CacheOutcome::ALL.into_iter().find(|o| o.as_str() == text)
    }
}
