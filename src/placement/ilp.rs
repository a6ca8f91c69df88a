//! Placement as an integer program, after MoETuner (arXiv 2502.10144): binary
//! `x[l][e][d]` puts a copy of expert `e` of MoE layer `l` on device `d`.
//!
//! - every expert gets its copies (EPLB's replication rule) on distinct
//!   devices, every device exactly its slots;
//! - balance: `z_l >= sum_e load[l][e] / copies[l][e] * x[l][e][d]` for every
//!   device, minimising `sum_l z_l` (a step waits for the busiest device of
//!   every layer); this is exact per layer, so it is solved layer by layer;
//! - traffic: tokens whose rank-0 expert in layer `l` is `i` and that choose
//!   `j` in layer `l + 1` cross devices when `i` and `j` sit apart:
//!   `cut[l][i][j] >= x[l][i][d] - x[l+1][j][d]` for all `d`, weight = those
//!   tokens, cross-node cuts (the same over node sums) `node_weight` times more;
//! - `both` minimises traffic subject to every layer's load staying at its
//!   balance optimum.
//!
//! Solved with `good_lp` on microlp (pure Rust). A traffic program over all
//! layers at once is kept to [`JOINT_MAX_BINARIES`] binaries; past that each
//! layer is solved with its neighbours fixed, sweeping until nothing improves
//! or time runs out; past [`LAYER_MAX_BINARIES`] per layer the greedy of
//! `greedy.rs` is the answer and the plan says so.
//!
//! The program balances whole-trace totals, but a step waits for its own
//! busiest device, and the totals hide which experts are busy together: on
//! the demo trace the program's answer alone never beat EPLB's per-step load
//! (and, on 4 devices, not its traffic either).
//! So [`plan`] gives the program half the time limit and hands its answer,
//! with EPLB's placement, to the swap search of `local.rs`, which scores what
//! the replay measures. The reported gap is the program's; the search has none.

use std::ops::Range;
use std::time::{Duration, Instant};

use good_lp::{
    Expression, ProblemVariables, Solution, SolverModel, Variable, WithInitialSolution,
    WithTimeLimit, microlp, variable,
};

use super::baseline::eplb;
use super::greedy::{
    Assignment, copies_per_layer, device_lists, greedy, max_load, pack_layer, proxy_traffic,
};
use super::local::{Search, State};
use super::{Capacity, Placement, RoutingCounts, SolverReport, Topology};
use crate::error::{Error, Result};

/// Above this many `x` binaries the traffic program is solved layer by layer.
pub const JOINT_MAX_BINARIES: usize = 256;
/// Above this many binaries in one layer the greedy placement is used.
pub const LAYER_MAX_BINARIES: usize = 4096;
/// Sweeps over the layers when solving them one at a time.
const MAX_SWEEPS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Minimise the busiest device's load in every layer.
    Balance,
    /// Minimise cross-device and cross-node transitions only.
    Traffic,
    /// Balance first, then minimise traffic with every layer's load capped by --load-cap.
    Both,
}

#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    pub topology: Topology,
    pub capacity: Capacity,
    pub objective: Objective,
    pub time_limit: Duration,
    /// A cross-node transition costs this many cross-device ones.
    pub node_weight: f64,
    /// `both`: where between the lowest per-step load the search reached
    /// (0) and EPLB's (1) each layer's load is capped while traffic is cut.
    pub load_cap: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolveMethod {
    Joint,
    Layerwise,
    Greedy,
}

