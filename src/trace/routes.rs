//! A trace regrouped for analysis: per sequence, per MoE layer, the experts of
//! each token in position order (rows arrive in the order layer calls ran).

use std::path::Path;

use super::parquet::{Trace, TraceMeta};
use crate::error::{Error, Result};

/// The experts of each token of one layer, best first (a token may have fewer
/// than `top_k` under dynamic top-p).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenExperts {
    /// `[n_tokens + 1]`: token `t`'s experts are `experts[offsets[t]..offsets[t + 1]]`.
    offsets: Vec<usize>,
    experts: Vec<u32>,
}

impl TokenExperts {
    pub fn new() -> Self {
        Self {
            offsets: vec![0],
            experts: Vec::new(),
        }
    }

    /// From each token's expert list.
    pub fn from_tokens<T: AsRef<[u32]>>(tokens: &[T]) -> Self {
        let mut out = Self::new();
        for t in tokens {
            out.push_token(t.as_ref());
        }
        out
    }

    pub fn push_token(&mut self, experts: &[u32]) {
        self.experts.extend_from_slice(experts);
        self.offsets.push(self.experts.len());
    }

    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Expert choices over all tokens.
    pub fn n_choices(&self) -> usize {
        self.experts.len()
    }

    pub fn token(&self, t: usize) -> &[u32] {
        match (self.offsets.get(t), self.offsets.get(t + 1)) {
            (Some(&a), Some(&b)) => &self.experts[a..b],
            _ => &[],
        }
    }

    pub fn tokens(&self) -> impl Iterator<Item = &[u32]> + '_ {
        (0..self.len()).map(|t| self.token(t))
    }

    /// One token stream over several layers, as the paper's model-level
    /// analysis sees it: token `t` requests every layer's experts in layer
    /// order, layer `i`'s expert `e` renamed `i * num_experts + e`.
    pub fn concat_layers(layers: &[TokenExperts], num_experts: usize) -> TokenExperts {
        let n = layers.iter().map(TokenExperts::len).min().unwrap_or(0);
        let mut out = TokenExperts::new();
        let mut buf = Vec::new();
        for t in 0..n {
            buf.clear();
            for (i, layer) in layers.iter().enumerate() {
                buf.extend(layer.token(t).iter().map(|&e| (i * num_experts) as u32 + e));
            }
            out.push_token(&buf);
        }
        out
    }
}

/// One sequence's routing in every MoE layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceRoutes {
    pub id: u64,
    /// Absolute positions of its tokens, ascending.
    pub positions: Vec<u32>,
    /// Indexed like [`TraceMeta::moe_layers`].
    pub layers: Vec<TokenExperts>,
}

impl SequenceRoutes {
    pub fn n_tokens(&self) -> usize {
        self.positions.len()
    }
}

/// A whole trace, by sequence (ascending id).
#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    pub meta: TraceMeta,
    pub sequences: Vec<SequenceRoutes>,
}

