//! `olmoe` (q/k norm over the whole projection, `clip_qkv`): router `mlp.gate`, experts `mlp.experts.{e}.{gate,up,down}_proj`.
//! Its attention and MoE options come from the config (see `config::hf`).

use super::Wiring;
use crate::experts::ExpertNaming;

pub(super) const WIRING: Wiring = Wiring {
    experts: ExpertNaming::QWEN,
};
