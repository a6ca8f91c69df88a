//! Trainable parameters: one `Var` per checkpoint tensor, named as in a Hub
//! checkpoint, served to the model loader through [`TensorSource`].
//!
//! The model is rebuilt from these vars every step: the loader fuses gate and up
//! projections with a copy, and a rebuilt model can never hold stale copies
//! (autograd flows through the copy back to the vars).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use super::rng::SplitMix64;
use crate::config::{ModelConfig, QkNorm};
use crate::error::{Error, Result};
use crate::weights::TensorSource;

/// How a fresh parameter is initialised (as transformers' `_init_weights` does for these models).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Normal(f32),
    Ones,
    Zeros,
}

/// The standard deviation of fresh matrices.
const STD: f32 = 0.02;

impl Init {
    /// `n` values; a tensor's normal values depend only on `seed` and its `name`.
    fn values(self, name: &str, n: usize, seed: u64) -> Vec<f32> {
        match self {
            Init::Ones => vec![1f32; n],
            Init::Zeros => vec![0f32; n],
            Init::Normal(std) => {
                let mut rng = SplitMix64::new(seed ^ SplitMix64::hash_str(name));
                (0..n).map(|_| rng.normal() * std).collect()
            }
        }
    }
}

/// The parameters of an all-sparse `qwen3_moe` / `qwen2_moe` model, by Hub name.
/// A `BTreeMap` so every walk over them (clipping norms, saving) has one order.
#[derive(Debug)]
pub struct VarStore {
    vars: BTreeMap<String, Var>,
}

impl VarStore {
    /// Fresh parameters for `cfg`: normal(0, 0.02) matrices, unit norms, zero biases.
    /// Each tensor's values depend only on `seed` and its name.
    pub fn init(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for (name, shape, init) in parameter_specs(cfg) {
            let values = init.values(&name, shape.iter().product(), seed);
            let t = Tensor::from_vec(values, shape.as_slice(), device)?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        Ok(Self { vars })
    }

    /// Parameters from saved tensors (a checkpoint), checked against `cfg`.
    pub fn from_tensors(cfg: &ModelConfig, mut tensors: BTreeMap<String, Tensor>) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for (name, shape, _) in parameter_specs(cfg) {
            let t = tensors.remove(&name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                hint: " (in the training checkpoint)".into(),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    name,
                    expected: shape,
                    found: t.dims().to_vec(),
                });
            }
            vars.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        Ok(Self { vars })
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    pub fn num_parameters(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Current values, detached from autograd (for evaluation and saving).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// A source that serves detached values: a model built from it runs the
    /// fused inference kernels and records no graph.
    pub fn frozen(&self) -> Frozen<'_> {
        Frozen(self)
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<&Var> {
        let var = self.vars.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            hint: " (not a parameter of the trained model)".into(),
        })?;
        if var.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: var.dims().to_vec(),
            });
        }
        Ok(var)
    }
}

impl TensorSource for VarStore {
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Ok(self.get(name, shape)?.as_tensor().to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }
}

pub struct Frozen<'a>(&'a VarStore);

impl TensorSource for Frozen<'_> {
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Ok(self
            .0
            .get(name, shape)?
            .as_tensor()
            .detach()
            .to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// Fresh parameters shaped like a checkpoint's: whatever the loader asks of
/// `like` (checked there from metadata), initialised as [`VarStore::init`] does
/// by name (norms one, biases zero, the rest normal(0, 0.02)). Unlike `init` it
/// follows every layout the loader reads: dense layers, fused or renamed experts.
pub struct RandomLike<'a> {
    like: &'a dyn TensorSource,
    seed: u64,
}

impl<'a> RandomLike<'a> {
    pub fn new(like: &'a dyn TensorSource, seed: u64) -> Self {
        Self { like, seed }
    }
}

impl TensorSource for RandomLike<'_> {
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.like.check(name, shape)?;
        let init = if name.ends_with("norm.weight") {
            Init::Ones
        } else if name.ends_with(".bias") {
            Init::Zeros
        } else {
            Init::Normal(STD)
        };
        let values = init.values(name, shape.iter().product(), self.seed);
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.like.contains(name)
    }
}

/// Every parameter of the model `train` builds: name, shape, initialisation.
fn parameter_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let a = &cfg.attention;
    let m = &cfg.moe;
    let mut specs = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![v, h],
            Init::Normal(STD),
        ),
        ("model.norm.weight".to_string(), vec![h], Init::Ones),
    ];
    if !cfg.tie_word_embeddings {
        specs.push(("lm_head.weight".into(), vec![v, h], Init::Normal(STD)));
    }
    let swiglu = |specs: &mut Vec<(String, Vec<usize>, Init)>, p: &str, ffn: usize| {
        specs.push((
            format!("{p}.gate_proj.weight"),
            vec![ffn, h],
            Init::Normal(STD),
        ));
        specs.push((
            format!("{p}.up_proj.weight"),
            vec![ffn, h],
            Init::Normal(STD),
        ));
        specs.push((
            format!("{p}.down_proj.weight"),
            vec![h, ffn],
            Init::Normal(STD),
        ));
    };
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        specs.push((format!("{p}.input_layernorm.weight"), vec![h], Init::Ones));
        specs.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
        ));
        let at = format!("{p}.self_attn");
        for (proj, out) in [
            ("q_proj", a.q_dim()),
            ("k_proj", a.kv_dim()),
            ("v_proj", a.kv_dim()),
        ] {
            specs.push((
                format!("{at}.{proj}.weight"),
                vec![out, h],
                Init::Normal(STD),
            ));
            if a.qkv_bias {
                specs.push((format!("{at}.{proj}.bias"), vec![out], Init::Zeros));
            }
        }
        specs.push((
            format!("{at}.o_proj.weight"),
            vec![h, a.q_dim()],
            Init::Normal(STD),
        ));
        if a.qk_norm == QkNorm::PerHead {
            specs.push((format!("{at}.q_norm.weight"), vec![a.head_dim], Init::Ones));
            specs.push((format!("{at}.k_norm.weight"), vec![a.head_dim], Init::Ones));
        }
        let mlp = format!("{p}.mlp");
        specs.push((
            format!("{mlp}.gate.weight"),
            vec![m.num_experts, h],
            Init::Normal(STD),
        ));
        for e in 0..m.num_experts {
            swiglu(&mut specs, &format!("{mlp}.experts.{e}"), m.expert_ffn);
        }
        if let Some(width) = m.shared_expert_ffn {
            swiglu(&mut specs, &format!("{mlp}.shared_expert"), width);
            specs.push((
                format!("{mlp}.shared_expert_gate.weight"),
                vec![1, h],
                Init::Normal(STD),
            ));
        }
    }
    specs
}
