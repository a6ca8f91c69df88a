//! Per-sequence key/value cache. Buffers are preallocated and written in place,
//! so a decode step copies only its own new keys and values, never the history.
//!
//! A sliding-window layer (gpt-oss's `sliding_attention`) keeps only the positions
//! its queries can still see: at most `window - 1` old ones plus the step's new
//! ones. Its buffer holds about `2 * window` rows; when it fills, the newest
//! `window - 1` rows move to the front (one copy every ~`window` decode steps).

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// One layer's buffers: row `i` holds position `base + i`.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor, // [n_kv_heads, rows, k_width]
    v: Tensor, // [n_kv_heads, rows, v_width]
    base: usize,
    rows: usize,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Per layer: `Some(w)` keeps only what a sliding window of `w` still sees.
    windows: Vec<Option<usize>>,
    len: usize,
    initial_capacity: usize,
    max_capacity: usize,
    n_kv_heads: usize,
    /// Widths of a cached key and value row: `head_dim` each, or under
    /// multi-head latent attention the latent and the rotary key.
    k_width: usize,
    v_width: usize,
    dtype: DType,
}

impl KvCache {
    /// A cache that can grow to the model's context length; `initial_capacity`
    /// positions are allocated per layer when the first token arrives. Every layer
    /// keeps all positions until [`KvCache::with_windows`] says otherwise.
    pub fn new(config: &ModelConfig, initial_capacity: usize, dtype: DType) -> Self {
        let max_capacity = config.max_position_embeddings;
        let (n_kv_heads, k_width, v_width) = config.attention.cache_row();
        Self {
            layers: vec![None; config.num_layers],
            windows: vec![None; config.num_layers],
            len: 0,
            initial_capacity: initial_capacity.clamp(1, max_capacity.max(1)),
            max_capacity,
            n_kv_heads,
            k_width,
            v_width,
            dtype,
        }
    }

    /// Bounds the layers with a sliding window (`windows[layer]`, `None` = full).
    pub fn with_windows(mut self, windows: Vec<Option<usize>>) -> Self {
        self.windows = windows;
        self.windows.resize(self.layers.len(), None);
        self
    }

    /// Tokens cached so far: the position the next token will take.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn row_bytes(&self) -> usize {
        self.n_kv_heads * (self.k_width + self.v_width) * self.dtype.size_in_bytes()
    }

    /// Bytes the cache holds now.
    pub fn allocated_bytes(&self) -> usize {
        let rows: usize = self.layers.iter().flatten().map(|l| l.rows).sum();
        rows * self.row_bytes()
    }

    /// The most bytes this cache can hold for a sequence of `len` positions fed in
    /// steps of at most `max_step` tokens: full layers hold `len` rows, sliding
    /// ones `max(2 window, window - 1 + max_step)` whatever the length.
    pub fn bytes_bound(&self, len: usize, max_step: usize) -> usize {
        let rows: usize = self
            .windows
            .iter()
            .map(|w| match w {
                Some(w) => len.min(window_rows(*w, max_step)),
                None => len,
            })
            .sum();
        rows * self.row_bytes()
    }

    pub fn clear(&mut self) {
        self.len = 0;
        for l in self.layers.iter_mut().flatten() {
            l.base = 0;
        }
    }

    /// Drops everything after the first `len` positions (for re-using a prefix).
    /// A sliding layer that no longer holds the window before `len` cannot be
    /// rolled back that far, which is an error.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let len = self.len.min(len);
        for (l, w) in self.layers.iter().zip(&self.windows) {
            if let (Some(l), Some(w)) = (l, w)
                && l.base > len.saturating_sub(w - 1)
            {
                return Err(Error::InvalidInput(format!(
                    "cannot roll the KV cache back to {len} positions: a sliding-window layer (window {w}) only keeps positions from {}",
                    l.base
                )));
            }
        }
        self.len = len;
        Ok(())
    }

    /// Writes `n` new positions for `layer` after the cached ones and returns
    /// views of the keys and values the new positions may attend to, oldest
    /// first and ending with the new ones: every position for a full layer, the
    /// `window - 1` before the first new one (or fewer) for a sliding layer.
    /// [`KvCache::advance`] commits them.
    ///
    /// # Shapes
    /// `k: [n_kv_heads, n, k_width], v: [n_kv_heads, n, v_width]` -> the
    /// same with `seen` rows
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let end = self.len + n;
        if end > self.max_capacity {
            return Err(Error::InvalidInput(format!(
                "sequence of {end} tokens exceeds the model's context of {} (max_position_embeddings)",
                self.max_capacity
            )));
        }
        let window = self.windows.get(layer).copied().flatten();
        // The first position any new query may see.
        let first = window.map_or(0, |w| self.len.saturating_sub(w.max(1) - 1));
        let mut kv = match self.layers[layer].take() {
            Some(kv) => kv,
            None => {
                let rows = match window {
                    Some(w) => window_rows(w, n).min(self.max_capacity),
                    None => self.initial_capacity.max(n),
                };
                self.alloc(rows, 0)?
            }
        };
        if end - kv.base > kv.rows {
            let rows = match window {
                Some(w) => window_rows(w, n),
                None => end.next_power_of_two(),
            };
            kv = self.moved(&kv, first, rows.min(self.max_capacity))?;
        }
        let at = self.len - kv.base;
        kv.k.slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 1, at)?;
        kv.v.slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 1, at)?;
        let from = first.max(kv.base) - kv.base;
        let views = (
            kv.k.narrow(1, from, end - kv.base - from)?,
            kv.v.narrow(1, from, end - kv.base - from)?,
        );
        self.layers[layer] = Some(kv);
        Ok(views)
    }

    /// Commits `n` positions written by `append` on every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    fn alloc(&self, rows: usize, base: usize) -> Result<LayerKv> {
        let (heads, kw, vw) = (self.n_kv_heads, self.k_width, self.v_width);
        Ok(LayerKv {
            k: Tensor::zeros((heads, rows, kw), self.dtype, &Device::Cpu)?,
            v: Tensor::zeros((heads, rows, vw), self.dtype, &Device::Cpu)?,
            base,
            rows,
        })
    }

    /// A buffer of `rows` rows starting at position `first`, holding `kv`'s cached
    /// positions from `first` on.
    fn moved(&self, kv: &LayerKv, first: usize, rows: usize) -> Result<LayerKv> {
        let new = self.alloc(rows, first)?;
        let keep = self.len.saturating_sub(first);
        if keep > 0 {
            let from = first - kv.base;
            new.k
                .slice_set(&kv.k.narrow(1, from, keep)?.contiguous()?, 1, 0)?;
            new.v
                .slice_set(&kv.v.narrow(1, from, keep)?.contiguous()?, 1, 0)?;
        }
        Ok(new)
    }
}

