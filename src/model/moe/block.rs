use std::sync::Arc;

use candle_core::{D, DType, Tensor};
use rayon::prelude::*;

use super::router::{RouterBias, RouterConfig, Routing, route};
use crate::config::ScoreFn;
use crate::error::{Error, Result};
use crate::experts::{CacheOutcome, CallExperts, ExpertProvider};
use crate::model::batch::BatchLayout;
use crate::model::observer::{RoutingObserver, RoutingSite};
use crate::model::profile::{self, Phase};
use crate::ops::matmul::as_task;
use crate::ops::{Ffn, FfnInput, Linear, with_thread_scratch};

/// An always-on expert: Qwen2-MoE's mixed in with weight `sigmoid(gate(x))`,
/// DeepSeek's (no gate) added as it is.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub ffn: Ffn,
    pub gate: Option<Linear>, // [1, hidden]
}

/// The next MoE layer's router, applied to this layer's input to predict the
/// experts that layer will use (`--prefetch next-layer`; FATE reports ~97 %
/// accuracy training-free, the hidden state changing little between layers).
#[derive(Debug, Clone)]
pub struct NextRouter {
    pub layer: usize,
    pub router: Linear, // [n_experts, hidden]
    pub config: RouterConfig,
    pub selection_bias: Option<Vec<f32>>, // [n_experts]
}

impl NextRouter {
    /// The distinct experts, ascending, that `x: [n_tokens, hidden]` would route to.
    fn predict(&self, x: &Tensor) -> Result<Vec<u32>> {
        let logits = self.router.forward(x)?.to_dtype(DType::F32)?; // [n_tokens, n_experts]
        let n_experts = self.router.dims().0;
        let routing = route(
            &logits.flatten_all()?.to_vec1::<f32>()?,
            n_experts,
            self.config,
            RouterBias {
                logits: None,
                selection: self.selection_bias.as_deref(),
            },
        );
        let mut experts = routing.expert_ids;
        experts.retain(|&e| e != Routing::NO_EXPERT);
        experts.sort_unstable();
        experts.dedup();
        Ok(experts)
    }
}

/// Cost per token: the router (`n_experts x hidden`) plus `top_k` experts'
/// weights (plus the shared expert); unselected experts are never touched.
#[derive(Debug)]
pub struct MoeBlock {
    layer: usize,
    router: Linear, // [n_experts, hidden]
    config: RouterConfig,
    experts: Arc<dyn ExpertProvider>,
    shared: Option<SharedExpert>,
    /// Added to the scores for choosing only (DeepSeek-V3's
    /// `e_score_correction_bias`). `[n_experts]`
    selection_bias: Option<Vec<f32>>,
    /// Boxed: most blocks have none, and `LayerFfn` stays small.
    next: Option<Box<NextRouter>>,
}

impl MoeBlock {
    pub fn new(
        layer: usize,
        router: Linear,
        config: RouterConfig,
        experts: Arc<dyn ExpertProvider>,
        shared: Option<SharedExpert>,
    ) -> Self {
        Self {
            layer,
            router,
            config,
            experts,
            shared,
            selection_bias: None,
            next: None,
        }
    }

    /// The block with a selection bias, `[n_experts]`.
    pub fn with_selection_bias(mut self, bias: Option<Vec<f32>>) -> Self {
        self.selection_bias = bias;
        self
    }

    pub fn selection_bias(&self) -> Option<&[f32]> {
        self.selection_bias.as_deref()
    }

    /// Predict the next MoE layer's experts from this layer's input and ask
    /// the provider to prefetch them.
    pub fn set_next_router(&mut self, next: NextRouter) {
        self.next = Some(Box::new(next));
    }

    pub fn config(&self) -> RouterConfig {
        self.config
    }

    pub fn router(&self) -> &Linear {
        &self.router
    }

    pub fn shared(&self) -> Option<&SharedExpert> {
        self.shared.as_ref()
    }

