//! A GGUF file as a [`TensorSource`]. The model asks for Hugging Face names;
//! this translates them with one table (the names llama.cpp's gguf-py
//! `tensor_mapping.py` gives them), slices each routed expert out of the merged
//! 3-D `ffn_*_exps` tensors, and undoes the q/k row permutation that
//! `convert_hf_to_gguf.py` applies for the `llama` architecture.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::TensorSource;
use super::gguf::{GgufFile, GgufTensorInfo, decode, to_qtensor};
use super::source::{Reopened, load_stacked};
use crate::error::{Error, Result};
use crate::ops::Linear;

/// Hugging Face name -> GGUF name, for tensors outside the decoder layers.
pub const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Hugging Face name under `model.layers.{l}.` -> GGUF name under `blk.{l}.`.
pub const LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    // Router.
    ("mlp.gate.weight", "ffn_gate_inp.weight"),
    ("block_sparse_moe.gate.weight", "ffn_gate_inp.weight"),
    // Qwen2-MoE shared expert and its sigmoid gate (stored 1-D: `[hidden]`).
    (
        "mlp.shared_expert.gate_proj.weight",
        "ffn_gate_shexp.weight",
    ),
    ("mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight"),
    (
        "mlp.shared_expert.down_proj.weight",
        "ffn_down_shexp.weight",
    ),
    ("mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight"),
    // Dense MLP layers (Qwen3-MoE `mlp_only_layers`).
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// Modules whose `experts.{e}.*` are routed experts.
const EXPERT_MODULES: &[&str] = &["mlp", "block_sparse_moe"];

/// Per-expert Hugging Face suffix (under `{module}.experts.{e}.`) -> the merged
/// GGUF tensor `[n_experts, out, in]` (ggml order `{in, out, n_experts}`) holding it.
pub const EXPERT_NAMES: &[(&str, &str)] = &[
    ("gate_proj.weight", "ffn_gate_exps.weight"),
    ("up_proj.weight", "ffn_up_exps.weight"),
    ("down_proj.weight", "ffn_down_exps.weight"),
    // Mixtral: w1 = gate, w3 = up, w2 = down.
    ("w1.weight", "ffn_gate_exps.weight"),
    ("w3.weight", "ffn_up_exps.weight"),
    ("w2.weight", "ffn_down_exps.weight"),
];

/// Where a Hugging Face tensor lives in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufLocation {
    pub name: String,
    /// For a routed expert: its index along the merged tensor's first dimension.
    pub expert: Option<usize>,
}

/// The GGUF location of a Hugging Face tensor name, if it has one.
pub fn gguf_location(hf: &str) -> Option<GgufLocation> {
    if let Some(&(_, g)) = GLOBAL_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some(GgufLocation {
            name: g.to_string(),
            expert: None,
        });
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    for module in EXPERT_MODULES {
        if let Some(expert_rest) = rest
            .strip_prefix(module)
            .and_then(|r| r.strip_prefix(".experts."))
        {
            let (expert, suffix) = expert_rest.split_once('.')?;
            let expert: usize = expert.parse().ok()?;
            let &(_, g) = EXPERT_NAMES.iter().find(|(h, _)| *h == suffix)?;
            return Some(GgufLocation {
                name: format!("blk.{layer}.{g}"),
                expert: Some(expert),
            });
        }
    }
    let &(_, g) = LAYER_NAMES.iter().find(|(h, _)| *h == rest)?;
    Some(GgufLocation {
        name: format!("blk.{layer}.{g}"),
        expert: None,
    })
}

/// Query/key head counts, for undoing the converter's rotary permutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkHeads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
}

pub struct GgufSource {
    file: GgufFile,
    /// `Some` for files whose q/k rows are in llama.cpp's interleaved rotary
    /// order (architecture `llama`): `LlamaModel.permute` in `convert_hf_to_gguf.py`.
    permuted_qk: Option<QkHeads>,
}