impl SolveMethod {
    fn name(self) -> &'static str {
        match self {
            SolveMethod::Joint => "ilp",
            SolveMethod::Layerwise => "ilp-layerwise",
            SolveMethod::Greedy => "greedy",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PlanOutcome {
    pub placement: Placement,
    pub method: SolveMethod,
    pub solver: SolverReport,
    /// Per MoE layer, over the whole trace.
    pub max_device_load: Vec<f64>,
    /// Per MoE layer, the busiest device's load per step, averaged over the
    /// steps of `RoutingCounts::step_load` (what `simulate` reports).
    pub step_max_load: Vec<f64>,
    /// The same for EPLB's greedy placement, which the plan starts from.
    pub eplb_step_max_load: Vec<f64>,
    /// The objective's traffic proxy (None without transition counts).
    pub cross_device_transitions: Option<f64>,
    pub cross_node_transitions: Option<f64>,
}

/// The solver's word on one program.
#[derive(Debug, Clone, Copy, Default)]
struct Verdict {
    /// The solver returned no incumbent (time up before a feasible point).
    failed: bool,
    proved: bool,
    gap: f64,
    objective: f64,
    bound: f64,
}

/// Plans a placement: the integer program (half the time limit), then the
/// swap search of `local.rs` from its answer and from EPLB's placement, in
/// two phases for `both` (module comment of `local.rs`): lowest per-step
/// load first, then least traffic with every layer's load capped at
/// `reached + load_cap x (EPLB's - reached)`. Per-step balance spreads the
/// experts a step's tokens share, which is what traffic wants together, so
/// the cap is the trade: below 1 the plan keeps part of its load gain over
/// EPLB on every layer, at 1 it spends all of it on traffic.
pub fn plan(counts: &RoutingCounts, options: &PlanOptions) -> Result<PlanOutcome> {
    let start = Instant::now();
    let program_options = PlanOptions {
        time_limit: options.time_limit / 2,
        ..*options
    };
    let program = solve_program(counts, &program_options)?;
    let cap = options.capacity;
    let deadline = start + options.time_limit;
    let copies = copies_per_layer(counts, cap);
    let topo = options.topology;
    let search = Search {
        counts,
        copies: &copies,
        capacity: cap,
        topology: topo,
        node_weight: if topo.nodes > 1 {
            options.node_weight
        } else {
            0.0
        },
    };
    let layers = counts.load.len();
    let program_start = assignment(&program.placement);
    let eplb_start = assignment(&eplb(cap, &counts.load)?);
    let eplb_loads = search.step_loads(&search.state(eplb_start.clone()));
    let zero = vec![0.0; layers];
    let open = vec![f64::INFINITY; layers];
    let mut moves = 0;
    // Phase 1, or the whole search for `balance`: lowest load, traffic breaking ties.
    let mut balanced: Vec<State> = Vec::new();
    if options.objective != Objective::Traffic {
        for start_at in [eplb_start.clone(), program_start.clone()] {
            let mut st = search.state(start_at);
            moves += search.improve(&mut st, &zero, deadline);
            balanced.push(st);
        }
    }
    let best = match options.objective {
        Objective::Balance => pick(&search, balanced, &zero)?,
        Objective::Traffic => {
            let mut out = Vec::new();
            for start_at in [program_start, eplb_start] {
                let mut st = search.state(start_at);
                moves += search.improve(&mut st, &open, deadline);
                out.push(st);
            }
            pick(&search, out, &open)?
        }
        Objective::Both => {
            let reached: Vec<f64> = (0..layers)
                .map(|l| {
                    (balanced.iter())
                        .map(|st| search.step_loads(st)[l])
                        .fold(f64::INFINITY, f64::min)
                })
                .collect();
            let caps: Vec<f64> = (0..layers)
                .map(|l| {
                    reached[l]
                        + options.load_cap.clamp(0.0, 1.0) * (eplb_loads[l] - reached[l]).max(0.0)
                })
                .collect();
            let mut out = Vec::new();
            for mut st in balanced.into_iter().chain([search.state(program_start)]) {
                moves += search.improve(&mut st, &caps, deadline);
                out.push(st);
            }
            pick(&search, out, &caps)?
        }
    };
    let mut assign = best.assign.clone();
    for layer in &mut assign {
        for devs in layer.iter_mut() {
            devs.sort_unstable();
        }
    }
    let placement = Placement::from_device_lists(cap, &device_lists(&assign, cap))?;
    let steps = counts.num_steps().max(1) as f64;
    let step_max_load = search.step_loads(&best).iter().map(|x| x / steps).collect();
    let traffic_known = program.cross_device_transitions.is_some();
    let (device, node) = proxy_traffic(counts, &assign, &topo);
    let mut solver = program.solver;
    solver.seconds = start.elapsed().as_secs_f64();
    solver.local_search_moves = Some(moves);
    Ok(PlanOutcome {
        max_device_load: (0..layers)
            .map(|l| max_load(&counts.load[l], &copies[l], &assign[l], cap.devices))
            .collect(),
        placement,
        method: program.method,
        solver,
        step_max_load,
        eplb_step_max_load: eplb_loads.iter().map(|x| x / steps).collect(),
        cross_device_transitions: traffic_known.then_some(device),
        cross_node_transitions: traffic_known.then_some(node),
    })
}

/// `[layer][expert]`: the devices of each copy in `placement`.
fn assignment(placement: &Placement) -> Assignment {
    (0..placement.num_layers())
        .map(|l| placement.expert_devices(l))
        .collect()
}

/// The state lowest in (load over `caps`, traffic).
fn pick(search: &Search<'_>, states: Vec<State>, caps: &[f64]) -> Result<State> {
    let score = |st: &State| {
        let excess: f64 = (search.step_loads(st).iter().zip(caps))
            .map(|(x, c)| (x - c).max(0.0))
            .sum();
        (excess, search.traffic(st))
    };
    (states.into_iter().map(|s| (score(&s), s)))
        .min_by(|a, b| a.0.0.total_cmp(&b.0.0).then(a.0.1.total_cmp(&b.0.1)))
        .map(|(_, s)| s)
        .ok_or_else(|| Error::InvalidInput("the placement search had no start".into()))
}

/// The integer program of the module comment, with the greedy fallback.
fn solve_program(counts: &RoutingCounts, options: &PlanOptions) -> Result<PlanOutcome> {
    let start = Instant::now();
    let cap = options.capacity;
    if cap.num_experts != counts.num_experts || cap.devices != options.topology.devices {
        return Err(Error::InvalidInput(format!(
            "the capacity is for {} experts on {} devices, the counts have {} experts and the \
             topology {} devices",
            cap.num_experts, cap.devices, counts.num_experts, options.topology.devices
        )));
    }
    let layers = counts.load.len();
    let per_layer = cap.num_experts * cap.devices;
    let mut ctx = Ctx {
        counts,
        options,
        copies: copies_per_layer(counts, cap),
        deadline: start + options.time_limit,
        verdicts: Vec::new(),
    };
    let traffic_known = counts.transitions.is_some() && layers > 1;
    let (assign, method, note) = if per_layer > LAYER_MAX_BINARIES {
        let note = format!(
            "{per_layer} binaries per layer ({} experts x {} devices) is more than the \
             {LAYER_MAX_BINARIES} the pure-Rust solver is given: greedy placement",
            cap.num_experts, cap.devices
        );
        (greedy(counts, cap), SolveMethod::Greedy, Some(note))
    } else {
        let mut assign = Vec::with_capacity(layers);
        let mut z_best = Vec::with_capacity(layers);
        let mut pending = layers;
        for l in 0..layers {
            // Balance needs solving for `balance` and `both` only.
            let packed = pack_layer(&counts.load[l], &ctx.copies[l], cap);
            if options.objective == Objective::Traffic && traffic_known {
                z_best.push(f64::INFINITY);
                assign.push(packed);
                continue;
            }
            let budget = ctx.share(pending + usize::from(traffic_known));
            pending -= 1;
            let (layer, z) = ctx.balance(l, packed, budget)?;
            assign.push(layer);
            z_best.push(z);
        }
        let caps = z_best.clone();
        if options.objective == Objective::Balance || !traffic_known {
            let note = (!traffic_known && options.objective != Objective::Balance)
                .then(|| "the counts carry no cross-layer transitions: balance only".to_string());
            (assign, SolveMethod::Joint, note)
        } else {
            // The greedy's traffic-aware pass is a better start where it keeps the loads.
            let g = greedy(counts, cap);
            let within = (0..layers).all(|l| {
                max_load(&counts.load[l], &ctx.copies[l], &g[l], cap.devices) <= caps[l] + 1e-9
            });
            if within {
                assign = g;
            }
            if layers * per_layer <= JOINT_MAX_BINARIES {
                let budget = ctx.share(1);
                ctx.traffic(0..layers, &mut assign, &caps, budget)?;
                (assign, SolveMethod::Joint, None)
            } else {
                ctx.sweep(&mut assign, &caps)?;
                (assign, SolveMethod::Layerwise, None)
            }
        }
    };
    let placement = Placement::from_device_lists(cap, &device_lists(&assign, cap))?;
    let max_device_load = (0..layers)
        .map(|l| max_load(&counts.load[l], &ctx.copies[l], &assign[l], cap.devices))
        .collect();
    let (device, node) = proxy_traffic(counts, &assign, &options.topology);
    let solver = ctx.report(method, note, start.elapsed().as_secs_f64());
    Ok(PlanOutcome {
        placement,
        method,
        solver,
        max_device_load,
        step_max_load: Vec::new(),
        eplb_step_max_load: Vec::new(),
        cross_device_transitions: traffic_known.then_some(device),
        cross_node_transitions: traffic_known.then_some(node),
    })
}

struct Ctx<'a> {
    counts: &'a RoutingCounts,
    options: &'a PlanOptions,
    copies: Vec<Vec<usize>>,
    deadline: Instant,
    verdicts: Vec<Verdict>,
}

impl Ctx<'_> {
    /// An even share of the time left among `programs` still to solve.
    fn share(&self, programs: usize) -> Duration {
        let left = self.deadline.saturating_duration_since(Instant::now());
        (left / programs.max(1) as u32).max(Duration::from_millis(50))
    }

