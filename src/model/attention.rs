//! Causal self-attention with grouped-query heads, RoPE, optional q/k norms and
//! QKV clipping: one implementation for every architecture.
//!
//! Cost per decoded token: the four projections plus reading `len` cached
//! keys and values per KV head.

use candle_core::{DType, Tensor};

use crate::config::{AttentionConfig, QkNorm};
use crate::error::{Error, Result};
use crate::model::kv_cache::KvCache;
use crate::model::profile::{self, Phase};
use crate::ops::{Linear, RmsNorm, RopeTable, attend_cache, softmax_last_dim};

#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Present for `QkNorm::PerHead` / `QkNorm::Full`.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub config: AttentionConfig,
    /// This layer's options beyond the shared config (gpt-oss varies them per layer).
    pub layer: LayerAttention,
}

/// Per-layer attention options.
#[derive(Debug, Clone, Default)]
pub struct LayerAttention {
    /// gpt-oss's attention sinks: one learned logit per query head that joins the
    /// softmax (and takes mass away) without a value row. `[num_heads]`.
    pub sinks: Option<Vec<f32>>,
    /// Sliding-window attention: a query sees itself and the `window - 1` positions
    /// before it (transformers' `kv_idx > q_idx - sliding_window`).
    pub sliding_window: Option<usize>,
}

/// What one sequence's attention reads besides its hidden states.
pub struct AttentionInput<'a> {
    pub layer: usize,
    pub start_position: usize,
    pub rope: &'a RopeTable,
    /// `None` attends only within the given rows (training, scoring).
    pub cache: Option<&'a mut KvCache>,
}

impl Attention {
    /// Bytes of the four projection weights (what one token reads).
    pub fn weight_bytes(&self) -> usize {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
            .iter()
            .map(|p| p.weight_bytes())
            .sum()
    }

    /// # Shapes
    /// `x: [n, hidden] -> [n, hidden]`, the `n` rows being consecutive positions
    /// of one sequence starting at `input.start_position`.
    pub fn forward(&self, x: &Tensor, input: AttentionInput<'_>) -> Result<Tensor> {
        let n = x.dim(0)?;
        self.forward_batch(x, vec![(0, n, input)])
    }

