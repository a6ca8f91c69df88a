//! Expert placement for expert-parallel serving: where each layer's experts
//! (and the replicas of the hottest) sit on the devices of a distributed engine
//! (SGLang, vLLM), planned from routing traces, compared with the engines' own
//! placements by trace replay, and exported in the formats those engines read.
//!
//! A placement uses the engines' own representation: per MoE layer, a
//! `physical_to_logical` map over `devices x slots_per_device` physical
//! experts, physical expert `p` living on device `p / slots_per_device`.

mod baseline;
mod counts;
mod export;
mod greedy;
mod ilp;
mod local;
mod simulate;

pub use baseline::{Baseline, contiguous, eplb, replica_counts, round_robin};
pub use counts::RoutingCounts;
pub use export::{
    ExportFormat, PLAN_FORMAT, PlanFile, PlanShape, SolverReport, read_plan, write_plan,
};
pub use ilp::{Objective, PlanOptions, PlanOutcome, SolveMethod, plan};
pub use simulate::{SimOptions, SimReport, simulate};

use crate::error::{Error, Result};

/// Devices of an expert-parallel group, spread evenly over nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub devices: usize,
    pub nodes: usize,
}

impl Topology {
    pub fn new(devices: usize, nodes: usize) -> Result<Self> {
        if devices == 0 || nodes == 0 {
            return Err(Error::InvalidInput(format!(
                "need at least one device and one node (got {devices} devices on {nodes} nodes)"
            )));
        }
        if !devices.is_multiple_of(nodes) {
            return Err(Error::InvalidInput(format!(
                "{devices} devices do not split evenly over {nodes} nodes"
            )));
        }
        Ok(Self { devices, nodes })
    }

    pub fn devices_per_node(&self) -> usize {
        self.devices / self.nodes
    }

    pub fn node_of(&self, device: usize) -> usize {
        device / self.devices_per_node()
    }
}

/// How many physical experts each device holds per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub num_experts: usize,
    pub devices: usize,
    /// Physical experts per device per layer.
    pub slots_per_device: usize,
}

impl Capacity {
    /// `redundant` extra physical experts per layer on top of one copy of each
    /// expert; both engines need the physical experts to split evenly over the
    /// devices, and a replica on a device that already holds its expert is useless.
    pub fn with_redundant(num_experts: usize, devices: usize, redundant: usize) -> Result<Self> {
        if devices > num_experts {
            return Err(Error::InvalidInput(format!(
                "{devices} devices but only {num_experts} experts per layer: \
                 every device must hold at least one expert"
            )));
        }
        let physical = num_experts + redundant;
        if !physical.is_multiple_of(devices) {
            return Err(Error::InvalidInput(format!(
                "{num_experts} experts + {redundant} redundant = {physical} physical experts \
                 do not split evenly over {devices} devices"
            )));
        }
        if redundant > num_experts * (devices - 1) {
            return Err(Error::InvalidInput(format!(
                "{redundant} redundant experts is more than {num_experts} experts x {} other \
                 devices can hold without two copies of an expert on one device",
                devices - 1
            )));
        }
        Ok(Self {
            num_experts,
            devices,
            slots_per_device: physical / devices,
        })
    }

    /// A per-device capacity as the user states it; the replicas fill what is
    /// left after one copy of every expert.
    pub fn with_slots(num_experts: usize, devices: usize, slots_per_device: usize) -> Result<Self> {
        let physical = devices * slots_per_device;
        if physical < num_experts {
            return Err(Error::InvalidInput(format!(
                "a capacity of {slots_per_device} experts per device x {devices} devices = \
                 {physical} slots cannot hold the {num_experts} experts of a layer once"
            )));
        }
        Self::with_redundant(num_experts, devices, physical - num_experts)
    }

    pub fn num_physical(&self) -> usize {
        self.devices * self.slots_per_device
    }

    pub fn redundant(&self) -> usize {
        self.num_physical() - self.num_experts
    }
}

/// Per MoE layer, which logical expert each physical expert is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub capacity: Capacity,
    /// `[moe_layers][num_physical]`: logical expert of each physical expert.
    pub physical_to_logical: Vec<Vec<u32>>,
}

