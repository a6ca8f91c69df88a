//! Segment routing best performance (SRP) of "Not All Models Suit Expert
//! Offloading" (arXiv 2505.16056), as the authors' `30_srp_calc.py` and
//! `31_srp_refine.py` compute it: over every window of `m` consecutive tokens
//! of a sequence (stride 1), predict each expert chosen at least `c` times in the
//! window as active for all `m` tokens; sum matches, predictions and actual
//! activations over all windows (and experts, and layers at model level) before
//! taking F1 = 2 matches / (predictions + activations); SRP is the best F1 over
//! `c in 0..=m` (one `c` per layer at layer level, one for the whole model at
//! model level). High SRP: a segment's experts are few and predictable, so a
//! small cache serves it.

use super::routes::TokenExperts;

/// The segment lengths the paper reports.
pub const SEGMENT_LENGTHS: [usize; 4] = [4, 16, 64, 256];

/// For one segment length, how many (window, expert) pairs saw the expert
/// chosen `c` times, for `c in 0..=m`. Adding histograms pools windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHistogram {
    segment: usize,
    /// `[segment + 1]`
    counts: Vec<u64>,
    windows: u64,
}

/// The best threshold's F1 and what it predicts.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Srp {
    pub segment: usize,
    /// SRP: the best F1 over thresholds.
    pub f1: f64,
    /// The threshold `c` that reaches it (the lowest on a tie).
    pub threshold: usize,
    /// Predicted (token, expert) activations over actual ones at that threshold.
    pub predicted_per_actual: f64,
    /// Actual activations over all (token, expert) slots of the windows (k / E
    /// under fixed top-k).
    pub activation_ratio: f64,
    /// Windows pooled (sequence windows, summed over layers at model level).
    pub windows: u64,
}

impl SegmentHistogram {
    pub fn new(segment: usize) -> Self {
        Self {
            segment,
            counts: vec![0; segment + 1],
            windows: 0,
        }
    }

    /// Adds every window of one sequence of one layer. A sequence shorter than
    /// the segment has no window and adds nothing.
    pub fn add_sequence(&mut self, tokens: &TokenExperts, num_experts: usize) {
        let (m, n) = (self.segment, tokens.len());
        if m == 0 || n < m {
            return;
        }
        let windows = n - m + 1;
        self.windows += windows as u64;
        // Each expert's count in the current window, and the window since which it
        // has held that count: a count lasting `w` windows adds `w` at once.
        let mut count = vec![0usize; num_experts];
        let mut since = vec![0usize; num_experts];
        for t in 0..m {
            for &e in tokens.token(t) {
                if let Some(c) = count.get_mut(e as usize) {
                    *c += 1;
                }
            }
        }
        let mut change = |e: u32, w: usize, up: bool, count: &mut [usize], since: &mut [usize]| {
            let e = e as usize;
            if e >= count.len() {
                return;
            }
            // invariant: e < num_experts (checked above); a window of m tokens holds an
            // expert at most m times, as Routes refuses an expert twice in one token.
            self.counts[count[e]] += (w - since[e]) as u64;
            since[e] = w;
            if up {
                count[e] += 1;
            } else {
                count[e] -= 1;
            }
        };
        for w in 1..windows {
            for &e in tokens.token(w - 1) {
                change(e, w, false, &mut count, &mut since);
            }
            for &e in tokens.token(w + m - 1) {
                change(e, w, true, &mut count, &mut since);
            }
        }
        for (e, &c) in count.iter().enumerate() {
            self.counts[c] += (windows - since[e]) as u64;
        }
    }

    pub fn add(&mut self, other: &SegmentHistogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.windows += other.windows;
    }

    /// F1 at every threshold `0..=m`, as the authors' refine step computes it.
    pub fn f1_by_threshold(&self) -> Vec<f64> {
        let (matches, predictions) = self.matches_and_predictions();
        let actual = matches.first().copied().unwrap_or(0);
        matches
            .iter()
            .zip(&predictions)
            .map(|(&mt, &p)| 2.0 * mt as f64 / (p + actual).max(1) as f64)
            .collect()
    }

    /// `[m + 1]` each: activations inside windows whose count reaches `c`, and
    /// `m` predictions per such (window, expert).
    fn matches_and_predictions(&self) -> (Vec<u64>, Vec<u64>) {
        let m = self.segment as u64;
        let (mut matches, mut predictions) =
            (vec![0; self.counts.len()], vec![0; self.counts.len()]);
        let (mut mt, mut p) = (0u64, 0u64);
        for c in (0..self.counts.len()).rev() {
            mt += c as u64 * self.counts[c];
            p += m * self.counts[c];
            matches[c] = mt;
            predictions[c] = p;
        }
        (matches, predictions)
    }

