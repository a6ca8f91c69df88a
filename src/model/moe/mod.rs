//! The one MoE block every architecture uses: router, routed experts, optional
//! shared expert.

mod block;
mod router;

pub use block::{MoeBlock, NextRouter, SharedExpert};
pub use router::{ExpertTopP, RouterBias, RouterConfig, Routing, TopPMode, route};