impl Placement {
    /// Checks the map against the capacity: every row `num_physical` long,
    /// every expert in range and present at least once. `what` names the plan
    /// in errors.
    pub fn new(capacity: Capacity, physical_to_logical: Vec<Vec<u32>>, what: &str) -> Result<Self> {
        let physical = capacity.num_physical();
        for (l, row) in physical_to_logical.iter().enumerate() {
            if row.len() != physical {
                return Err(Error::InvalidInput(format!(
                    "{what}: layer {l} has {} physical experts, expected {} \
                     ({} devices x {} per device)",
                    row.len(),
                    physical,
                    capacity.devices,
                    capacity.slots_per_device
                )));
            }
            let mut seen = vec![false; capacity.num_experts];
            for &e in row {
                match seen.get_mut(e as usize) {
                    Some(s) => *s = true,
                    None => {
                        return Err(Error::InvalidInput(format!(
                            "{what}: layer {l} names expert {e} but the model has {} experts",
                            capacity.num_experts
                        )));
                    }
                }
            }
            if let Some(missing) = seen.iter().position(|&s| !s) {
                return Err(Error::InvalidInput(format!(
                    "{what}: layer {l} places no copy of expert {missing}"
                )));
            }
        }
        Ok(Self {
            capacity,
            physical_to_logical,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.physical_to_logical.len()
    }

    pub fn device_of_physical(&self, physical: usize) -> usize {
        physical / self.capacity.slots_per_device
    }

    /// `[num_experts]`: the devices holding each expert of layer `layer`,
    /// ascending, one entry per physical copy.
    pub fn expert_devices(&self, layer: usize) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.capacity.num_experts];
        for (p, &e) in self.physical_to_logical[layer].iter().enumerate() {
            out[e as usize].push(self.device_of_physical(p));
        }
        out
    }

    /// From per-layer `[device] -> experts` lists (each `slots_per_device` long).
    pub fn from_device_lists(capacity: Capacity, layers: &[Vec<Vec<u32>>]) -> Result<Self> {
        let map = layers.iter().map(|devs| devs.concat()).collect();
        Self::new(capacity, map, "placement")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_that_cannot_work_are_refused_naming_the_numbers() {
        let err = Capacity::with_redundant(4, 8, 0).unwrap_err().to_string();
        assert!(err.contains("8 devices but only 4 experts"), "{err}");
        let err = Capacity::with_redundant(16, 8, 3).unwrap_err().to_string();
        assert!(
            err.contains("16 experts + 3 redundant = 19 physical"),
            "{err}"
        );
        let err = Capacity::with_slots(16, 4, 3).unwrap_err().to_string();
        assert!(
            err.contains("3 experts per device x 4 devices = 12 slots"),
            "{err}"
        );
        let err = Topology::new(6, 4).unwrap_err().to_string();
        assert!(
            err.contains("6 devices do not split evenly over 4 nodes"),
            "{err}"
        );
        let c = Capacity::with_slots(16, 4, 5).unwrap();
        assert_eq!((c.num_physical(), c.redundant()), (20, 4));
    }

    #[test]
    fn placement_maps_that_miss_or_invent_experts_are_refused() {
        let c = Capacity::with_redundant(4, 2, 0).unwrap();
        let err = Placement::new(c, vec![vec![0, 1, 2]], "p").unwrap_err();
        assert!(
            err.to_string()
                .contains("layer 0 has 3 physical experts, expected 4")
        );
        let err = Placement::new(c, vec![vec![0, 1, 2, 2]], "p").unwrap_err();
        assert!(err.to_string().contains("places no copy of expert 3"));
        let err = Placement::new(c, vec![vec![0, 1, 2, 7]], "p").unwrap_err();
        assert!(
            err.to_string()
                .contains("names expert 7 but the model has 4")
        );
        let p = Placement::new(c, vec![vec![3, 1, 2, 0]], "p").unwrap();
        assert_eq!(
            p.expert_devices(0),
            vec![vec![1], vec![0], vec![1], vec![0]]
        );
    }
}
