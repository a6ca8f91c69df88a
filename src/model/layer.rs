use candle_core::Tensor;

use super::attention::{Attention, AttentionInput};
use super::mla::LatentAttention;
use super::moe::MoeBlock;
use crate::error::Result;
use crate::ops::{Ffn, RmsNorm};

/// The attention half of a decoder layer: the block its family declares.
#[derive(Debug)]
pub enum AttentionBlock {
    /// Grouped-query heads with their own keys and values.
    Grouped(Attention),
    /// DeepSeek's multi-head latent attention.
    Latent(LatentAttention),
}

impl AttentionBlock {
    /// # Shapes
    /// `x: [n, hidden] -> [n, hidden]` (see [`Attention::forward`]).
    pub fn forward(&self, x: &Tensor, input: AttentionInput<'_>) -> Result<Tensor> {
        match self {
            AttentionBlock::Grouped(a) => a.forward(x, input),
            AttentionBlock::Latent(a) => a.forward(x, input),
        }
    }

    pub fn grouped(&self) -> Option<&Attention> {
        match self {
            AttentionBlock::Grouped(a) => Some(a),
            AttentionBlock::Latent(_) => None,
        }
    }

    /// Bytes of the projection weights one token reads.
    pub fn weight_bytes(&self) -> usize {
        match self {
            AttentionBlock::Grouped(a) => a.weight_bytes(),
            AttentionBlock::Latent(a) => a.weight_bytes(),
        }
    }

    /// The layer's sliding window, if it has one.
    pub fn sliding_window(&self) -> Option<usize> {
        match self {
            AttentionBlock::Grouped(a) => a.layer.sliding_window,
            AttentionBlock::Latent(_) => None,
        }
    }
}

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
    pub attention: AttentionBlock,
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
