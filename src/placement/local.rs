//! Pairwise-swap local search on what `simulate` measures, run after the
//! integer program (whose loads are whole-trace totals) and from EPLB's own
//! placement.
//!
//! A move swaps two physical experts of one layer on different devices (never
//! giving a device a second copy of an expert). Its score, per layer `l`:
//! - `step_load[l]`: summed over the replay's steps, the busiest device's
//!   expert-token pairs in that step (a replica takes `1 / copies` of its
//!   expert's tokens), which is `simulate`'s max load with its batch size;
//! - `excess = sum_l max(0, step_load[l] - cap[l])`;
//! - traffic: cross-device plus `node_weight` x cross-node dispatches exactly
//!   as `simulate` counts them (every token from the device of its rank-0
//!   expert of the layer before, or its home device, once to each other
//!   device holding one of its experts) where the counts carry the tokens and
//!   no expert is replicated; otherwise the integer program's proxy
//!   (`greedy::proxy_traffic`), since a replica's serving copy depends on
//!   where the token comes from, layer after layer.
//!
//! A move is taken when it lowers `(excess, traffic)` lexicographically, so
//! with caps of zero it minimises load (traffic breaks ties) and with caps at
//! a reached load it minimises traffic without letting any layer's load pass
//! its cap. First improvement, layer by layer, until a full pass over every
//! pair changes nothing or the deadline passes; a swap only touches its
//! layer's loads and the two boundaries beside it, so each is scored in
//! `O(steps x devices + experts)` (proxy) or `O(steps x devices + tokens
//! choosing either expert x top_k)` (exact). There is no bound: what it reaches is a
//! local optimum of the swap neighbourhood.

use std::time::Instant;

use super::counts::TokenRoutes;
use super::greedy::Assignment;
use super::{Capacity, RoutingCounts, Topology};

/// Below this a change is float noise, not an improvement.
fn tol(x: f64) -> f64 {
    1e-9 * (1.0 + x.abs())
}

pub struct Search<'a> {
    pub counts: &'a RoutingCounts,
    pub copies: &'a [Vec<usize>],
    pub capacity: Capacity,
    pub topology: Topology,
    /// A cross-node transition costs this many cross-device ones (0 on one node).
    pub node_weight: f64,
}

/// A placement being improved, with its per-step device loads kept current.
pub struct State {
    /// `[moe_layers][expert]`: devices of each copy.
    pub assign: Assignment,
    /// `[moe_layers][steps * devices]`.
    dev_load: Vec<Vec<f64>>,
}

