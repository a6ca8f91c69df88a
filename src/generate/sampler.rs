//! Turns a logits row into the next token: greedy, or seeded sampling with
//! temperature, top-k and top-p (applied in that order, as transformers does).

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(format!("top_p must be in (0, 1], got {p}"));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be at least 1".into());
        }
        Ok(())
    }
}

/// SplitMix64: tiny, and the same stream on every platform and version, so a
/// seed reproduces a sample forever.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: Rng(params.seed),
            scratch: Vec::new(),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)));
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.params.top_k {
            cand.truncate(k.max(1));
        }
        let max = cand[0].1;
        let mut sum = 0f32;
        for c in cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            sum += c.1;
        }
        for c in cand.iter_mut() {
            c.1 /= sum;
        }
        if let Some(p) = self.params.top_p {
            // Keep the smallest prefix whose mass reaches p (always at least one).
            let mut mass = 0f32;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                mass += c.1;
                if mass >= p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            let total: f32 = cand.iter().map(|c| c.1).sum();
            for c in cand.iter_mut() {
                c.1 /= total;
            }
        }
        let u = self.rng.next_f32();
        let mut acc = 0f32;
        for c in cand.iter() {
            acc += c.1;
            if u < acc {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
    ) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    #[test]
    fn zero_temperature_is_argmax() {
        let mut s = Sampler::new(params(0.0, None, None, 1));
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9]), 1);
    }

    #[test]
    fn same_seed_same_samples_and_seeds_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, None, None, seed));
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(params(5.0, Some(1), None, 3));
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 0.5, 3.0, 0.1]), 2);
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two
        let logits = [3.0, 2.0, 1.0, -0.1];
        let mut s = Sampler::new(params(1.0, None, Some(0.8), 11));
        for _ in 0..500 {
            assert!(s.sample(&logits) < 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let mut s = Sampler::new(params(1.0, None, None, 42));
        let ones = (0..4000).filter(|_| s.sample(&logits) == 1).count();
        let share = ones as f32 / 4000.0;
        assert!((share - 0.75).abs() < 0.03, "share {share}");
    }
}
