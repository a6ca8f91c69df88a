//! The one MoE block every architecture uses: router, routed experts, optional
//! shared expert.

mod block;
mod router;

pub use block::{MoeBlock, SharedExpert};
pub use router::{RouterConfig, Routing, route};
