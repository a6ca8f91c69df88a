//! Placement files: Switchyard's own plan, SGLang's `--init-expert-location`
//! JSON and vLLM's EPLB tensors as JSON; each read back for `simulate`.
//!
//! - SGLang (`python/sglang/srt/eplb/expert_location.py`,
//!   `compute_initial_expert_location_metadata`): a JSON object with
//!   `physical_to_logical_map`, `[num_hidden_layers, num_physical_experts]`,
//!   one row per decoder layer (dense layers included; SGLang ignores theirs).
//! - vLLM (`vllm/distributed/eplb/rebalance_algo.py`, `rebalance_experts`'s
//!   return values): `physical_to_logical_map` `[moe_layers, num_physical]`,
//!   `logical_to_physical_map` `[moe_layers, num_logical, num_redundant + 1]`
//!   padded with -1, `logical_replica_count` `[moe_layers, num_logical]`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Capacity, Placement};
use crate::error::{Error, Result};

pub const PLAN_FORMAT: &str = "switchyard-expert-placement";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// The plan with its objective values and solver gap.
    Switchyard,
    /// SGLang's `--init-expert-location` JSON.
    Sglang,
    /// vLLM's EPLB tensors as JSON.
    Vllm,
}

/// How the plan was solved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SolverReport {
    /// `ilp` (one integer program over all layers), `ilp-layerwise` (one per
    /// layer, sweeping), or `greedy` (too large for the solver).
    pub method: String,
    /// `optimal`, `time-limit` (best incumbent), or `greedy`.
    pub status: String,
    /// Relative gap between the incumbent and the solver's best bound, as the
    /// solver states it (0 when proved optimal; `None` without a solver).
    pub gap: Option<f64>,
    pub objective: Option<f64>,
    pub best_bound: Option<f64>,
    pub seconds: f64,
    /// Why a fallback or a time limit was taken.
    pub note: Option<String>,
    /// Swaps the local search took after the program (it has no bound of its
    /// own: `gap` is the program's).
    #[serde(default)]
    pub local_search_moves: Option<usize>,
}

/// Switchyard's plan file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanFile {
    pub format: String,
    pub num_layers: usize,
    pub moe_layers: Vec<usize>,
    pub num_experts: usize,
    pub devices: usize,
    pub nodes: usize,
    pub redundant: usize,
    pub objective: String,
    /// `[moe_layers][num_physical]`.
    pub physical_to_logical_map: Vec<Vec<u32>>,
    /// Per MoE layer, the most expert-token pairs on one device over the whole trace.
    pub max_device_load: Vec<f64>,
    /// Planned cross-device transitions between consecutive MoE layers (the
    /// objective's proxy: rank-0 expert to each next-layer expert).
    pub cross_device_transitions: Option<f64>,
    pub cross_node_transitions: Option<f64>,
    pub solver: SolverReport,
    pub source: String,
}