impl Routes {
    /// Regroups `trace`'s rows; `path` names the trace in errors. Every token
    /// must have rows in every MoE layer, with distinct ranks and experts.
    pub fn from_trace(trace: &Trace, path: &Path) -> Result<Routes> {
        let rows = &trace.rows;
        let moe = &trace.meta.moe_layers;
        let layer_index = |layer: u32| moe.binary_search(&(layer as usize)).ok();
        // invariant: read_trace fills every column from the same record batches, so
        // each has rows.len() entries.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_unstable_by_key(|&i| {
            (
                rows.sequence[i],
                rows.position[i],
                rows.layer[i],
                rows.rank[i],
            )
        });
        let mut sequences: Vec<SequenceRoutes> = Vec::new();
        let mut token: Vec<Vec<u32>> = vec![Vec::new(); moe.len()];
        let mut i = 0;
        while i < order.len() {
            let (seq, pos) = (rows.sequence[order[i]], rows.position[order[i]]);
            for t in token.iter_mut() {
                t.clear();
            }
            let mut last: Option<(u32, u32)> = None;
            while let Some(&r) = order.get(i) {
                if (rows.sequence[r], rows.position[r]) != (seq, pos) {
                    break;
                }
                let (layer, rank, expert) = (rows.layer[r], rows.rank[r], rows.expert[r]);
                if last == Some((layer, rank)) {
                    return Err(Error::trace(
                        path,
                        format!(
                            "two rows for sequence {seq}, position {pos}, layer {layer}, rank {rank}"
                        ),
                    ));
                }
                last = Some((layer, rank));
                let li = layer_index(layer).ok_or_else(|| {
                    Error::trace(path, format!("row {r}: layer {layer} is not a MoE layer"))
                })?;
                if token[li].contains(&expert) {
                    return Err(Error::trace(
                        path,
                        format!(
                            "sequence {seq}, position {pos}, layer {layer}: expert {expert} chosen twice"
                        ),
                    ));
                }
                token[li].push(expert);
                i += 1;
            }
            if let Some(li) = token.iter().position(Vec::is_empty) {
                return Err(Error::trace(
                    path,
                    format!(
                        "sequence {seq}, position {pos} has rows in some MoE layers but none in layer {}",
                        moe[li]
                    ),
                ));
            }
            if sequences.last().is_none_or(|s| s.id != seq) {
                sequences.push(SequenceRoutes {
                    id: seq,
                    positions: Vec::new(),
                    layers: vec![TokenExperts::new(); moe.len()],
                });
            }
            if let Some(s) = sequences.last_mut() {
                s.positions.push(pos);
                for (layer, experts) in s.layers.iter_mut().zip(&token) {
                    layer.push_token(experts);
                }
            }
        }
        Ok(Routes {
            meta: trace.meta.clone(),
            sequences,
        })
    }

    /// Tokens over all sequences.
    pub fn n_tokens(&self) -> usize {
        self.sequences.iter().map(SequenceRoutes::n_tokens).sum()
    }

    /// Every sequence's tokens in MoE layer `li` (an index into `meta.moe_layers`).
    pub fn layer(&self, li: usize) -> impl Iterator<Item = &TokenExperts> + '_ {
        self.sequences.iter().filter_map(move |s| s.layers.get(li))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{TraceRow, TraceRows};

    fn meta() -> TraceMeta {
        TraceMeta {
            num_layers: 3,
            num_experts: 4,
            top_k: 2,
            moe_layers: vec![0, 2],
            model: "m".into(),
        }
    }

    fn row(sequence: u64, position: u32, layer: u32, rank: u32, expert: u32) -> TraceRow {
        TraceRow {
            sequence,
            position,
            layer,
            rank,
            expert,
            weight: 0.5,
            score: 0.5,
            cache: None,
        }
    }

    fn trace(rows: &[TraceRow]) -> Trace {
        let mut r = TraceRows::default();
        for &row in rows {
            r.push(row);
        }
        Trace {
            meta: meta(),
            rows: r,
        }
    }

    #[test]
    fn rows_in_call_order_regroup_by_sequence_layer_and_position() {
        // Layer calls as a batched run writes them: layer 0 for both sequences,
        // then layer 2; the second token of sequence 9 comes in a later call.
        let t = trace(&[
            row(9, 0, 0, 1, 3),
            row(9, 0, 0, 0, 1),
            row(4, 5, 0, 0, 2),
            row(9, 0, 2, 0, 0),
            row(4, 5, 2, 0, 1),
            row(4, 5, 2, 1, 3),
            row(9, 1, 0, 0, 2),
            row(9, 1, 2, 0, 2),
        ]);
        let routes = Routes::from_trace(&t, Path::new("t")).unwrap();
        assert_eq!(routes.sequences.len(), 2);
        let (a, b) = (&routes.sequences[0], &routes.sequences[1]);
        assert_eq!((a.id, a.positions.clone()), (4, vec![5]));
        assert_eq!(a.layers[1].token(0), &[1, 3]);
        assert_eq!((b.id, b.positions.clone()), (9, vec![0, 1]));
        assert_eq!(b.layers[0].token(0), &[1, 3], "ranks in order");
        assert_eq!(b.layers[0].token(1), &[2]);
        assert_eq!(routes.n_tokens(), 3);
        let model = TokenExperts::concat_layers(&b.layers, 4);
        assert_eq!(model.token(0), &[1, 3, 4]);
        assert_eq!(model.token(1), &[2, 6]);
    }

    #[test]
    fn inconsistent_rows_are_refused_naming_the_token() {
        let missing_layer = trace(&[row(1, 3, 0, 0, 2)]);
        let err = Routes::from_trace(&missing_layer, Path::new("t")).unwrap_err();
        assert!(
            err.to_string()
                .contains("position 3 has rows in some MoE layers but none in layer 2")
        );
        let duplicate = trace(&[row(1, 3, 0, 0, 2), row(1, 3, 0, 0, 1), row(1, 3, 2, 0, 1)]);
        let err = Routes::from_trace(&duplicate, Path::new("t")).unwrap_err();
        assert!(
            err.to_string()
                .contains("two rows for sequence 1, position 3, layer 0, rank 0")
        );
        let twice = trace(&[row(1, 3, 0, 0, 2), row(1, 3, 0, 1, 2), row(1, 3, 2, 0, 1)]);
        let err = Routes::from_trace(&twice, Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("expert 2 chosen twice"));
    }
}
