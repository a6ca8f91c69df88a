//! `qwen3_moe` (per-head q/k norm, dense `mlp_only_layers`): router `mlp.gate`, experts `mlp.experts.{e}.{gate,up,down}_proj`.
//! Its attention and MoE options come from the config (see `config::hf`).

use super::Wiring;
use crate::experts::ExpertNaming;

pub(super) const WIRING: Wiring = Wiring {
    experts: ExpertNaming::QWEN,
};