impl Search<'_> {
    pub fn state(&self, assign: Assignment) -> State {
        let n = self.capacity.devices;
        let e = self.counts.num_experts;
        let steps = self.counts.num_steps();
        let dev_load = (0..assign.len())
            .map(|l| {
                let mut out = vec![0.0; steps * n];
                for (x, devs) in assign[l].iter().enumerate() {
                    let c = self.copies[l][x] as f64;
                    for &d in devs {
                        for s in 0..steps {
                            out[s * n + d] += self.counts.step_load[l][s * e + x] / c;
                        }
                    }
                }
                out
            })
            .collect();
        State { assign, dev_load }
    }

    /// `[moe_layers]`: each layer's per-step max load summed over steps.
    pub fn step_loads(&self, state: &State) -> Vec<f64> {
        let n = self.capacity.devices;
        (state.dev_load.iter())
            .map(|row| {
                row.chunks(n)
                    .map(|s| s.iter().fold(0.0, |m: f64, &x| m.max(x)))
                    .sum()
            })
            .collect()
    }

    /// The token routes to score traffic exactly with, if that is possible.
    fn exact(&self) -> Option<&TokenRoutes> {
        (self.capacity.redundant() == 0)
            .then_some(self.counts.tokens.as_ref())
            .flatten()
    }

    /// Cross-device + `node_weight` x cross-node traffic of `state` (module comment).
    pub fn traffic(&self, state: &State) -> f64 {
        let layers = state.assign.len();
        if let Some(tr) = self.exact() {
            let mut sum = 0.0;
            for l in 0..layers {
                for t in 0..tr.n_tokens() {
                    sum += self.token_cost(tr, &state.assign, l, t);
                }
            }
            return sum;
        }
        let e = self.counts.num_experts;
        let mut sum = 0.0;
        for b in 0..layers.saturating_sub(1) {
            for i in 0..e {
                for j in 0..e {
                    sum += self.pair(&state.assign, b, i, j);
                }
            }
        }
        sum
    }

    /// Improves `state` in place (module comment) until a local optimum or
    /// `deadline`; `caps` is `[moe_layers]`. Returns the moves taken.
    pub fn improve(&self, state: &mut State, caps: &[f64], deadline: Instant) -> usize {
        let layers = state.assign.len();
        let physical = self.capacity.num_physical();
        let mut loads = self.step_loads(state);
        let mut moves = 0;
        loop {
            let mut improved = false;
            for l in 0..layers {
                // Physical slot -> (expert, device), rebuilt after each swap.
                let mut slots = slot_list(&state.assign[l]);
                for p in 0..physical {
                    for q in (p + 1)..physical {
                        if Instant::now() >= deadline {
                            return moves;
                        }
                        let ((a, da), (b, db)) = (slots[p], slots[q]);
                        if da == db || a == b {
                            continue;
                        }
                        let holds = |x: usize, d: usize| state.assign[l][x].contains(&d);
                        if holds(a, db) || holds(b, da) {
                            continue;
                        }
                        let new_load = self.swapped_load(state, l, (a, da), (b, db));
                        let excess = |x: f64| (x - caps[l]).max(0.0);
                        let (old_ex, new_ex) = (excess(loads[l]), excess(new_load));
                        if new_ex > old_ex + tol(old_ex) {
                            continue;
                        }
                        let before = self.local_traffic(&state.assign, l, a, b);
                        swap(&mut state.assign[l], (a, da), (b, db));
                        let after = self.local_traffic(&state.assign, l, a, b);
                        let better_ex = new_ex < old_ex - tol(old_ex);
                        if better_ex || after < before - tol(before) {
                            self.apply_load(state, l, (a, da), (b, db));
                            loads[l] = new_load;
                            slots[p] = (a, db);
                            slots[q] = (b, da);
                            moves += 1;
                            improved = true;
                        } else {
                            swap(&mut state.assign[l], (a, db), (b, da));
                        }
                    }
                }
            }
            if !improved {
                return moves;
            }
        }
    }

    /// Layer `l`'s per-step max load summed over steps with copy `a` on `da`
    /// and copy `b` on `db` exchanged.
    fn swapped_load(
        &self,
        state: &State,
        l: usize,
        (a, da): (usize, usize),
        (b, db): (usize, usize),
    ) -> f64 {
        let n = self.capacity.devices;
        let e = self.counts.num_experts;
        let (ca, cb) = (self.copies[l][a] as f64, self.copies[l][b] as f64);
        let row = &state.dev_load[l];
        let w = &self.counts.step_load[l];
        let mut sum = 0.0;
        for s in 0..row.len() / n {
            let (wa, wb) = (w[s * e + a] / ca, w[s * e + b] / cb);
            let mut max = 0.0f64;
            for d in 0..n {
                let x = row[s * n + d];
                let x = if d == da {
                    x - wa + wb
                } else if d == db {
                    x - wb + wa
                } else {
                    x
                };
                max = max.max(x);
            }
            sum += max;
        }
        sum
    }

    fn apply_load(
        &self,
        state: &mut State,
        l: usize,
        (a, da): (usize, usize),
        (b, db): (usize, usize),
    ) {
        let n = self.capacity.devices;
        let e = self.counts.num_experts;
        let (ca, cb) = (self.copies[l][a] as f64, self.copies[l][b] as f64);
        let w = &self.counts.step_load[l];
        let row = &mut state.dev_load[l];
        for s in 0..row.len() / n {
            let (wa, wb) = (w[s * e + a] / ca, w[s * e + b] / cb);
            row[s * n + da] += wb - wa;
            row[s * n + db] += wa - wb;
        }
    }

    /// The traffic of every pair a swap of experts `a` and `b` in layer `l`
    /// can change: into them from layer `l - 1`, out of them into `l + 1`.
    fn local_traffic(&self, assign: &Assignment, l: usize, a: usize, b: usize) -> f64 {
        if let Some(tr) = self.exact() {
            return self.local_token_traffic(tr, assign, l, a, b);
        }
        let e = self.counts.num_experts;
        let mut sum = 0.0;
        for x in [a, b] {
            for other in 0..e {
                if l > 0 {
                    sum += self.pair(assign, l - 1, other, x);
                }
                if l + 1 < assign.len() {
                    sum += self.pair(assign, l, x, other);
                }
            }
        }
        sum
    }

    /// [`Self::local_traffic`] counted token by token: the tokens choosing
    /// `a` or `b` in layer `l`, and where those whose rank-0 expert is `a` or
    /// `b` go next.
    fn local_token_traffic(
        &self,
        tr: &TokenRoutes,
        assign: &Assignment,
        l: usize,
        a: usize,
        b: usize,
    ) -> f64 {
        let mut sum = 0.0;
        let (xs, ys) = (&tr.by_expert[l][a], &tr.by_expert[l][b]);
        let (mut i, mut j) = (0, 0);
        // Both ascending: a merge visits each token once.
        while i < xs.len() || j < ys.len() {
            let t = match (xs.get(i), ys.get(j)) {
                (Some(&x), Some(&y)) if x == y => {
                    i += 1;
                    j += 1;
                    x
                }
                (Some(&x), Some(&y)) if x < y => {
                    i += 1;
                    x
                }
                (Some(&x), None) => {
                    i += 1;
                    x
                }
                (_, Some(&y)) => {
                    j += 1;
                    y
                }
                (None, None) => break,
            };
            sum += self.token_cost(tr, assign, l, t as usize);
        }
        for x in [a, b] {
            for &t in &tr.by_rank0[l][x] {
                let t = t as usize;
                // The next layer that routes the token leaves from here.
                if let Some(m) = (l + 1..assign.len()).find(|&m| !tr.layers[m].token(t).is_empty())
                {
                    sum += self.token_cost(tr, assign, m, t);
                }
            }
        }
        sum
    }

    /// Token `t`'s dispatches in layer `l`, `simulate`'s way (no replicas).
    fn token_cost(&self, tr: &TokenRoutes, assign: &Assignment, l: usize, t: usize) -> f64 {
        let topo = self.topology;
        let src = (0..l)
            .rev()
            .find_map(|m| tr.layers[m].token(t).first().map(|&r| (m, r as usize)))
            .and_then(|(m, r)| assign[m][r].first().copied())
            .unwrap_or(t % topo.devices);
        let mut dest: [usize; 16] = [usize::MAX; 16];
        let mut n_dest = 0;
        let mut extra: Vec<usize> = Vec::new();
        let mut cost = 0.0;
        for &x in tr.layers[l].token(t) {
            let Some(&d) = assign[l][x as usize].first() else {
                continue;
            };
            if d == src || dest[..n_dest].contains(&d) || extra.contains(&d) {
                continue;
            }
            if n_dest < dest.len() {
                dest[n_dest] = d;
                n_dest += 1;
            } else {
                extra.push(d);
            }
            cost += 1.0;
            if self.node_weight > 0.0 && topo.node_of(d) != topo.node_of(src) {
                cost += self.node_weight;
            }
        }
        cost
    }

    /// Boundary `b`'s proxy cost of tokens going `i -> j` (`proxy_traffic`).
    fn pair(&self, assign: &Assignment, b: usize, i: usize, j: usize) -> f64 {
        let Some(t) = self.counts.transition(b) else {
            return 0.0;
        };
        let w = t[i * self.counts.num_experts + j];
        if w == 0.0 {
            return 0.0;
        }
        let (src, dst) = (&assign[b][i], &assign[b + 1][j]);
        let topo = self.topology;
        let mut apart = 0.0;
        for &d in src {
            if !dst.contains(&d) {
                apart += 1.0;
                if self.node_weight > 0.0
                    && !dst.iter().any(|&x| topo.node_of(x) == topo.node_of(d))
                {
                    apart += self.node_weight;
                }
            }
        }
        w * apart / src.len() as f64
    }
}

