//! The losses a step minimises besides next-token cross-entropy: Switch-style
//! load balancing (Fedus et al. 2021, eq. 4) and the router z-loss (Zoph et al.
//! 2022, ST-MoE eq. 5).

use candle_core::{D, DType, Tensor};

use crate::config::RouterSpec;
use crate::error::Result;
use crate::model::moe::{RouterBias, RouterConfig, route};

pub struct RouterLosses {
    /// Mean over layers of `E * sum_i f_i * P_i`; 1.0 when perfectly balanced.
    pub balance: Tensor,
    /// Mean over layers and tokens of `logsumexp(router logits)^2`.
    pub z: Tensor,
    /// Per layer: the fraction of token slots each expert received.
    pub loads: Vec<Vec<f64>>,
}

/// # Shapes
/// each `router_logits[l]: [n_tokens, n_experts]`.
pub fn router_losses(router_logits: &[Tensor], top_k: usize) -> Result<RouterLosses> {
    let mut balance = Vec::with_capacity(router_logits.len());
    let mut z = Vec::with_capacity(router_logits.len());
    let mut loads = Vec::with_capacity(router_logits.len());
    for logits in router_logits {
        let logits = logits.to_dtype(DType::F32)?;
        let (n_tokens, n_experts) = logits.dims2()?;
        // f_i: the share of slots the (non-differentiable) top-k gave expert i.
        let values = logits.detach().flatten_all()?.to_vec1::<f32>()?;
        let routing = route(
            &values,
            n_experts,
            RouterConfig {
                top_k,
                spec: RouterSpec::SOFTMAX,
                top_p: None,
            },
            RouterBias::default(),
        );
        let mut share = vec![0f64; n_experts];
        for &e in &routing.expert_ids {
            share[e as usize] += 1.0 / (n_tokens * top_k) as f64;
        }
        // P_i: the mean router probability of expert i (carries the gradient).
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?; // [n_tokens, n_experts]
        let mean_prob = probs.mean(0)?; // [n_experts]
        let f: Vec<f32> = share.iter().map(|&s| s as f32).collect();
        let f = Tensor::new(f.as_slice(), logits.device())?;
        balance.push(((mean_prob * f)?.sum_all()? * n_experts as f64)?);
        z.push(logits.log_sum_exp(D::Minus1)?.sqr()?.mean_all()?);
        loads.push(share);
    }
    let mean = |parts: Vec<Tensor>| -> Result<Tensor> {
        if parts.is_empty() {
            return Ok(Tensor::zeros((), DType::F32, &candle_core::Device::Cpu)?);
        }
        let n = parts.len() as f64;
        Ok((Tensor::stack(&parts, 0)?.sum_all()? / n)?)
    };
    Ok(RouterLosses {
        balance: mean(balance)?,
        z: mean(z)?,
        loads,
    })
}
