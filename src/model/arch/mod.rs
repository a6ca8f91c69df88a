//! Per-architecture wiring: which checkpoint names feed the shared blocks.
//! Hyper-parameter mapping lives in `config`; the blocks live in `model`.

mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_moe;

use crate::config::Arch;

/// How one architecture names its MoE tensors under `model.layers.{l}.`.
#[derive(Debug)]
pub struct Wiring {
    /// Module holding the router and experts; alternatives in the order tried
    /// (transformers 5 renamed some of them).
    pub moe_modules: &'static [&'static str],
    /// Per-expert projection names: gate, up, down.
    pub expert_projections: [&'static str; 3],
}

pub fn wiring(arch: Arch) -> &'static Wiring {
    match arch {
        Arch::Qwen3Moe => &qwen3_moe::WIRING,
        Arch::Mixtral => &mixtral::WIRING,
        Arch::Qwen2Moe => &qwen2_moe::WIRING,
        Arch::Olmoe => &olmoe::WIRING,
    }
}