/// Writes `plan` as `format` to `path` (temp file, then rename).
pub fn write_plan(plan: &PlanFile, format: ExportFormat, path: &Path) -> Result<()> {
    let value = match format {
        ExportFormat::Switchyard => serde_json::to_value(plan),
        ExportFormat::Sglang => serde_json::to_value(sglang(plan)),
        ExportFormat::Vllm => serde_json::to_value(vllm(plan)),
    }
    .map_err(|e| Error::InvalidInput(format!("serialising the plan: {e}")))?;
    let text = serde_json::to_string(&value)
        .map_err(|e| Error::InvalidInput(format!("serialising the plan: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[derive(Serialize, Deserialize)]
struct SglangFile {
    physical_to_logical_map: Vec<Vec<u32>>,
}

/// Every decoder layer gets a row; dense ones the trivial map SGLang itself uses.
fn sglang(plan: &PlanFile) -> SglangFile {
    let physical = plan.physical_to_logical_map.first().map_or(0, Vec::len);
    let trivial: Vec<u32> = (0..physical)
        .map(|p| (p % plan.num_experts) as u32)
        .collect();
    let rows = (0..plan.num_layers)
        .map(|l| match plan.moe_layers.iter().position(|&m| m == l) {
            Some(i) => plan.physical_to_logical_map[i].clone(),
            None => trivial.clone(),
        })
        .collect();
    SglangFile {
        physical_to_logical_map: rows,
    }
}

#[derive(Serialize, Deserialize)]
struct VllmFile {
    physical_to_logical_map: Vec<Vec<u32>>,
    logical_to_physical_map: Vec<Vec<Vec<i64>>>,
    logical_replica_count: Vec<Vec<u32>>,
    /// Not part of vLLM's tensors: which decoder layers the rows are.
    moe_layers: Vec<usize>,
}

fn vllm(plan: &PlanFile) -> VllmFile {
    let mut log2phy = Vec::new();
    let mut counts = Vec::new();
    for row in &plan.physical_to_logical_map {
        let mut l2p = vec![vec![-1i64; plan.redundant + 1]; plan.num_experts];
        let mut count = vec![0u32; plan.num_experts];
        for (p, &e) in row.iter().enumerate() {
            let c = &mut count[e as usize];
            if let Some(slot) = l2p[e as usize].get_mut(*c as usize) {
                *slot = p as i64;
            }
            *c += 1;
        }
        log2phy.push(l2p);
        counts.push(count);
    }
    VllmFile {
        physical_to_logical_map: plan.physical_to_logical_map.clone(),
        logical_to_physical_map: log2phy,
        logical_replica_count: counts,
        moe_layers: plan.moe_layers.clone(),
    }
}

/// What a plan file of any of the three formats says, checked against the
/// model it is replayed on: `num_layers` decoder layers whose `moe_layers`
/// route over `num_experts` experts, on `devices` devices.
pub struct PlanShape<'a> {
    pub num_layers: usize,
    pub moe_layers: &'a [usize],
    pub num_experts: usize,
    pub devices: usize,
}

pub fn read_plan(path: &Path, shape: PlanShape<'_>) -> Result<Placement> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::config(path, reason);
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map_of = |key: &str| -> Result<Vec<Vec<u32>>> {
        let v = value
            .get(key)
            .ok_or_else(|| bad(format!("no {key:?} field")))?;
        serde_json::from_value(v.clone()).map_err(|e| {
            bad(format!(
                "{key} is not a [layers, physical experts] list: {e}"
            ))
        })
    };
    let mut map = map_of("physical_to_logical_map")?;
    if value.get("format").and_then(|f| f.as_str()) == Some(PLAN_FORMAT) {
        let plan: PlanFile = serde_json::from_value(value.clone())
            .map_err(|e| bad(format!("not a Switchyard plan: {e}")))?;
        if plan.devices != shape.devices || plan.num_experts != shape.num_experts {
            return Err(bad(format!(
                "the plan is for {} experts on {} devices, the replay has {} experts on {} devices",
                plan.num_experts, plan.devices, shape.num_experts, shape.devices
            )));
        }
    }
    // SGLang's rows are every decoder layer: keep the MoE ones.
    if map.len() == shape.num_layers && map.len() != shape.moe_layers.len() {
        map = shape.moe_layers.iter().map(|&l| map[l].clone()).collect();
    }
    if map.len() != shape.moe_layers.len() {
        return Err(bad(format!(
            "the plan has {} layers, the trace {} MoE layers of {} decoder layers",
            map.len(),
            shape.moe_layers.len(),
            shape.num_layers
        )));
    }
    let physical = map.first().map_or(0, Vec::len);
    if !physical.is_multiple_of(shape.devices) || physical < shape.num_experts {
        return Err(bad(format!(
            "{physical} physical experts per layer do not fit {} experts on {} devices",
            shape.num_experts, shape.devices
        )));
    }
    let capacity = Capacity::with_slots(shape.num_experts, shape.devices, physical / shape.devices)
        .map_err(|e| bad(e.to_string()))?;
    Placement::new(capacity, map, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> PlanFile {
        PlanFile {
            format: PLAN_FORMAT.into(),
            num_layers: 3,
            moe_layers: vec![1, 2],
            num_experts: 4,
            devices: 2,
            nodes: 1,
            redundant: 2,
            objective: "both".into(),
            physical_to_logical_map: vec![vec![0, 1, 2, 0, 3, 1], vec![3, 2, 1, 0, 2, 3]],
            max_device_load: vec![4.0, 5.0],
            cross_device_transitions: Some(3.0),
            cross_node_transitions: Some(0.0),
            solver: SolverReport {
                method: "ilp".into(),
                status: "optimal".into(),
                gap: Some(0.0),
                objective: Some(12.0),
                best_bound: Some(12.0),
                seconds: 0.1,
                note: None,
                local_search_moves: Some(3),
            },
            source: "t.parquet".into(),
        }
    }

    fn shape(devices: usize) -> PlanShape<'static> {
        PlanShape {
            num_layers: 3,
            moe_layers: &[1, 2],
            num_experts: 4,
            devices,
        }
    }

    #[test]
    fn each_format_round_trips_its_schema_and_reads_back_the_same_placement() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan();
        for format in [
            ExportFormat::Switchyard,
            ExportFormat::Sglang,
            ExportFormat::Vllm,
        ] {
            let path = dir.path().join(format!("{format:?}.json"));
            write_plan(&p, format, &path).unwrap();
            let placement = read_plan(&path, shape(2)).unwrap();
            assert_eq!(placement.physical_to_logical, p.physical_to_logical_map);
            assert_eq!(placement.capacity.redundant(), 2);
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("Sglang.json")).unwrap())
                .unwrap();
        let rows = json["physical_to_logical_map"].as_array().unwrap();
        assert_eq!(rows.len(), 3, "one row per decoder layer");
        assert_eq!(
            rows[0],
            serde_json::json!([0, 1, 2, 3, 0, 1]),
            "dense layer: trivial"
        );
        let v: VllmFile =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("Vllm.json")).unwrap())
                .unwrap();
        assert_eq!(v.logical_replica_count[0], [2, 2, 1, 1]);
        assert_eq!(
            v.logical_to_physical_map[0][1],
            [1, 5, -1],
            "padded to redundant + 1"
        );
        assert_eq!(v.logical_to_physical_map[1][3], [0, 5, -1]);
    }

    #[test]
    fn a_plan_for_another_shape_is_refused_naming_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        write_plan(&plan(), ExportFormat::Switchyard, &path).unwrap();
        let err = read_plan(&path, shape(3)).unwrap_err().to_string();
        assert!(
            err.contains("for 4 experts on 2 devices, the replay has 4 experts on 3"),
            "{err}"
        );
        write_plan(&plan(), ExportFormat::Vllm, &path).unwrap();
        let wrong_layers = PlanShape {
            num_layers: 5,
            moe_layers: &[0, 1, 2, 3, 4],
            num_experts: 4,
            devices: 2,
        };
        let err = read_plan(&path, wrong_layers).unwrap_err().to_string();
        assert!(
            err.contains("the plan has 2 layers, the trace 5 MoE layers"),
            "{err}"
        );
    }
}
