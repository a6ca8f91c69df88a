use std::sync::RwLock;

use candle_core::{DType, Device, Result, Tensor};

/// Rotary position embedding in the "rotate half" (GPT-NeoX) layout that all
/// supported architectures use. The cos/sin tables grow (doubling, in whole
/// chunks) as positions are reached, up to the context length: a config may
/// claim a context of millions of positions, and most runs see a few thousand.
#[derive(Debug)]
pub struct RopeTable {
    inv_freq: Vec<f32>,
    scale: f32,
    max_positions: usize,
    device: Device,
    tables: RwLock<Tables>,
}

#[derive(Debug, Clone)]
struct Tables {
    cos: Tensor, // [positions, head_dim / 2]
    sin: Tensor, // [positions, head_dim / 2]
}

/// Positions computed up front and per growth step at least.
const CHUNK_POSITIONS: usize = 4096;

impl Clone for RopeTable {
    fn clone(&self) -> Self {
        let tables = match self.tables.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        Self {
            inv_freq: self.inv_freq.clone(),
            scale: self.scale,
            max_positions: self.max_positions,
            device: self.device.clone(),
            tables: RwLock::new(tables),
        }
    }
}

/// YaRN context extension (Peng et al. 2023, "YaRN: Efficient Context Window
/// Extension"), as transformers' `_compute_yarn_parameters` computes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    /// Context growth over the pretraining context.
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    /// Rotations bounding the extrapolated (fast) and interpolated (slow) dimensions.
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Round the correction range outwards to whole dimensions (transformers'
    /// default; gpt-oss sets `truncate: false`).
    pub truncate: bool,
    /// The cos/sin scale; `None` derives it from `factor` (and DeepSeek's
    /// `mscale` / `mscale_all_dim`) as transformers does.
    pub attention_factor: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
}

impl Yarn {
    /// YaRN's `0.1 m ln(s) + 1` for a context growth `s` (1 when `s <= 1`),
    /// transformers' `get_mscale`.
    pub fn mscale(scale: f64, m: f64) -> f64 {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    }