    fn capacity(&self) -> Capacity {
        self.options.capacity
    }

    fn report(&self, method: SolveMethod, note: Option<String>, seconds: f64) -> SolverReport {
        let solved = !self.verdicts.is_empty();
        let proved = self.verdicts.iter().all(|v| v.proved);
        let gap = self.verdicts.iter().map(|v| v.gap).fold(0.0, f64::max);
        let last = self.verdicts.iter().rev().find(|v| !v.failed);
        let note = note.or_else(|| {
            (method == SolveMethod::Layerwise).then(|| {
                format!(
                    "{} binaries over all layers is more than {JOINT_MAX_BINARIES}: layers solved \
                     one at a time with their neighbours fixed; the gap is the largest of {} \
                     programs'",
                    self.counts.load.len() * self.capacity().num_experts * self.capacity().devices,
                    self.verdicts.len()
                )
            })
        });
        let failed = self.verdicts.iter().filter(|v| v.failed).count();
        let note = match (note, failed) {
            (note, 0) => note,
            (note, n) => Some(format!(
                "{}{n} of {} programs found no solution in their time share (their start was \
                 kept, gap counted as 100 %)",
                note.map_or(String::new(), |s| s + "; "),
                self.verdicts.len()
            )),
        };
        SolverReport {
            method: method.name().into(),
            status: match (method, solved, proved) {
                (SolveMethod::Greedy, _, _) | (_, false, _) => "greedy".into(),
                (_, true, true) => "optimal".into(),
                (_, true, false) => "time-limit".into(),
            },
            gap: solved.then_some(gap),
            objective: last.map(|v| v.objective),
            best_bound: last.map(|v| v.bound),
            seconds,
            note,
            local_search_moves: None,
        }
    }

