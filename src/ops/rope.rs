use candle_core::{DType, Device, Result, Tensor};

/// Rotary position embedding in the "rotate half" (GPT-NeoX) layout that all
/// supported architectures use. Tables cover every position up to the context length.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Tensor, // [max_positions, head_dim / 2]
    sin: Tensor, // [max_positions, head_dim / 2]
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        // Frequencies in f64, then rounded, to match transformers' float32 inv_freq.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
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
