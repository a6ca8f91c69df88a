//! `mixtral`: Hub checkpoints keep the MoE block in `block_sparse_moe` with
//! experts `w1` (gate), `w3` (up), `w2` (down); transformers 5 may write `mlp`.

use super::Wiring;

pub(super) const WIRING: Wiring = Wiring {
    moe_modules: &["block_sparse_moe", "mlp"],
    expert_projections: ["w1", "w3", "w2"],
};