    /// Layer `l`'s balance optimum, starting from `start`; returns the
    /// placement and its max load (never worse than `start`'s).
    fn balance(
        &mut self,
        l: usize,
        start: Vec<Vec<usize>>,
        budget: Duration,
    ) -> Result<(Vec<Vec<usize>>, f64)> {
        let n = self.capacity().devices;
        let (load, copies) = (&self.counts.load[l], &self.copies[l]);
        let start_z = max_load(load, copies, &start, n);
        let mut p = Program::new(self, l..l + 1, std::slice::from_ref(&start));
        let z = p.vars.add(variable().min(0.0).initial(start_z));
        p.warm.push((z, start_z));
        p.objective += z;
        for d in 0..n {
            p.constraints.push((p.load_expr(self, 0, d) - z).leq(0.0));
        }
        // Devices are interchangeable: the heaviest expert's first copy on device 0.
        if let Some(hot) = (0..load.len()).max_by(|&a, &b| load[a].total_cmp(&load[b])) {
            p.constraints.push(Expression::from(p.x[0][hot][0]).eq(1.0));
        }
        let Some((layers, verdict)) = p.solve(budget) else {
            self.verdicts.push(Verdict::failed());
            return Ok((start, start_z));
        };
        let layer = layers.into_iter().next().unwrap_or_default();
        let z_found = max_load(load, copies, &layer, n);
        let valid = layer.iter().zip(copies).all(|(d, &c)| d.len() == c);
        self.verdicts.push(verdict);
        Ok(if valid && z_found <= start_z {
            (layer, z_found)
        } else {
            (start, start_z)
        })
    }

