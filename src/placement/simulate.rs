//! Trace replay: what a placement costs an expert-parallel engine, step by step.
//!
//! The model of a step, written down because every number depends on it:
//! - a step is `batch_tokens` consecutive tokens of the trace (sequences in id
//!   order, positions ascending), each token's home device `g mod N` for the
//!   `g`-th token of the trace (data-parallel attention spreads tokens evenly);
//! - in the first MoE layer a token leaves its home device; in each later one
//!   it leaves the device that ran its rank-0 expert of the layer before
//!   (MoETuner's reading: the activation follows the expert that weighs most);
//! - it is sent once to every other device holding one of its experts (the
//!   all-to-all deduplicates per device, as DeepEP does), and the same number
//!   of results come back in the combine;
//! - a replicated expert is served by the copy on the sending device if there
//!   is one, else by a copy on a device the token is sent to anyway, else on
//!   the sender's node, else copy `g mod copies` (SGLang's static dispatch
//!   keeps tokens local the same way);
//! - a device's load in a layer is the expert-token pairs it computes; a step
//!   takes as long as its most-loaded device in every layer, so per step the
//!   per-layer maxima are summed.

use serde::Serialize;

use super::{Placement, Topology};
use crate::error::{Error, Result};
use crate::trace::Routes;

#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// Tokens per step.
    pub batch_tokens: usize,
    /// Bytes of one token's activation (hidden size x element bytes), to turn
    /// token counts into bytes; `None` reports tokens only.
    pub token_bytes: Option<u64>,
}

/// Per-step means over the replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    pub steps: usize,
    pub tokens: usize,
    /// Sum over MoE layers of the most-loaded device's expert-token pairs.
    pub max_load: f64,
    /// Sum over MoE layers of the mean device's expert-token pairs.
    pub mean_load: f64,
    /// `max_load / mean_load`: 1.0 is perfect balance.
    pub imbalance: f64,
    /// Token activations sent to another device, dispatch only (the combine
    /// sends as many back).
    pub cross_device_tokens: f64,
    /// Of those, sent to a device on another node.
    pub cross_node_tokens: f64,
    /// Bytes between devices, dispatch plus combine.
    pub cross_device_bytes: Option<f64>,
    /// Bytes between nodes, dispatch plus combine.
    pub cross_node_bytes: Option<f64>,
}

/// Replays `routes` on `placement` over `topology`.
pub fn simulate(
    routes: &Routes,
    placement: &Placement,
    topology: &Topology,
    options: SimOptions,
) -> Result<SimReport> {
    let n_layers = routes.meta.moe_layers.len();
    let cap = placement.capacity;
    if placement.num_layers() != n_layers
        || cap.num_experts != routes.meta.num_experts
        || cap.devices != topology.devices
    {
        return Err(Error::InvalidInput(format!(
            "the plan places {} experts in {} MoE layers on {} devices, the trace has {} \
             experts in {} MoE layers and the replay {} devices",
            cap.num_experts,
            placement.num_layers(),
            cap.devices,
            routes.meta.num_experts,
            n_layers,
            topology.devices
        )));
    }
    if options.batch_tokens == 0 {
        return Err(Error::InvalidInput(
            "a step needs at least one token".into(),
        ));
    }
    let n = topology.devices;
    let holders: Vec<Vec<Vec<usize>>> =
        (0..n_layers).map(|l| placement.expert_devices(l)).collect();
    let tokens: Vec<(usize, usize)> = (routes.sequences.iter().enumerate())
        .flat_map(|(s, seq)| (0..seq.n_tokens()).map(move |t| (s, t)))
        .collect();

    let mut totals = Totals::default();
    let mut load = vec![0u64; n_layers * n];
    let mut dest: Vec<usize> = Vec::with_capacity(n);
    for (step, batch) in tokens.chunks(options.batch_tokens).enumerate() {
        load.fill(0);
        let (mut device_sends, mut node_sends) = (0u64, 0u64);
        for (i, &(s, t)) in batch.iter().enumerate() {
            let g = step * options.batch_tokens + i;
            let mut src = g % n;
            for (li, layer) in routes.sequences[s].layers.iter().enumerate() {
                dest.clear();
                let mut rank0_device = src;
                for (rank, &e) in layer.token(t).iter().enumerate() {
                    let d = serving_device(&holders[li][e as usize], src, &dest, topology, g);
                    load[li * n + d] += 1;
                    if !dest.contains(&d) {
                        dest.push(d);
                    }
                    if rank == 0 {
                        rank0_device = d;
                    }
                }
                for &d in dest.iter().filter(|&&d| d != src) {
                    device_sends += 1;
                    node_sends += u64::from(topology.node_of(d) != topology.node_of(src));
                }
                src = rank0_device;
            }
        }
        let (mut max_sum, mut mean_sum) = (0.0, 0.0);
        for li in 0..n_layers {
            let row = &load[li * n..(li + 1) * n];
            max_sum += row.iter().copied().max().unwrap_or(0) as f64;
            mean_sum += row.iter().sum::<u64>() as f64 / n as f64;
        }
        totals.add(max_sum, mean_sum, device_sends, node_sends);
    }
    Ok(totals.report(tokens.len(), options.token_bytes))
}

