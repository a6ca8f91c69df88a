//! `switchyard plan`: expert placement for expert-parallel serving, planned
//! from a routing trace (or SGLang's expert-distribution counts) and written
//! in Switchyard's, SGLang's or vLLM's format.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use switchyard::placement::{
    Capacity, ExportFormat, Objective, PLAN_FORMAT, PlanFile, PlanOptions, RoutingCounts, Topology,
    plan, write_plan,
};
use switchyard::trace::{Routes, read_trace};

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Routing trace (.parquet) to plan from.
    #[arg(long, required_unless_present = "counts", conflicts_with = "counts")]
    trace: Option<PathBuf>,
    /// SGLang expert-distribution counts as JSON (`{"logical_count": [[...]]}`), instead of
    /// --trace: balance only, since counts carry no cross-layer transitions.
    #[arg(long)]
    counts: Option<PathBuf>,
    /// Devices (GPUs) of the expert-parallel group.
    #[arg(long)]
    devices: usize,
    /// Nodes the devices are spread over, evenly.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Extra physical experts per layer, given to the hottest experts.
    #[arg(long, default_value_t = 0, conflicts_with = "capacity")]
    redundant: usize,
    /// Physical experts per device per layer (instead of --redundant).
    #[arg(long)]
    capacity: Option<usize>,
    #[arg(long, value_enum, default_value_t = Objective::Both)]
    objective: Objective,
    /// Seconds for the solver; past it the best incumbent is kept with its gap.
    #[arg(long, default_value_t = 60.0)]
    time_limit: f64,
    /// A cross-node transition costs this many cross-device ones.
    #[arg(long, default_value_t = 4.0)]
    node_weight: f64,
    /// With --objective both: each layer's per-step max load is capped this far from the
    /// lowest the search reached (0) towards EPLB's (1) while traffic is cut.
    #[arg(long, default_value_t = 0.5)]
    load_cap: f64,
    /// Tokens per step whose busiest device the search balances (simulate's --batch).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Output file (JSON).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportFormat::Switchyard)]
    format: ExportFormat,
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let (counts, source) = match (&args.trace, &args.counts) {
        (Some(path), _) => {
            let trace = read_trace(path)?;
            let routes = Routes::from_trace(&trace, path)?;
            anyhow::ensure!(
                routes.n_tokens() > 0,
                "{}: the trace has no rows",
                path.display()
            );
            (
                RoutingCounts::from_routes(&routes, args.batch)?,
                path.display().to_string(),
            )
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not JSON", path.display()))?;
            let counts = RoutingCounts::from_sglang_logical_count(&json, path)?;
            (counts, path.display().to_string())
        }
        (None, None) => anyhow::bail!("give --trace TRACE.parquet or --counts COUNTS.json"),
    };
    anyhow::ensure!(
        args.time_limit.is_finite() && args.time_limit > 0.0,
        "--time-limit must be a positive number of seconds"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.load_cap),
        "--load-cap must be between 0 (lowest load) and 1 (EPLB's load), got {}",
        args.load_cap
    );
    let topology = Topology::new(args.devices, args.nodes)?;
    let capacity = match args.capacity {
        Some(slots) => Capacity::with_slots(counts.num_experts, args.devices, slots)?,
        None => Capacity::with_redundant(counts.num_experts, args.devices, args.redundant)?,
    };
    let options = PlanOptions {
        topology,
        capacity,
        objective: args.objective,
        time_limit: Duration::from_secs_f64(args.time_limit),
        node_weight: args.node_weight,
        load_cap: args.load_cap,
    };
    let outcome = plan(&counts, &options)?;
    let s = &outcome.solver;
    eprintln!(
        "{}: {} experts x {} MoE layers on {} devices ({} nodes), {} per device",
        source,
        capacity.num_experts,
        counts.moe_layers.len(),
        topology.devices,
        topology.nodes,
        capacity.slots_per_device
    );
    eprintln!(
        "solver: {} ({}), gap {}, {:.1} s",
        s.method,
        s.status,
        s.gap
            .map_or("n/a".into(), |g| format!("{:.2} %", 100.0 * g)),
        s.seconds
    );
    if let Some(note) = &s.note {
        eprintln!("note: {note}");
    }
    let loads: Vec<String> = (outcome.max_device_load.iter())
        .map(|x| format!("{x:.0}"))
        .collect();
    eprintln!(
        "max device load per layer, whole trace: {}",
        loads.join(" ")
    );
    let per_step = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "max device load per layer, mean per step of {}: {} (EPLB greedy: {})",
        args.batch,
        per_step(&outcome.step_max_load),
        per_step(&outcome.eplb_step_max_load)
    );
    if let Some(m) = s.local_search_moves {
        eprintln!("local search: {m} swaps after the program (no bound of its own)");
    }
    if let (Some(d), Some(n)) = (
        outcome.cross_device_transitions,
        outcome.cross_node_transitions,
    ) {
        eprintln!("planned transitions: {d:.0} cross-device, {n:.0} cross-node");
    }
    let file = PlanFile {
        format: PLAN_FORMAT.into(),
        num_layers: counts.num_layers,
        moe_layers: counts.moe_layers.clone(),
        num_experts: counts.num_experts,
        devices: topology.devices,
        nodes: topology.nodes,
        redundant: capacity.redundant(),
        objective: format!("{:?}", args.objective).to_lowercase(),
        physical_to_logical_map: outcome.placement.physical_to_logical.clone(),
        max_device_load: outcome.max_device_load.clone(),
        cross_device_transitions: outcome.cross_device_transitions,
        cross_node_transitions: outcome.cross_node_transitions,
        solver: outcome.solver.clone(),
        source,
    };
    write_plan(&file, args.format, &args.out)?;
    eprintln!("wrote {} ({:?} format)", args.out.display(), args.format);
    Ok(())
}
