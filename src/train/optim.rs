//! AdamW with its state in the open, plus the learning-rate schedule.
//!
//! The update is `candle_nn::AdamW`'s, term for term; it is re-stated here because
//! that type keeps its moments private and `--resume` must save and restore them.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::vars::VarStore;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not norms or biases).
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

#[derive(Debug)]
pub struct AdamW {
    params: AdamWParams,
    /// Steps taken so far (the bias correction's `t`).
    pub step_t: usize,
    /// Per parameter name: first and second moments.
    moments: BTreeMap<String, (Var, Var)>,
}

impl AdamW {
    pub fn new(vars: &VarStore, params: AdamWParams) -> Result<Self> {
        let mut moments = BTreeMap::new();
        for (name, var) in vars.iter() {
            let zeros = || Var::zeros(var.shape(), var.dtype(), var.device());
            moments.insert(name.clone(), (zeros()?, zeros()?));
        }
        Ok(Self {
            params,
            step_t: 0,
            moments,
        })
    }

    /// One update with learning rate `lr`, every gradient first multiplied by
    /// `grad_scale` (gradient clipping).
    pub fn step(
        &mut self,
        vars: &VarStore,
        grads: &GradStore,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step_t += 1;
        let p = self.params;
        let t = self.step_t as i32;
        let scale_m = 1.0 / (1.0 - p.beta1.powi(t));
        let scale_v = 1.0 / (1.0 - p.beta2.powi(t));
        for (name, theta) in vars.iter() {
            let Some(g) = grads.get(theta) else { continue };
            let (m, v) = self.moments.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                hint: " (no optimizer state)".into(),
            })?;
            let g = (g * grad_scale)?;
            let next_m = ((m.as_tensor() * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let next_v = ((v.as_tensor() * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let decay = if theta.rank() >= 2 {
                lr * p.weight_decay
            } else {
                0.0
            };
            let next_theta = (theta.as_tensor() * (1.0 - decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let next_theta = (next_theta - (adjusted * lr)?)?;
            m.set(&next_m)?;
            v.set(&next_v)?;
            theta.set(&next_theta)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (name, (m, v)) in &self.moments {
            out.insert(format!("m.{name}"), m.as_tensor().detach());
            out.insert(format!("v.{name}"), v.as_tensor().detach());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step_t: usize) -> Result<()> {
        for (name, (m, v)) in &self.moments {
            for (prefix, var) in [("m", m), ("v", v)] {
                let key = format!("{prefix}.{name}");
                let t = tensors.get(&key).ok_or_else(|| Error::MissingTensor {
                    name: key.clone(),
                    hint: " (in the optimizer checkpoint)".into(),
                })?;
                var.set(t)?;
            }
        }
        self.step_t = step_t;
        Ok(())
    }
}

/// Global L2 norm of all gradients, summed in the store's (name) order.
pub fn grad_norm(vars: &VarStore, grads: &GradStore) -> Result<f64> {
    let mut total = 0f64;
    for (_, var) in vars.iter() {
        if let Some(g) = grads.get(var) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(total.sqrt())
}

/// Linear warm-up to `peak`, then cosine decay to `peak * min_ratio` at `total` steps.
pub fn cosine_lr(step: usize, warmup: usize, total: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_lr_warms_up_then_decays_to_floor() {
        assert!((cosine_lr(0, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((cosine_lr(9, 10, 100, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(10, 10, 100, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(100, 10, 100, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!(cosine_lr(50, 10, 100, 1.0, 0.1) < cosine_lr(30, 10, 100, 1.0, 0.1));
    }
}
