use std::cell::Cell;

use candle_core::Tensor;

use super::kernels::silu_mul;
use super::linear::with_thread_scratch;
use super::quant::QuantizedActs;
use super::{Linear, QuantKind};
use crate::error::{Error, Result};

/// SwiGLU feed-forward, `down(act(gate(x), up(x)))`: a routed expert, a shared
/// expert and a dense MLP layer are all this. Gate and up are one fused matrix
/// (`[2 * ffn, hidden]`, gate rows first) so a token batch reads it in one pass;
/// either may carry a bias (gpt-oss's experts do).
#[derive(Debug, Clone)]
pub struct Ffn {
    gate_up: Linear,
    down: Linear,
    activation: GluActivation,
}

/// How the gate and up halves are combined.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum GluActivation {
    /// `silu(gate) * up`.
    #[default]
    SiLU,
    /// gpt-oss's clamped SwiGLU (transformers `GptOssExperts._apply_gate`):
    /// `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`,
    /// `(u + 1) * g * sigmoid(alpha * g)`.
    Clamped { alpha: f32, limit: f32 },
}

impl GluActivation {
    /// `out = act(gate, up)` element-wise.
    pub fn apply(self, gate: &[f32], up: &[f32], out: &mut [f32]) {
        match self {
            GluActivation::SiLU => silu_mul(gate, up, out),
            GluActivation::Clamped { alpha, limit } => {
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    let g = g.min(limit);
                    let u = u.clamp(-limit, limit);
                    *o = (u + 1.0) * g / (1.0 + (-alpha * g).exp());
                }
            }
        }
    }

    /// The same on tensors (the differentiable form).
    fn forward(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok(match self {
            GluActivation::SiLU => (candle_nn::ops::silu(gate)? * up)?,
            GluActivation::Clamped { alpha, limit } => {
                let limit = f64::from(limit);
                let g = gate.minimum(limit)?;
                let u = up.clamp(-limit, limit)?;
                let glu = (&g * candle_nn::ops::sigmoid(&(&g * f64::from(alpha))?)?)?;
                ((u + 1.0)? * glu)?
            }
        })
    }
}

impl Ffn {
    pub fn new(gate_up: Linear, down: Linear) -> Self {
        Self {
            gate_up,
            down,
            activation: GluActivation::SiLU,
        }
    }

    /// The same matrices with another gate/up activation.
    pub fn with_activation(self, activation: GluActivation) -> Self {
        Self { activation, ..self }
    }

    pub fn activation(&self) -> GluActivation {
        self.activation
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
        Ok(
            Ffn::new(self.gate_up.quantize(kind)?, self.down.quantize(kind)?)
                .with_activation(self.activation),
        )
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
        let h = self.activation.forward(&gate, &up)?;
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
        self.activate(n, scratch);
        self.down.forward_f32(&scratch.h, n, ffn, y)
    }

    /// [`Ffn::forward_f32`] on rows `rows` of a MoE layer call's shared input
    /// (its quantization made once for all experts), on this thread's scratch.
    ///
    /// # Shapes
    /// `input: [n, hidden]`, `rows: [m]` -> `y: [m, hidden]` (overwritten)
    pub fn forward_rows(&self, input: &FfnInput, rows: &[usize], y: &mut [f32]) -> Result<()> {
        let hidden = input.cols;
        if let Some(&bad) = rows.iter().find(|&&r| r >= input.n) {
            return Err(Error::InvalidInput(format!(
                "expert input row {bad} of a [{}, {hidden}] layer input",
                input.n
            )));
        }
        let m = rows.len();
        let all_in_order = m == input.n && rows.iter().enumerate().all(|(i, &r)| i == r);
        with_thread_scratch(&SCRATCH, |s| {
            if !(input.quantized && self.gate_up.reads_quantized()) {
                let (x, scratch) = (&mut s.x, &mut s.ffn);
                x.clear();
                for &r in rows {
                    x.extend_from_slice(&input.x[r * hidden..(r + 1) * hidden]);
                }
                return self.forward_f32(x, m, y, scratch);
            }
            let acts = if all_in_order {
                &input.acts
            } else {
                s.acts.gather_rows(&input.acts, rows);
                &s.acts
            };
            let ffn = self.ffn_dim();
            let scratch = &mut s.ffn;
            scratch.gate_up.resize(m * 2 * ffn, 0.0);
            scratch.h.resize(m * ffn, 0.0);
            self.gate_up.forward_quantized(acts, &mut scratch.gate_up)?; // [m, 2 * ffn]
            self.activate(m, scratch);
            self.down.forward_f32(&scratch.h, m, ffn, y)
        })
    }