/// The device that serves expert copies `holders` for a token sent from `src`
/// to `dest` so far (rules in the module comment).
fn serving_device(
    holders: &[usize],
    src: usize,
    dest: &[usize],
    topology: &Topology,
    g: usize,
) -> usize {
    if holders.contains(&src) {
        return src;
    }
    if let Some(&d) = holders.iter().find(|d| dest.contains(d)) {
        return d;
    }
    if let Some(&d) = (holders.iter()).find(|&&d| topology.node_of(d) == topology.node_of(src)) {
        return d;
    }
    holders[g % holders.len()]
}

#[derive(Default)]
struct Totals {
    steps: usize,
    max_load: f64,
    mean_load: f64,
    device_sends: u64,
    node_sends: u64,
}

impl Totals {
    fn add(&mut self, max_load: f64, mean_load: f64, device_sends: u64, node_sends: u64) {
        self.steps += 1;
        self.max_load += max_load;
        self.mean_load += mean_load;
        self.device_sends += device_sends;
        self.node_sends += node_sends;
    }

    fn report(&self, tokens: usize, token_bytes: Option<u64>) -> SimReport {
        let per_step = |x: f64| x / self.steps.max(1) as f64;
        let device = per_step(self.device_sends as f64);
        let node = per_step(self.node_sends as f64);
        SimReport {
            steps: self.steps,
            tokens,
            max_load: per_step(self.max_load),
            mean_load: per_step(self.mean_load),
            imbalance: if self.mean_load > 0.0 {
                self.max_load / self.mean_load
            } else {
                1.0
            },
            cross_device_tokens: device,
            cross_node_tokens: node,
            cross_device_bytes: token_bytes.map(|b| 2.0 * device * b as f64),
            cross_node_bytes: token_bytes.map(|b| 2.0 * node * b as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Capacity;
    use crate::trace::{SequenceRoutes, TokenExperts, TraceMeta};

    fn routes(layers: Vec<TokenExperts>) -> Routes {
        let n = layers[0].len();
        Routes {
            meta: TraceMeta {
                num_layers: layers.len(),
                num_experts: 4,
                top_k: 2,
                moe_layers: (0..layers.len()).collect(),
                model: "m".into(),
            },
            sequences: vec![SequenceRoutes {
                id: 0,
                positions: (0..n as u32).collect(),
                layers,
            }],
        }
    }

    #[test]
    fn counts_on_a_tiny_trace_match_the_hand_worked_replay() {
        // 4 experts, 2 devices on 2 nodes; device 0 holds {0, 1}, device 1 {2, 3}.
        // token 0 (home 0): L0 {0, 2} -> sends to d1; rank-0 on d0; L1 {1} local.
        // token 1 (home 1): L0 {3}    -> local;       rank-0 on d1; L1 {0, 1} -> d0.
        // token 2 (home 0): L0 {2, 3} -> d1;          rank-0 on d1; L1 {3, 0} -> d0.
        // Steps of 2 tokens: step 0 = tokens 0, 1; step 1 = token 2.
        let r = routes(vec![
            TokenExperts::from_tokens(&[vec![0, 2], vec![3], vec![2, 3]]),
            TokenExperts::from_tokens(&[vec![1], vec![0, 1], vec![3, 0]]),
        ]);
        let cap = Capacity::with_redundant(4, 2, 0).unwrap();
        let p = Placement::new(cap, vec![vec![0, 1, 2, 3]; 2], "p").unwrap();
        let topo = Topology::new(2, 2).unwrap();
        let opts = SimOptions {
            batch_tokens: 2,
            token_bytes: Some(10),
        };
        let rep = simulate(&r, &p, &topo, opts).unwrap();
        // Step 0 loads: L0 d0 1, d1 2 -> max 2, mean 1.5; L1 d0 3, d1 0 -> max 3, mean 1.5.
        // Step 1 loads: L0 d0 0, d1 2 -> max 2, mean 1;   L1 d0 1, d1 1 -> max 1, mean 1.
        assert_eq!(rep.steps, 2);
        assert_eq!(rep.max_load, (5.0 + 3.0) / 2.0);
        assert_eq!(rep.mean_load, (3.0 + 2.0) / 2.0);
        assert_eq!(rep.imbalance, 8.0 / 5.0);
        // Sends: step 0: token 0 one (L0), token 1 one (L1); step 1: token 2 two.
        assert_eq!(rep.cross_device_tokens, 2.0);
        assert_eq!(rep.cross_node_tokens, 2.0, "every device is its own node");
        assert_eq!(rep.cross_device_bytes, Some(2.0 * 2.0 * 10.0));
    }

    #[test]
    fn a_replica_on_the_sending_device_keeps_the_token_local() {
        // Expert 0 on both devices (2 x 3 slots: {0, 1, 2} and {0, 3, 1}).
        let r = routes(vec![
            TokenExperts::from_tokens(&[vec![0], vec![0]]),
            TokenExperts::from_tokens(&[vec![3], vec![3]]),
        ]);
        let cap = Capacity::with_redundant(4, 2, 2).unwrap();
        let p = Placement::new(cap, vec![vec![0, 1, 2, 0, 3, 1]; 2], "p").unwrap();
        let topo = Topology::new(2, 1).unwrap();
        let opts = SimOptions {
            batch_tokens: 8,
            token_bytes: None,
        };
        let rep = simulate(&r, &p, &topo, opts).unwrap();
        // Token 0 (home 0): expert 0 on d0, then 3 on d1: one send.
        // Token 1 (home 1): expert 0 on d1, then 3 on d1: none.
        assert_eq!(rep.cross_device_tokens, 1.0);
        assert_eq!(rep.cross_node_tokens, 0.0);
        // L0: d0 1, d1 1; L1: d0 0, d1 2.
        assert_eq!((rep.max_load, rep.mean_load), (3.0, 2.0));
    }

    #[test]
    fn a_plan_of_another_shape_is_refused_naming_both() {
        let r = routes(vec![TokenExperts::from_tokens(&[vec![0]])]);
        let cap = Capacity::with_redundant(4, 2, 0).unwrap();
        let p = Placement::new(cap, vec![vec![0, 1, 2, 3]; 3], "p").unwrap();
        let opts = SimOptions {
            batch_tokens: 8,
            token_bytes: None,
        };
        let err = simulate(&r, &p, &Topology::new(2, 1).unwrap(), opts).unwrap_err();
        assert!(
            err.to_string()
                .contains("4 experts in 3 MoE layers on 2 devices, the trace has 4 experts in 1")
        );
    }
}