    /// Minimises the traffic of the boundaries touching `window`, the other
    /// layers of `assign` fixed and every layer's max load at most `caps`.
    fn traffic(
        &mut self,
        window: Range<usize>,
        assign: &mut Assignment,
        caps: &[f64],
        budget: Duration,
    ) -> Result<()> {
        let topo = self.options.topology;
        let before = weighted_traffic(self, assign);
        let mut p = Program::new(self, window.clone(), &assign[window.clone()]);
        for (w, l) in window.clone().enumerate() {
            if caps[l].is_finite() {
                for d in 0..topo.devices {
                    let c = caps[l] * (1.0 + 1e-9) + 1e-9;
                    p.constraints.push(p.load_expr(self, w, d).leq(c));
                }
            }
        }
        p.add_traffic(self, assign);
        let Some((layers, verdict)) = p.solve(budget) else {
            self.verdicts.push(Verdict::failed());
            return Ok(());
        };
        self.verdicts.push(verdict);
        let mut candidate = assign.clone();
        for (w, l) in window.enumerate() {
            candidate[l] = layers[w].clone();
        }
        let loads_ok = (0..assign.len()).all(|l| {
            let z = max_load(
                &self.counts.load[l],
                &self.copies[l],
                &candidate[l],
                topo.devices,
            );
            z <= caps[l] * (1.0 + 1e-6) + 1e-6
        });
        if loads_ok && weighted_traffic(self, &candidate) <= before {
            *assign = candidate;
        }
        Ok(())
    }

    /// Layer-at-a-time traffic passes until one changes nothing or time is up.
    fn sweep(&mut self, assign: &mut Assignment, caps: &[f64]) -> Result<()> {
        let layers = assign.len();
        for pass in 0..MAX_SWEEPS {
            let before = weighted_traffic(self, assign);
            for l in 0..layers {
                let left = (MAX_SWEEPS - pass) * layers - l;
                if Instant::now() >= self.deadline {
                    return Ok(());
                }
                let budget = self.share(left);
                self.traffic(l..l + 1, assign, caps, budget)?;
            }
            if weighted_traffic(self, assign) >= before - 1e-9 {
                break;
            }
        }
        Ok(())
    }
}

fn weighted_traffic(ctx: &Ctx<'_>, assign: &Assignment) -> f64 {
    let (device, node) = proxy_traffic(ctx.counts, assign, &ctx.options.topology);
    device + ctx.options.node_weight * node
}

/// One program over the layers of `window`.
struct Program {
    window: Range<usize>,
    vars: ProblemVariables,
    /// `[window layer][expert][device]`.
    x: Vec<Vec<Vec<Variable>>>,
    objective: Expression,
    constraints: Vec<good_lp::Constraint>,
    warm: Vec<(Variable, f64)>,
}

