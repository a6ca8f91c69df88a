//! `GET /metrics` in the Prometheus text format (version 0.0.4): counters,
//! gauges and latency histograms, updated by the handlers and the model thread.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::trace::ActiveExperts;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Cumulative buckets in seconds, as Prometheus histograms are.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramData>,
}

#[derive(Debug, Default)]
struct HistogramData {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

const LATENCY_BOUNDS_S: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Histogram {
    fn latency() -> Self {
        Self {
            bounds: LATENCY_BOUNDS_S,
            inner: Mutex::new(HistogramData {
                counts: vec![0; LATENCY_BOUNDS_S.len()],
                ..Default::default()
            }),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let Ok(mut d) = self.inner.lock() else {
            return;
        };
        for (c, &b) in d.counts.iter_mut().zip(self.bounds) {
            if seconds <= b {
                *c += 1;
            }
        }
        d.sum += seconds;
        d.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let Ok(d) = self.inner.lock() else {
            return;
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in d.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", d.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", d.sum, d.count);
    }
}

#[derive(Debug)]
pub struct Metrics {
    /// `(route, status)` -> responses.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub cancelled: Counter,
    pub rejected_full: Counter,
    pub running: Gauge,
    pub waiting: Gauge,
    pub kv_reserved_bytes: Gauge,
    pub kv_allocated_bytes: Gauge,
    pub kv_budget_bytes: Gauge,
    pub expert_resident_bytes: Gauge,
    /// The model's `top_k`, beside the experts tokens actually used.
    pub expert_top_k: Gauge,
    /// Experts used, over every (token, MoE layer) pair the model routed.
    routed_expert_slots: Counter,
    /// (token, MoE layer) pairs routed: tokens fed times MoE layers.
    routed_tokens: Counter,
    /// `routed_expert_slots / routed_tokens` as one value (f64 bits), so a
    /// scrape between the two stores never sees a torn ratio.
    active_experts_per_token: Gauge,
    steps: Counter,
    step_ns: Counter,
    /// Tokens per second of the last step (f64 bits).
    last_step_tokens_per_s: Gauge,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            cancelled: Counter::default(),
            rejected_full: Counter::default(),
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_reserved_bytes: Gauge::default(),
            kv_allocated_bytes: Gauge::default(),
            kv_budget_bytes: Gauge::default(),
            expert_resident_bytes: Gauge::default(),
            expert_top_k: Gauge::default(),
            routed_expert_slots: Counter::default(),
            routed_tokens: Counter::default(),
            active_experts_per_token: Gauge::default(),
            steps: Counter::default(),
            step_ns: Counter::default(),
            last_step_tokens_per_s: Gauge::default(),
            time_to_first_token: Histogram::latency(),
            inter_token_latency: Histogram::latency(),
        }
    }
}

