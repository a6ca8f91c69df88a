//! The token stream a run trains on: every data file tokenised once, its tail
//! held out for evaluation, files joined by `<|endoftext|>`.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::rng::SplitMix64;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Corpus {
    pub train: Vec<u32>,
    pub heldout: Vec<u32>,
}

/// The text of every file under `paths` (directories walked recursively, in name order).
pub fn read_texts(paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files)?;
    }
    if files.is_empty() {
        return Err(Error::InvalidInput("no data files found".into()));
    }
    files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        })
        .collect()
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        collect_files(&e, out)?;
    }
    Ok(())
}

impl Corpus {
    /// Tokenises each text; the last `holdout_fraction` of its tokens go to the
    /// held-out stream, so evaluation covers every source.
    pub fn build(
        texts: &[String],
        tok: &Tokenizer,
        holdout_fraction: f64,
        eot: u32,
    ) -> Result<Self> {
        let encodings = tok
            .encode_batch(texts.iter().map(|t| t.as_str()).collect::<Vec<_>>(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let (mut train, mut heldout) = (Vec::new(), Vec::new());
        for enc in encodings {
            let ids = enc.get_ids();
            let split = ids.len() - (ids.len() as f64 * holdout_fraction) as usize;
            train.extend_from_slice(&ids[..split]);
            train.push(eot);
            heldout.extend_from_slice(&ids[split..]);
            heldout.push(eot);
        }
        Ok(Self { train, heldout })
    }

    /// `batch` random windows of `len` tokens from the training stream.
    pub fn sample(&self, rng: &mut SplitMix64, batch: usize, len: usize) -> Result<Vec<Vec<u32>>> {
        if self.train.len() < len + 1 {
            return Err(Error::InvalidInput(format!(
                "training data has {} tokens, fewer than one window of {len}",
                self.train.len()
            )));
        }
        Ok((0..batch)
            .map(|_| {
                let start = rng.below(self.train.len() - len + 1);
                self.train[start..start + len].to_vec()
            })
            .collect())
    }

    /// `n` fixed windows of `len` tokens spread evenly over the held-out stream
    /// (overlapping when it is short).
    pub fn eval_windows(&self, n: usize, len: usize) -> Result<Vec<Vec<u32>>> {
        if self.heldout.len() < len {
            return Err(Error::InvalidInput(format!(
                "held-out data has {} tokens, fewer than one window of {len}",
                self.heldout.len()
            )));
        }
        let span = self.heldout.len() - len;
        Ok((0..n)
            .map(|i| {
                let start = span * i / n.max(1);
                self.heldout[start..start + len].to_vec()
            })
            .collect())
    }
}