    pub fn num_experts(&self) -> usize {
        self.router.dims().0
    }

    /// # Shapes
    /// `x: [n_tokens, hidden] -> [n_tokens, hidden]`; router logits are pushed to
    /// `router_logits` when it is given (training's auxiliary losses need them).
    pub fn forward(
        &self,
        x: &Tensor,
        layout: &BatchLayout,
        observer: &mut dyn RoutingObserver,
        router_logits: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let n_experts = self.num_experts();
        let layer = Some(self.layer);
        let router_span = profile::span(Phase::Router, layer);
        let logits = self.router.forward(x)?; // [n_tokens, n_experts]
        let logits_f32 = logits.to_dtype(DType::F32)?;
        let routing = route(
            &logits_f32.flatten_all()?.to_vec1::<f32>()?,
            n_experts,
            self.config,
            RouterBias {
                logits: None,
                selection: self.selection_bias.as_deref(),
            },
        );
        let groups = routing.slots_by_expert();
        drop(router_span);

        let experts_span = profile::span(Phase::Experts, layer);
        let mut norms = observer.wants_expert_output_norms().then(Vec::new);
        let (mut out, outcomes) = if logits.track_op() || x.track_op() {
            self.experts_autograd(x, &logits_f32, &routing, &groups)?
        } else {
            let prefetch = match &self.next {
                Some(next) => Some((next.layer as u32, next.predict(x)?)),
                None => None,
            };
            let call = InferenceCall {
                routing: &routing,
                groups: &groups,
                prefetch,
                norms: norms.as_mut(),
            };
            self.experts_inference(x, call)?
        };
        drop(experts_span);
        report(self.layer, &routing, layout, outcomes.as_deref(), observer);
        if let Some(norms) = &norms {
            observer.on_expert_output_norms(self.layer, &routing, norms);
        }
        if let Some(shared) = &self.shared {
            let _span = profile::span(Phase::SharedExpert, layer);
            let y = shared.ffn.forward(x)?;
            out = match &shared.gate {
                Some(gate) => {
                    let gate = candle_nn::ops::sigmoid(&gate.forward(x)?)?; // [n_tokens, 1]
                    (out + y.broadcast_mul(&gate)?)?
                }
                None => (out + y)?,
            };
        }
        if let Some(all) = router_logits {
            all.push(logits);
        }
        Ok(out)
    }

    /// The provider's experts for one group of `groups` (a whole layer call
    /// unless it is wider than the provider allows).
    fn call_experts(&self, group: &[(u32, Vec<u32>)]) -> Result<CallExperts> {
        let distinct: Vec<u32> = group.iter().map(|(e, _)| *e).collect();
        let experts = self
            .experts
            .experts_for_call(self.layer as u32, &distinct)?;
        if experts.ffns.len() != distinct.len() {
            return Err(Error::InvalidInput(format!(
                "layer {}: the expert provider returned {} experts for {} asked",
                self.layer,
                experts.ffns.len(),
                distinct.len()
            )));
        }
        Ok(experts)
    }

