//! Continuous batching: every running sequence advances in one batched forward
//! per step, new sequences join between steps, and long prompts enter in chunks
//! so the streams already running keep getting tokens.
//!
//! Cost per step: one read of the attention weights, the router and each expert
//! that any row of the batch routes to (the MoE block groups rows per expert),
//! plus each sequence's own cached keys/values.

use std::collections::VecDeque;

use super::sampler::{Sampler, SamplingParams};
use crate::error::{Error, Result};
use crate::model::{
    ForwardOptions, KvCache, LogitsFor, Model, Phase, RoutingObserver, SequenceId, SequenceInput,
    profile,
};

/// One generation asked of the scheduler.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    pub prompt: Vec<u32>,
    /// Cut to what the context leaves after the prompt.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// The sequence finishes after emitting one of these (usually the EOS ids).
    pub stop_ids: Vec<u32>,
    /// `Some(k)`: report each chosen token's log-probability and the `k` most
    /// likely alternatives.
    pub top_logprobs: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerOptions {
    /// Sequences decoded together; later ones wait.
    pub max_running: usize,
    /// KV-cache bytes the running sequences may reserve together (`None`: no
    /// bound). A sequence reserves its whole length's worth when admitted, so a
    /// running one never runs out.
    pub kv_budget_bytes: Option<usize>,
    /// Prompt tokens one sequence feeds per step. The boundaries depend on the
    /// sequence alone, so its output does not depend on what it is batched with.
    pub prefill_chunk: usize,
    /// Prompt tokens one step feeds across all prefilling sequences (at least one
    /// chunk is always fed), so a burst of long prompts cannot stall decode.
    pub prefill_tokens_per_step: usize,
}

impl SchedulerOptions {
    /// One sequence, its prompt in one forward: what `run` and `bench` do.
    pub fn single_sequence() -> Self {
        Self {
            max_running: 1,
            kv_budget_bytes: None,
            prefill_chunk: usize::MAX,
            prefill_tokens_per_step: usize::MAX,
        }
    }
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            max_running: 16,
            kv_budget_bytes: None,
            prefill_chunk: 256,
            prefill_tokens_per_step: 512,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id was emitted.
    Stop,
    /// `max_tokens` (or the context) ran out.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Natural log of the chosen token's probability under the model (before
    /// temperature and truncation).
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub sequence: SequenceId,
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
    /// Set on the sequence's last token; the sequence is gone after this event.
    pub finish: Option<FinishReason>,
}

#[derive(Debug)]
pub enum StepEvent {
    Token(TokenEvent),
    /// The sequence could not be run and was removed; the others go on.
    Failed {
        sequence: SequenceId,
        error: Error,
    },
}

struct Sequence {
    id: SequenceId,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The last sampled token, fed at the next decode step.
    next_input: u32,
    generated: usize,
    max_tokens: usize,
    stop_ids: Vec<u32>,
    top_logprobs: Option<usize>,
    sampler: Sampler,
    cache: KvCache,
    reserved_bytes: usize,
}

impl Sequence {
    fn prefilling(&self) -> bool {
        self.fed < self.prompt.len()
    }
}

/// Owns the sequences of one model: admission, batching, sampling.
pub struct Scheduler<'m> {
    model: &'m Model,
    opts: SchedulerOptions,
    next_id: u64,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    reserved_bytes: usize,
}

/// Checks a prompt against the model and returns the number of tokens that can
/// be generated after it (`max_tokens` cut to what the context leaves).
pub(crate) fn check_prompt(model: &Model, prompt: &[u32], max_tokens: usize) -> Result<usize> {
    let cfg = model.config();
    let context = cfg.max_position_embeddings;
    if prompt.is_empty() {
        return Err(Error::InvalidInput("the prompt is empty".into()));
    }
    if prompt.len() >= context {
        return Err(Error::InvalidInput(format!(
            "prompt has {} tokens but the model's context is {context} positions (max_position_embeddings); nothing is left to generate",
            prompt.len()
        )));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(Error::InvalidInput(format!(
            "token id {bad} is out of range for a vocabulary of {}",
            cfg.vocab_size
        )));
    }
    // The last generated token is never fed back, so the context holds prompt + max_tokens - 1.
    Ok(max_tokens.min(context - prompt.len() + 1))
}