/// One tensor's encoded bytes, ready to decode.
struct Piece<'a> {
    info: &'a GgufTensorInfo,
    bytes: Cow<'a, [u8]>,
    /// The shape of this piece (one expert's matrix for merged experts).
    shape: Vec<usize>,
}

impl GgufSource {
    pub fn new(file: GgufFile, permuted_qk: Option<QkHeads>) -> Self {
        Self { file, permuted_qk }
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn locate(&self, hf: &str) -> Result<GgufLocation> {
        gguf_location(hf).ok_or_else(|| Error::MissingTensor {
            name: hf.to_string(),
            hint: format!(
                " (no GGUF name is known for it; reading {})",
                self.file.path().display()
            ),
        })
    }

    /// The location in this file: merged experts, or the per-expert tensors
    /// (`blk.N.ffn_gate.E.weight`) of GGUFs converted before llama.cpp merged them.
    fn resolve(&self, loc: GgufLocation) -> GgufLocation {
        match loc.expert {
            Some(e) if !self.file.contains(&loc.name) => {
                let legacy = loc.name.replace("_exps.weight", &format!(".{e}.weight"));
                if self.file.contains(&legacy) {
                    return GgufLocation {
                        name: legacy,
                        expert: None,
                    };
                }
                loc
            }
            _ => loc,
        }
    }

    /// The bytes and shape of `hf`, checked against `shape` (dimensions of size
    /// one are ignored: the converter squeezes them), q/k rows un-permuted.
    fn piece(&self, hf: &str, shape: &[usize]) -> Result<Piece<'_>> {
        let loc = self.resolve(self.locate(hf)?);
        let info = self.file.require(&loc.name)?;
        let (bytes, stored_shape) = match loc.expert {
            None => (self.file.bytes(&loc.name)?, info.shape.clone()),
            Some(e) => {
                let [n, rows, cols] = info.shape[..] else {
                    return Err(self.bad(
                        &loc.name,
                        format!(
                            "merged expert tensor has shape {:?}, expected 3 dimensions",
                            info.shape
                        ),
                    ));
                };
                if e >= n {
                    return Err(
                        self.bad(&loc.name, format!("has {n} experts, expert {e} requested"))
                    );
                }
                (self.file.part_bytes(&loc.name, e, n)?, vec![rows, cols])
            }
        };
        let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
        if squeeze(&stored_shape) != squeeze(shape) {
            return Err(Error::ShapeMismatch {
                name: format!("{hf} (GGUF `{}`)", loc.name),
                expected: shape.to_vec(),
                found: stored_shape,
            });
        }
        let bytes = match self.heads_to_unpermute(&loc.name) {
            Some(heads) => {
                let rows = shape.first().copied().unwrap_or(0);
                Cow::Owned(self.unpermute_rows(&loc.name, &bytes, rows, heads)?)
            }
            None => bytes,
        };
        Ok(Piece {
            info,
            bytes,
            shape: shape.to_vec(),
        })
    }

    fn heads_to_unpermute(&self, gguf_name: &str) -> Option<usize> {
        let heads = self.permuted_qk?;
        let (_, local) = gguf_name.strip_prefix("blk.")?.split_once('.')?;
        match local {
            "attn_q.weight" | "attn_q.bias" => Some(heads.num_heads),
            "attn_k.weight" | "attn_k.bias" => Some(heads.num_kv_heads),
            _ => None,
        }
    }