    /// Each active expert once over all its tokens, on plain f32 buffers: the
    /// layer's input is quantized once for all experts (decode quantized the same
    /// row once per expert before), each expert's rows are read from it and its
    /// outputs written to its own part of one buffer, then mixed in place. Experts
    /// run in parallel, one per thread at a time (their matmuls then stay on that
    /// thread): a decode step pays one fork-join per layer instead of two per
    /// expert. The buffers are this thread's, reused from call to call. A
    /// `prefetch` prediction `(layer, experts)` is passed on to the provider. Experts
    /// come in groups of at most the provider's
    /// [`max_experts_per_call`](ExpertProvider::max_experts_per_call), each
    /// group's dropped before the next is asked for.
    fn experts_inference(&self, x: &Tensor, call: InferenceCall<'_>) -> Result<(Tensor, Outcomes)> {
        let InferenceCall {
            routing,
            groups,
            mut prefetch,
            norms,
        } = call;
        let (n, hidden) = x.dims2()?;
        let k = routing.top_k;
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?; // [n, hidden]
        let per_call = self.experts.max_experts_per_call().max(1);
        with_thread_scratch(&CALL_SCRATCH, |scratch| {
            let CallScratch { input, rows, ys } = scratch;
            // Per group, its tokens' row numbers and its slice of the outputs.
            rows.clear();
            rows.extend(
                groups
                    .iter()
                    .flat_map(|(_, slots)| slots.iter().map(|&s| s as usize / k)),
            );
            ys.resize(rows.len() * hidden, 0.0); // [n * top_k, hidden]
            let mut parts = Vec::with_capacity(groups.len());
            let (mut rows_left, mut ys_left) = (rows.as_slice(), ys.as_mut_slice());
            for (_, slots) in groups {
                let (r, rest) = rows_left.split_at(slots.len());
                let (y, ys_rest) = std::mem::take(&mut ys_left).split_at_mut(slots.len() * hidden);
                (rows_left, ys_left) = (rest, ys_rest);
                parts.push((r, y));
            }
            let mut parts = parts.into_iter();
            let mut outcomes = None;
            let mut filled_quantized = None;
            for group in groups.chunks(per_call) {
                let call = self.call_experts(group)?;
                // Once this layer's first experts are in hand, so that the
                // reads overlap its compute and never evict what it uses.
                if let Some((layer, experts)) = prefetch.take() {
                    self.experts.prefetch(layer, &experts);
                }
                let quantize = call.ffns.iter().any(|e| e.gate_up().reads_quantized());
                if filled_quantized != Some(quantize) {
                    input.fill(&xs, n, hidden, quantize)?;
                    filled_quantized = Some(quantize);
                }
                merge_outcomes(&mut outcomes, call.outcomes);
                let input = &*input;
                let work: Vec<_> = call
                    .ffns
                    .iter()
                    .zip(parts.by_ref().take(group.len()))
                    .collect();
                work.into_par_iter().try_for_each(|(ffn, (r, y))| {
                    let _span = profile::span(Phase::ExpertMatvecs, Some(self.layer));
                    as_task(|| ffn.forward_rows(input, r, y))
                })?;
            }
            drop(parts);
            let slots = groups.iter().flat_map(|(_, slots)| slots.iter());
            if let Some(norms) = norms {
                norms.clear();
                norms.resize(routing.expert_ids.len(), 0.0);
                for (&s, y) in slots.clone().zip(ys.chunks_exact(hidden)) {
                    norms[s as usize] = y.iter().map(|v| v * v).sum::<f32>().sqrt();
                }
            }
            let mut out = vec![0f32; n * hidden];
            for (&s, y) in slots.zip(ys.chunks_exact(hidden)) {
                let t = s as usize / k;
                let w = routing.weights[s as usize];
                for (o, &v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(y) {
                    *o += w * v;
                }
            }
            let out = Tensor::from_vec(out, (n, hidden), x.device())?.to_dtype(x.dtype())?;
            Ok((out, outcomes))
        })
    }

    /// The differentiable form: the mixture as tensor ops so that experts and
    /// router receive gradients.
    fn experts_autograd(
        &self,
        x: &Tensor,
        logits: &Tensor,
        routing: &Routing,
        groups: &[(u32, Vec<u32>)],
    ) -> Result<(Tensor, Outcomes)> {
        let weights = self.mixing_weights(logits, routing)?; // [n_tokens * top_k]
        let mut out = x.zeros_like()?;
        let mut outcomes = None;
        for group in groups.chunks(self.experts.max_experts_per_call().max(1)) {
            let call = self.call_experts(group)?;
            for ((_, slots), ffn) in group.iter().zip(&call.ffns) {
                let tokens: Vec<u32> = slots.iter().map(|s| s / routing.top_k as u32).collect();
                let tokens = Tensor::new(tokens.as_slice(), x.device())?;
                let slots = Tensor::new(slots.as_slice(), x.device())?;
                let xs = x.index_select(&tokens, 0)?; // [m, hidden]
                let w = weights.index_select(&slots, 0)?.unsqueeze(1)?; // [m, 1]
                let ys = ffn.forward(&xs)?.broadcast_mul(&w.to_dtype(x.dtype())?)?;
                out = out.index_add(&tokens, &ys, 0)?;
            }
            merge_outcomes(&mut outcomes, call.outcomes);
        }
        Ok((out, outcomes))
    }

    /// The routing weights as a tensor. In inference they are the router's
    /// values; under autograd they are recomputed from the logits so that the
    /// router receives gradients through the mixture.
    fn mixing_weights(&self, logits: &Tensor, routing: &Routing) -> Result<Tensor> {
        if !logits.track_op() {
            return Ok(Tensor::new(routing.weights.as_slice(), logits.device())?);
        }
        if self.config.top_p.is_some() {
            return Err(Error::InvalidInput(
                "dynamic expert top-p is for inference; training routes plain top-k".into(),
            ));
        }
        let spec = self.config.spec;
        if spec.score != ScoreFn::Softmax
            || spec.groups.is_some()
            || spec.routed_scaling_factor != 1.0
        {
            return Err(Error::InvalidInput(
                "training differentiates the softmax router only (no sigmoid, groups or scaling)"
                    .into(),
            ));
        }
        let n_tokens = routing.n_tokens();
        let ids = Tensor::from_slice(
            &routing.expert_ids,
            (n_tokens, routing.top_k),
            logits.device(),
        )?;
        let probs = candle_nn::ops::softmax(logits, D::Minus1)?;
        let mut top = probs.gather(&ids, 1)?; // [n_tokens, top_k]
        if spec.norm_topk_prob {
            let denom = top.sum_keepdim(1)?.clamp(f32::MIN_POSITIVE, f32::MAX)?;
            top = top.broadcast_div(&denom)?;
        }
        Ok(top.flatten_all()?)
    }
}

/// One layer call's work for [`MoeBlock::experts_inference`].
struct InferenceCall<'a> {
    routing: &'a Routing,
    /// `(expert, slots)` from [`Routing::slots_by_expert`].
    groups: &'a [(u32, Vec<u32>)],
    /// The next layer's predicted experts `(layer, experts)`, passed on to the provider.
    prefetch: Option<(u32, Vec<u32>)>,
    /// Receives each slot's output L2 norm, when given.
    norms: Option<&'a mut Vec<f32>>,
}