impl<'m> Scheduler<'m> {
    pub fn new(model: &'m Model, opts: SchedulerOptions) -> Self {
        Self {
            model,
            opts,
            next_id: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved_bytes: 0,
        }
    }

    /// Queues a sequence; it starts at a later step, in arrival order, once a
    /// running slot and its KV reservation are free. Refuses what could never run.
    pub fn add(&mut self, req: SequenceRequest) -> Result<SequenceId> {
        req.sampling.validate().map_err(Error::InvalidInput)?;
        if req.max_tokens == 0 {
            return Err(Error::InvalidInput("max_tokens must be at least 1".into()));
        }
        let max_tokens = check_prompt(self.model, &req.prompt, req.max_tokens)?;
        let len = req.prompt.len() + max_tokens - 1;
        // Sized for the whole sequence up front: the cache never grows past its reservation.
        let cache = self.model.new_cache(len);
        let step = self.opts.prefill_chunk.clamp(1, len);
        let reserved_bytes = cache.bytes_bound(len, step);
        if let Some(budget) = self.opts.kv_budget_bytes
            && reserved_bytes > budget
        {
            return Err(Error::InvalidInput(format!(
                "{} prompt + {max_tokens} new tokens need {reserved_bytes} bytes of KV cache, more than the whole KV budget of {budget} bytes",
                req.prompt.len()
            )));
        }
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        self.waiting.push_back(Sequence {
            id,
            next_input: 0,
            fed: 0,
            generated: 0,
            max_tokens,
            stop_ids: req.stop_ids,
            top_logprobs: req.top_logprobs,
            sampler: Sampler::new(req.sampling),
            cache,
            reserved_bytes,
            prompt: req.prompt,
        });
        Ok(id)
    }

    /// Drops a waiting or running sequence and frees its cache now. False if it
    /// was not there (finished already).
    pub fn cancel(&mut self, id: SequenceId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.swap_remove(i);
            self.reserved_bytes -= seq.reserved_bytes;
            return true;
        }
        false
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// KV bytes reserved by the running sequences.
    pub fn reserved_kv_bytes(&self) -> usize {
        self.reserved_bytes
    }

    /// KV bytes the running sequences' caches hold now.
    pub fn allocated_kv_bytes(&self) -> usize {
        self.running.iter().map(|s| s.cache.allocated_bytes()).sum()
    }

