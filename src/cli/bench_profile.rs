//! `switchyard bench --profile`: where a decode step's time goes, per phase and
//! per layer, from one extra decode run with the model's phase timers on (the
//! timed runs above it stay unprofiled).

use std::time::Instant;

use switchyard::Engine;
use switchyard::generate::SchedulerOptions;
use switchyard::model::{Phase, profile};

use super::bench::{greedy_request, step};

/// Decodes `gen_tokens` greedy steps from a one-token prompt with profiling on,
/// then prints the breakdown.
pub fn run(engine: &Engine, first: u32, gen_tokens: usize) -> anyhow::Result<()> {
    let mut scheduler = engine.scheduler(SchedulerOptions::single_sequence());
    scheduler.add(greedy_request(&[first], gen_tokens))?;
    step(&mut scheduler)?;
    profile::set_enabled(true);
    let result = (|| -> anyhow::Result<()> {
        while !scheduler.is_idle() {
            let start = Instant::now();
            step(&mut scheduler)?;
            profile::record_step(start.elapsed());
        }
        Ok(())
    })();
    profile::set_enabled(false);
    result?;
    let p = profile::snapshot(engine.config().num_layers);
    print(&p, engine.expert_bytes_per_token());
    Ok(())
}

fn print(p: &profile::Profile, expert_bytes: usize) {
    let steps = p.steps.max(1) as f64;
    let us = |ns: u64| ns as f64 / steps / 1e3;
    let step_us = us(p.step_ns);
    let share = |ns: u64| 100.0 * ns as f64 / p.step_ns.max(1) as f64;
    let threads = switchyard::ops::num_threads();
    println!(
        "\ndecode step profile: {} steps from an empty cache, {step_us:.0} us/step with the timers on, {threads} threads",
        p.steps
    );
    println!("| phase | us/step | share of step |");
    println!("|---|---:|---:|");
    for phase in Phase::ALL {
        let ns = p.phase_ns(phase);
        if ns == 0 || phase == Phase::ExpertMatvecs {
            continue;
        }
        println!("| {} | {:.1} | {:.1} % |", phase.name(), us(ns), share(ns));
    }
    let rest = p.remainder_ns();
    println!(
        "| other (embedding, residual adds, tensor plumbing) | {:.1} | {:.1} % |",
        us(rest),
        share(rest)
    );
    // Inside the experts' wall time: the matmuls' busy time spread over the
    // threads, and what is left of it (fork-join, gathering, quantizing, mixing).
    let experts = p.phase_ns(Phase::Experts);
    let busy = p.phase_ns(Phase::ExpertMatvecs);
    let busy_wall = busy as f64 / threads.max(1) as f64;
    let overhead = (experts as f64 - busy_wall).max(0.0);
    println!(
        "\nrouted experts: matmuls {:.1} us/step busy over {threads} threads ({:.1} us/step of wall if evenly spread), fork-join + gather + mix {:.1} us/step ({:.1} % of step); expert weights {:.1} MB/token read at {:.1} GB/s while the matmuls run",
        us(busy),
        busy_wall / steps / 1e3,
        overhead / steps / 1e3,
        100.0 * overhead / p.step_ns.max(1) as f64,
        expert_bytes as f64 / 1e6,
        expert_bytes as f64 * steps / busy_wall.max(1.0),
    );
    println!(
        "\n| layer | norms us | attn proj us | attn core us | router us | experts us | expert matmuls busy us | layer us |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (l, row) in p.layers.iter().enumerate() {
        let at = |phase: Phase| row[phase as usize];
        let total: u64 = Phase::ALL
            .iter()
            .filter(|&&ph| ph != Phase::ExpertMatvecs)
            .map(|&ph| at(ph))
            .sum();
        println!(
            "| {l} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            us(at(Phase::Norm)),
            us(at(Phase::AttentionProjections)),
            us(at(Phase::AttentionCore)),
            us(at(Phase::Router)),
            us(at(Phase::Experts) + at(Phase::SharedExpert) + at(Phase::DenseFfn)),
            us(at(Phase::ExpertMatvecs)),
            us(total),
        );
    }
}