impl Program {
    /// Variables and the copy and slot constraints, warm-started at `start`.
    fn new(ctx: &Ctx<'_>, window: Range<usize>, start: &[Vec<Vec<usize>>]) -> Self {
        let cap = ctx.capacity();
        let mut vars = ProblemVariables::new();
        let mut warm = Vec::new();
        let mut constraints = Vec::new();
        let mut x = Vec::with_capacity(window.len());
        for (w, l) in window.clone().enumerate() {
            let layer: Vec<Vec<Variable>> = (0..cap.num_experts)
                .map(|e| {
                    (0..cap.devices)
                        .map(|d| {
                            let on = f64::from(u8::from(start[w][e].contains(&d)));
                            let v = vars.add(variable().binary().initial(on));
                            warm.push((v, on));
                            v
                        })
                        .collect()
                })
                .collect();
            for (e, xs) in layer.iter().enumerate() {
                let sum: Expression = xs.iter().sum();
                constraints.push(sum.eq(ctx.copies[l][e] as f64));
            }
            for d in 0..cap.devices {
                let sum: Expression = layer.iter().map(|xs| xs[d]).sum();
                constraints.push(sum.eq(cap.slots_per_device as f64));
            }
            x.push(layer);
        }
        Self {
            window,
            vars,
            x,
            objective: Expression::from(0.0),
            constraints,
            warm,
        }
    }

    /// Device `d`'s load in window layer `w`.
    fn load_expr(&self, ctx: &Ctx<'_>, w: usize, d: usize) -> Expression {
        let l = self.window.start + w;
        let mut sum = Expression::from(0.0);
        for (e, xs) in self.x[w].iter().enumerate() {
            sum.add_mul(ctx.counts.load[l][e] / ctx.copies[l][e] as f64, xs[d]);
        }
        sum
    }

    /// Traffic terms of every boundary touching the window (module comment);
    /// a boundary to a fixed layer is linear in `x` and needs no cut variable.
    fn add_traffic(&mut self, ctx: &Ctx<'_>, assign: &Assignment) {
        let topo = ctx.options.topology;
        let e = ctx.counts.num_experts;
        let node_w = if topo.nodes > 1 {
            ctx.options.node_weight
        } else {
            0.0
        };
        let first = self.window.start.saturating_sub(1);
        let last = (self.window.end + 1).min(assign.len());
        for b in first..last.saturating_sub(1) {
            let Some(t) = ctx.counts.transition(b) else {
                continue;
            };
            let (src_free, dst_free) = (self.window.contains(&b), self.window.contains(&(b + 1)));
            for i in 0..e {
                for j in 0..e {
                    let tokens = t[i * e + j];
                    if tokens == 0.0 {
                        continue;
                    }
                    match (src_free, dst_free) {
                        (true, true) => self.add_cut(b, (i, j), tokens, node_w, topo),
                        (true, false) => {
                            let dst = &assign[b + 1][j];
                            let share = tokens / ctx.copies[b][i] as f64;
                            for d in 0..topo.devices {
                                let apart = !dst.contains(&d);
                                let node_apart =
                                    !dst.iter().any(|&x| topo.node_of(x) == topo.node_of(d));
                                let c = share
                                    * (f64::from(u8::from(apart))
                                        + node_w * f64::from(u8::from(node_apart)));
                                self.objective
                                    .add_mul(c, self.x[b - self.window.start][i][d]);
                            }
                        }
                        (false, true) => {
                            let src = &assign[b][i];
                            let share = tokens / (src.len() * ctx.copies[b + 1][j]) as f64;
                            for d in 0..topo.devices {
                                let apart = src.iter().filter(|&&s| s != d).count() as f64;
                                let node_apart = (src.iter())
                                    .filter(|&&s| topo.node_of(s) != topo.node_of(d))
                                    .count()
                                    as f64;
                                let c = share * (apart + node_w * node_apart);
                                self.objective
                                    .add_mul(c, self.x[b + 1 - self.window.start][j][d]);
                            }
                        }
                        (false, false) => {}
                    }
                }
            }
        }
    }

