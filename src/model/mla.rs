//! Multi-head latent attention (DeepSeek-V2, section 2.1): keys and values of
//! every head come from one normed latent per token, and the rotary part of the
//! key is one vector shared by all heads. The KV cache keeps only those two,
//! `kv_lora_rank + qk_rope_head_dim` values per token and layer, instead of
//! `heads * (qk_head_dim + v_head_dim)`; they are up-projected through `kv_b_proj`
//! for a prefill (transformers' form). A decode step instead folds `kv_b_proj`
//! into the query and the output (DeepSeek-V2's "absorbed" form): each head's
//! query is mapped into latent space, scored against the cached latents
//! directly, and the weighted latent sum mapped to the head's value.
//!
//! Cost per decoded token: the projections, plus per head `2 * len *
//! (kv_lora_rank + qk_rope_head_dim)` multiply-adds over the `len` cached
//! positions and `(nope + v) * kv_lora_rank` to absorb `kv_b_proj`.

use std::sync::OnceLock;

use candle_core::{D, Tensor};

use super::attention::{AttentionInput, causal_mask};
use super::profile::{self, Phase};
use crate::config::{AttentionConfig, MlaDims};
use crate::error::{Error, Result};
use crate::ops::{Linear, RmsNorm, softmax_last_dim};

