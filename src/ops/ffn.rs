use candle_core::Tensor;

use super::kernels::silu_mul;
use super::{Linear, QuantKind};
use crate::error::Result;

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

    /// Both matrices quantized to `kind`.
    pub fn quantize(&self, kind: QuantKind) -> Result<Ffn> {
        Ok(Ffn::new(
            self.gate_up.quantize(kind)?,
            self.down.quantize(kind)?,
        ))
    }

    /// [`Ffn::quantize`] when `kind` is set, else a copy.
    pub fn quantize_opt(self, kind: Option<QuantKind>) -> Result<Ffn> {
        match kind {
            Some(kind) => self.quantize(kind),
            None => Ok(self),
        }
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

    /// [`Ffn::forward`] on plain slices, reusing `scratch` between calls.
    ///
    /// # Shapes
    /// `x: [n, hidden]` -> `y: [n, hidden]` (overwritten)
    pub fn forward_f32(
        &self,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        scratch: &mut FfnScratch,
    ) -> Result<()> {
        let ffn = self.ffn_dim();
        let hidden = self.gate_up.dims().1;
        scratch.gate_up.resize(n * 2 * ffn, 0.0);
        scratch.h.resize(n * ffn, 0.0);
        self.gate_up
            .forward_f32(x, n, hidden, &mut scratch.gate_up)?; // [n, 2 * ffn]
        for (gu, h) in scratch
            .gate_up
            .chunks_exact(2 * ffn)
            .zip(scratch.h.chunks_exact_mut(ffn))
        {
            let (gate, up) = gu.split_at(ffn);
            silu_mul(gate, up, h);
        }
        self.down.forward_f32(&scratch.h, n, ffn, y)
    }
}

/// Intermediate buffers of [`Ffn::forward_f32`].
#[derive(Debug, Default)]
pub struct FfnScratch {
    gate_up: Vec<f32>, // [n, 2 * ffn]
    h: Vec<f32>,       // [n, ffn]
}
