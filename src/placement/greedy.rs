//! The placement `plan` falls back to when the integer program is too large,
//! and the incumbent it starts the solver from.
//!
//! Per layer: copies by EPLB's rule ([`replica_counts`]), then physical experts
//! heaviest first onto the least-loaded device with a free slot that does not
//! hold the expert yet (longest-processing-time packing, which is EPLB's
//! `balanced_packing` without its duplicate copies). Where the next-layer
//! traffic is known, a second pass places each expert of layer `l + 1` on the
//! device its tokens come from most, among the devices where it keeps the
//! layer's maximum load at the packing's.

use super::baseline::replica_counts;
use super::{Capacity, RoutingCounts, Topology};

/// `[moe_layers][expert]`: the devices holding each copy, ascending.
pub type Assignment = Vec<Vec<Vec<usize>>>;

pub fn copies_per_layer(counts: &RoutingCounts, capacity: Capacity) -> Vec<Vec<usize>> {
    (counts.load.iter())
        .map(|w| replica_counts(w, capacity.redundant()))
        .collect()
}

/// Most expert-token pairs on one device, a replica taking its share.
pub fn max_load(load: &[f64], copies: &[usize], experts: &[Vec<usize>], devices: usize) -> f64 {
    device_loads(load, copies, experts, devices)
        .into_iter()
        .fold(0.0, f64::max)
}

pub fn device_loads(
    load: &[f64],
    copies: &[usize],
    experts: &[Vec<usize>],
    devices: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; devices];
    for (e, devs) in experts.iter().enumerate() {
        for &d in devs {
            out[d] += load[e] / copies[e] as f64;
        }
    }
    out
}

/// The objective's traffic of an assignment: for every boundary, tokens of
/// `(i -> j)` weighted by the share of `i`'s copies on a device (node) that
/// holds no copy of `j`. Returns (cross-device, cross-node).
pub fn proxy_traffic(counts: &RoutingCounts, assign: &Assignment, topo: &Topology) -> (f64, f64) {
    let e = counts.num_experts;
    let (mut device, mut node) = (0.0, 0.0);
    for b in 0..assign.len().saturating_sub(1) {
        let Some(t) = counts.transition(b) else {
            continue;
        };
        for i in 0..e {
            let src = &assign[b][i];
            for j in 0..e {
                let w = t[i * e + j];
                if w == 0.0 {
                    continue;
                }
                let dst = &assign[b + 1][j];
                let share = w / src.len() as f64;
                for &d in src {
                    if !dst.contains(&d) {
                        device += share;
                    }
                    if !dst.iter().any(|&x| topo.node_of(x) == topo.node_of(d)) {
                        node += share;
                    }
                }
            }
        }
    }
    (device, node)
}

/// Longest-processing-time packing of one layer (the module comment's first pass).
pub fn pack_layer(load: &[f64], copies: &[usize], capacity: Capacity) -> Vec<Vec<usize>> {
    place_layer(load, copies, capacity, |_, _| 0.0, f64::INFINITY)
}

/// Places one layer's physical experts heaviest first: among devices with a
/// free slot that lack the expert and stay at or under `cap`, the one with
/// the highest `affinity(expert, device)`, then the least loaded.
fn place_layer(
    load: &[f64],
    copies: &[usize],
    capacity: Capacity,
    affinity: impl Fn(usize, usize) -> f64,
    cap: f64,
) -> Vec<Vec<usize>> {
    let (n, s) = (capacity.devices, capacity.slots_per_device);
    let mut items: Vec<(usize, f64)> = (0..load.len())
        .flat_map(|e| std::iter::repeat_n((e, load[e] / copies[e] as f64), copies[e]))
        .collect();
    items.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut device_load = vec![0.0f64; n];
    let mut used = vec![0usize; n];
    let mut experts: Vec<Vec<usize>> = vec![Vec::new(); load.len()];
    for (e, w) in items {
        let free = |d: &usize| used[*d] < s && !experts[e].contains(d);
        let fits = |d: &usize| device_load[*d] + w <= cap * (1.0 + 1e-9);
        let least = |a: &usize, b: &usize| device_load[*a].total_cmp(&device_load[*b]);
        let best = (0..n)
            .filter(|d| free(d) && fits(d))
            .max_by(|a, b| {
                affinity(e, *a)
                    .total_cmp(&affinity(e, *b))
                    .then_with(|| least(b, a))
            })
            .or_else(|| (0..n).filter(free).min_by(least))
            // Only the last copies of one expert can be left without a
            // device lacking it; EPLB doubles such a copy up the same way.
            .or_else(|| (0..n).filter(|&d| used[d] < s).min_by(least))
            .unwrap_or(0);
        device_load[best] += w;
        used[best] += 1;
        experts[e].push(best);
    }
    for devs in &mut experts {
        devs.sort_unstable();
    }
    experts
}

/// The fallback placement of every layer (module comment).
pub fn greedy(counts: &RoutingCounts, capacity: Capacity) -> Assignment {
    let copies = copies_per_layer(counts, capacity);
    let e = counts.num_experts;
    let mut out: Assignment = Vec::with_capacity(counts.load.len());
    for (l, load) in counts.load.iter().enumerate() {
        let packed = pack_layer(load, &copies[l], capacity);
        let layer = match (
            l.checked_sub(1),
            l.checked_sub(1).and_then(|b| counts.transition(b)),
        ) {
            (Some(prev), Some(t)) => {
                let cap = max_load(load, &copies[l], &packed, capacity.devices);
                let src = &out[prev];
                let affinity = |j: usize, d: usize| -> f64 {
                    (0..e)
                        .filter(|&i| src[i].contains(&d))
                        .map(|i| t[i * e + j] / src[i].len() as f64)
                        .sum()
                };
                place_layer(load, &copies[l], capacity, affinity, cap)
            }
            _ => packed,
        };
        out.push(layer);
    }
    out
}

/// `[device] -> experts` lists, each exactly `slots_per_device` long.
pub fn device_lists(assign: &Assignment, capacity: Capacity) -> Vec<Vec<Vec<u32>>> {
    assign
        .iter()
        .map(|layer| {
            let mut devs = vec![Vec::new(); capacity.devices];
            for (e, ds) in layer.iter().enumerate() {
                for &d in ds {
                    devs[d].push(e as u32);
                }
            }
            devs
        })
        .collect()
}
