//! Per-architecture wiring: which checkpoint names feed the shared blocks.
//! Hyper-parameter mapping lives in `config`; the blocks live in `model`.

mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_moe;

use crate::config::Arch;
use crate::experts::ExpertNaming;

/// How one architecture names its MoE tensors under `model.layers.{l}.`.
#[derive(Debug)]
pub struct Wiring {
    /// Router module and routed experts' tensor names (data `experts/` reads).
    pub experts: ExpertNaming,
}

pub fn wiring(arch: Arch) -> &'static Wiring {
    match arch {
        Arch::Qwen3Moe => &qwen3_moe::WIRING,
        Arch::Mixtral => &mixtral::WIRING,
        Arch::Qwen2Moe => &qwen2_moe::WIRING,
        Arch::Olmoe => &olmoe::WIRING,
    }
}