    /// Per-pair inverse frequencies and the cos/sin scale.
    pub fn inv_freq(&self, head_dim: usize, theta: f64) -> (Vec<f32>, f64) {
        let dim = head_dim as f64;
        let get_mscale = Self::mscale;
        let attention = self
            .attention_factor
            .unwrap_or(match (self.mscale, self.mscale_all_dim) {
                (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                    get_mscale(self.factor, m) / get_mscale(self.factor, a)
                }
                _ => get_mscale(self.factor, 1.0),
            });
        let correction_dim = |rotations: f64| {
            let max_pos = self.original_max_position_embeddings as f64;
            dim * (max_pos / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (
            correction_dim(self.beta_fast),
            correction_dim(self.beta_slow),
        );
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001; // as upstream: no zero-width ramp
        }
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                let pos_freq = theta.powf((2 * i) as f64 / dim);
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let f = 1.0 / (self.factor * pos_freq) * (1.0 - extrapolation)
                    + 1.0 / pos_freq * extrapolation;
                f as f32
            })
            .collect();
        (inv_freq, attention)
    }
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Result<Self> {
        // Frequencies in f64, then rounded, to match transformers' float32 inv_freq.
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        Self::from_inv_freq(&inv_freq, 1.0, max_positions, device)
    }

    /// A YaRN-scaled table (see [`Yarn`]).
    pub fn yarn(
        head_dim: usize,
        theta: f64,
        yarn: &Yarn,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let (inv_freq, attention) = yarn.inv_freq(head_dim, theta);
        Self::from_inv_freq(&inv_freq, attention as f32, max_positions, device)
    }

    fn from_inv_freq(
        inv_freq: &[f32],
        scale: f32,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let tables = compute(inv_freq, scale, max_positions.min(CHUNK_POSITIONS), device)?;
        Ok(Self {
            inv_freq: inv_freq.to_vec(),
            scale,
            max_positions,
            device: device.clone(),
            tables: RwLock::new(tables),
        })
    }

    /// The context length the table serves.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// [`Self::apply`] for heads whose rotary dimensions come in adjacent
    /// pairs `(x0, x1), (x2, x3), ..` (ERNIE, GPT-J) rather than two halves.
    ///
    /// # Shapes
    /// `x: [heads, seq, head_dim]`, positions `start..start + seq`.
    pub fn apply_pairs(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        self.turn(x, start, true)
    }

    /// cos and sin of positions `start..start + len`, growing the tables if needed.
    fn rows(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.max_positions)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "rotary positions {start}..{start}+{len} exceed the context of {} positions",
                    self.max_positions
                ))
            })?;
        fn poisoned<T>(_: T) -> candle_core::Error {
            candle_core::Error::Msg("rotary table lock poisoned".into())
        }
        {
            let t = self.tables.read().map_err(poisoned)?;
            if t.cos.dim(0)? >= end {
                return Ok((t.cos.narrow(0, start, len)?, t.sin.narrow(0, start, len)?));
            }
        }
        let mut t = self.tables.write().map_err(poisoned)?;
        let have = t.cos.dim(0)?;
        if have < end {
            let grown = end
                .max(have.saturating_mul(2))
                .max(CHUNK_POSITIONS)
                .min(self.max_positions);
            *t = compute(&self.inv_freq, self.scale, grown, &self.device)?;
        }
        Ok((t.cos.narrow(0, start, len)?, t.sin.narrow(0, start, len)?))
    }

    /// Dimensions of a head the table turns.
    pub fn rotary_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// # Shapes
    /// `x: [heads, seq, head_dim]`, positions `start..start + seq`. A head
    /// wider than [`Self::rotary_dim`] has only its leading dimensions turned
    /// (partial rotary); the rest pass through unchanged.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        self.turn(x, start, false)
    }

    /// Rotates the leading [`Self::rotary_dim`] dimensions of every head, in
    /// adjacent `pairs` or in halves.
    fn turn(&self, x: &Tensor, start: usize, pairs: bool) -> Result<Tensor> {
        let (head_dim, rotary) = (x.dim(2)?, self.rotary_dim());
        if head_dim > rotary {
            let turned = self.turn(&x.narrow(2, 0, rotary)?, start, pairs)?;
            let kept = x.narrow(2, rotary, head_dim - rotary)?.contiguous()?;
            // The attention kernels and the KV cache read row-contiguous heads.
            return Tensor::cat(&[turned, kept], 2)?.contiguous();
        }
        if head_dim < rotary {
            candle_core::bail!("a head of {head_dim} dimensions under a rotary table of {rotary}");
        }
        let (cos, sin) = self.rows(start, x.dim(1)?)?;
        let cos = cos.to_dtype(x.dtype())?;
        let sin = sin.to_dtype(x.dtype())?;
        let x4 = x.unsqueeze(0)?;
        use candle_nn::rotary_emb::{rope, rope_i, rope_i_slow, rope_slow};
        let y = match (pairs, x.track_op()) {
            (true, true) => rope_i_slow(&x4, &cos, &sin)?,
            (true, false) => rope_i(&x4.contiguous()?, &cos, &sin)?,
            (false, true) => rope_slow(&x4, &cos, &sin)?,
            (false, false) => rope(&x4.contiguous()?, &cos, &sin)?,
        };
        y.squeeze(0)
    }

    pub fn dtype(&self) -> DType {
        DType::F32
    }
}

