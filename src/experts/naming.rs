//! Routed experts located by the family's [`MoeNames`] (data its
//! architecture file declares), and the one loader that turns those names into
//! an expert's [`Ffn`]. Living here (not in `model/`) lets an expert provider read a single
//! expert long after the model was built, without knowing the architecture.
//! GGUF's merged `ffn_*_exps` tensors are reached through the same Hugging Face
//! names: `weights::gguf_source` slices one expert out of them.

use candle_core::{DType, Tensor};

use super::ExpertId;
use crate::config::family::ExpertKind;
use crate::error::{Error, Result};
use crate::ops::{Ffn, GluActivation, Linear};
use crate::weights::{MatrixLayout, MoeNames, TensorSource, deinterleave};

/// The MoE module prefix of `layer` in `src` (`model.layers.{l}.{module}`):
/// the first of the family's alternatives whose router exists.
pub fn moe_prefix(names: &MoeNames, src: &dyn TensorSource, layer: usize) -> Result<String> {
    let router = names.router.0;
    let candidates: Vec<String> = names
        .modules
        .iter()
        .map(|m| format!("model.layers.{layer}.{m}"))
        .collect();
    candidates
        .iter()
        .find(|p| src.contains(&format!("{p}.{router}.weight")))
        .cloned()
        .ok_or_else(|| Error::MissingTensor {
            name: format!(
                "{}.{router}.weight",
                candidates.first().map_or("?", String::as_str)
            ),
            hint: " (the MoE router of this layer)".to_string(),
        })
}

/// One MoE layer's experts located in a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerExperts {
    /// `model.layers.{l}.{module}`.
    pub prefix: String,
    pub storage: ExpertStorage,
    names: &'static MoeNames,
    kind: ExpertKind,
}

/// How a checkpoint stores one layer's routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertStorage {
    /// Separate gate, up and down matrices per expert.
    PerExpert,
    /// transformers 5's fused 3-D tensors, all experts in each.
    Fused,
    /// The fused tensors as MXFP4 `{fused}_blocks` / `{fused}_scales` (gpt-oss on the Hub).
    Mxfp4,
}

/// The shapes every routed expert of a model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertDims {
    pub hidden: usize,
    pub ffn: usize,
    pub num_experts: usize,
}

impl LayerExperts {
    /// Where `layer`'s experts are in `src`, for a family whose experts are `kind`.
    pub fn locate(
        names: &'static MoeNames,
        kind: ExpertKind,
        src: &dyn TensorSource,
        layer: usize,
    ) -> Result<Self> {
        let prefix = moe_prefix(names, src, layer)?;
        let fused = format!("{prefix}.experts.{}", names.fused[0]);
        let storage = if src.contains(&format!("{fused}_blocks")) {
            ExpertStorage::Mxfp4
        } else if src.contains(&fused) {
            ExpertStorage::Fused
        } else {
            ExpertStorage::PerExpert
        };
        Ok(LayerExperts {
            prefix,
            storage,
            names,
            kind,
        })
    }

    /// The Hugging Face names of expert `e`'s gate, up and down matrices, or of
    /// the fused tensors holding it (for MXFP4, without `_blocks` / `_scales`).
    pub fn tensor_names(&self, e: usize) -> Vec<String> {
        let p = &self.prefix;
        match self.storage {
            ExpertStorage::Fused | ExpertStorage::Mxfp4 => self
                .names
                .fused
                .iter()
                .map(|n| format!("{p}.experts.{n}"))
                .collect(),
            ExpertStorage::PerExpert => self
                .names
                .experts
                .iter()
                .map(|(n, _)| format!("{p}.experts.{e}.{n}.weight"))
                .collect(),
        }
    }

