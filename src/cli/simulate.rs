//! `switchyard simulate`: replays a routing trace on a placement and on the
//! engines' own three (contiguous, round-robin, EPLB greedy), step by step.

use std::path::PathBuf;

use clap::Args;
use switchyard::config::load_model_config;
use switchyard::placement::{
    Baseline, PlanShape, RoutingCounts, SimOptions, SimReport, Topology, read_plan, simulate,
};
use switchyard::trace::{Routes, read_trace};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Routing trace (.parquet) to replay.
    #[arg(long)]
    trace: PathBuf,
    /// Placement: a Switchyard plan, SGLang --init-expert-location JSON or vLLM EPLB JSON.
    #[arg(long)]
    plan: PathBuf,
    #[arg(long)]
    devices: usize,
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Tokens per step.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Hidden size of the model, to report bytes (default: from --model).
    #[arg(long)]
    hidden_size: Option<usize>,
    /// Model directory whose config.json gives the hidden size.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Bytes per activation element sent (2 = bf16).
    #[arg(long, default_value_t = 2)]
    activation_bytes: u64,
    /// Trace whose expert loads EPLB packs by (default: the replayed one). A deployment's
    /// EPLB has only loads recorded before, so give the trace a plan was made from to
    /// compare both out of sample.
    #[arg(long)]
    baseline_trace: Option<PathBuf>,
    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Row {
    placement: String,
    #[serde(flatten)]
    report: SimReport,
}

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let trace = read_trace(&args.trace)?;
    let routes = Routes::from_trace(&trace, &args.trace)?;
    anyhow::ensure!(
        routes.n_tokens() > 0,
        "{}: the trace has no rows",
        args.trace.display()
    );
    let topology = Topology::new(args.devices, args.nodes)?;
    let shape = PlanShape {
        num_layers: routes.meta.num_layers,
        moe_layers: &routes.meta.moe_layers,
        num_experts: routes.meta.num_experts,
        devices: args.devices,
    };
    let plan = read_plan(&args.plan, shape)?;
    let hidden = match (args.hidden_size, &args.model) {
        (Some(h), _) => Some(h),
        (None, Some(dir)) => Some(load_model_config(dir)?.hidden_size),
        (None, None) => None,
    };
    let options = SimOptions {
        batch_tokens: args.batch,
        token_bytes: hidden.map(|h| h as u64 * args.activation_bytes),
    };
    let load = match &args.baseline_trace {
        None => RoutingCounts::from_routes(&routes, args.batch)?.load,
        Some(path) => {
            let other = Routes::from_trace(&read_trace(path)?, path)?;
            anyhow::ensure!(
                other.meta.num_experts == routes.meta.num_experts
                    && other.meta.moe_layers == routes.meta.moe_layers,
                "{}: {} experts in MoE layers {:?}, the replayed trace has {} in {:?}",
                path.display(),
                other.meta.num_experts,
                other.meta.moe_layers,
                routes.meta.num_experts,
                routes.meta.moe_layers
            );
            RoutingCounts::from_routes(&other, args.batch)?.load
        }
    };
    let mut rows = vec![Row {
        placement: "plan".into(),
        report: simulate(&routes, &plan, &topology, options)?,
    }];
    for baseline in Baseline::ALL {
        let placement = baseline.place(plan.capacity, &load)?;
        rows.push(Row {
            placement: baseline.name().into(),
            report: simulate(&routes, &placement, &topology, options)?,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{}: {} tokens in {} steps of {}; {} devices on {} nodes, {} physical experts per layer",
        args.trace.display(),
        rows[0].report.tokens,
        rows[0].report.steps,
        args.batch,
        topology.devices,
        topology.nodes,
        plan.capacity.num_physical()
    );
    println!("per step: loads are expert-token pairs summed over MoE layers; sends are dispatches");
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>12} {:>11} {:>12} {:>11}",
        "placement", "max load", "mean", "max/mean", "dev sends", "node sends", "dev MB", "node MB"
    );
    let mb = |b: Option<f64>| b.map_or("-".into(), |b| format!("{:.2}", b / 1e6));
    for row in &rows {
        let r = &row.report;
        println!(
            "{:<12} {:>9.1} {:>9.1} {:>9.3} {:>12.1} {:>11.1} {:>12} {:>11}",
            row.placement,
            r.max_load,
            r.mean_load,
            r.imbalance,
            r.cross_device_tokens,
            r.cross_node_tokens,
            mb(r.cross_device_bytes),
            mb(r.cross_node_bytes)
        );
    }
    Ok(())
}
