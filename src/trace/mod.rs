//! Routing observers and the analyses built on them: a trace recorder, expert
//! load entropy and consecutive-token expert reuse (locality).

mod analysis;
mod recorder;

pub use analysis::{consecutive_reuse, entropy_bits, load_entropy, loads, uniform_reuse};
pub use recorder::RoutingTrace;