    /// Ids of the sequences that have not finished, waiting ones included.
    pub fn sequence_ids(&self) -> impl Iterator<Item = SequenceId> + '_ {
        self.running.iter().chain(&self.waiting).map(|s| s.id)
    }

    fn admit(&mut self) {
        while let Some(next) = self.waiting.front() {
            let fits = self
                .opts
                .kv_budget_bytes
                .is_none_or(|b| self.reserved_bytes + next.reserved_bytes <= b);
            if self.running.len() >= self.opts.max_running.max(1) || !fits {
                break;
            }
            if let Some(seq) = self.waiting.pop_front() {
                self.reserved_bytes += seq.reserved_bytes;
                self.running.push(seq);
            }
        }
    }

    /// Admits what fits, then runs one forward over every running sequence: a
    /// prompt chunk for those still prefilling, the last token for the others.
    /// Returns the tokens sampled this step (none for a sequence mid-prompt).
    pub fn step(&mut self, observer: &mut dyn RoutingObserver) -> Vec<StepEvent> {
        self.admit();
        // (index into running, tokens fed this step)
        let mut plan: Vec<(usize, usize)> = Vec::with_capacity(self.running.len());
        let mut prefill_tokens = 0usize;
        for (i, seq) in self.running.iter().enumerate() {
            if !seq.prefilling() {
                plan.push((i, 1));
                continue;
            }
            let n = (seq.prompt.len() - seq.fed).min(self.opts.prefill_chunk.max(1));
            if prefill_tokens == 0 || prefill_tokens + n <= self.opts.prefill_tokens_per_step {
                prefill_tokens += n;
                plan.push((i, n));
            }
        }
        if plan.is_empty() {
            return Vec::new();
        }
        let mut events = Vec::new();
        let mut failed: Vec<usize> = Vec::new();
        match self.forward(&plan, observer) {
            Ok(logits) => self.sample(&plan, &logits, &mut events, &mut failed),
            // Which sequence is at fault is unknown: run each alone, so one bad
            // sequence fails by itself. A failed forward commits nothing to the caches.
            Err(_) => {
                for &entry in &plan {
                    match self.forward(&[entry], observer) {
                        Ok(logits) => self.sample(&[entry], &logits, &mut events, &mut failed),
                        Err(error) => {
                            failed.push(entry.0);
                            events.push(StepEvent::Failed {
                                sequence: self.running[entry.0].id,
                                error,
                            });
                        }
                    }
                }
            }
        }
        failed.sort_unstable();
        for i in failed.into_iter().rev() {
            let seq = self.running.swap_remove(i);
            self.reserved_bytes -= seq.reserved_bytes;
        }
        events
    }

    /// Logits `[plan.len(), vocab]` of the last token each planned sequence fed.
    fn forward(
        &mut self,
        plan: &[(usize, usize)],
        observer: &mut dyn RoutingObserver,
    ) -> Result<candle_core::Tensor> {
        let mut inputs = Vec::with_capacity(plan.len());
        let mut planned = plan.iter().peekable();
        for (i, seq) in self.running.iter_mut().enumerate() {
            let Some(&&(_, n)) = planned.peek().filter(|(j, _)| *j == i) else {
                continue;
            };
            planned.next();
            let Sequence {
                id,
                prompt,
                fed,
                next_input,
                cache,
                ..
            } = seq;
            let tokens = if *fed < prompt.len() {
                &prompt[*fed..*fed + n]
            } else {
                std::slice::from_ref(&*next_input)
            };
            inputs.push(SequenceInput {
                id: *id,
                tokens,
                cache: Some(cache),
            });
        }
        let opts = ForwardOptions {
            logits: LogitsFor::LastOfEachSequence,
            keep_router_logits: false,
        };
        Ok(self.model.forward(&mut inputs, observer, opts)?.logits)
    }

    /// Commits a successful forward: advances prompts, samples the sequences
    /// that are past their prompt, marks finished (and failed) ones in `done`.
    fn sample(
        &mut self,
        plan: &[(usize, usize)],
        logits: &candle_core::Tensor,
        events: &mut Vec<StepEvent>,
        done: &mut Vec<usize>,
    ) {
        let _span = profile::span(Phase::Sampling, None);
        for (row, &(i, n)) in plan.iter().enumerate() {
            let seq = &mut self.running[i];
            if seq.prefilling() {
                seq.fed += n;
                if seq.prefilling() {
                    continue;
                }
            }
            let values = match logits.get(row).and_then(|r| r.to_vec1::<f32>()) {
                Ok(v) => v,
                Err(e) => {
                    done.push(i);
                    events.push(StepEvent::Failed {
                        sequence: seq.id,
                        error: e.into(),
                    });
                    continue;
                }
            };
            let token = seq.sampler.sample(&values);
            seq.generated += 1;
            seq.next_input = token;
            let finish = if seq.stop_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if seq.generated >= seq.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if finish.is_some() {
                done.push(i);
            }
            events.push(StepEvent::Token(TokenEvent {
                sequence: seq.id,
                token,
                logprobs: seq.top_logprobs.map(|k| logprobs(&values, token, k)),
                finish,
            }));
        }
    }
}