/// `[physical]`: (expert, device) of each slot, devices in order.
fn slot_list(layer: &[Vec<usize>]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = (layer.iter().enumerate())
        .flat_map(|(x, devs)| devs.iter().map(move |&d| (x, d)))
        .collect();
    out.sort_by_key(|&(x, d)| (d, x));
    out
}

/// Moves one copy of `a` from `da` to `db` and one of `b` from `db` to `da`.
fn swap(layer: &mut [Vec<usize>], (a, da): (usize, usize), (b, db): (usize, usize)) {
    if let Some(x) = layer[a].iter_mut().find(|d| **d == da) {
        *x = db;
    }
    if let Some(x) = layer[b].iter_mut().find(|d| **d == db) {
        *x = da;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::placement::greedy::{copies_per_layer, pack_layer, proxy_traffic};
    use crate::trace::{Routes, SequenceRoutes, TokenExperts, TraceMeta};

    /// A trace of `layers x tokens` with `top_k` experts of `num_experts`
    /// from a fixed LCG, each layer's first choice following the last's
    /// half the time (so placement can cut traffic).
    pub(crate) fn correlated_routes(num_experts: u32, layers: usize, tokens: usize) -> Routes {
        let mut x = 12345u64;
        let mut next = |m: u32| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % u64::from(m)) as u32
        };
        let mut per_layer = vec![Vec::new(); layers];
        for _ in 0..tokens {
            let mut prev = next(num_experts);
            for layer in per_layer.iter_mut() {
                let first = if next(2) == 0 {
                    (prev * 3 + 1) % num_experts
                } else {
                    next(num_experts)
                };
                let mut second = next(num_experts);
                if second == first {
                    second = (first + 1) % num_experts;
                }
                layer.push(vec![first, second]);
                prev = first;
            }
        }
        Routes {
            meta: TraceMeta {
                num_layers: layers,
                num_experts: num_experts as usize,
                top_k: 2,
                moe_layers: (0..layers).collect(),
                model: "m".into(),
            },
            sequences: vec![SequenceRoutes {
                id: 0,
                positions: (0..tokens as u32).collect(),
                layers: per_layer
                    .iter()
                    .map(|t| TokenExperts::from_tokens(t))
                    .collect(),
            }],
        }
    }

    #[test]
    fn kept_loads_match_a_recount_after_every_swap() {
        let routes = correlated_routes(8, 3, 300);
        let counts = RoutingCounts::from_routes(&routes, 32).unwrap();
        let capacity = Capacity::with_redundant(8, 4, 4).unwrap();
        let copies = copies_per_layer(&counts, capacity);
        let topology = Topology::new(4, 2).unwrap();
        let search = Search {
            counts: &counts,
            copies: &copies,
            capacity,
            topology,
            node_weight: 4.0,
        };
        let start: Assignment = (0..3)
            .map(|l| pack_layer(&counts.load[l], &copies[l], capacity))
            .collect();
        let mut st = search.state(start.clone());
        let (load0, traffic0) = (search.step_loads(&st), search.traffic(&st));
        let far = Instant::now() + std::time::Duration::from_secs(30);
        let moves = search.improve(&mut st, &[0.0; 3], far);
        assert!(moves > 0, "LPT on totals is not per-step optimal here");
        let fresh = search.state(st.assign.clone());
        for (kept, recount) in search.step_loads(&st).iter().zip(search.step_loads(&fresh)) {
            assert!((kept - recount).abs() < 1e-9, "{kept} vs {recount}");
        }
        let loads = search.step_loads(&st);
        assert!(loads.iter().zip(&load0).all(|(a, b)| a <= b));
        assert!(loads.iter().sum::<f64>() < load0.iter().sum::<f64>());
        // Copies stay on distinct devices and every device keeps its slots.
        for layer in &st.assign {
            let mut used = [0; 4];
            for (x, devs) in layer.iter().enumerate() {
                let mut d = devs.clone();
                d.sort_unstable();
                d.dedup();
                assert_eq!(d.len(), devs.len(), "two copies of {x} on one device");
                for &dev in devs {
                    used[dev] += 1;
                }
            }
            assert_eq!(used, [3; 4]);
        }
        // The traffic the search scores is the program's proxy.
        let (dev, node) = proxy_traffic(&counts, &st.assign, &topology);
        assert!((search.traffic(&st) - (dev + 4.0 * node)).abs() < 1e-6);
        // Capped 5 % above the loads reached, traffic goes down and no cap is passed.
        let before = search.traffic(&st);
        let caps: Vec<f64> = loads.iter().map(|x| x * 1.05).collect();
        search.improve(&mut st, &caps, far);
        assert!(
            search.traffic(&st) < before,
            "{} vs {before}",
            search.traffic(&st)
        );
        assert!(search.traffic(&st) < traffic0);
        for (now, cap) in search.step_loads(&st).iter().zip(&caps) {
            assert!(*now <= cap + 1e-9, "{now} above its cap {cap}");
        }
    }

    #[test]
    fn exact_traffic_is_what_the_replay_counts_before_and_after_the_search() {
        use crate::placement::greedy::device_lists;
        use crate::placement::{Placement, SimOptions, simulate};
        let routes = correlated_routes(8, 3, 500);
        let counts = RoutingCounts::from_routes(&routes, 50).unwrap();
        let capacity = Capacity::with_redundant(8, 4, 0).unwrap();
        let copies = copies_per_layer(&counts, capacity);
        let topology = Topology::new(4, 2).unwrap();
        let search = Search {
            counts: &counts,
            copies: &copies,
            capacity,
            topology,
            node_weight: 3.0,
        };
        let start: Assignment = (0..3)
            .map(|l| pack_layer(&counts.load[l], &copies[l], capacity))
            .collect();
        let mut st = search.state(start);
        let replayed = |st: &State| {
            let p = Placement::from_device_lists(capacity, &device_lists(&st.assign, capacity));
            let sim = SimOptions {
                batch_tokens: 50,
                token_bytes: None,
            };
            let r = simulate(&routes, &p.unwrap(), &topology, sim).unwrap();
            // Per-step means back to totals over the 10 steps.
            (r.cross_device_tokens * 10.0, r.cross_node_tokens * 10.0)
        };
        let (dev, node) = replayed(&st);
        assert!((search.traffic(&st) - (dev + 3.0 * node)).abs() < 1e-6);
        let far = Instant::now() + std::time::Duration::from_secs(30);
        search.improve(&mut st, &[f64::INFINITY; 3], far);
        let (dev_after, node_after) = replayed(&st);
        assert!((search.traffic(&st) - (dev_after + 3.0 * node_after)).abs() < 1e-6);
        assert!(dev_after + 3.0 * node_after < dev + 3.0 * node);
    }
}
