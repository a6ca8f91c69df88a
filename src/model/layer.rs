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

    /// Several sequences' rows at once (see [`Attention::forward_batch`]);
    /// latent attention runs each sequence by itself.
    ///
    /// # Shapes
    /// `x: [rows, hidden] -> [rows, hidden]`
    pub fn forward_batch(
        &self,
        x: &Tensor,
        seqs: Vec<(usize, usize, AttentionInput<'_>)>,
    ) -> Result<Tensor> {
        match self {
            AttentionBlock::Grouped(a) => a.forward_batch(x, seqs),
            AttentionBlock::Latent(a) => {
                let mut parts = Vec::with_capacity(seqs.len());
                for (row, n, input) in seqs {
                    parts.push(a.forward(&x.narrow(0, row, n)?, input)?);
                }
                Ok(Tensor::cat(&parts, 0)?)
            }
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
    /// Boxed: a block is several times a dense MLP's size.
    Moe(Box<MoeBlock>),
}

/// A decoder layer: attention, then the dense MLP or MoE block, each added to
/// the residual stream with the RMS-norms its family places.
#[derive(Debug)]
pub struct DecoderLayer {
    pub norms: LayerNorms,
    pub attention: AttentionBlock,
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

/// A decoder layer's RMS-norms where its family places them
/// (`config::family::NormPlacement`).
#[derive(Debug)]
pub enum LayerNorms {
    /// `x + attn(input(x))`, then `h + ffn(post_attention(h))`.
    Pre {
        input: RmsNorm,
        post_attention: RmsNorm,
    },
    /// OLMo-2: `x + attention(attn(x))`, then `h + ffn(ffn(h))`.
    Post { attention: RmsNorm, ffn: RmsNorm },
}

impl LayerNorms {
    /// What the attention block reads from the residual stream `x`.
    pub fn attention_input(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            LayerNorms::Pre { input, .. } => input.forward(x),
            LayerNorms::Post { .. } => Ok(x.clone()),
        }
    }

    /// `x` plus the attention block's output `attn`.
    pub fn add_attention(&self, x: &Tensor, attn: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            LayerNorms::Pre { .. } => x + attn,
            LayerNorms::Post { attention, .. } => x + attention.forward(attn)?,
        }
    }

    /// What the feed-forward block reads from the residual stream `h`.
    pub fn ffn_input(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            LayerNorms::Pre { post_attention, .. } => post_attention.forward(h),
            LayerNorms::Post { .. } => Ok(h.clone()),
        }
    }

    /// `h` plus the feed-forward block's output `out`.
    pub fn add_ffn(&self, h: &Tensor, out: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            LayerNorms::Pre { .. } => h + out,
            LayerNorms::Post { ffn, .. } => h + ffn.forward(out)?,
        }
    }
}