    /// Expert `e` of this layer, gate and up fused into one matrix (gate rows
    /// first) with `activation`; quantized GGUF and MXFP4 weights stay
    /// quantized, float ones are converted to `dtype`.
    pub fn load(
        &self,
        src: &dyn TensorSource,
        dims: ExpertDims,
        e: usize,
        dtype: DType,
        activation: GluActivation,
    ) -> Result<Ffn> {
        let ExpertDims {
            hidden: h,
            ffn,
            num_experts: n,
        } = dims;
        if e >= n {
            return Err(Error::InvalidInput(format!(
                "{}: expert {e} requested, the layer has {n}",
                self.prefix
            )));
        }
        let names = self.tensor_names(e);
        let interleaved = self.kind.gate_up_interleaved;
        let (gate_up, down) = match self.storage {
            ExpertStorage::Fused | ExpertStorage::Mxfp4 => {
                // Fused biases: `[E, 2 * ffn]` (interleaved like their rows) and `[E, hidden]`.
                let (gate_up_bias, down_bias) = if self.kind.biases {
                    let bias = |name: &str, width: usize| {
                        src.load_index(&format!("{name}_bias"), &[n, width], e, DType::F32)
                    };
                    let gate_up = bias(&names[0], 2 * ffn)?;
                    let gate_up = if interleaved {
                        deinterleave(&gate_up)?
                    } else {
                        gate_up
                    };
                    (Some(gate_up), Some(bias(&names[1], h)?))
                } else {
                    (None, None)
                };
                if self.storage == ExpertStorage::Mxfp4 {
                    (
                        src.load_mxfp4_index(
                            &names[0],
                            [n, 2 * ffn, h],
                            e,
                            interleaved,
                            gate_up_bias,
                        )?,
                        src.load_mxfp4_index(&names[1], [n, h, ffn], e, false, down_bias)?,
                    )
                } else {
                    // transformers 5 stores all experts in one tensor; an expert is a slice of it.
                    let t = self.kind.fused_transposed;
                    let stored = |out: usize, inp: usize| {
                        if t { [n, inp, out] } else { [n, out, inp] }
                    };
                    let layout = |interleaved| MatrixLayout {
                        transposed: t,
                        interleaved,
                    };
                    (
                        Linear::new(
                            src.load_matrix_index(
                                &names[0],
                                &stored(2 * ffn, h),
                                e,
                                layout(interleaved),
                                dtype,
                            )?,
                            gate_up_bias,
                        ),
                        Linear::new(
                            src.load_matrix_index(
                                &names[1],
                                &stored(h, ffn),
                                e,
                                layout(false),
                                dtype,
                            )?,
                            down_bias,
                        ),
                    )
                }
            }
            ExpertStorage::PerExpert => {
                let bias = |name: &str, width: usize| -> Result<Option<Tensor>> {
                    if !self.kind.biases {
                        return Ok(None);
                    }
                    let name = name.replace(".weight", ".bias");
                    Ok(Some(src.load(&name, &[width], DType::F32)?))
                };
                let gate_up_bias = match (bias(&names[0], ffn)?, bias(&names[1], ffn)?) {
                    (Some(g), Some(u)) => Some(Tensor::cat(&[g, u], 0)?),
                    _ => None,
                };
                (
                    src.load_linear(
                        &[(&names[0], ffn), (&names[1], ffn)],
                        h,
                        dtype,
                        gate_up_bias,
                    )?,
                    src.load_linear(&[(&names[2], h)], ffn, dtype, bias(&names[2], h)?)?,
                )
            }
        };
        Ok(Ffn::new(gate_up, down).with_activation(activation))
    }
}

/// Every MoE layer's experts located in one checkpoint: what an expert provider
/// needs to read any expert again later.
#[derive(Debug, Clone)]
pub struct ExpertLayout {
    /// `[layer]`; `None` for dense layers.
    pub layers: Vec<Option<LayerExperts>>,
    pub dims: ExpertDims,
    pub dtype: DType,
    pub activation: GluActivation,
}

impl ExpertLayout {
    pub fn load(&self, src: &dyn TensorSource, id: ExpertId) -> Result<Ffn> {
        let layer = self
            .layers
            .get(id.layer as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Error::InvalidInput(format!("layer {} has no routed experts", id.layer))
            })?;
        layer.load(
            src,
            self.dims,
            id.expert as usize,
            self.dtype,
            self.activation,
        )
    }

    pub fn num_experts(&self, layer: usize) -> usize {
        match self.layers.get(layer) {
            Some(Some(_)) => self.dims.num_experts,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_per_expert_and_fused_tensors() {
        let per = LayerExperts {
            prefix: "model.layers.2.block_sparse_moe".into(),
            storage: ExpertStorage::PerExpert,
            names: &crate::config::family::MIXTRAL.names,
            kind: ExpertKind::SWIGLU,
        };
        assert_eq!(
            per.tensor_names(5),
            [
                "model.layers.2.block_sparse_moe.experts.5.w1.weight",
                "model.layers.2.block_sparse_moe.experts.5.w3.weight",
                "model.layers.2.block_sparse_moe.experts.5.w2.weight",
            ]
        );
        let fused = LayerExperts {
            prefix: "model.layers.0.mlp".into(),
            storage: ExpertStorage::Fused,
            names: &crate::config::family::MIXTRAL.names,
            kind: ExpertKind::SWIGLU,
        };
        assert_eq!(
            fused.tensor_names(3),
            [
                "model.layers.0.mlp.experts.gate_up_proj",
                "model.layers.0.mlp.experts.down_proj"
            ]
        );
    }
}