/// How the query is projected.
#[derive(Debug)]
pub enum LatentQuery {
    /// `q_proj`: `[heads * qk_head_dim, hidden]` (DeepSeek-V2-Lite).
    Full(Linear),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))` through `q_lora_rank`.
    LowRank {
        a: Linear, // [q_lora_rank, hidden]
        norm: RmsNorm,
        b: Linear, // [heads * qk_head_dim, q_lora_rank]
    },
}

#[derive(Debug)]
pub struct LatentAttention {
    pub query: LatentQuery,
    /// The latent and the shared rotary key: `[kv_lora_rank + qk_rope_head_dim, hidden]`.
    pub kv_a_proj: Linear,
    pub kv_a_norm: RmsNorm, // [kv_lora_rank]
    /// Per head its non-rotary key then its value: `[heads * (nope + v), kv_lora_rank]`.
    pub kv_b_proj: Linear,
    pub o_proj: Linear, // [hidden, heads * v_head_dim]
    pub config: AttentionConfig,
    pub dims: MlaDims,
    /// `[qk_rope_head_dim]`: the even rotary dimensions, then the odd ones. With
    /// interleaved pairs, gathering q's and k's rotary parts so turns them into
    /// the two-halves layout the rotary table rotates, and q·k is unchanged by
    /// applying one permutation to both.
    deinterleave: Option<Tensor>,
    /// `kv_b_proj` split per head for the decode step: `[nh, nope, rank]` (key)
    /// and `[nh, v, rank]` (value), f32. Built at the first decode step, so a
    /// shape-only dry run of the loader never expands it.
    absorbed: OnceLock<(Tensor, Tensor)>,
}

impl LatentAttention {
    pub fn new(
        query: LatentQuery,
        kv: [Linear; 2],
        kv_a_norm: RmsNorm,
        o_proj: Linear,
        config: &AttentionConfig,
    ) -> Result<Self> {
        let dims = config.mla.ok_or_else(|| {
            Error::InvalidInput("latent attention needs the MLA widths in its config".into())
        })?;
        let deinterleave = if config.rope_interleaved {
            let r = dims.qk_rope_head_dim as u32;
            let order: Vec<u32> = (0..r).step_by(2).chain((1..r).step_by(2)).collect();
            Some(Tensor::new(order.as_slice(), &candle_core::Device::Cpu)?)
        } else {
            None
        };
        let [kv_a_proj, kv_b_proj] = kv;
        Ok(Self {
            query,
            kv_a_proj,
            kv_a_norm,
            kv_b_proj,
            o_proj,
            config: config.clone(),
            dims,
            deinterleave,
            absorbed: OnceLock::new(),
        })
    }

    fn absorbed(&self) -> Result<&(Tensor, Tensor)> {
        if let Some(a) = self.absorbed.get() {
            return Ok(a);
        }
        let MlaDims {
            kv_lora_rank: rank,
            qk_nope_head_dim: nope,
            v_head_dim: vd,
            ..
        } = self.dims;
        let nh = self.config.num_heads;
        let w = self.kv_b_proj.dense_f32()?.reshape((nh, nope + vd, rank))?; // [nh, nope + v, rank]
        let split = (
            w.narrow(1, 0, nope)?.contiguous()?,
            w.narrow(1, nope, vd)?.contiguous()?,
        );
        Ok(self.absorbed.get_or_init(|| split))
    }

    /// One query position over the cache, `kv_b_proj` folded in.
    ///
    /// # Shapes
    /// `q_nope: [nh, 1, nope]`, `q_rot: [nh, 1, rope]`, `latent: [1, total, rank]`,
    /// `k_rot: [1, total, rope]` -> `[nh, 1, v]`
    fn attend_absorbed(
        &self,
        q_nope: &Tensor,
        q_rot: &Tensor,
        latent: &Tensor,
        k_rot: &Tensor,
    ) -> Result<Tensor> {
        let (w_k, w_v) = self.absorbed()?;
        let nh = self.config.num_heads;
        let latent = latent.squeeze(0)?; // [total, rank]
        let q_latent = q_nope.matmul(w_k)?.squeeze(1)?; // [nh, rank]
        let scores = (q_latent.matmul(&latent.t()?)?
            + q_rot.squeeze(1)?.matmul(&k_rot.squeeze(0)?.t()?)?)?; // [nh, total]
        let probs = softmax_last_dim(&(scores * self.config.softmax_scale())?)?;
        let context = probs.matmul(&latent.contiguous()?)?; // [nh, rank]
        let rank = context.dim(1)?;
        // Per head: value = W_v[h] · context[h].
        Ok(context
            .reshape((nh, 1, rank))?
            .matmul(&w_v.transpose(1, 2)?)?) // [nh, 1, v]
    }

    /// Bytes of all projection weights (what one token reads).
    pub fn weight_bytes(&self) -> usize {
        let query = match &self.query {
            LatentQuery::Full(q) => q.weight_bytes(),
            LatentQuery::LowRank { a, b, .. } => a.weight_bytes() + b.weight_bytes(),
        };
        query
            + self.kv_a_proj.weight_bytes()
            + self.kv_b_proj.weight_bytes()
            + self.o_proj.weight_bytes()
    }

    fn rotary_layout(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.deinterleave {
            Some(order) => x.index_select(order, D::Minus1),
            None => Ok(x.clone()),
        }
    }

    /// # Shapes
    /// `x: [n, hidden] -> [n, hidden]`, the `n` rows being consecutive positions
    /// of one sequence starting at `input.start_position`.
    pub fn forward(&self, x: &Tensor, input: AttentionInput<'_>) -> Result<Tensor> {
        let MlaDims {
            kv_lora_rank: rank,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope,
            v_head_dim: vd,
            ..
        } = self.dims;
        let n = x.dim(0)?;
        let nh = self.config.num_heads;
        let qk = self.dims.qk_head_dim();
        let layer = Some(input.layer);

        let proj = profile::span(Phase::AttentionProjections, layer);
        let q = match &self.query {
            LatentQuery::Full(q) => q.forward(x)?,
            LatentQuery::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
        }; // [n, nh * qk]
        let compressed = self.kv_a_proj.forward(x)?; // [n, rank + rope]
        drop(proj);
        let core = profile::span(Phase::AttentionCore, layer);
        let q = q.reshape((n, nh, qk))?.transpose(0, 1)?; // [nh, n, qk]
        let q_nope = q.narrow(2, 0, nope)?.contiguous()?; // [nh, n, nope]
        let q_rot = self.rotary_layout(&q.narrow(2, nope, rope)?.contiguous()?)?;
        let latent = self
            .kv_a_norm
            .forward(&compressed.narrow(1, 0, rank)?.contiguous()?)?
            .unsqueeze(0)?; // [1, n, rank]
        let k_rot = self.rotary_layout(&compressed.narrow(1, rank, rope)?.contiguous()?)?;
        let q_rot = input.rope.apply(&q_rot, input.start_position)?; // [nh, n, rope]
        let k_rot = input
            .rope
            .apply(&k_rot.unsqueeze(0)?, input.start_position)?; // [1, n, rope]

        // Only the latent and the rotated shared key are cached.
        let (latent, k_rot) = match input.cache {
            Some(cache) => cache.append(input.layer, &latent, &k_rot)?,
            None => (latent, k_rot),
        };
        let total = latent.dim(1)?; // cached + new positions
        if n == 1 && !x.track_op() {
            let out = self.attend_absorbed(&q_nope, &q_rot, &latent, &k_rot)?;
            drop(core);
            let _proj = profile::span(Phase::AttentionProjections, layer);
            return self.o_proj.forward(&out.reshape((1, nh * vd))?);
        }
        drop(core);
        let proj = profile::span(Phase::AttentionProjections, layer);
        let kv = self.kv_b_proj.forward(&latent.squeeze(0)?.contiguous()?)?; // [total, nh * (nope + vd)]
        drop(proj);
        let core = profile::span(Phase::AttentionCore, layer);
        let kv = kv.reshape((total, nh, nope + vd))?.transpose(0, 1)?; // [nh, total, nope + vd]
        let k_nope = kv.narrow(2, 0, nope)?.contiguous()?;
        let v = kv.narrow(2, nope, vd)?.contiguous()?; // [nh, total, vd]

        // q·k = q_nope·k_nope (per head) + q_rot·k_rot (one key for all heads).
        let scores_nope = q_nope.matmul(&k_nope.t()?)?; // [nh, n, total]
        let k_rot_t = k_rot.squeeze(0)?.t()?.contiguous()?; // [rope, total]
        let scores_rot = q_rot
            .reshape((nh * n, rope))?
            .matmul(&k_rot_t)?
            .reshape((nh, n, total))?;
        let scores = ((scores_nope + scores_rot)? * self.config.softmax_scale())?;
        let scores = if n > 1 {
            let mask = causal_mask(n, total, None, x.device())?; // [n, total]
            scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?
        } else {
            scores
        };
        let out = softmax_last_dim(&scores)?.matmul(&v)?; // [nh, n, vd]
        let out = out.transpose(0, 1)?.reshape((n, nh * vd))?;
        drop(core);
        let _proj = profile::span(Phase::AttentionProjections, layer);
        self.o_proj.forward(&out)
    }
}