/// Log-probabilities of `token` and of the `k` most likely tokens under `logits`.
pub fn logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let log_z = max + sum.ln();
    let lp = |t: u32| {
        logits
            .get(t as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - log_z)
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(ids.len());
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, by_logit);
    }
    ids.truncate(k);
    ids.sort_unstable_by(by_logit);
    TokenLogprobs {
        logprob: lp(token),
        top: ids.into_iter().map(|t| (t, lp(t))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoadOptions, NoObserver};

    fn demo() -> Model {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
        let opts = LoadOptions {
            dtype: candle_core::DType::BF16,
            ..LoadOptions::default()
        };
        Model::load(&dir, &opts).unwrap()
    }

    /// Greedy tokens of every request, by arrival order; the reservation is back to 0.
    fn run_all(model: &Model, opts: SchedulerOptions, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
        let mut s = Scheduler::new(model, opts);
        let ids: Vec<SequenceId> = prompts
            .iter()
            .map(|p| {
                s.add(SequenceRequest {
                    prompt: p.clone(),
                    max_tokens: 6,
                    sampling: SamplingParams::default(),
                    stop_ids: Vec::new(),
                    top_logprobs: None,
                })
                .unwrap()
            })
            .collect();
        let mut out = vec![Vec::new(); prompts.len()];
        let mut steps = 0;
        while !s.is_idle() {
            if let Some(b) = opts.kv_budget_bytes {
                assert!(s.reserved_kv_bytes() <= b);
            }
            assert!(s.running_len() <= opts.max_running);
            for e in s.step(&mut NoObserver) {
                let StepEvent::Token(t) = e else {
                    panic!("{e:?}")
                };
                let i = ids.iter().position(|&id| id == t.sequence).unwrap();
                out[i].push(t.token);
            }
            steps += 1;
            assert!(steps < 1000);
        }
        assert_eq!(s.reserved_kv_bytes(), 0);
        out
    }

    #[test]
    fn batched_sequences_get_the_tokens_of_their_single_runs() {
        crate::ops::set_batch_invariant(true);
        let model = demo();
        let prompts: Vec<Vec<u32>> = (0..5usize)
            .map(|i| {
                (0..3 + 7 * i)
                    .map(|t| ((t * 31 + i * 7) % 4000 + 1) as u32)
                    .collect()
            })
            .collect();
        let chunked = SchedulerOptions {
            max_running: 1,
            kv_budget_bytes: None,
            prefill_chunk: 4,
            prefill_tokens_per_step: 8,
        };
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| run_all(&model, chunked, std::slice::from_ref(p)).remove(0))
            .collect();
        // Three at a time, and a KV budget that holds only two of the longest.
        let one = model.new_cache(40).bytes_bound(40, 4);
        let batched = SchedulerOptions {
            max_running: 3,
            kv_budget_bytes: Some(2 * one),
            ..chunked
        };
        assert_eq!(run_all(&model, batched, &prompts), alone);
        assert!(alone.iter().all(|t| t.len() == 6));
    }

    #[test]
    fn refusals_and_cancel_free_the_reservation() {
        let model = demo();
        let mut s = Scheduler::new(
            &model,
            SchedulerOptions {
                kv_budget_bytes: Some(1000),
                ..SchedulerOptions::default()
            },
        );
        let req = |prompt: Vec<u32>| SequenceRequest {
            prompt,
            max_tokens: 4,
            sampling: SamplingParams::default(),
            stop_ids: Vec::new(),
            top_logprobs: None,
        };
        let err = s.add(req(vec![1; 600])).unwrap_err().to_string();
        assert!(err.contains("context"), "{err}");
        let err = s.add(req(vec![1, 99_999])).unwrap_err().to_string();
        assert!(err.contains("99999"), "{err}");
        let err = s.add(req(vec![1; 10])).unwrap_err().to_string();
        assert!(err.contains("KV budget"), "{err}");
        let mut s = Scheduler::new(&model, SchedulerOptions::default());
        let id = s.add(req(vec![1, 2, 3])).unwrap();
        s.step(&mut NoObserver);
        assert!(s.reserved_kv_bytes() > 0 && s.allocated_kv_bytes() > 0);
        assert!(s.cancel(id));
        assert_eq!((s.reserved_kv_bytes(), s.running_len()), (0, 0));
        assert!(!s.cancel(id));
    }

    #[test]
    fn logprobs_normalise_and_rank() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        let lp = logprobs(&logits, 2, 2);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (2f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[0].1 - (3f32.exp() / z).ln()).abs() < 1e-6);
        assert!(logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(logprobs(&logits, 0, 10).top.len(), 4);
    }
}