    /// `h = act(gate, up)` per row of `scratch.gate_up`.
    fn activate(&self, m: usize, scratch: &mut FfnScratch) {
        let ffn = self.ffn_dim();
        for (gu, h) in scratch
            .gate_up
            .chunks_exact(2 * ffn)
            .zip(scratch.h.chunks_exact_mut(ffn))
            .take(m)
        {
            let (gate, up) = gu.split_at(ffn);
            self.activation.apply(gate, up, h);
        }
    }
}

/// Intermediate buffers of [`Ffn::forward_f32`].
#[derive(Debug, Default)]
pub struct FfnScratch {
    gate_up: Vec<f32>, // [n, 2 * ffn]
    h: Vec<f32>,       // [n, ffn]
}

/// What [`Ffn::forward_rows`] keeps per thread between calls.
#[derive(Debug, Default)]
struct RowsScratch {
    x: Vec<f32>,         // [m, hidden]: gathered rows, for weights that read f32
    acts: QuantizedActs, // [m, hidden]: gathered quantized rows
    ffn: FfnScratch,
}

thread_local! {
    static SCRATCH: Cell<RowsScratch> = Cell::new(RowsScratch::default());
}

/// A MoE layer call's input `[n, hidden]`, kept in f32 and (for experts whose
/// weights read quantized activations) quantized once for all of them: decode
/// used to quantize the same row once per expert.
#[derive(Debug, Default)]
pub struct FfnInput {
    x: Vec<f32>, // [n, hidden]
    acts: QuantizedActs,
    quantized: bool,
    n: usize,
    cols: usize,
}

impl FfnInput {
    /// Re-fills the input from `x: [n, cols]`, reusing the buffers; `quantize`
    /// when the experts it feeds read quantized activations.
    pub fn fill(&mut self, x: &[f32], n: usize, cols: usize, quantize: bool) -> Result<()> {
        if x.len() != n * cols {
            return Err(Error::InvalidInput(format!(
                "expert input of {} values is not [{n}, {cols}]",
                x.len()
            )));
        }
        self.x.clear();
        self.x.extend_from_slice(x);
        self.quantized = quantize;
        if quantize {
            self.acts.quantize_from(x, n, cols);
        }
        (self.n, self.cols) = (n, cols);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn clamped_swiglu_matches_the_gpt_oss_formula_on_slices_and_tensors() {
        let act = GluActivation::Clamped {
            alpha: 1.702,
            limit: 7.0,
        };
        let gate = [-20.0f32, -1.0, 0.0, 0.5, 6.9, 7.5, 30.0];
        let up = [-9.0f32, -7.5, 0.3, 1.0, 7.1, -2.0, 8.0];
        let mut out = [0f32; 7];
        act.apply(&gate, &up, &mut out);
        for i in 0..gate.len() {
            let g = f64::from(gate[i]).min(7.0);
            let u = f64::from(up[i]).clamp(-7.0, 7.0);
            let want = (u + 1.0) * g / (1.0 + (-1.702 * g).exp());
            assert!(
                (f64::from(out[i]) - want).abs() < 1e-5 * (1.0 + want.abs()),
                "{i}"
            );
        }
        // Above the limit the gate saturates: 7.5 and 30 give the same glu.
        assert_eq!(out[5] / (-2.0 + 1.0), out[6] / (7.0 + 1.0));
        let dev = &Device::Cpu;
        let t = act
            .forward(
                &Tensor::new(&gate, dev).unwrap(),
                &Tensor::new(&up, dev).unwrap(),
            )
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in t.iter().zip(&out) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
