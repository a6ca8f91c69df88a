//! Hugging Face <-> GGUF tensor names in one table. The shared blocks'
//! names (embedding, norms, attention, dense MLP) are the same for every
//! family and live here; a family's MoE names are a [`MoeNames`] value its
//! architecture file (`config::family`) declares. The GGUF side is what
//! llama.cpp's gguf-py `tensor_mapping.py` calls them.

/// Hugging Face name -> GGUF name, for tensors outside the decoder layers.
const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Hugging Face name under `model.layers.{l}.` -> GGUF name under `blk.{l}.`,
/// for the blocks every family shares.
const LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.o_proj.bias", "attn_output.bias"),
    ("self_attn.sinks", "attn_sinks.weight"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    // Multi-head latent attention (DeepSeek). llama.cpp's converter splits
    // `kv_b_proj` into `attn_k_b` / `attn_v_b`; `GgufSource` joins them again.
    ("self_attn.q_a_proj.weight", "attn_q_a.weight"),
    ("self_attn.q_a_layernorm.weight", "attn_q_a_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn_q_b.weight"),
    (
        "self_attn.kv_a_proj_with_mqa.weight",
        "attn_kv_a_mqa.weight",
    ),
    ("self_attn.kv_a_layernorm.weight", "attn_kv_a_norm.weight"),
    ("self_attn.kv_b_proj.weight", "attn_kv_b.weight"),
    // Dense MLP layers (Qwen3-MoE `mlp_only_layers`).
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// A Hugging Face name and the GGUF name of the same tensor.
pub type NamePair = (&'static str, &'static str);

/// One family's MoE tensor names under `model.layers.{l}.{module}.` (Hugging
/// Face) and `blk.{l}.` (GGUF), each without the `.weight` suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeNames {
    /// Module holding the router and the experts; alternatives in the order
    /// tried (transformers 5 renamed some of them).
    pub modules: &'static [&'static str],
    /// The router, `{module}.{hf}`.
    pub router: NamePair,
    /// Routed experts' gate, up and down: per expert `{module}.experts.{e}.{hf}`,
    /// in GGUF one merged `[n_experts, out, in]` tensor each.
    pub experts: [NamePair; 3],
    /// transformers 5's fused 3-D tensors under `{module}.experts.`: gate-up
    /// `[E, 2 * ffn, hidden]` (gate rows first) and down `[E, hidden, ffn]`.
    pub fused: [&'static str; 2],
    /// The always-on shared expert, for families that have one.
    pub shared_expert: Option<SharedExpertNames>,
    /// GGUF name of `post_attention_layernorm` under `blk.{l}.` (without
    /// `.weight`): `ffn_norm`, or gpt-oss's `post_attention_norm`.
    pub post_attention_norm: &'static str,
    /// `[n_experts]`, added to the scores only to choose experts
    /// (DeepSeek-V3's `gate.e_score_correction_bias`, stored with its own
    /// suffix, here part of the name; ERNIE's `moe_statics` one is `[1,
    /// n_experts]`, a row per expert group).
    pub selection_bias: Option<NamePair>,
    /// The selection bias is a model parameter, which torch counts (ERNIE's),
    /// not a buffer, which it does not (DeepSeek-V3's).
    pub selection_bias_is_parameter: bool,
}

/// A shared expert's SwiGLU under `{module}.{module_name}.` and the gate that
/// scales its output, `{module}.{gate}` (none: added unscaled, as DeepSeek's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedExpertNames {
    pub module: &'static str,
    /// Gate, up and down projections.
    pub projections: [NamePair; 3],
    pub gate: Option<NamePair>,
}

/// Where a Hugging Face tensor lives in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufLocation {
    pub name: String,
    /// For a routed expert: its index along the merged tensor's first dimension.
    pub expert: Option<usize>,
}

