//! Everything `switchyard analyze` reports about a trace, as one serialisable
//! value: expert load, locality (SRP, SCH), cache hit-rate curves under both
//! countings, and cross-layer co-activation.

use serde::Serialize;

use super::coactivation::{Coactivation, PairStat};
use super::load::{ExpertLoad, consecutive_reuse, uniform_reuse};
use super::routes::{Routes, TokenExperts};
use super::srp::{SEGMENT_LENGTHS, SegmentHistogram, Srp};
use super::stack::{StackPolicy, mean_hit_curve};
use crate::experts::{Capacity, LayerCall, PolicyKind, replay, replay_optimal};

/// Co-activation pairs listed per layer pair.
const TOP_PAIRS: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub model: String,
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub moe_layers: Vec<usize>,
    pub sequences: usize,
    pub tokens: usize,
    /// Cache sizes of every curve, in experts per MoE layer (`1..=num_experts`);
    /// model-level curves hold that many experts times the number of MoE layers.
    pub cache_experts_per_layer: Vec<usize>,
    /// The same sizes as multiples of `top_k` (the paper's x axis).
    pub cache_in_top_k: Vec<f64>,
    pub load: Vec<ExpertLoad>,
    /// Share of consecutive tokens sharing an expert, per layer, against the
    /// share independent uniform routing would give.
    pub consecutive_reuse: Vec<LayerValue>,
    pub uniform_random_reuse: f64,
    pub srp: SrpSummary,
    pub sch: SchSummary,
    /// LRU, LFU and Belady under the paper's counting (comparable with its tables).
    pub paper_counting: HitRates,
    /// LRU, LFU (with ageing) and Belady under the engine's counting (what the
    /// expert cache reports at run time).
    pub engine_counting: HitRates,
    pub coactivation: Vec<CoactivationSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerValue {
    pub layer: usize,
    pub value: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SrpSummary {
    /// Per MoE layer, one entry per segment length.
    pub layers: Vec<LayerSrp>,
    /// Windows of all layers pooled, one threshold for the model.
    pub model: Vec<Srp>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerSrp {
    pub layer: usize,
    pub segments: Vec<Srp>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SchSummary {
    pub layers: Vec<LayerSch>,
    pub model: Vec<SchCurve>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerSch {
    pub layer: usize,
    pub curves: Vec<SchCurve>,
}

/// SCH for one look-ahead (segment) length: hit rate per cache size.
#[derive(Debug, Clone, Serialize)]
pub struct SchCurve {
    pub segment: usize,
    pub hit_rate: Vec<f64>,
}

/// Hit rate per cache size for each policy.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyCurves {
    pub lru: Vec<f64>,
    pub lfu: Vec<f64>,
    pub belady: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerCurves {
    pub layer: usize,
    #[serde(flatten)]
    pub curves: PolicyCurves,
}

#[derive(Debug, Clone, Serialize)]
pub struct HitRates {
    pub layers: Vec<LayerCurves>,
    pub model: PolicyCurves,
}

#[derive(Debug, Clone, Serialize)]
pub struct CoactivationSummary {
    pub from_layer: usize,
    pub to_layer: usize,
    pub mutual_information_bits: f64,
    /// Mutual information over the next layer's routing entropy.
    pub normalized_mutual_information: f64,
    pub top_pairs: Vec<PairStat>,
    /// `[from_expert][to_expert]`: P(to at the next layer | from at this one).
    pub conditional: Vec<Vec<f64>>,
}

impl Summary {
    pub fn of(routes: &Routes) -> Summary {
        let meta = &routes.meta;
        let (e, k) = (meta.num_experts, meta.top_k);
        let n_layers = meta.moe_layers.len();
        let sizes: Vec<usize> = (1..=e).collect();
        let model_streams: Vec<TokenExperts> = routes
            .sequences
            .iter()
            .map(|s| TokenExperts::concat_layers(&s.layers, e))
            .collect();
        let per_layer = |li: usize| routes.layer(li);
        // Model-level curves at the same per-layer sizes: every n_layers-th size.
        let at_layer_sizes = |curve: Vec<f64>| -> Vec<f64> {
            sizes
                .iter()
                .filter_map(|c| curve.get(c * n_layers - 1).copied())
                .collect()
        };

        let load = (meta.moe_layers.iter().enumerate())
            .map(|(li, &l)| ExpertLoad::of(l, per_layer(li), e))
            .collect();
        let consecutive = (meta.moe_layers.iter().enumerate())
            .map(|(li, &l)| LayerValue {
                layer: l,
                value: consecutive_reuse(per_layer(li)),
            })
            .collect();

        let mut model_srp: Vec<SegmentHistogram> = SEGMENT_LENGTHS
            .iter()
            .map(|&m| SegmentHistogram::new(m))
            .collect();
        let mut srp_layers = Vec::new();
        for (li, &l) in meta.moe_layers.iter().enumerate() {
            let mut segments = Vec::new();
            for (m, model) in SEGMENT_LENGTHS.iter().zip(model_srp.iter_mut()) {
                let mut h = SegmentHistogram::new(*m);
                for seq in per_layer(li) {
                    h.add_sequence(seq, e);
                }
                model.add(&h);
                segments.push(h.best());
            }
            srp_layers.push(LayerSrp { layer: l, segments });
        }

        let sch_layers = (meta.moe_layers.iter().enumerate())
            .map(|(li, &l)| LayerSch {
                layer: l,
                curves: SEGMENT_LENGTHS
                    .iter()
                    .map(|&m| SchCurve {
                        segment: m,
                        hit_rate: mean_hit_curve(
                            per_layer(li),
                            e,
                            StackPolicy::FewestSoon { future: m },
                        ),
                    })
                    .collect(),
            })
            .collect();
        let model_items = e * n_layers;
        let sch_model = SEGMENT_LENGTHS
            .iter()
            .map(|&m| SchCurve {
                segment: m,
                hit_rate: at_layer_sizes(mean_hit_curve(
                    &model_streams,
                    model_items,
                    StackPolicy::FewestSoon { future: m },
                )),
            })
            .collect();

        let paper_curves = |streams: Vec<&TokenExperts>, items: usize| PolicyCurves {
            lru: mean_hit_curve(streams.iter().copied(), items, StackPolicy::Lru),
            lfu: mean_hit_curve(streams.iter().copied(), items, StackPolicy::Lfu),
            belady: mean_hit_curve(streams.iter().copied(), items, StackPolicy::Belady),
        };
        let paper_counting = HitRates {
            layers: (meta.moe_layers.iter().enumerate())
                .map(|(li, &l)| LayerCurves {
                    layer: l,
                    curves: paper_curves(per_layer(li).collect(), e),
                })
                .collect(),
            model: {
                let c = paper_curves(model_streams.iter().collect(), model_items);
                PolicyCurves {
                    lru: at_layer_sizes(c.lru),
                    lfu: at_layer_sizes(c.lfu),
                    belady: at_layer_sizes(c.belady),
                }
            },
        };

        let engine_counting = HitRates {
            layers: (0..n_layers)
                .map(|li| LayerCurves {
                    layer: meta.moe_layers[li],
                    curves: engine_curves(
                        &layer_calls(routes, Some(li)),
                        &sizes,
                        Capacity::PerLayer,
                    ),
                })
                .collect(),
            model: engine_curves(&layer_calls(routes, None), &sizes, |c| {
                Capacity::Global(c * n_layers)
            }),
        };

        let coactivation = (0..n_layers.saturating_sub(1))
            .filter_map(|li| Coactivation::of(routes, li))
            .map(|c| CoactivationSummary {
                from_layer: c.from_layer,
                to_layer: c.to_layer,
                mutual_information_bits: c.mutual_information_bits(),
                normalized_mutual_information: c.normalized_mutual_information(),
                top_pairs: c.top_pairs(TOP_PAIRS),
                conditional: c.conditional_matrix(),
            })
            .collect();

        Summary {
            model: meta.model.clone(),
            num_layers: meta.num_layers,
            num_experts: e,
            top_k: k,
            moe_layers: meta.moe_layers.clone(),
            sequences: routes.sequences.len(),
            tokens: routes.n_tokens(),
            cache_in_top_k: sizes.iter().map(|&c| c as f64 / k.max(1) as f64).collect(),
            cache_experts_per_layer: sizes,
            load,
            consecutive_reuse: consecutive,
            uniform_random_reuse: uniform_reuse(e, k),
            srp: SrpSummary {
                layers: srp_layers,
                model: model_srp.iter().map(SegmentHistogram::best).collect(),
            },
            sch: SchSummary {
                layers: sch_layers,
                model: sch_model,
            },
            paper_counting,
            engine_counting,
            coactivation,
        }
    }
}

/// The trace as the engine's expert cache would see it: sequences one after
/// another through one cache, each token one call per MoE layer (as decode
/// runs), layers in order. `only` keeps one MoE layer (an index into
/// `moe_layers`).
fn layer_calls(routes: &Routes, only: Option<usize>) -> Vec<LayerCall> {
    let mut calls = Vec::new();
    for seq in &routes.sequences {
        for t in 0..seq.n_tokens() {
            for (li, layer) in seq.layers.iter().enumerate() {
                if only.is_none_or(|o| o == li) {
                    let id = routes.meta.moe_layers[li] as u32;
                    calls.push(LayerCall::new(id, layer.token(t).iter().copied()));
                }
            }
        }
    }
    calls
}

fn engine_curves(
    calls: &[LayerCall],
    sizes: &[usize],
    capacity: impl Fn(usize) -> Capacity,
) -> PolicyCurves {
    let run = |f: &dyn Fn(Capacity) -> f64| sizes.iter().map(|&c| f(capacity(c))).collect();
    PolicyCurves {
        lru: run(&|cap| replay(calls, cap, PolicyKind::Lru).hit_rate()),
        lfu: run(&|cap| replay(calls, cap, PolicyKind::Lfu { half_life: None }).hit_rate()),
        belady: run(&|cap| replay_optimal(calls, cap).hit_rate()),
    }
}