impl Metrics {
    pub fn record_request(&self, route: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route.to_string(), status)).or_default() += 1;
        }
    }

    pub fn record_step(&self, tokens: u64, took: Duration) {
        self.steps.inc();
        self.step_ns.add(took.as_nanos() as u64);
        self.generated_tokens.add(tokens);
        let rate = tokens as f64 / took.as_secs_f64().max(1e-9);
        self.last_step_tokens_per_s.set(rate.to_bits());
    }

    /// The model thread's running totals of what the router chose (they only grow).
    pub fn record_routing(&self, active: &ActiveExperts) {
        let slots = active.routed_slots();
        self.routed_expert_slots.0.store(slots, Ordering::Relaxed);
        self.routed_tokens
            .0
            .store(active.routed_tokens(), Ordering::Relaxed);
        self.active_experts_per_token
            .set(active.mean_active_per_token().to_bits());
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP switchyard_requests_total HTTP responses by route and status.\n# TYPE switchyard_requests_total counter"
        );
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "switchyard_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let counters = [
            (
                "switchyard_prompt_tokens_total",
                "Prompt tokens of accepted requests.",
                &self.prompt_tokens,
            ),
            (
                "switchyard_generated_tokens_total",
                "Tokens generated.",
                &self.generated_tokens,
            ),
            (
                "switchyard_cancelled_sequences_total",
                "Sequences ended because their client went away.",
                &self.cancelled,
            ),
            (
                "switchyard_rejected_queue_full_total",
                "Requests refused with 429 because the queue was full.",
                &self.rejected_full,
            ),
            (
                "switchyard_routed_expert_slots_total",
                "Experts used, summed over every token and MoE layer the model routed.",
                &self.routed_expert_slots,
            ),
            (
                "switchyard_routed_tokens_total",
                "Tokens routed times MoE layers (prompt and generated).",
                &self.routed_tokens,
            ),
            (
                "switchyard_decode_steps_total",
                "Batched forward steps of the model thread.",
                &self.steps,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        let busy_s = self.step_ns.get() as f64 / 1e9;
        let _ = writeln!(
            out,
            "# HELP switchyard_model_busy_seconds_total Time the model thread spent in steps.\n# TYPE switchyard_model_busy_seconds_total counter\nswitchyard_model_busy_seconds_total {busy_s}"
        );
        let gauges = [
            (
                "switchyard_running_sequences",
                "Sequences in the running batch.",
                self.running.get() as f64,
            ),
            (
                "switchyard_queue_depth",
                "Sequences waiting for a running slot or KV memory.",
                self.waiting.get() as f64,
            ),
            (
                "switchyard_kv_cache_reserved_bytes",
                "KV-cache bytes reserved by running sequences.",
                self.kv_reserved_bytes.get() as f64,
            ),
            (
                "switchyard_kv_cache_allocated_bytes",
                "KV-cache bytes allocated by running sequences.",
                self.kv_allocated_bytes.get() as f64,
            ),
            (
                "switchyard_kv_cache_budget_bytes",
                "The KV budget (--kv-memory); 0 when unbounded.",
                self.kv_budget_bytes.get() as f64,
            ),
            (
                "switchyard_expert_resident_bytes",
                "Expert weight bytes resident in memory.",
                self.expert_resident_bytes.get() as f64,
            ),
            (
                "switchyard_expert_top_k",
                "Experts per token the model's router picks (its top_k).",
                self.expert_top_k.get() as f64,
            ),
            (
                "switchyard_active_experts_per_token",
                "Experts used per token and MoE layer, averaged (below top_k under --expert-top-p).",
                f64::from_bits(self.active_experts_per_token.get()),
            ),
            (
                "switchyard_decode_tokens_per_second",
                "Tokens the last step produced per second of its time.",
                f64::from_bits(self.last_step_tokens_per_s.get()),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        self.time_to_first_token.write(
            &mut out,
            "switchyard_time_to_first_token_seconds",
            "From submission to the first token.",
        );
        self.inter_token_latency.write(
            &mut out,
            "switchyard_inter_token_latency_seconds",
            "Between consecutive tokens of a sequence.",
        );
        out
    }
}

/// The expert cache's counters (only under `--expert-memory`).
pub fn expert_cache_lines(r: &crate::experts::CacheReport) -> String {
    let mut out = String::new();
    let mut lines: Vec<(&str, &str, &str, f64)> = vec![(
        "switchyard_expert_cache_hit_rate",
        "gauge",
        "Expert lookups served from memory.",
        r.counts.hit_rate(),
    )];
    // A server keeps no routing history (it would grow without bound), so
    // the optimum appears only when a report carries it.
    if let Some(optimal) = &r.optimal {
        lines.push((
            "switchyard_expert_cache_optimal_hit_rate",
            "gauge",
            "Belady's optimum on the same lookups and capacity.",
            optimal.hit_rate(),
        ));
    }
    if let Some(share) = r.stand_in_share() {
        lines.push((
            "switchyard_expert_cache_stand_in_share",
            "gauge",
            "Expert lookups computed with a 4-bit stand-in (--miss-precision).",
            share,
        ));
    }
    lines.extend([
        (
            "switchyard_expert_cache_lookups_total",
            "counter",
            "Expert lookups.",
            r.counts.lookups as f64,
        ),
        (
            "switchyard_expert_cache_misses_total",
            "counter",
            "Expert lookups read from the checkpoint.",
            r.counts.misses as f64,
        ),
        (
            "switchyard_expert_cache_budget_bytes",
            "gauge",
            "The expert budget (--expert-memory).",
            r.budget_bytes as f64,
        ),
        (
            "switchyard_expert_cache_peak_resident_bytes",
            "gauge",
            "Most expert bytes resident at once.",
            r.peak_resident_bytes as f64,
        ),
    ]);
    for (name, kind, help, v) in lines {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
    out
}

/// The value of an unlabelled sample in a rendered exposition (tests, bench-serve).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_samples_parse() {
        let m = Metrics::default();
        m.time_to_first_token.observe(0.003);
        m.time_to_first_token.observe(0.2);
        m.record_request("/v1/completions", 200);
        m.running.set(3);
        let text = m.render();
        assert!(text.contains("switchyard_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("switchyard_time_to_first_token_seconds_bucket{le=\"0.25\"} 2"));
        assert!(text.contains("switchyard_time_to_first_token_seconds_count 2"));
        assert!(
            text.contains("switchyard_requests_total{route=\"/v1/completions\",status=\"200\"} 1")
        );
        assert_eq!(sample(&text, "switchyard_running_sequences"), Some(3.0));
    }

    #[test]
    fn routing_totals_and_their_ratio_are_exposed() {
        use crate::model::moe::Routing;
        use crate::model::{RoutingObserver, RoutingSite, SequenceId};
        let mut active = ActiveExperts::default();
        // Three tokens: two use both slots, one only its first (dynamic top-p).
        let routing = Routing {
            top_k: 2,
            expert_ids: vec![0, 1, 2, Routing::NO_EXPERT, 3, 0],
            weights: vec![0.5, 0.5, 1.0, 0.0, 0.5, 0.5],
            scores: vec![0.5; 6],
        };
        let site = RoutingSite {
            layer: 0,
            sequence: SequenceId(0),
            start_position: 0,
            cache: None,
        };
        active.on_routing(site, &routing);
        let m = Metrics::default();
        m.expert_top_k.set(2);
        m.record_routing(&active);
        let text = m.render();
        assert_eq!(
            sample(&text, "switchyard_routed_expert_slots_total"),
            Some(5.0)
        );
        assert_eq!(sample(&text, "switchyard_routed_tokens_total"), Some(3.0));
        let ratio = sample(&text, "switchyard_active_experts_per_token").unwrap();
        assert!((ratio - 5.0 / 3.0).abs() < 1e-12, "{ratio}");
        assert_eq!(sample(&text, "switchyard_expert_top_k"), Some(2.0));
    }
}
