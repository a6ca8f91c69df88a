//! Sliding-window perplexity as transformers' perplexity guide computes it
//! ("Perplexity of fixed-length models"): windows of `context` tokens start
//! every `stride` tokens, and each window scores only the tokens the previous
//! window did not, so every token after the first is scored once, with up to
//! `context - stride` tokens of context before the first scored one.
//!
//! The guide weights each window's mean loss by its target count minus one;
//! here every scored token counts once (the exact per-token mean it approximates).
//!
//! Cost: `n_tokens * context / stride` forwarded tokens.

use std::time::Instant;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::model::{ForwardOptions, LogitsFor, Model, RoutingObserver, SequenceId, SequenceInput};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerplexityOptions {
    /// Tokens per window (at most the model's context).
    pub context: usize,
    /// Tokens between window starts, `1..=context`.
    pub stride: usize,
    /// Windows per forward (the batch sees every window's tokens at once).
    pub windows_per_forward: usize,
}

/// One forward of the sliding window: tokens `begin..end` are fed, the
/// predictions of tokens `first_target..end` are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    pub first_target: usize,
}

/// The guide's loop: `for begin in range(0, n, stride)`, `end = min(begin +
/// context, n)`, targets the last `end - prev_end` tokens (the first token of a
/// window has no prediction), stop once `end == n`.
pub fn windows(n_tokens: usize, context: usize, stride: usize) -> Result<Vec<Window>> {
    if context < 2 {
        return Err(Error::InvalidInput(format!(
            "--context {context}: a window needs at least 2 tokens"
        )));
    }
    if stride == 0 || stride > context {
        return Err(Error::InvalidInput(format!(
            "--stride {stride}: must be between 1 and --context ({context}); a longer stride would skip tokens"
        )));
    }
    if n_tokens < 2 {
        return Err(Error::InvalidInput(format!(
            "the text has {n_tokens} token(s); perplexity needs at least 2"
        )));
    }
    let mut out = Vec::new();
    let mut prev_end = 0;
    for begin in (0..n_tokens).step_by(stride) {
        let end = (begin + context).min(n_tokens);
        out.push(Window {
            begin,
            end,
            first_target: prev_end.max(begin + 1),
        });
        prev_end = end;
        if end == n_tokens {
            break;
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerplexityReport {
    /// Tokens whose prediction was scored.
    pub scored_tokens: usize,
    /// Summed negative log-likelihood of the scored tokens, in nats.
    pub nll_sum: f64,
    /// Tokens fed through the model (windows overlap, so more than scored).
    pub forwarded_tokens: usize,
    pub windows: usize,
    pub seconds: f64,
}

impl PerplexityReport {
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.scored_tokens.max(1) as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// Forwarded tokens per second.
    pub fn tokens_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.forwarded_tokens as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Scores `tokens` window by window. Window `i` is reported to `observer` as
/// sequence `i`, positions from 0 (each window is its own uncached sequence).
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    opts: PerplexityOptions,
    observer: &mut dyn RoutingObserver,
) -> Result<PerplexityReport> {
    let max_context = model.config().max_position_embeddings;
    if opts.context > max_context {
        return Err(Error::InvalidInput(format!(
            "--context {}: the model's context is {max_context} positions (max_position_embeddings)",
            opts.context
        )));
    }
    let plan = windows(tokens.len(), opts.context, opts.stride)?;
    let vocab = model.config().vocab_size;
    let mut report = PerplexityReport {
        scored_tokens: 0,
        nll_sum: 0.0,
        forwarded_tokens: 0,
        windows: plan.len(),
        seconds: 0.0,
    };
    let start = Instant::now();
    for (b, batch) in plan.chunks(opts.windows_per_forward.max(1)).enumerate() {
        let first_id = b * opts.windows_per_forward.max(1);
        let mut seqs: Vec<SequenceInput> = (batch.iter().enumerate())
            .map(|(i, w)| SequenceInput {
                id: SequenceId((first_id + i) as u64),
                tokens: &tokens[w.begin..w.end],
                cache: None,
            })
            .collect();
        let fwd = ForwardOptions {
            logits: LogitsFor::AllTokens,
            keep_router_logits: false,
        };
        let logits = model.forward(&mut seqs, observer, fwd)?.logits; // [n_tokens, vocab]
        let logits = logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut row_start = 0;
        for w in batch {
            let targets = &tokens[w.first_target..w.end];
            for (i, &target) in targets.iter().enumerate() {
                // The row of the token before a target predicts it.
                let row = row_start + (w.first_target + i - 1 - w.begin);
                let row = &logits[row * vocab..(row + 1) * vocab];
                report.nll_sum += nll(row, target as usize);
                report.scored_tokens += 1;
            }
            row_start += w.end - w.begin;
            report.forwarded_tokens += w.end - w.begin;
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// `-log softmax(row)[target]`, in f64 around the row's maximum.
fn nll(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - row[target] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guide's loop, written as it is in Python, returning for each window
    /// (begin, end, targets scored).
    fn guide(n: usize, max_length: usize, stride: usize) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut prev_end_loc = 0;
        let mut begin_loc = 0;
        while begin_loc < n {
            let end_loc = (begin_loc + max_length).min(n);
            let trg_len = end_loc - prev_end_loc;
            // Labels are the last trg_len tokens; after the internal shift the
            // window's first token is never a target.
            let targets = trg_len.min(end_loc - begin_loc - 1);
            out.push((begin_loc, end_loc, targets));
            prev_end_loc = end_loc;
            if end_loc == n {
                break;
            }
            begin_loc += stride;
        }
        out
    }

    #[test]
    fn windows_follow_the_transformers_guide() {
        for (n, ctx, stride) in [
            (10, 4, 2),
            (11, 4, 4),
            (5, 8, 4),
            (1000, 128, 96),
            (7, 2, 1),
        ] {
            let ours: Vec<(usize, usize, usize)> = windows(n, ctx, stride)
                .unwrap()
                .iter()
                .map(|w| (w.begin, w.end, w.end - w.first_target))
                .collect();
            assert_eq!(
                ours,
                guide(n, ctx, stride),
                "n {n}, context {ctx}, stride {stride}"
            );
            // With overlap, every token but the first is scored exactly once.
            if stride < ctx {
                assert_eq!(ours.iter().map(|w| w.2).sum::<usize>(), n - 1);
            }
        }
    }

    #[test]
    fn windows_by_hand() {
        // 10 tokens, context 4, stride 2: [0,4) scores 1..4, [2,6) scores 4..6, ...
        let w = windows(10, 4, 2).unwrap();
        let got: Vec<_> = w.iter().map(|w| (w.begin, w.end, w.first_target)).collect();
        assert_eq!(got, vec![(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]);
    }

    #[test]
    fn bad_windows_are_refused() {
        let err = windows(100, 8, 9).unwrap_err().to_string();
        assert!(err.contains("--stride 9"), "{err}");
        assert!(
            windows(100, 8, 0)
                .unwrap_err()
                .to_string()
                .contains("--stride 0")
        );
        assert!(
            windows(100, 1, 1)
                .unwrap_err()
                .to_string()
                .contains("--context 1")
        );
        assert!(
            windows(1, 8, 4)
                .unwrap_err()
                .to_string()
                .contains("1 token")
        );
    }

    #[test]
    fn nll_is_cross_entropy() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        assert!((nll(&row, 0) - (z.ln() - 1.0)).abs() < 1e-12);
        // Uniform logits: log(vocab).
        assert!((nll(&[5.0; 8], 3) - 8f64.ln()).abs() < 1e-12);
    }
}
