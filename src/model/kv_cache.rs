//! Per-sequence key/value cache. Buffers are preallocated and written in place,
//! so a decode step copies only its own new keys and values, never the history.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

#[derive(Debug)]
pub struct KvCache {
    /// `[layer] -> (k, v)`, each `[n_kv_heads, capacity, head_dim]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    capacity: usize,
    max_capacity: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
}

impl KvCache {
    /// A cache that can grow to the model's context length; `initial_capacity`
    /// positions are allocated when the first token arrives.
    pub fn new(config: &ModelConfig, initial_capacity: usize, dtype: DType) -> Self {
        let max_capacity = config.max_position_embeddings;
        Self {
            layers: vec![None; config.num_layers],
            len: 0,
            capacity: initial_capacity.clamp(1, max_capacity.max(1)),
            max_capacity,
            n_kv_heads: config.attention.num_kv_heads,
            head_dim: config.attention.head_dim,
            dtype,
        }
    }

    /// Tokens cached so far: the position the next token will take.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the cache holds now.
    pub fn allocated_bytes(&self) -> usize {
        let per_layer =
            2 * self.n_kv_heads * self.capacity * self.head_dim * self.dtype.size_in_bytes();
        per_layer * self.layers.iter().filter(|l| l.is_some()).count()
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drops everything after the first `len` positions (for re-using a prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Writes `n` new positions for `layer` after the cached ones and returns
    /// views of all `len + n` keys and values. [`KvCache::advance`] commits them.
    ///
    /// # Shapes
    /// `k, v: [n_kv_heads, n, head_dim] -> ([n_kv_heads, len + n, head_dim], same)`
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let needed = self.len + n;
        if needed > self.max_capacity {
            return Err(Error::InvalidInput(format!(
                "sequence of {needed} tokens exceeds the model's context of {} (max_position_embeddings)",
                self.max_capacity
            )));
        }
        if needed > self.capacity {
            self.grow(needed.next_power_of_two().min(self.max_capacity))?;
        }
        let (kb, vb) = match &self.layers[layer] {
            Some(kv) => kv.clone(),
            None => {
                let shape = (self.n_kv_heads, self.capacity, self.head_dim);
                let kv = (
                    Tensor::zeros(shape, self.dtype, &Device::Cpu)?,
                    Tensor::zeros(shape, self.dtype, &Device::Cpu)?,
                );
                self.layers[layer] = Some(kv.clone());
                kv
            }
        };
        kb.slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 1, self.len)?;
        Ok((kb.narrow(1, 0, needed)?, vb.narrow(1, 0, needed)?))
    }

    /// Commits `n` positions written by `append` on every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    fn grow(&mut self, capacity: usize) -> Result<()> {
        for slot in self.layers.iter_mut() {
            if let Some((k, v)) = slot.take() {
                let shape = (self.n_kv_heads, capacity, self.head_dim);
                let nk = Tensor::zeros(shape, self.dtype, &Device::Cpu)?;
                let nv = Tensor::zeros(shape, self.dtype, &Device::Cpu)?;
                if self.len > 0 {
                    nk.slice_set(&k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    nv.slice_set(&v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                *slot = Some((nk, nv));
            }
        }
        self.capacity = capacity;
        Ok(())
    }
}
