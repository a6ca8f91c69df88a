//! Builds a [`Model`] from any [`TensorSource`], checking every tensor's shape
//! against the configuration.

use std::io::IsTerminal;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use super::Model;
use super::attention::{Attention, LayerAttention};
use super::layer::{AttentionBlock, DecoderLayer, LayerFfn, LayerNorms};
use super::mla::{LatentAttention, LatentQuery};
use super::moe::{ExpertTopP, MoeBlock, NextRouter, RouterConfig, SharedExpert};
use crate::config::family::NormPlacement;
use crate::config::{ModelConfig, QkNorm};
use crate::error::{Error, Result};
use crate::experts::{
    ExpertCache, ExpertDims, ExpertLayout, ExpertMemory, ExpertProvider, ExpertReads, ExpertStore,
    LayerExperts, Prefetch, moe_prefix,
};
use crate::ops::{Embedding, Ffn, Linear, QuantKind, RmsNorm, RopeTable};
use crate::weights::{MoeNames, TensorSource};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Element type weights are converted to at load.
    pub dtype: DType,
    /// Show a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
    /// Quantize expert, attention and output matrices at load. Embeddings, norms,
    /// routers and the shared-expert gate keep `dtype`.
    pub quant: Option<QuantKind>,
    /// Read routed experts on demand into an expert cache of this budget
    /// instead of all at load; the checkpoint stays open for the engine's lifetime.
    pub expert_memory: Option<ExpertMemory>,
    /// Dynamic expert activation in every router (`--expert-top-p`).
    pub expert_top_p: Option<ExpertTopP>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            progress: false,
            quant: None,
            expert_memory: None,
            expert_top_p: None,
        }
    }
}

struct Loader<'a> {
    src: &'a dyn TensorSource,
    cfg: &'a ModelConfig,
    dtype: DType,
    quant: Option<QuantKind>,
    expert_top_p: Option<ExpertTopP>,
    /// The family's MoE tensor names.
    names: &'static MoeNames,
}

pub(super) fn build(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    opts: &LoadOptions,
) -> Result<Model> {
    let loader = Loader {
        src,
        cfg,
        dtype: opts.dtype,
        quant: opts.quant,
        expert_top_p: opts.expert_top_p,
        names: &cfg.family.names,
    };
    let bar = progress_bar(opts.progress, cfg.num_layers);
    let h = cfg.hidden_size;
    let embed = loader.embedding()?;
    let lm_head = if cfg.tie_word_embeddings {
        match embed.dense_table() {
            Some(table) => loader.quantized_output(Linear::new(table.clone(), None))?,
            // Stored quantized: the output projection reads the same blocks on
            // our kernels, as an untied quantized `output.weight` does.
            None => loader.quantized_output(loader.linear(
                "model.embed_tokens",
                cfg.vocab_size,
                h,
                false,
            )?)?,
        }
    } else {
        loader.quantized_output(loader.linear("lm_head", cfg.vocab_size, h, false)?)?
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    let layout = loader.expert_layout()?;
    let experts: Arc<dyn ExpertProvider> = match &opts.expert_memory {
        None => {
            let mut experts = Vec::with_capacity(cfg.num_layers);
            for l in 0..cfg.num_layers {
                experts.push(loader.quantized_ffns(loader.experts(&layout, l)?)?);
            }
            Arc::new(ExpertStore::new(experts))
        }
        Some(memory) => {
            let reopened = src.reopen_for_reads()?.ok_or_else(|| {
                Error::InvalidInput(
                    "--expert-memory needs a checkpoint on disk to read experts from".into(),
                )
            })?;
            let reads = ExpertReads {
                layout,
                quant: opts.quant,
                top_k: cfg.moe.top_k,
            };
            Arc::new(ExpertCache::open(reopened, reads, memory.clone())?)
        }
    };
    for l in 0..cfg.num_layers {
        layers.push(loader.layer(l, &experts)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if opts
        .expert_memory
        .as_ref()
        .is_some_and(|m| m.prefetch == Prefetch::NextLayer)
    {
        wire_next_routers(&mut layers);
    }
    let norm = loader.norm("model.norm.weight", h)?;
    let a = &cfg.attention;
    let rope = match &a.yarn {
        Some(yarn) => RopeTable::yarn(
            a.rotary_dim,
            a.rope_theta,
            yarn,
            cfg.max_position_embeddings,
            embed.device(),
        )?,
        None => RopeTable::new(
            a.rotary_dim,
            a.rope_theta,
            cfg.max_position_embeddings,
            embed.device(),
        )?,
    };
    Ok(Model {
        config: cfg.clone(),
        dtype: opts.dtype,
        embed,
        layers,
        norm,
        lm_head,
        rope,
        experts,
    })
}

/// Hands each MoE block the router of the next MoE layer, for prefetching.
fn wire_next_routers(layers: &mut [DecoderLayer]) {
    let routers: Vec<Option<NextRouter>> = layers
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            layer.moe().map(|b| NextRouter {
                layer: l,
                router: b.router().clone(),
                config: b.config(),
                selection_bias: b.selection_bias().map(<[f32]>::to_vec),
            })
        })
        .collect();
    for (l, layer) in layers.iter_mut().enumerate() {
        let next = routers[l + 1..].iter().flatten().next();
        if let (LayerFfn::Moe(block), Some(next)) = (&mut layer.ffn, next) {
            block.set_next_router(next.clone());
        }
    }
}

fn progress_bar(enabled: bool, len: usize) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("loading {bar:30} {pos}/{len} layers {elapsed}")
    {
        bar.set_style(style);
    }
    bar
}