impl MoeNames {
    /// The GGUF location of a Hugging Face tensor name, if it has one.
    pub fn gguf_location(&self, hf: &str) -> Option<GgufLocation> {
        if let Some(&(_, g)) = GLOBAL_NAMES.iter().find(|(h, _)| *h == hf) {
            return Some(GgufLocation {
                name: g.to_string(),
                expert: None,
            });
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let in_layer = |g: &str| GgufLocation {
            name: format!("blk.{layer}.{g}"),
            expert: None,
        };
        if let Some(&(_, g)) = LAYER_NAMES.iter().find(|(h, _)| *h == rest) {
            return Some(in_layer(g));
        }
        if rest == "post_attention_layernorm.weight" {
            return Some(in_layer(&format!("{}.weight", self.post_attention_norm)));
        }
        let local = self
            .modules
            .iter()
            .find_map(|m| rest.strip_prefix(m)?.strip_prefix('.'))?;
        // Its own suffix (`.bias` in GGUF), so matched whole.
        if let Some((_, g)) = self.selection_bias.filter(|b| b.0 == local) {
            return Some(in_layer(g));
        }
        // Routers and routed experts may carry biases (gpt-oss), stored beside
        // their weights under the same GGUF name.
        let (local, kind) = match local.strip_suffix(".bias") {
            Some(l) => (l, "bias"),
            None => (local.strip_suffix(".weight")?, "weight"),
        };
        if let Some(expert_rest) = local.strip_prefix("experts.") {
            let (expert, suffix) = expert_rest.split_once('.')?;
            let expert: usize = expert.parse().ok()?;
            let &(_, g) = self.experts.iter().find(|(h, _)| *h == suffix)?;
            return Some(GgufLocation {
                name: format!("blk.{layer}.{g}.{kind}"),
                expert: Some(expert),
            });
        }
        if local == self.router.0 {
            return Some(in_layer(&format!("{}.{kind}", self.router.1)));
        }
        if kind == "bias" {
            return None;
        }
        let shared = self.shared_expert?;
        if let Some(gate) = shared.gate.filter(|g| g.0 == local) {
            return Some(in_layer(&format!("{}.weight", gate.1)));
        }
        let proj = local.strip_prefix(shared.module)?.strip_prefix('.')?;
        let &(_, g) = shared.projections.iter().find(|(h, _)| *h == proj)?;
        Some(in_layer(&format!("{g}.weight")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXTRAL_LIKE: MoeNames = MoeNames {
        modules: &["block_sparse_moe", "mlp"],
        router: ("gate", "ffn_gate_inp"),
        experts: [
            ("w1", "ffn_gate_exps"),
            ("w3", "ffn_up_exps"),
            ("w2", "ffn_down_exps"),
        ],
        fused: ["gate_up_proj", "down_proj"],
        shared_expert: Some(SharedExpertNames {
            module: "shared_expert",
            projections: [
                ("gate_proj", "ffn_gate_shexp"),
                ("up_proj", "ffn_up_shexp"),
                ("down_proj", "ffn_down_shexp"),
            ],
            gate: Some(("shared_expert_gate", "ffn_gate_inp_shexp")),
        }),
        post_attention_norm: "ffn_norm",
        selection_bias: None,
        selection_bias_is_parameter: false,
    };

    #[test]
    fn maps_names_like_llama_cpp() {
        let loc = |hf| MIXTRAL_LIKE.gguf_location(hf).map(|l| (l.name, l.expert));
        assert_eq!(
            loc("model.layers.3.self_attn.q_proj.weight"),
            Some(("blk.3.attn_q.weight".into(), None))
        );
        assert_eq!(
            loc("model.layers.0.block_sparse_moe.experts.5.w2.weight"),
            Some(("blk.0.ffn_down_exps.weight".into(), Some(5)))
        );
        assert_eq!(
            loc("model.layers.1.mlp.experts.2.w3.weight"),
            Some(("blk.1.ffn_up_exps.weight".into(), Some(2)))
        );
        assert_eq!(
            loc("model.layers.4.block_sparse_moe.gate.weight"),
            Some(("blk.4.ffn_gate_inp.weight".into(), None))
        );
        assert_eq!(
            loc("model.layers.1.mlp.shared_expert_gate.weight"),
            Some(("blk.1.ffn_gate_inp_shexp.weight".into(), None))
        );
        assert_eq!(
            loc("model.layers.1.mlp.shared_expert.down_proj.weight"),
            Some(("blk.1.ffn_down_shexp.weight".into(), None))
        );
        assert_eq!(
            loc("model.layers.0.mlp.gate_proj.weight"),
            Some(("blk.0.ffn_gate.weight".into(), None))
        );
        assert_eq!(loc("lm_head.weight"), Some(("output.weight".into(), None)));
        assert_eq!(
            loc("model.layers.2.self_attn.kv_a_proj_with_mqa.weight"),
            Some(("blk.2.attn_kv_a_mqa.weight".into(), None))
        );
        let biased = MoeNames {
            selection_bias: Some(("gate.e_score_correction_bias", "exp_probs_b.bias")),
            ..MIXTRAL_LIKE
        };
        assert_eq!(
            biased
                .gguf_location("model.layers.1.mlp.gate.e_score_correction_bias")
                .map(|l| l.name),
            Some("blk.1.exp_probs_b.bias".into())
        );
        assert_eq!(loc("model.layers.1.mlp.gate.e_score_correction_bias"), None);
        // Another family's expert names are not this family's.
        assert_eq!(loc("model.layers.0.mlp.experts.1.up_proj.weight"), None);
        assert_eq!(loc("model.layers.0.mlp.experts.gate_up_proj"), None);
        assert_eq!(loc("model.layers.x.mlp.gate.weight"), None);
    }
}
