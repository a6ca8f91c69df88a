//! Byte sizes as the command line spells them (`--expert-memory`, `--kv-memory`):
//! one parser so that every flag accepts the same forms and rejects the rest
//! with the same message.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A size as written: absolute bytes, or a share of a total that only the
/// caller knows (e.g. all routed experts' bytes for `--expert-memory 25%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ByteSize {
    Bytes(u64),
    /// A fraction in `(0, 1]`.
    Fraction(f64),
}

impl ByteSize {
    pub const ACCEPTED: &'static str = "plain bytes (123456), a number with a unit \
         (512KiB, 512MiB, 4GiB, 1TiB binary; 500kB, 1.5GB, 2TB decimal; K/M/G/T alone are binary), \
         or a percentage of the total (25%)";

    /// Bytes this size stands for, `total` being what a percentage is of.
    pub fn resolve(&self, total: u64) -> u64 {
        match *self {
            ByteSize::Bytes(b) => b,
            ByteSize::Fraction(f) => (total as f64 * f).floor() as u64,
        }
    }
}

/// `(suffix, multiplier)`, matched case-insensitively; longest suffixes first so
/// that `GiB` is not read as `B`.
const UNITS: &[(&str, u64)] = &[
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    // A bare letter means binary, as `free -h` and llama.cpp's `--cache-ram` read it.
    ("k", 1 << 10),
    ("m", 1 << 20),
    ("g", 1 << 30),
    ("t", 1 << 40),
    ("b", 1),
];

impl FromStr for ByteSize {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidInput(format!(
                "size {text:?}: {why}; accepted forms: {}",
                ByteSize::ACCEPTED
            ))
        };
        let s = text.trim();
        if let Some(pct) = s.strip_suffix('%') {
            let p: f64 = pct.trim().parse().map_err(|_| bad("not a percentage"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad("a percentage must be above 0 and at most 100"));
            }
            return Ok(ByteSize::Fraction(p / 100.0));
        }
        let lower = s.to_ascii_lowercase();
        let (number, multiplier) = UNITS
            .iter()
            .find_map(|&(unit, m)| lower.strip_suffix(unit).map(|n| (n.trim(), m)))
            .unwrap_or((lower.as_str(), 1));
        if number.is_empty() {
            return Err(bad("no number"));
        }
        if let Ok(n) = number.parse::<u64>() {
            return n
                .checked_mul(multiplier)
                .map(ByteSize::Bytes)
                .ok_or_else(|| bad("too large"));
        }
        let x: f64 = number.parse().map_err(|_| bad("not a number"))?;
        if !x.is_finite() || x < 0.0 {
            return Err(bad("not a non-negative number"));
        }
        let bytes = x * multiplier as f64;
        if bytes >= u64::MAX as f64 {
            return Err(bad("too large"));
        }
        Ok(ByteSize::Bytes(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ByteSize::Bytes(b) => f.write_str(&format_bytes(b)),
            ByteSize::Fraction(x) => write!(f, "{}%", x * 100.0),
        }
    }
}

/// Bytes in binary units with one decimal (`3.1 GiB`), as summaries print them.
pub fn format_bytes(bytes: u64) -> String {
    const NAMES: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < NAMES.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", NAMES[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &str) -> u64 {
        s.parse::<ByteSize>().unwrap().resolve(0)
    }

    #[test]
    fn parses_binary_decimal_and_plain_sizes() {
        assert_eq!(bytes("123456"), 123_456);
        assert_eq!(bytes("512MiB"), 512 << 20);
        assert_eq!(bytes("4GiB"), 4 << 30);
        assert_eq!(bytes("4gib"), 4 << 30);
        assert_eq!(bytes("1.5GB"), 1_500_000_000);
        assert_eq!(bytes("0.5 GiB"), 1 << 29);
        assert_eq!(bytes("2K"), 2048);
        assert_eq!(bytes("10B"), 10);
        assert_eq!(bytes(" 7 mb "), 7_000_000);
    }

    #[test]
    fn percentages_resolve_against_the_total() {
        let s: ByteSize = "25%".parse().unwrap();
        assert_eq!(s, ByteSize::Fraction(0.25));
        assert_eq!(s.resolve(1000), 250);
        assert_eq!("100%".parse::<ByteSize>().unwrap().resolve(999), 999);
        assert_eq!("12.5%".parse::<ByteSize>().unwrap().resolve(80), 10);
    }

    #[test]
    fn bad_sizes_list_the_accepted_forms() {
        for bad in [
            "",
            "GiB",
            "4 apples",
            "-1GiB",
            "0%",
            "101%",
            "x%",
            "1e400",
            "99999999999TiB",
        ] {
            let err = bad.parse::<ByteSize>().unwrap_err().to_string();
            assert!(err.contains("accepted forms"), "{bad:?}: {err}");
            assert!(
                err.contains("4GiB") && err.contains("25%"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn formats_in_binary_units() {
        assert_eq!(format_bytes(17), "17 B");
        assert_eq!(format_bytes(3 << 30), "3.0 GiB");
        assert_eq!(format_bytes(25_270_000), "24.1 MiB");
    }
}
