//! `mixtral`: Hub checkpoints keep the MoE block in `block_sparse_moe` with
//! experts `w1` (gate), `w3` (up), `w2` (down); transformers 5 may write `mlp`.

use super::Wiring;
use crate::experts::ExpertNaming;

pub(super) const WIRING: Wiring = Wiring {
    experts: ExpertNaming {
        moe_modules: &["block_sparse_moe", "mlp"],
        projections: ["w1", "w3", "w2"],
        ..ExpertNaming::QWEN
    },
};
