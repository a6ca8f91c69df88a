//! What a placement is planned from: tokens per expert per layer, and how
//! tokens move from one layer's experts to the next layer's.

use std::path::Path;

use crate::error::{Error, Result};
use crate::trace::{Routes, TokenExperts};

/// Routing statistics of a trace (or of an engine's expert-distribution dump).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingCounts {
    pub num_experts: usize,
    /// Decoder layers of the model, dense ones included.
    pub num_layers: usize,
    /// The layers that route, ascending; the rows below follow them.
    pub moe_layers: Vec<usize>,
    /// `[moe_layers][num_experts]`: tokens routed to each expert.
    pub load: Vec<Vec<f64>>,
    /// `[moe_layers][steps * num_experts]`: the same per step of the replay
    /// (`simulate`'s steps: consecutive tokens, sequences in order), entry
    /// `s * E + e`. One step holding everything where the source has no order.
    pub step_load: Vec<Vec<f64>>,
    /// `[moe_layers - 1][num_experts * num_experts]`: entry `i * E + j` of
    /// boundary `b` counts tokens whose rank-0 expert in MoE layer `b` is `i`
    /// and that choose `j` in layer `b + 1` (MoETuner's cross-layer
    /// dependency: a token's activation leaves the device of the expert that
    /// weighs most). `None` where the source only counts tokens.
    pub transitions: Option<Vec<Vec<f64>>>,
    /// Every token's experts, for scoring traffic as `simulate` counts it.
    pub tokens: Option<TokenRoutes>,
}

/// The tokens of a trace in replay order (sequences in order, positions
/// ascending; token `g` is the replay's `g`-th), per MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRoutes {
    /// `[moe_layers]`: each token's experts, best first.
    pub layers: Vec<TokenExperts>,
    /// `[moe_layers][expert]`: the tokens choosing the expert, ascending.
    pub by_expert: Vec<Vec<Vec<u32>>>,
    /// `[moe_layers][expert]`: the tokens whose rank-0 expert it is.
    pub by_rank0: Vec<Vec<Vec<u32>>>,
}

impl TokenRoutes {
    fn from_routes(routes: &Routes) -> Self {
        let e = routes.meta.num_experts;
        let n_moe = routes.meta.moe_layers.len();
        let mut layers = vec![TokenExperts::new(); n_moe];
        let mut by_expert = vec![vec![Vec::new(); e]; n_moe];
        let mut by_rank0 = vec![vec![Vec::new(); e]; n_moe];
        let mut g = 0u32;
        for seq in &routes.sequences {
            for t in 0..seq.n_tokens() {
                for (li, layer) in seq.layers.iter().enumerate() {
                    let experts = layer.token(t);
                    layers[li].push_token(experts);
                    for (rank, &x) in experts.iter().enumerate() {
                        if by_expert[li][x as usize].last() != Some(&g) {
                            by_expert[li][x as usize].push(g);
                        }
                        if rank == 0 {
                            by_rank0[li][x as usize].push(g);
                        }
                    }
                }
                g += 1;
            }
        }
        Self {
            layers,
            by_expert,
            by_rank0,
        }
    }

    pub fn n_tokens(&self) -> usize {
        self.layers.first().map_or(0, TokenExperts::len)
    }
}

impl RoutingCounts {
    /// Counts of `routes`, per-step loads in steps of `batch_tokens`.
    pub fn from_routes(routes: &Routes, batch_tokens: usize) -> Result<Self> {
        if batch_tokens == 0 {
            return Err(Error::InvalidInput(
                "a step needs at least one token".into(),
            ));
        }
        let e = routes.meta.num_experts;
        let n_moe = routes.meta.moe_layers.len();
        let n_steps = routes.n_tokens().div_ceil(batch_tokens).max(1);
        let mut load = vec![vec![0.0; e]; n_moe];
        let mut step_load = vec![vec![0.0; n_steps * e]; n_moe];
        let mut transitions = vec![vec![0.0; e * e]; n_moe.saturating_sub(1)];
        let mut seen = 0;
        for seq in &routes.sequences {
            for (li, layer) in seq.layers.iter().enumerate() {
                for (t, experts) in layer.tokens().enumerate() {
                    let step = (seen + t) / batch_tokens;
                    for &x in experts {
                        load[li][x as usize] += 1.0;
                        step_load[li][step * e + x as usize] += 1.0;
                    }
                    let (Some(next), Some(&top)) = (seq.layers.get(li + 1), experts.first()) else {
                        continue;
                    };
                    for &j in next.token(t) {
                        transitions[li][top as usize * e + j as usize] += 1.0;
                    }
                }
            }
            seen += seq.n_tokens();
        }
        Ok(Self {
            num_experts: e,
            num_layers: routes.meta.num_layers,
            moe_layers: routes.meta.moe_layers.clone(),
            load,
            step_load,
            transitions: Some(transitions),
            tokens: Some(TokenRoutes::from_routes(routes)),
        })
    }