    /// `cut >= x_i,d - x_j,d` per device (and per node with `node_w > 0`).
    fn add_cut(
        &mut self,
        b: usize,
        (i, j): (usize, usize),
        tokens: f64,
        node_w: f64,
        topo: Topology,
    ) {
        let (wi, wj) = (b - self.window.start, b + 1 - self.window.start);
        let cut = self.vars.add(variable().min(0.0));
        self.objective.add_mul(tokens, cut);
        for d in 0..topo.devices {
            let diff = Expression::from(self.x[wi][i][d]) - self.x[wj][j][d] - cut;
            self.constraints.push(diff.leq(0.0));
        }
        if node_w > 0.0 {
            let ncut = self.vars.add(variable().min(0.0));
            self.objective.add_mul(tokens * node_w, ncut);
            let per = topo.devices_per_node();
            for m in 0..topo.nodes {
                let mut diff = Expression::from(0.0) - ncut;
                for d in m * per..(m + 1) * per {
                    diff += self.x[wi][i][d];
                    diff -= self.x[wj][j][d];
                }
                self.constraints.push(diff.leq(0.0));
            }
        }
    }

    /// Solves within `budget`; returns each window layer's `[expert] -> devices`,
    /// or `None` where the solver gave up without an incumbent (microlp can
    /// run out of time before it takes the warm start; the caller keeps it).
    fn solve(self, budget: Duration) -> Option<(Vec<Vec<Vec<usize>>>, Verdict)> {
        let Program {
            vars,
            x,
            objective,
            constraints,
            warm,
            ..
        } = self;
        let mut model = vars
            .minimise(objective)
            .using(microlp)
            .with_time_limit(budget.as_secs_f64())
            .with_initial_solution(warm);
        for c in constraints {
            model.add_constraint(c);
        }
        let solution = model.solve().ok()?;
        let layers = (x.iter())
            .map(|layer| {
                (layer.iter())
                    .map(|xs| {
                        (0..xs.len())
                            .filter(|&d| solution.value(xs[d]) > 0.5)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let inner = solution.into_inner();
        let stats = inner.stats();
        let verdict = Verdict {
            failed: false,
            proved: inner.gap() == Some(0.0)
                || matches!(inner.status(), microlp::SolutionStatus::Optimal),
            gap: inner.gap().unwrap_or(0.0),
            objective: inner.objective(),
            bound: stats.best_bound.unwrap_or(inner.objective()),
        };
        Some((layers, verdict))
    }
}

impl Verdict {
    fn failed() -> Self {
        Self {
            failed: true,
            gap: 1.0,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_made_trace_is_solved_to_its_known_optimum() {
        // Layer 0 loads 4 4 2 2; tokens go 0 -> 0 (4), 1 -> 1 (4), 2 -> 1 (2),
        // 3 -> 0 (2), so layer 1 loads 6 6 0 0. Balance splits layer 0 into
        // {0, 2} | {1, 3} (4 crossing tokens) or {0, 3} | {1, 2} (none): only
        // the second has zero traffic at max loads 6 and 6.
        let mut t = vec![0.0; 16];
        t[0] = 4.0;
        t[5] = 4.0;
        t[2 * 4 + 1] = 2.0;
        t[3 * 4] = 2.0;
        let counts = RoutingCounts {
            num_experts: 4,
            num_layers: 2,
            moe_layers: vec![0, 1],
            load: vec![vec![4.0, 4.0, 2.0, 2.0], vec![6.0, 6.0, 0.0, 0.0]],
            step_load: vec![vec![4.0, 4.0, 2.0, 2.0], vec![6.0, 6.0, 0.0, 0.0]],
            transitions: Some(vec![t]),
            tokens: None,
        };
        let options = PlanOptions {
            topology: Topology::new(2, 1).unwrap(),
            capacity: Capacity::with_redundant(4, 2, 0).unwrap(),
            objective: Objective::Both,
            time_limit: Duration::from_secs(20),
            node_weight: 4.0,
            load_cap: 0.5,
        };
        let out = plan(&counts, &options).unwrap();
        assert_eq!(out.method, SolveMethod::Joint);
        assert_eq!(out.solver.status, "optimal");
        assert_eq!(out.max_device_load, vec![6.0, 6.0]);
        assert_eq!(out.cross_device_transitions, Some(0.0));
        let d = out.placement.expert_devices(0);
        assert_eq!(d[0], d[3]);
        assert_eq!(d[1], d[2]);
        assert_ne!(d[0], d[1]);
    }

    #[test]
    fn per_step_balance_beats_eplb_where_totals_mislead_it() {
        // Totals 4 3 3 2 on 2 devices: EPLB packs {0, 3} | {1, 2} (6 and 6),
        // but experts 1 and 2 are busy in step 0 together (3 + 3 on one
        // device) and 0 and 3 in step 1 (4 + 2): 6 per step. Splitting
        // either pair gives max loads 3 and 4: 3.5 per step.
        let counts = RoutingCounts {
            num_experts: 4,
            num_layers: 1,
            moe_layers: vec![0],
            load: vec![vec![4.0, 3.0, 3.0, 2.0]],
            step_load: vec![vec![0.0, 3.0, 3.0, 0.0, 4.0, 0.0, 0.0, 2.0]],
            transitions: None,
            tokens: None,
        };
        let options = PlanOptions {
            topology: Topology::new(2, 1).unwrap(),
            capacity: Capacity::with_redundant(4, 2, 0).unwrap(),
            objective: Objective::Both,
            time_limit: Duration::from_secs(5),
            node_weight: 4.0,
            load_cap: 0.5,
        };
        let out = plan(&counts, &options).unwrap();
        assert_eq!(out.eplb_step_max_load, vec![6.0]);
        assert_eq!(out.step_max_load, vec![3.5]);
        let d = out.placement.expert_devices(0);
        assert_ne!(d[1], d[2]);
        assert_ne!(d[0], d[3]);
    }

    #[test]
    fn the_plan_replays_with_less_load_and_traffic_than_eplb() {
        use crate::placement::local::tests::correlated_routes;
        use crate::placement::{SimOptions, eplb, simulate};
        let routes = correlated_routes(8, 3, 2048);
        let counts = RoutingCounts::from_routes(&routes, 64).unwrap();
        let topology = Topology::new(4, 2).unwrap();
        let capacity = Capacity::with_redundant(8, 4, 0).unwrap();
        let options = PlanOptions {
            topology,
            capacity,
            objective: Objective::Both,
            time_limit: Duration::from_secs(4),
            node_weight: 4.0,
            load_cap: 0.5,
        };
        let out = plan(&counts, &options).unwrap();
        let sim = SimOptions {
            batch_tokens: 64,
            token_bytes: None,
        };
        let ours = simulate(&routes, &out.placement, &topology, sim).unwrap();
        let theirs = simulate(
            &routes,
            &eplb(capacity, &counts.load).unwrap(),
            &topology,
            sim,
        );
        let theirs = theirs.unwrap();
        // Without replicas the search's per-step load is the replay's.
        let planned: f64 = out.step_max_load.iter().sum();
        assert!(
            (planned - ours.max_load).abs() < 1e-9,
            "{planned} vs {}",
            ours.max_load
        );
        assert!(ours.max_load < theirs.max_load, "{ours:?} vs {theirs:?}");
        assert!(
            ours.cross_device_tokens < theirs.cross_device_tokens,
            "{ours:?} vs {theirs:?}"
        );
        assert!(
            ours.cross_node_tokens < theirs.cross_node_tokens,
            "{ours:?} vs {theirs:?}"
        );
    }
}