/// What [`MoeBlock::experts_inference`] keeps per thread between calls.
#[derive(Default)]
struct CallScratch {
    input: FfnInput,
    rows: Vec<usize>, // [n * top_k]: input row of each slot, grouped by expert
    ys: Vec<f32>,     // [n * top_k, hidden]: each slot's expert output
}

thread_local! {
    static CALL_SCRATCH: std::cell::Cell<CallScratch> = std::cell::Cell::new(CallScratch::default());
}

/// What the expert cache did for each expert of a layer call, ascending by expert.
type Outcomes = Option<Vec<(u32, CacheOutcome)>>;

/// Groups are ascending and disjoint, so appending keeps the order.
fn merge_outcomes(all: &mut Outcomes, group: Outcomes) {
    if let Some(group) = group {
        all.get_or_insert_with(Vec::new).extend(group);
    }
}

/// Hands each sequence its own slice of the batch's routing.
fn report(
    layer: usize,
    routing: &Routing,
    layout: &BatchLayout,
    cache: Option<&[(u32, CacheOutcome)]>,
    observer: &mut dyn RoutingObserver,
) {
    for seq in layout.sequences() {
        let site = RoutingSite {
            layer,
            sequence: seq.sequence,
            start_position: seq.start_position,
            cache,
        };
        observer.on_routing(site, &routing.tokens(seq.row_start, seq.n_tokens));
    }
}
