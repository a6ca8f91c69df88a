use candle_core::{DType, Device, Result, Tensor};

/// Rotary position embedding in the "rotate half" (GPT-NeoX) layout that all
/// supported architectures use. Tables cover every position up to the context length.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Tensor, // [max_positions, head_dim / 2]
    sin: Tensor, // [max_positions, head_dim / 2]
}

/// YaRN context extension (Peng et al. 2023, "YaRN: Efficient Context Window
/// Extension"), as transformers' `_compute_yarn_parameters` computes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    /// Context growth over the pretraining context.
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    /// Rotations bounding the extrapolated (fast) and interpolated (slow) dimensions.
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Round the correction range outwards to whole dimensions (transformers'
    /// default; gpt-oss sets `truncate: false`).
    pub truncate: bool,
    /// The cos/sin scale; `None` derives it from `factor` (and DeepSeek's
    /// `mscale` / `mscale_all_dim`) as transformers does.
    pub attention_factor: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
}

impl Yarn {
    /// Per-pair inverse frequencies and the cos/sin scale.
    pub fn inv_freq(&self, head_dim: usize, theta: f64) -> (Vec<f32>, f64) {
        let dim = head_dim as f64;
        let get_mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        let attention = self
            .attention_factor
            .unwrap_or(match (self.mscale, self.mscale_all_dim) {
                (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                    get_mscale(self.factor, m) / get_mscale(self.factor, a)
                }
                _ => get_mscale(self.factor, 1.0),
            });
        let correction_dim = |rotations: f64| {
            let max_pos = self.original_max_position_embeddings as f64;
            dim * (max_pos / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (
            correction_dim(self.beta_fast),
            correction_dim(self.beta_slow),
        );
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001; // as upstream: no zero-width ramp
        }
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                let pos_freq = theta.powf((2 * i) as f64 / dim);
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let f = 1.0 / (self.factor * pos_freq) * (1.0 - extrapolation)
                    + 1.0 / pos_freq * extrapolation;
                f as f32
            })
            .collect();
        (inv_freq, attention)
    }
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Result<Self> {
        // Frequencies in f64, then rounded, to match transformers' float32 inv_freq.
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        Self::from_inv_freq(&inv_freq, 1.0, max_positions, device)
    }

    /// A YaRN-scaled table (see [`Yarn`]).
    pub fn yarn(
        head_dim: usize,
        theta: f64,
        yarn: &Yarn,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let (inv_freq, attention) = yarn.inv_freq(head_dim, theta);
        Self::from_inv_freq(&inv_freq, attention as f32, max_positions, device)
    }

    /// `cos(p f) * scale`, `sin(p f) * scale` for every position `p` and frequency `f`.
    fn from_inv_freq(
        inv_freq: &[f32],
        scale: f32,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos() * scale);
                sin.push(angle.sin() * scale);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
        })
    }

    /// # Shapes
    /// `x: [heads, seq, head_dim]`, positions `start..start + seq`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let seq = x.dim(1)?;
        let cos = self.cos.narrow(0, start, seq)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, start, seq)?.to_dtype(x.dtype())?;
        let x4 = x.unsqueeze(0)?;
        let y = if x.track_op() {
            candle_nn::rotary_emb::rope_slow(&x4, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&x4.contiguous()?, &cos, &sin)?
        };
        y.squeeze(0)
    }

    pub fn dtype(&self) -> DType {
        self.cos.dtype()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_matches_transformers_inv_freq() {
        // transformers 5.23 `_compute_yarn_parameters` for gpt-oss (head_dim 64, theta
        // 1.5e5, factor 32, original context 4096, beta 32/1), without truncation (its
        // config) and with (the default): entries 0, 8, 9, 12, 16, 17, 20, 31.
        let mut y = Yarn {
            factor: 32.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: false,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
        };
        let at = [0, 8, 9, 12, 16, 17, 20, 31];
        let untruncated = [
            1.0,
            5.081_327e-2,
            3.170_569_6e-2,
            6.794_959e-3,
            4.564_839e-4,
            1.293_187e-4,
            1.818_834e-5,
            3.023_511_4e-7,
        ];
        let truncated = [
            1.0,
            5.081_327e-2,
            3.162_075e-2,
            7.015_714e-3,
            5.809_475e-4,
            2.279_478e-4,
            1.818_834e-5,
            3.023_511_4e-7,
        ];
        for (truncate, want) in [(false, untruncated), (true, truncated)] {
            y.truncate = truncate;
            let (f, a) = y.inv_freq(64, 1.5e5);
            assert!((a - 1.346_573_590_279_972_7).abs() < 1e-12, "{a}");
            for (&i, w) in at.iter().zip(want) {
                assert!(
                    (f[i] / w - 1.0).abs() < 2e-6,
                    "truncate {truncate} [{i}]: {} vs {w}",
                    f[i]
                );
            }
        }
    }
}