    /// Inverse of `LlamaModel.permute`: within each head the converter stores row
    /// `2 i + j` for Hugging Face row `j * head_dim / 2 + i` (`j` in 0..2).
    fn unpermute_rows(
        &self,
        gguf_name: &str,
        bytes: &[u8],
        rows: usize,
        heads: usize,
    ) -> Result<Vec<u8>> {
        if heads == 0
            || rows == 0
            || !rows.is_multiple_of(heads)
            || !(rows / heads).is_multiple_of(2)
            || !bytes.len().is_multiple_of(rows)
        {
            return Err(self.bad(
                gguf_name,
                format!("{rows} rows cannot be split into {heads} heads of an even size"),
            ));
        }
        let head_dim = rows / heads;
        let half = head_dim / 2;
        let row_bytes = bytes.len() / rows;
        let mut out = Vec::with_capacity(bytes.len());
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let src = h * head_dim + 2 * i + j;
                    out.extend_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
                }
            }
        }
        Ok(out)
    }

    fn bad(&self, gguf_name: &str, reason: String) -> Error {
        Error::Gguf {
            path: self.file.path().to_path_buf(),
            reason: format!("tensor `{gguf_name}` {reason}"),
        }
    }

    /// Row blocks of one quantized GGML type stacked into one `QTensor`, or `None`
    /// when a part is a float type or the parts' types differ.
    fn stacked_quantized(&self, parts: &[(&str, usize)], cols: usize) -> Result<Option<QTensor>> {
        let pieces = parts
            .iter()
            .map(|&(name, rows)| self.piece(name, &[rows, cols]))
            .collect::<Result<Vec<_>>>()?;
        let dtype = pieces[0].info.dtype;
        if matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
            || pieces.iter().any(|p| p.info.dtype != dtype)
        {
            return Ok(None);
        }
        let rows: usize = parts.iter().map(|&(_, r)| r).sum();
        // Rows are whole blocks, so stacking rows is concatenating bytes.
        let q = if let [one] = &pieces[..] {
            to_qtensor(&one.bytes, dtype, &[rows, cols])?
        } else {
            let mut bytes = Vec::with_capacity(pieces.iter().map(|p| p.bytes.len()).sum());
            for p in &pieces {
                bytes.extend_from_slice(&p.bytes);
            }
            to_qtensor(&bytes, dtype, &[rows, cols])?
        };
        Ok(Some(q))
    }
}

impl TensorSource for GgufSource {
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let p = self.piece(name, shape)?;
        Ok(decode(&p.bytes, p.info.dtype, &p.shape, dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_location(name).is_some_and(|loc| self.file.contains(&self.resolve(loc).name))
    }

    fn drop_cached_pages(&self) -> Result<()> {
        self.file.drop_cached_pages()
    }

    fn reopen_for_reads(&self) -> Result<Option<Reopened>> {
        let (file, stats) = self.file.with_positioned_reads()?;
        Ok(Some(Reopened {
            source: Box::new(GgufSource::new(file, self.permuted_qk)),
            stats,
        }))
    }

    fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.piece(name, shape).map(|_| ())
    }

    /// Quantized GGUF matrices stay quantized (Q8_0 / Q4_0 on our kernels, other
    /// GGML types on candle's); float ones are converted to `dtype`.
    fn load_linear(
        &self,
        parts: &[(&str, usize)],
        cols: usize,
        dtype: DType,
        bias: Option<Tensor>,
    ) -> Result<Linear> {
        match self.stacked_quantized(parts, cols)? {
            Some(q) => Linear::from_qtensor(q, bias),
            None => Ok(Linear::new(load_stacked(self, parts, cols, dtype)?, bias)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_names_like_llama_cpp() {
        let loc = |hf| gguf_location(hf).map(|l| (l.name, l.expert));
        assert_eq!(
            loc("model.layers.3.self_attn.q_proj.weight"),
            Some(("blk.3.attn_q.weight".into(), None))
        );
        assert_eq!(
            loc("model.layers.0.block_sparse_moe.experts.5.w2.weight"),
            Some(("blk.0.ffn_down_exps.weight".into(), Some(5)))
        );
        assert_eq!(
            loc("model.layers.1.mlp.experts.2.up_proj.weight"),
            Some(("blk.1.ffn_up_exps.weight".into(), Some(2)))
        );
        assert_eq!(
            loc("model.layers.1.mlp.shared_expert_gate.weight"),
            Some(("blk.1.ffn_gate_inp_shexp.weight".into(), None))
        );
        assert_eq!(loc("lm_head.weight"), Some(("output.weight".into(), None)));
        assert_eq!(loc("model.layers.0.mlp.experts.gate_up_proj"), None);
        assert_eq!(loc("model.layers.x.mlp.gate.weight"), None);
    }
}
