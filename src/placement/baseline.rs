//! The placements the engines make themselves, to compare a plan against.

use super::{Capacity, Placement};
use crate::error::Result;

/// One of the engines' own placements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    Contiguous,
    RoundRobin,
    Eplb,
}

impl Baseline {
    pub const ALL: [Baseline; 3] = [Baseline::Contiguous, Baseline::RoundRobin, Baseline::Eplb];

    pub fn name(self) -> &'static str {
        match self {
            Baseline::Contiguous => "contiguous",
            Baseline::RoundRobin => "round-robin",
            Baseline::Eplb => "EPLB greedy",
        }
    }

    /// `load` is `[moe_layers][num_experts]` (only EPLB reads the values).
    pub fn place(self, capacity: Capacity, load: &[Vec<f64>]) -> Result<Placement> {
        match self {
            Baseline::Contiguous => contiguous(capacity, load.len()),
            Baseline::RoundRobin => round_robin(capacity, load.len()),
            Baseline::Eplb => eplb(capacity, load),
        }
    }
}

/// The engines' default: physical expert `p` is logical expert `p mod E`, so
/// device `d` holds a contiguous block (SGLang's `init_trivial`, vLLM without
/// EPLB); redundant slots repeat the first experts.
pub fn contiguous(capacity: Capacity, num_layers: usize) -> Result<Placement> {
    let e = capacity.num_experts as u32;
    let row: Vec<u32> = (0..capacity.num_physical() as u32).map(|p| p % e).collect();
    Placement::new(capacity, vec![row; num_layers], "contiguous placement")
}

/// Expert `q` goes to device `q mod N` (vLLM's `--expert-placement-strategy
/// round_robin`), redundant slots again repeating the first experts.
pub fn round_robin(capacity: Capacity, num_layers: usize) -> Result<Placement> {
    let (n, s, e) = (
        capacity.devices,
        capacity.slots_per_device,
        capacity.num_experts,
    );
    let mut row = vec![0u32; n * s];
    for q in 0..n * s {
        let (device, slot) = (q % n, q / n);
        row[device * s + slot] = (q % e) as u32;
    }
    Placement::new(capacity, vec![row; num_layers], "round-robin placement")
}

/// Copies of each expert of one layer: one each, then every redundant slot to
/// the expert with the highest load per copy (DeepSeek EPLB's
/// `replicate_experts`, as vLLM's `rebalance_algo.py` and SGLang's
/// `eplb_algorithms/deepseek.py` run it; ties to the lower id).
pub fn replica_counts(load: &[f64], redundant: usize) -> Vec<usize> {
    let mut copies = vec![1usize; load.len()];
    for _ in 0..redundant {
        let mut best = 0;
        for e in 1..load.len() {
            if load[e] / copies[e] as f64 > load[best] / copies[best] as f64 {
                best = e;
            }
        }
        copies[best] += 1;
    }
    copies
}

/// DeepSeek EPLB's global policy as vLLM and SGLang run it for models without
/// expert groups (the hierarchical policy reduces to it with one group):
/// replicate by [`replica_counts`], then pack physical experts heaviest first,
/// each onto the least-loaded device that still has a free slot
/// (`balanced_packing`). Like the original, it may put two copies of an
/// expert on one device.
pub fn eplb(capacity: Capacity, load: &[Vec<f64>]) -> Result<Placement> {
    let (n, s) = (capacity.devices, capacity.slots_per_device);
    let mut map = Vec::with_capacity(load.len());
    for layer in load {
        let copies = replica_counts(layer, capacity.redundant());
        // Physical experts in replication order: the originals, then each replica.
        let mut physical: Vec<(u32, f64)> = (0..layer.len())
            .map(|e| (e as u32, layer[e] / copies[e] as f64))
            .collect();
        for (e, &c) in copies.iter().enumerate() {
            for _ in 1..c {
                physical.push((e as u32, layer[e] / c as f64));
            }
        }
        let mut order: Vec<usize> = (0..physical.len()).collect();
        order.sort_by(|&a, &b| physical[b].1.total_cmp(&physical[a].1));
        let mut device_load = vec![0.0f64; n];
        let mut device_items: Vec<Vec<u32>> = vec![Vec::with_capacity(s); n];
        for i in order {
            let device = (0..n)
                .filter(|&d| device_items[d].len() < s)
                .min_by(|&a, &b| device_load[a].total_cmp(&device_load[b]))
                .unwrap_or(0);
            device_load[device] += physical[i].1;
            device_items[device].push(physical[i].0);
        }
        map.push(device_items.concat());
    }
    Placement::new(capacity, map, "EPLB placement")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_and_round_robin_lay_experts_out_as_the_engines_do() {
        let c = Capacity::with_redundant(4, 2, 0).unwrap();
        assert_eq!(
            contiguous(c, 1).unwrap().physical_to_logical[0],
            [0, 1, 2, 3]
        );
        assert_eq!(
            round_robin(c, 1).unwrap().physical_to_logical[0],
            [0, 2, 1, 3]
        );
        let r = Capacity::with_redundant(4, 2, 2).unwrap();
        assert_eq!(
            contiguous(r, 1).unwrap().physical_to_logical[0],
            [0, 1, 2, 3, 0, 1]
        );
    }

    #[test]
    fn eplb_replicates_the_hottest_and_packs_heaviest_first() {
        // Loads 10, 6, 3, 1 on 2 devices x 3 slots (2 redundant): 10 gets two
        // copies (5 each), then 6 vs 5 -> 6 gets one (3 each).
        assert_eq!(replica_counts(&[10.0, 6.0, 3.0, 1.0], 2), vec![2, 2, 1, 1]);
        let c = Capacity::with_redundant(4, 2, 2).unwrap();
        let p = eplb(c, &[vec![10.0, 6.0, 3.0, 1.0]]).unwrap();
        // Heaviest first, ties in replication order: e0 5 -> d0, e0 5 -> d1,
        // e1 3 -> d0 (8), e2 3 -> d1 (8), e1's replica 3 -> d0 (11, full),
        // e3 1 -> d1 (9): EPLB's packing puts both copies of e1 on d0.
        assert_eq!(p.physical_to_logical[0], [0, 1, 1, 0, 2, 3]);
    }
}
