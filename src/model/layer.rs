use super::attention::Attention;
use super::moe::MoeBlock;
use crate::ops::{Ffn, RmsNorm};

/// The feed-forward half of a decoder layer.
#[derive(Debug)]
pub enum LayerFfn {
    Dense(Ffn),
    Moe(MoeBlock),
}

/// Pre-norm decoder layer: `x + attn(norm(x))`, then `h + ffn(norm(h))`.
#[derive(Debug)]
pub struct DecoderLayer {
    pub input_norm: RmsNorm,
    pub attention: Attention,
    pub post_attention_norm: RmsNorm,
    pub ffn: LayerFfn,
}

impl DecoderLayer {
    pub fn moe(&self) -> Option<&MoeBlock> {
        match &self.ffn {
            LayerFfn::Moe(block) => Some(block),
            LayerFfn::Dense(_) => None,
        }
    }
}