impl Loader<'_> {
    /// `linear` converted to `--quant`'s format, if one is set.
    fn quantized(&self, linear: Linear) -> Result<Linear> {
        match self.quant {
            Some(kind) => linear.quantize(kind),
            None => Ok(linear),
        }
    }

    /// The output projection one step above `--quant`, as llama.cpp's 4-bit mixes keep
    /// `output.weight` at Q6_K: Q8_0 for the 4-bit kinds, the load dtype for q8_0
    /// (a Q8_0 lm_head alone moved the demo model's logits by ~0.75 % of the 1 % budget).
    fn quantized_output(&self, linear: Linear) -> Result<Linear> {
        match self.quant {
            Some(QuantKind::Q4_0 | QuantKind::Q4K) => linear.quantize(QuantKind::Q8_0),
            _ => Ok(linear),
        }
    }

    /// A layer's experts quantized in parallel (quantization is compute-bound).
    fn quantized_ffns(&self, ffns: Vec<Ffn>) -> Result<Vec<Ffn>> {
        match self.quant {
            Some(kind) => ffns.par_iter().map(|f| f.quantize(kind)).collect(),
            None => Ok(ffns),
        }
    }

    /// The token embedding, checked to be finite.
    fn embedding(&self) -> Result<Embedding> {
        let name = "model.embed_tokens.weight";
        let shape = [self.cfg.vocab_size, self.cfg.hidden_size];
        let embed = self.src.load_embedding(name, shape, self.dtype)?;
        if embed.all_finite()? == Some(false) {
            return Err(Error::InvalidInput(format!(
                "tensor {name:?} holds non-finite values (NaN or Inf)"
            )));
        }
        Ok(embed)
    }

    fn norm(&self, name: &str, dim: usize) -> Result<RmsNorm> {
        // Norm weights stay f32: they are tiny and the norm computes in f32.
        let w = self.finite(name, self.src.load(name, &[dim], DType::F32)?)?;
        Ok(RmsNorm::new(w, self.cfg.rms_norm_eps))
    }

    /// `t` if all its values are finite: checked where it is cheap (norms,
    /// routers, the embedding), as one NaN there spreads to every logit.
    fn finite(&self, name: &str, t: Tensor) -> Result<Tensor> {
        if crate::ops::all_finite(&t) == Some(false) {
            return Err(Error::InvalidInput(format!(
                "tensor {name:?} holds non-finite values (NaN or Inf)"
            )));
        }
        Ok(t)
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let b = if bias {
            Some(
                self.src
                    .load(&format!("{prefix}.bias"), &[out], DType::F32)?,
            )
        } else {
            None
        };
        let weight = format!("{prefix}.weight");
        self.src.load_linear(&[(&weight, out)], inp, self.dtype, b)
    }

    /// A SwiGLU from separate gate/up/down matrices, gate and up fused.
    fn ffn(&self, prefix: &str, names: [&str; 3], ffn: usize) -> Result<Ffn> {
        let h = self.cfg.hidden_size;
        let [gate, up, down] = names.map(|n| format!("{prefix}.{n}.weight"));
        Ok(Ffn::new(
            self.src
                .load_linear(&[(&gate, ffn), (&up, ffn)], h, self.dtype, None)?,
            self.src.load_linear(&[(&down, h)], ffn, self.dtype, None)?,
        ))
    }

    fn moe_prefix(&self, l: usize) -> Result<String> {
        moe_prefix(self.names, self.src, l)
    }

    /// Where every MoE layer's experts are in the source.
    fn expert_layout(&self) -> Result<ExpertLayout> {
        let m = &self.cfg.moe;
        let layers = (0..self.cfg.num_layers)
            .map(|l| {
                m.sparse_layers[l]
                    .then(|| LayerExperts::locate(self.names, self.cfg.family.experts, self.src, l))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(ExpertLayout {
            layers,
            dims: ExpertDims {
                hidden: self.cfg.hidden_size,
                ffn: m.expert_ffn,
                num_experts: m.num_experts,
            },
            dtype: self.dtype,
            activation: m.expert_activation,
        })
    }

    /// Routed experts of layer `l` (none for a dense layer).
    fn experts(&self, layout: &ExpertLayout, l: usize) -> Result<Vec<Ffn>> {
        let n = layout.num_experts(l);
        let Some(Some(layer)) = layout.layers.get(l) else {
            return Ok(Vec::new());
        };
        (0..n)
            .map(|e| layer.load(self.src, layout.dims, e, self.dtype, layout.activation))
            .collect()
    }

    /// Multi-head latent attention of layer `l`.
    fn latent_attention(&self, l: usize) -> Result<LatentAttention> {
        let a = &self.cfg.attention;
        let h = self.cfg.hidden_size;
        let p = format!("model.layers.{l}.self_attn");
        let mla = a
            .mla
            .ok_or_else(|| Error::InvalidInput("latent attention without its MLA widths".into()))?;
        let q_width = a.num_heads * mla.qk_head_dim();
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            self.quantized(self.linear(&format!("{p}.{name}"), out, inp, false)?)
        };
        let query = match mla.q_lora_rank {
            None => LatentQuery::Full(linear("q_proj", q_width, h)?),
            Some(r) => LatentQuery::LowRank {
                a: linear("q_a_proj", r, h)?,
                norm: self.norm(&format!("{p}.q_a_layernorm.weight"), r)?,
                b: linear("q_b_proj", q_width, r)?,
            },
        };
        let kv = [
            linear(
                "kv_a_proj_with_mqa",
                mla.kv_lora_rank + mla.qk_rope_head_dim,
                h,
            )?,
            linear(
                "kv_b_proj",
                a.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                mla.kv_lora_rank,
            )?,
        ];
        LatentAttention::new(
            query,
            kv,
            self.norm(&format!("{p}.kv_a_layernorm.weight"), mla.kv_lora_rank)?,
            linear("o_proj", h, a.num_heads * mla.v_head_dim)?,
            a,
        )
    }

    fn attention_block(&self, l: usize) -> Result<AttentionBlock> {
        Ok(if self.cfg.family.attention.latent {
            AttentionBlock::Latent(self.latent_attention(l)?)
        } else {
            AttentionBlock::Grouped(self.attention(l)?)
        })
    }

    fn attention(&self, l: usize) -> Result<Attention> {
        let a = &self.cfg.attention;
        let h = self.cfg.hidden_size;
        let p = format!("model.layers.{l}.self_attn");
        let (q_norm, k_norm) = match a.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(self.norm(&format!("{p}.q_norm.weight"), a.head_dim)?),
                Some(self.norm(&format!("{p}.k_norm.weight"), a.head_dim)?),
            ),
            QkNorm::Full => (
                Some(self.norm(&format!("{p}.q_norm.weight"), a.q_dim())?),
                Some(self.norm(&format!("{p}.k_norm.weight"), a.kv_dim())?),
            ),
        };
        Ok(Attention {
            q_proj: self.quantized(self.linear(
                &format!("{p}.q_proj"),
                a.q_dim(),
                h,
                a.qkv_bias,
            )?)?,
            k_proj: self.quantized(self.linear(
                &format!("{p}.k_proj"),
                a.kv_dim(),
                h,
                a.qkv_bias,
            )?)?,
            v_proj: self.quantized(self.linear(
                &format!("{p}.v_proj"),
                a.kv_dim(),
                h,
                a.qkv_bias,
            )?)?,
            o_proj: self.quantized(self.linear(
                &format!("{p}.o_proj"),
                h,
                a.q_dim(),
                a.o_bias,
            )?)?,
            q_norm,
            k_norm,
            config: a.clone(),
            layer: LayerAttention {
                sinks: if a.sinks {
                    let name = format!("{p}.sinks");
                    let sinks = self.src.load(&name, &[a.num_heads], DType::F32)?;
                    Some(self.finite(&name, sinks)?.to_vec1::<f32>()?)
                } else {
                    None
                },
                sliding_window: a.window(l),
            },
        })
    }

    /// The router's selection bias under `prefix`, if the family has one.
    fn selection_bias(&self, prefix: &str) -> Result<Option<Vec<f32>>> {
        let Some((name, _)) = self.names.selection_bias else {
            return Ok(None);
        };
        let name = format!("{prefix}.{name}");
        let n = self.cfg.moe.num_experts;
        // ERNIE stores one row per expert group, and has one group.
        let bias = if self.src.check(&name, &[1, n]).is_ok() {
            self.src.load(&name, &[1, n], DType::F32)?.flatten_all()?
        } else {
            self.src.load(&name, &[n], DType::F32)?
        };
        Ok(Some(self.finite(&name, bias)?.to_vec1::<f32>()?))
    }

    fn layer(&self, l: usize, experts: &Arc<dyn ExpertProvider>) -> Result<DecoderLayer> {
        let h = self.cfg.hidden_size;
        let m = &self.cfg.moe;
        let p = format!("model.layers.{l}");
        let ffn = if m.sparse_layers[l] {
            let prefix = self.moe_prefix(l)?;
            let shared = match (m.shared_expert_ffn, self.names.shared_expert) {
                (Some(width), Some(names)) => Some(SharedExpert {
                    ffn: self
                        .ffn(
                            &format!("{prefix}.{}", names.module),
                            names.projections.map(|(hf, _)| hf),
                            width,
                        )?
                        .quantize_opt(self.quant)?,
                    gate: match names.gate {
                        Some((gate, _)) => {
                            Some(self.linear(&format!("{prefix}.{gate}"), 1, h, false)?)
                        }
                        None => None,
                    },
                }),
                (Some(_), None) => {
                    return Err(Error::InvalidInput(format!(
                        "the configuration has a shared expert, but {} names none",
                        self.cfg.family.model_type()
                    )));
                }
                (None, _) => None,
            };
            let router_name = format!("{prefix}.{}", self.names.router.0);
            let router = self.linear(
                &router_name,
                m.num_experts,
                h,
                self.cfg.family.experts.router_bias,
            )?;
            if let Some(w) = router.dense_weight() {
                self.finite(&format!("{router_name}.weight"), w.clone())?;
            }
            LayerFfn::Moe(Box::new(
                MoeBlock::new(
                    l,
                    router,
                    RouterConfig {
                        top_k: m.top_k,
                        spec: m.router,
                        top_p: self.expert_top_p,
                    },
                    experts.clone(),
                    shared,
                )
                .with_selection_bias(self.selection_bias(&prefix)?),
            ))
        } else {
            LayerFfn::Dense(
                self.ffn(
                    &format!("{p}.mlp"),
                    ["gate_proj", "up_proj", "down_proj"],
                    m.dense_ffn,
                )?
                .quantize_opt(self.quant)?,
            )
        };
        let norm = |name: &str| self.norm(&format!("{p}.{name}.weight"), h);
        let norms = match self.cfg.family.norm {
            NormPlacement::Pre => LayerNorms::Pre {
                input: norm("input_layernorm")?,
                post_attention: norm("post_attention_layernorm")?,
            },
            NormPlacement::Post => LayerNorms::Post {
                attention: norm("post_attention_layernorm")?,
                ffn: norm("post_feedforward_layernorm")?,
            },
        };
        Ok(DecoderLayer {
            norms,
            attention: self.attention_block(l)?,
            ffn,
        })
    }
}
