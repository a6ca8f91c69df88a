//! Routed experts located by the family's [`MoeNames`] (data its
//! architecture file declares), and the one loader that turns those names into
//! an expert's [`Ffn`]. Living here (not in `model/`) lets an expert provider read a single
//! expert long after the model was built, without knowing the architecture.
//! GGUF's merged `ffn_*_exps` tensors are reached through the same Hugging Face
//! names: `weights::gguf_source` slices one expert out of them.

use candle_core::DType;

use super::ExpertId;
use crate::error::{Error, Result};
use crate::ops::{Ffn, Linear};
use crate::weights::{MoeNames, TensorSource};

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerExperts {
    /// `model.layers.{l}.{module}`.
    pub prefix: String,
    /// Stored as the fused 3-D tensors rather than per expert.
    pub fused: bool,
    names: &'static MoeNames,
}

/// The shapes every routed expert of a model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertDims {
    pub hidden: usize,
    pub ffn: usize,
    pub num_experts: usize,
}

impl LayerExperts {
    /// Where `layer`'s experts are in `src`.
    pub fn locate(names: &'static MoeNames, src: &dyn TensorSource, layer: usize) -> Result<Self> {
        let prefix = moe_prefix(names, src, layer)?;
        let fused = src.contains(&format!("{prefix}.experts.{}", names.fused[0]));
        Ok(LayerExperts {
            prefix,
            fused,
            names,
        })
    }

    /// The Hugging Face names of expert `e`'s gate, up and down matrices, or of
    /// the fused tensors holding it.
    pub fn tensor_names(&self, e: usize) -> Vec<String> {
        let p = &self.prefix;
        if self.fused {
            self.names
                .fused
                .iter()
                .map(|n| format!("{p}.experts.{n}"))
                .collect()
        } else {
            self.names
                .experts
                .iter()
                .map(|(n, _)| format!("{p}.experts.{e}.{n}.weight"))
                .collect()
        }
    }

    /// Expert `e` of this layer, gate and up fused into one matrix; quantized
    /// GGUF weights stay quantized, float ones are converted to `dtype`.
    pub fn load(
        &self,
        src: &dyn TensorSource,
        dims: ExpertDims,
        e: usize,
        dtype: DType,
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
        if self.fused {
            // transformers 5 stores all experts in one tensor; an expert is a slice of it.
            let gate_up = src.load_index(&names[0], &[n, 2 * ffn, h], e, dtype)?;
            let down = src.load_index(&names[1], &[n, h, ffn], e, dtype)?;
            return Ok(Ffn::new(
                Linear::new(gate_up, None),
                Linear::new(down, None),
            ));
        }
        Ok(Ffn::new(
            src.load_linear(&[(&names[0], ffn), (&names[1], ffn)], h, dtype, None)?,
            src.load_linear(&[(&names[2], h)], ffn, dtype, None)?,
        ))
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
        layer.load(src, self.dims, id.expert as usize, self.dtype)
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
            fused: false,
            names: &crate::config::family::MIXTRAL.names,
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
            fused: true,
            names: &crate::config::family::MIXTRAL.names,
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
