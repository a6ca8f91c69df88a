//! What `--expert-memory`, `--expert-cache`, `--prefetch` and
//! `--miss-precision` ask of an expert cache.

use super::packed::ExpertFile;
use super::policy::PolicyKind;
use crate::config::ByteSize;
use crate::error::{Error, Result};

/// An expert cache's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertMemory {
    /// Of all routed experts' bytes in the kernels' layout, for a percentage.
    pub budget: ByteSize,
    pub policy: PolicyKind,
    pub prefetch: Prefetch,
    pub miss_precision: MissPrecision,
    /// Keep the run's routing sequence for the optimal yardstick in the
    /// report. A run that reports once at its end asks for it; a server does
    /// not (its history would grow by one entry per layer call for as long as
    /// it runs), and its reports carry no optimal hit rate.
    pub record_routing: bool,
    /// `--expert-file` and `--expert-dir`: whether misses read a packed
    /// expert file, and where it is kept.
    pub expert_file: ExpertFile,
}

/// `--prefetch`: what an expert cache reads ahead of use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefetch {
    #[default]
    Off,
    /// Layer L+1's router applied to layer L's MoE input (as FATE and
    /// Pre-gated MoE predict), the predicted misses read on a background I/O
    /// thread while layer L computes.
    NextLayer,
}

impl Prefetch {
    pub const ACCEPTED: &'static str = "off, next-layer";
}

impl std::str::FromStr for Prefetch {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" => Ok(Prefetch::Off),
            "next-layer" => Ok(Prefetch::NextLayer),
            _ => Err(Error::InvalidInput(format!(
                "--prefetch {s:?}: expected one of {}",
                Self::ACCEPTED
            ))),
        }
    }
}

impl std::fmt::Display for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Prefetch::Off => "off",
            Prefetch::NextLayer => "next-layer",
        })
    }
}

/// `--miss-precision`: what a miss computes with (HOBBIT, Tang et al. 2024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissPrecision {
    /// Wait for the full copy to be read.
    #[default]
    Off,
    /// Compute with a resident 4-bit (Q4_0) stand-in of the expert when there
    /// is one, and read the full copy in the background for next time.
    Q4,
}

impl MissPrecision {
    pub const ACCEPTED: &'static str = "q4, off";
}

impl std::str::FromStr for MissPrecision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" => Ok(MissPrecision::Off),
            "q4" | "q4_0" => Ok(MissPrecision::Q4),
            _ => Err(Error::InvalidInput(format!(
                "--miss-precision {s:?}: expected one of {}",
                Self::ACCEPTED
            ))),
        }
    }
}

impl std::fmt::Display for MissPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MissPrecision::Off => "off",
            MissPrecision::Q4 => "q4",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_names_parse_and_round_trip() {
        for s in ["off", "next-layer"] {
            assert_eq!(s.parse::<Prefetch>().unwrap().to_string(), s);
        }
        let err = "next".parse::<Prefetch>().unwrap_err().to_string();
        assert!(err.contains("off, next-layer"), "{err}");
    }

    #[test]
    fn miss_precision_names_parse_and_round_trip() {
        for s in ["off", "q4"] {
            assert_eq!(s.parse::<MissPrecision>().unwrap().to_string(), s);
        }
        let err = "q3".parse::<MissPrecision>().unwrap_err().to_string();
        assert!(err.contains("--miss-precision \"q3\""), "{err}");
        assert!(err.contains("q4, off"), "{err}");
    }
}