    pub fn best(&self) -> Srp {
        let f1 = self.f1_by_threshold();
        let (threshold, best) =
            f1.iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |acc, (c, &v)| if v > acc.1 { (c, v) } else { acc },
                );
        let (matches, predictions) = self.matches_and_predictions();
        let actual = matches.first().copied().unwrap_or(0);
        let slots = predictions.first().copied().unwrap_or(0);
        Srp {
            segment: self.segment,
            f1: best.max(0.0),
            threshold,
            predicted_per_actual: predictions.get(threshold).copied().unwrap_or(0) as f64
                / actual.max(1) as f64,
            activation_ratio: actual as f64 / slots.max(1) as f64,
            windows: self.windows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(tokens: &[&[u32]], num_experts: usize, m: usize) -> SegmentHistogram {
        let mut h = SegmentHistogram::new(m);
        h.add_sequence(&TokenExperts::from_tokens(tokens), num_experts);
        h
    }

    /// Tokens (top-1 of 2 experts): a a b b, m = 2. Windows: [a a] [a b] [b b].
    /// (window, expert) counts: w0: a=2 b=0; w1: a=1 b=1; w2: a=0 b=2.
    /// Histogram over c: c=0: 2, c=1: 2, c=2: 2.
    /// Actual activations: 6 (2 per window). Threshold 2 predicts a in w0 and b
    /// in w2, 2 tokens each: 4 predictions, 4 matches: F1 = 8 / (4 + 6) = 0.8.
    /// Threshold 1 adds w1's a and b: 8 predictions, 6 matches: F1 = 12/14.
    /// Threshold 0 predicts all: 12 predictions, 6 matches: F1 = 12/18.
    #[test]
    fn srp_of_a_hand_made_sequence() {
        let h = hist(&[&[0], &[0], &[1], &[1]], 2, 2);
        assert_eq!(h.counts, vec![2, 2, 2]);
        let f1 = h.f1_by_threshold();
        let want = [12.0 / 18.0, 12.0 / 14.0, 0.8];
        assert!(
            f1.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{f1:?}"
        );
        let best = h.best();
        assert_eq!((best.threshold, best.windows), (1, 3));
        assert!((best.f1 - 12.0 / 14.0).abs() < 1e-12);
        assert!((best.predicted_per_actual - 8.0 / 6.0).abs() < 1e-12);
        assert!((best.activation_ratio - 0.5).abs() < 1e-12);
    }

    /// Pooling before dividing: a sequence that always uses expert 0 (F1 = 1 at
    /// any c >= 1) pooled with the one above is not the mean of the two F1s.
    /// Constant sequence, m = 2, 3 tokens: windows 2, expert 0 count 2 (2 pairs),
    /// expert 1 count 0 (2 pairs). Pooled histogram: c0 = 4, c1 = 2, c2 = 4.
    /// c = 2: matches 4 + 4 = 8, predictions 8, actual 6 + 4 = 10: F1 = 16/18.
    /// c = 1: matches 10, predictions 12: 20/22. c = 1 wins (20/22 > 16/18).
    #[test]
    fn windows_are_pooled_before_f1() {
        let mut h = hist(&[&[0], &[0], &[1], &[1]], 2, 2);
        h.add(&hist(&[&[0], &[0], &[0]], 2, 2));
        assert_eq!(h.counts, vec![4, 2, 4]);
        let best = h.best();
        assert_eq!(best.threshold, 1);
        assert!((best.f1 - 20.0 / 22.0).abs() < 1e-12);
    }

    /// Top-2 of 4, m = 3: {0,1} {0,2} {0,1} {3,1}.
    /// w0 (t0..3): e0=3 e1=2 e2=1 e3=0; w1 (t1..4): e0=2 e1=2 e2=1 e3=1.
    /// Histogram: c0 1, c1 3, c2 3, c3 1. Actual = 3 + 6 + 3 = 12 (= 2 windows x 3 x 2).
    /// c=3: 3 matches / 3 preds: F1 = 6/15. c=2: 3+6 = 9 matches, 12 preds: 18/24.
    /// c=1: 12 matches, 21 preds: 24/33. c=0: 12, 24: 24/36. Best c = 2, 0.75.
    #[test]
    fn srp_with_two_experts_per_token() {
        let h = hist(&[&[0, 1], &[0, 2], &[0, 1], &[3, 1]], 4, 3);
        assert_eq!(h.counts, vec![1, 3, 3, 1]);
        let best = h.best();
        assert_eq!(best.threshold, 2);
        assert!((best.f1 - 0.75).abs() < 1e-12);
    }

    #[test]
    fn a_sequence_shorter_than_the_segment_adds_no_window() {
        let h = hist(&[&[0], &[1]], 2, 4);
        assert_eq!(h.counts, vec![0; 5]);
        assert_eq!(h.best().f1, 0.0);
    }
}