    /// SGLang's expert-distribution recorder output (`logical_count`, shape
    /// `[layers, experts]` or `[steps, layers, experts]`, summed over steps),
    /// as JSON. Its rows are every decoder layer; all-zero rows (dense layers)
    /// are dropped from the MoE layers.
    pub fn from_sglang_logical_count(json: &serde_json::Value, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::trace(path, reason);
        let count = json
            .get("logical_count")
            .ok_or_else(|| bad("no \"logical_count\" field (SGLang expert distribution)".into()))?;
        let as_rows = |v: &serde_json::Value| -> Option<Vec<Vec<f64>>> {
            v.as_array()?
                .iter()
                .map(|row| row.as_array()?.iter().map(|x| x.as_f64()).collect())
                .collect()
        };
        let rows: Vec<Vec<f64>> = match as_rows(count) {
            Some(rows) => rows,
            None => {
                let steps = count.as_array().ok_or_else(|| {
                    bad("\"logical_count\" is not a nested list of numbers".into())
                })?;
                let mut sum: Option<Vec<Vec<f64>>> = None;
                for step in steps {
                    let r = as_rows(step).ok_or_else(|| {
                        bad("\"logical_count\" is not a [layers, experts] or \
                             [steps, layers, experts] list of numbers"
                            .into())
                    })?;
                    match &mut sum {
                        None => sum = Some(r),
                        Some(s) if shape(s) == shape(&r) => {
                            for (a, b) in s.iter_mut().zip(&r) {
                                for (x, y) in a.iter_mut().zip(b) {
                                    *x += y;
                                }
                            }
                        }
                        Some(s) => {
                            return Err(bad(format!(
                                "\"logical_count\" steps differ in shape: {:?} and {:?}",
                                shape(s),
                                shape(&r)
                            )));
                        }
                    }
                }
                sum.ok_or_else(|| bad("\"logical_count\" is empty".into()))?
            }
        };
        let num_experts = rows.first().map_or(0, Vec::len);
        if num_experts == 0 || rows.iter().any(|r| r.len() != num_experts) {
            return Err(bad(format!(
                "\"logical_count\" rows must all have the same, non-zero number of experts \
                 (lengths {:?})",
                rows.iter().map(Vec::len).collect::<Vec<_>>()
            )));
        }
        if rows.iter().flatten().any(|&x| x < 0.0 || !x.is_finite()) {
            return Err(bad(
                "\"logical_count\" has a negative or non-finite count".into()
            ));
        }
        let moe_layers: Vec<usize> = (0..rows.len())
            .filter(|&l| rows[l].iter().any(|&x| x > 0.0))
            .collect();
        if moe_layers.is_empty() {
            return Err(bad("\"logical_count\" counts no token in any layer".into()));
        }
        let load: Vec<Vec<f64>> = moe_layers.iter().map(|&l| rows[l].clone()).collect();
        Ok(Self {
            num_experts,
            num_layers: rows.len(),
            step_load: load.clone(),
            load,
            moe_layers,
            transitions: None,
            tokens: None,
        })
    }

    pub fn num_steps(&self) -> usize {
        self.step_load
            .first()
            .map_or(0, |r| r.len() / self.num_experts.max(1))
    }

    /// The transition counts of boundary `b` (MoE layer `b` to `b + 1`), if known.
    pub fn transition(&self, b: usize) -> Option<&[f64]> {
        self.transitions.as_ref()?.get(b).map(Vec::as_slice)
    }
}

fn shape(rows: &[Vec<f64>]) -> (usize, usize) {
    (rows.len(), rows.first().map_or(0, Vec::len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{SequenceRoutes, TraceMeta};

    #[test]
    fn counts_load_and_rank0_transitions_of_a_trace() {
        let routes = Routes {
            meta: TraceMeta {
                num_layers: 2,
                num_experts: 3,
                top_k: 2,
                moe_layers: vec![0, 1],
                model: "m".into(),
            },
            sequences: vec![SequenceRoutes {
                id: 0,
                positions: vec![0, 1],
                layers: vec![
                    TokenExperts::from_tokens(&[vec![2, 0], vec![1, 2]]),
                    TokenExperts::from_tokens(&[vec![0, 1], vec![1, 0]]),
                ],
            }],
        };
        let c = RoutingCounts::from_routes(&routes, 1).unwrap();
        assert_eq!(c.load, vec![vec![1.0, 1.0, 2.0], vec![2.0, 2.0, 0.0]]);
        // One token per step: token 0 in step 0, token 1 in step 1.
        assert_eq!(c.num_steps(), 2);
        assert_eq!(c.step_load[0], vec![1.0, 0.0, 1.0, 0.0, 1.0, 1.0]);
        assert_eq!(c.step_load[1], vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
        let t = c.transition(0).unwrap();
        // token 0: 2 -> {0, 1}; token 1: 1 -> {1, 0}.
        assert_eq!(t, &[0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn sglang_logical_count_sums_steps_and_drops_dense_layers() {
        let json = serde_json::json!({"logical_count": [
            [[0, 0], [1, 2], [3, 0]],
            [[0, 0], [1, 0], [0, 4]],
        ]});
        let c = RoutingCounts::from_sglang_logical_count(&json, Path::new("d.json")).unwrap();
        assert_eq!(c.moe_layers, vec![1, 2]);
        assert_eq!(c.load, vec![vec![2.0, 2.0], vec![3.0, 4.0]]);
        let ragged = serde_json::json!({"logical_count": [[1, 2], [3]]});
        let err = RoutingCounts::from_sglang_logical_count(&ragged, Path::new("d.json"));
        assert!(err.unwrap_err().to_string().contains("lengths [2, 1]"));
    }
}
