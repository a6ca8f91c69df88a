use candle_core::{Result, Tensor};

use super::Linear;

/// SwiGLU feed-forward, `down(silu(gate(x)) * up(x))`: a routed expert, a shared
/// expert and a dense MLP layer are all this. Gate and up are one fused matrix
/// (`[2 * ffn, hidden]`, gate rows first) so a token batch reads it in one pass.
#[derive(Debug, Clone)]
pub struct Ffn {
    gate_up: Linear,
    down: Linear,
}

impl Ffn {
    pub fn new(gate_up: Linear, down: Linear) -> Self {
        Self { gate_up, down }
    }

    pub fn gate_up(&self) -> &Linear {
        &self.gate_up
    }

    pub fn down(&self) -> &Linear {
        &self.down
    }

    /// Width of the hidden SwiGLU layer.
    pub fn ffn_dim(&self) -> usize {
        self.down.dims().1
    }

    pub fn weight_bytes(&self) -> usize {
        self.gate_up.weight_bytes() + self.down.weight_bytes()
    }

    /// # Shapes
    /// `x: [n, hidden] -> [n, hidden]`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ffn = self.ffn_dim();
        let gate_up = self.gate_up.forward(x)?; // [n, 2 * ffn]
        let gate = gate_up.narrow(1, 0, ffn)?;
        let up = gate_up.narrow(1, ffn, ffn)?;
        let h = (candle_nn::ops::silu(&gate)? * up)?;
        self.down.forward(&h)
    }
}
