//! How the rows of one forward map to sequences. Linear layers and the MoE block
//! see all rows at once; attention walks the sequences, each with its own cache.

use super::observer::SequenceId;

/// One sequence's rows within the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceRows {
    pub sequence: SequenceId,
    pub row_start: usize,
    pub n_tokens: usize,
    /// Absolute position of the sequence's first row (its cached length).
    pub start_position: usize,
}

#[derive(Debug, Clone, Default)]
pub struct BatchLayout {
    sequences: Vec<SequenceRows>,
}

impl BatchLayout {
    pub fn push(&mut self, sequence: SequenceId, n_tokens: usize, start_position: usize) {
        let row_start = self.n_rows();
        self.sequences.push(SequenceRows {
            sequence,
            row_start,
            n_tokens,
            start_position,
        });
    }

    pub fn sequences(&self) -> &[SequenceRows] {
        &self.sequences
    }

    pub fn n_rows(&self) -> usize {
        self.sequences
            .last()
            .map_or(0, |s| s.row_start + s.n_tokens)
    }
}