/// `cos(p f) * scale`, `sin(p f) * scale` for positions `0..positions` and every frequency `f`.
fn compute(inv_freq: &[f32], scale: f32, positions: usize, device: &Device) -> Result<Tables> {
    let half = inv_freq.len();
    let n = positions.checked_mul(half).ok_or_else(|| {
        candle_core::Error::Msg(format!("rotary table of {positions} x {half} overflows"))
    })?;
    let mut cos = Vec::with_capacity(n);
    let mut sin = Vec::with_capacity(n);
    for pos in 0..positions {
        for &f in inv_freq {
            let angle = pos as f32 * f;
            cos.push(angle.cos() * scale);
            sin.push(angle.sin() * scale);
        }
    }
    Ok(Tables {
        cos: Tensor::from_vec(cos, (positions, half), device)?,
        sin: Tensor::from_vec(sin, (positions, half), device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_rotary_turns_the_leading_dims_and_keeps_the_rest() {
        let dev = Device::Cpu;
        let table = RopeTable::new(8, 10_000.0, 64, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 12), &dev).unwrap();
        let got = table.apply(&x, 7).unwrap();
        let head = table.apply(&x.narrow(2, 0, 8).unwrap(), 7).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f32>().unwrap()
        };
        assert!(got.is_contiguous());
        assert_eq!(max_diff(&got.narrow(2, 0, 8).unwrap(), &head), 0.0);
        let tail = x.narrow(2, 8, 4).unwrap();
        assert_eq!(max_diff(&got.narrow(2, 8, 4).unwrap(), &tail), 0.0);
        // The turned part did move: position 7 is not the identity.
        assert!(max_diff(&head, &x.narrow(2, 0, 8).unwrap()) > 1e-3);
        // A head narrower than the table is an error.
        assert!(table.apply(&x.narrow(2, 0, 6).unwrap(), 0).is_err());
    }

    #[test]
    fn adjacent_pairs_turn_as_halves_do_after_gathering_evens_then_odds() {
        let dev = Device::Cpu;
        let table = RopeTable::new(8, 10_000.0, 64, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev).unwrap();
        let halves_order = Tensor::new(&[0u32, 2, 4, 6, 1, 3, 5, 7], &dev).unwrap();
        let gather = |t: &Tensor| t.index_select(&halves_order, 2).unwrap();
        let pairs = gather(&table.apply_pairs(&x, 9).unwrap());
        let halves = table.apply(&gather(&x), 9).unwrap();
        let diff = (pairs - halves).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        // Not the halves rotation of the same input.
        let plain = table.apply(&x, 9).unwrap();
        let moved = (table.apply_pairs(&x, 9).unwrap() - plain).unwrap();
        assert!(
            moved
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 1e-3
        );
    }

    #[test]
    fn rope_table_grows_lazily_and_matches_an_eager_one() {
        let dev = Device::Cpu;
        // A claimed context of 2^40 positions must not be allocated up front.
        let huge = RopeTable::new(8, 10_000.0, 1 << 40, &dev).unwrap();
        assert_eq!(
            huge.tables.read().unwrap().cos.dim(0).unwrap(),
            CHUNK_POSITIONS
        );
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap();
        let start = 3 * CHUNK_POSITIONS + 5; // past the first chunk: grows
        let got = huge.apply(&x, start).unwrap();
        let grown = huge.tables.read().unwrap().cos.dim(0).unwrap();
        assert!(
            (start + 3..=4 * CHUNK_POSITIONS).contains(&grown),
            "{grown}"
        );
        let eager = RopeTable::new(8, 10_000.0, start + 3, &dev).unwrap();
        let want = eager.apply(&x, start).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        // Past the context: an error, not a panic.
        assert!(eager.apply(&x, start + 1).is_err());
        assert!(huge.apply(&x, usize::MAX - 1).is_err());
    }

    #[test]
    fn yarn_matches_transformers_inv_freq() {
        // transformers 5.23 `_compute_yarn_parameters` for gpt-oss (head_dim 64, theta
        // 1.5e5, factor 32, original context 4096, beta 32/1), without truncation (its
        // config) and with (the default): entries 0, 8, 9, 12, 16, 17, 20, 31.
        let mut y = Yarn {
            factor: 32.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: false,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
        };
        let at = [0, 8, 9, 12, 16, 17, 20, 31];
        let untruncated = [
            1.0,
            5.081_327e-2,
            3.170_569_6e-2,
            6.794_959e-3,
            4.564_839e-4,
            1.293_187e-4,
            1.818_834e-5,
            3.023_511_4e-7,
        ];
        let truncated = [
            1.0,
            5.081_327e-2,
            3.162_075e-2,
            7.015_714e-3,
            5.809_475e-4,
            2.279_478e-4,
            1.818_834e-5,
            3.023_511_4e-7,
        ];
        for (truncate, want) in [(false, untruncated), (true, truncated)] {
            y.truncate = truncate;
            let (f, a) = y.inv_freq(64, 1.5e5);
            assert!((a - 1.346_573_590_279_972_7).abs() < 1e-12, "{a}");
            for (&i, w) in at.iter().zip(want) {
                assert!(
                    (f[i] / w - 1.0).abs() < 2e-6,
                    "truncate {truncate} [{i}]: {} vs {w}",
                    f[i]
                );
            }
        }
    }
}
