//! `olmoe` (q/k norm over the whole projection, `clip_qkv`): router `mlp.gate`, experts `mlp.experts.{e}.{gate,up,down}_proj`.
//! Its attention and MoE options come from the config (see `config::hf`).

use super::Wiring;

pub(super) const WIRING: Wiring = Wiring {
    moe_modules: &["mlp"],
    expert_projections: ["gate_proj", "up_proj", "down_proj"],
};