    /// Several sequences' rows at once: the q/k/v and o projections run once
    /// over every row of the batch (each weight read once per step, one
    /// fork-join each, as for the experts), attention itself per sequence
    /// against its own cache. Under batch-invariant matmuls (the server's
    /// mode) every row is computed as it would be alone.
    ///
    /// # Shapes
    /// `x: [rows, hidden] -> [rows, hidden]`; `seqs`: `(first row, rows, input)`
    /// of each sequence, in row order, covering `x`.
    pub fn forward_batch(
        &self,
        x: &Tensor,
        seqs: Vec<(usize, usize, AttentionInput<'_>)>,
    ) -> Result<Tensor> {
        let layer = seqs.first().map(|(_, _, i)| i.layer);
        let proj = profile::span(Phase::AttentionProjections, layer);
        let qkv = Linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        drop(proj);
        let [q, k, v]: [Tensor; 3] = qkv
            .try_into()
            .map_err(|_| Error::InvalidInput("q/k/v projection count".into()))?; // [rows, nh * hd], [rows, nkv * hd] x2
        let mut outs = Vec::with_capacity(seqs.len());
        for (row, n, input) in seqs {
            // A narrow over all rows (one sequence) is the tensor itself.
            let rows = |t: &Tensor| t.narrow(0, row, n);
            outs.push(self.attend(rows(&q)?, rows(&k)?, rows(&v)?, input)?);
        }
        // One part (one sequence) is returned as it is.
        let out = Tensor::cat(&outs, 0)?;
        let _proj = profile::span(Phase::AttentionProjections, layer);
        self.o_proj.forward(&out)
    }

    /// One sequence's attention from its projected rows, before `o_proj`.
    ///
    /// # Shapes
    /// `q: [n, nh * hd]`, `k, v: [n, nkv * hd] -> [n, nh * hd]`
    fn attend(
        &self,
        mut q: Tensor,
        mut k: Tensor,
        mut v: Tensor,
        input: AttentionInput<'_>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let n = q.dim(0)?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let layer = Some(input.layer);
        let _core = profile::span(Phase::AttentionCore, layer);
        if cfg.qk_norm == QkNorm::Full {
            q = norm(&self.q_norm, &q)?;
            k = norm(&self.k_norm, &k)?;
        }
        // OLMoE clips after its q/k norms (v has none), before RoPE.
        if let Some(c) = cfg.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        let mut q = q.reshape((n, nh, hd))?;
        let mut k = k.reshape((n, nkv, hd))?;
        if cfg.qk_norm == QkNorm::PerHead {
            q = norm(&self.q_norm, &q)?;
            k = norm(&self.k_norm, &k)?;
        }
        let q = q.transpose(0, 1)?.contiguous()?; // [nh, n, hd]
        let k = k.transpose(0, 1)?.contiguous()?; // [nkv, n, hd]
        let v = v.reshape((n, nkv, hd))?.transpose(0, 1)?.contiguous()?; // [nkv, n, hd]
        let rotate = |x: &Tensor| match cfg.rope_interleaved {
            true => input.rope.apply_pairs(x, input.start_position),
            false => input.rope.apply(x, input.start_position),
        };
        let (q, k) = (rotate(&q)?, rotate(&k)?);

        let (k, v) = match input.cache {
            Some(cache) => cache.append(input.layer, &k, &v)?,
            None => (k, v),
        };
        let total = k.dim(1)?; // cached + new positions
        let window = self.layer.sliding_window;
        let sinks = self.layer.sinks.as_deref();

        // Heads that share a KV head are stacked as extra query rows, so the cache
        // is read in place instead of being repeated per head.
        let group = cfg.group_size();
        let q = q.reshape((nkv, group * n, hd))?;
        let scale = cfg.softmax_scale();
        if n == 1 && !q.track_op() && q.dtype() == DType::F32 && k.dtype() == DType::F32 {
            // Decode: the one new position sees the whole cache (or its window, the
            // newest positions) without a mask, read in place.
            let seen = window.map_or(total, |w| w.min(total));
            let (k, v) = (
                k.narrow(1, total - seen, seen)?,
                v.narrow(1, total - seen, seen)?,
            );
            let out = attend_cache(&q, &k, &v, scale as f32, sinks)?; // [nkv, group, hd]
            return Ok(out.reshape((1, nh * hd))?);
        }
        let scores = (q.matmul(&k.t()?)? * scale)?; // [nkv, group * n, total]
        let scores = if n > 1 || window.is_some_and(|w| w < total) {
            let mask = causal_mask(n, total, window, q.device())?; // [n, total]
            scores
                .reshape((nkv, group, n, total))?
                .broadcast_add(&mask.to_dtype(scores.dtype())?)?
                .reshape((nkv, group * n, total))?
        } else {
            scores
        };
        let probs = match sinks {
            None => softmax_last_dim(&scores)?,
            Some(sinks) => {
                // One more logit per row (its head's sink), dropped after the softmax.
                let col = Tensor::from_slice(sinks, (nkv, group, 1, 1), q.device())?
                    .broadcast_as((nkv, group, n, 1))?
                    .reshape((nkv, group * n, 1))?
                    .to_dtype(scores.dtype())?;
                softmax_last_dim(&Tensor::cat(&[&scores, &col], 2)?)?.narrow(2, 0, total)?
            }
        };
        let out = probs.matmul(&v)?; // [nkv, group * n, hd]
        let out = out
            .reshape((nh, n, hd))?
            .transpose(0, 1)?
            .reshape((n, nh * hd))?;
        Ok(out)
    }
}

fn norm(norm: &Option<RmsNorm>, x: &Tensor) -> candle_core::Result<Tensor> {
    match norm {
        Some(n) => n.forward(x),
        None => Ok(x.clone()),
    }
}

/// `[n, total]`: query `i` (at position `total - n + i`) sees keys up to its own
/// position, and with a `window`, only the `window` newest of those.
pub(super) fn causal_mask(
    n: usize,
    total: usize,
    window: Option<usize>,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let offset = total - n;
    let window = window.unwrap_or(usize::MAX);
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i || offset + i - j >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, total), device)
}