/// Rows a sliding layer's buffer gets for a step of `n` new positions: room for
/// the `window - 1` kept ones and the step, and at least `2 * window` so decode
/// moves rows only once every ~`window` steps.
fn window_rows(window: usize, n: usize) -> usize {
    (window.saturating_sub(1) + n).max(2 * window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(window: Option<usize>) -> KvCache {
        KvCache {
            layers: vec![None],
            windows: vec![window],
            len: 0,
            initial_capacity: 2,
            max_capacity: 1000,
            n_kv_heads: 1,
            k_width: 1,
            v_width: 1,
            dtype: DType::F32,
        }
    }

    /// `[1, n, 1]` keys holding their own positions.
    fn positions(start: usize, n: usize) -> Tensor {
        let v: Vec<f32> = (start..start + n).map(|p| p as f32).collect();
        Tensor::from_vec(v, (1, n, 1), &Device::Cpu).unwrap()
    }

    fn step(c: &mut KvCache, n: usize) -> Vec<f32> {
        let k = positions(c.len(), n);
        let (k, _) = c.append(0, &k, &k).unwrap();
        c.advance(n);
        k.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn full_layers_see_every_position() {
        let mut c = cache(None);
        assert_eq!(step(&mut c, 3), vec![0.0, 1.0, 2.0]);
        for _ in 0..5 {
            step(&mut c, 1);
        }
        let all: Vec<f32> = (0..9).map(|p| p as f32).collect();
        assert_eq!(step(&mut c, 1), all);
    }

    #[test]
    fn sliding_layers_keep_only_what_the_window_sees() {
        let w = 4;
        let mut c = cache(Some(w));
        // A prefill longer than the window: all its positions (the mask bands them).
        assert_eq!(
            step(&mut c, 6),
            (0..6).map(|p| p as f32).collect::<Vec<_>>()
        );
        for _ in 0..50 {
            let got = step(&mut c, 1);
            let newest = c.len() - 1;
            let want: Vec<f32> = (newest + 1 - w..=newest).map(|p| p as f32).collect();
            assert_eq!(got, want, "at position {newest}");
        }
        // Rows of 8 bytes (one head of one f32 key and value): 2 * window of them.
        assert_eq!(c.allocated_bytes(), 2 * w * 8);
        // A chunk after decode: the window before it plus the chunk.
        let start = c.len();
        let got = step(&mut c, 5);
        let want: Vec<f32> = (start + 1 - w..start + 5).map(|p| p as f32).collect();
        assert_eq!(got, want);
        assert_eq!(c.bytes_bound(10_000, 1), 2 * w * 8);
        assert_eq!(c.bytes_bound(10_000, 6), (w - 1 + 6) * 8);
        // Rolling back within the kept positions works; past them it is refused.
        assert!(c.truncate(c.len() - 2).is_ok());
        assert!(c.truncate(3).is_err());
    }
}
