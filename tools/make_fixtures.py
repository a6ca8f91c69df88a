#!/usr/bin/env python3
"""Generate Switchyard's golden test fixtures (tiny random-weight MoE checkpoints + reference outputs).

Everything is built locally (no Hugging Face hub access needed): a byte-level BPE tokenizer is trained
on the English text embedded below, and each model is created from a transformers config class with
`AutoModelForCausalLM.from_config`, re-initialised from a fixed seed, run in float32 on the CPU and
saved with `save_pretrained` exactly as transformers writes it (tensor names are never renamed).

Setup (the venv lives OUTSIDE the repository):

    python3 -m venv ~/.venvs/switchyard && . ~/.venvs/switchyard/bin/activate
    pip install -r tools/requirements.txt
    # (the PyPI torch wheel is fine; it is only used on the CPU here)

Regenerate (from the repository root):

    python tools/make_fixtures.py --out tests/fixtures

The script is deterministic: fixed seeds, float32, 2 CPU threads, eager attention and eager experts
for the reference run.  For every fixture it writes `tests/fixtures/<name>/`:

    config.json, generation_config.json, model*.safetensors[, model.safetensors.index.json]
    tokenizer.json, tokenizer_config.json          (shared tiny ChatML tokenizer, vocab 384)
    golden.safetensors   float32 `prompt{i}.logits` [seq, vocab] for each prompt
    golden.json          token ids, per-layer router top-k ids/weights, 32-token greedy continuations,
                         parameter counts, the tensor names/shapes written, robustness margins

Fixtures: qwen3_moe, qwen3_moe_fused, mixtral, qwen2_moe, olmoe, qwen3_moe_bf16_sharded, and (saved in bf16,
golden outputs computed in float32 on the bf16 values, each with a third, one-token prompt):
  gpt_oss       as openai/gpt-oss-* ship: experts MXFP4 (`*_blocks` / `*_scales` U8, `quantization_config`),
                [sliding, full] layers with a window of 4 (shorter than the prompts), attention sinks, router
                bias, expert biases, clamped SwiGLU (limit 7, weights large enough that it bites: golden.json
                `swiglu_clamp_fraction`), YaRN with `truncate: false`;
  gpt_oss_bf16  the same model as transformers 5 saves it unquantized (fused `gate_up_proj` [E, H, 2I] with
                interleaved gate/up columns), identical golden outputs;
  flex_olmo     OLMo-2 norms after attention and experts, q/k norms over the whole projections;
  ernie4_5_moe  MoE layers 1 and 3 (`moe_layer_start_index` / `moe_layer_interval`), a shared expert, a
                `moe_statics` selection bias that changes the chosen experts (golden.json
                `selection_bias_changed_fraction`), interleaved rotary.
  deepseek_v2_lite  multi-head latent attention with `q_proj`, softmax greedy top-k, YaRN (mscale == mscale_all_dim);
  deepseek_v2   `q_lora_rank`, `group_limited_greedy` (4 groups, best 2), routed_scaling_factor 2;
  glm4_moe      DeepSeek-V3's router and shared expert with grouped-query attention, q/k/v biases, per-head
                q/k norms and partial rotary (`partial_rotary_factor` 0.5), float32, with the one-token prompt;
  deepseek_v3   sigmoid + a random `e_score_correction_bias` that changes most choices (golden.json
                `selection_bias_changed_fraction`), `noaux_tc`, norm_topk_prob, scaling 2.5, YaRN with
                mscale != mscale_all_dim, interleaved rotary (float32, with the one-token prompt too).
`--only NAME...` regenerates some of them.
transformers 5 keeps MoE experts fused in memory (experts.gate_up_proj [E,2I,H], experts.down_proj
[E,H,I]) but `save_pretrained` (save_original_format=True, the default) reverts to the Hub layout:
per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` (Mixtral: `block_sparse_moe.experts.{e}.w1/w2/w3`).
`qwen3_moe_fused` is qwen3_moe re-saved with save_original_format=False (fused 3-D tensors), with
identical golden outputs, so both layouts are covered (its model.safetensors is rebuilt by the tests
from qwen3_moe's, following the names and shapes recorded in its golden.json).

If a seed gives a greedy top-1/top-2 logit margin < 1e-3 or a routing-probability gap between the k-th
and (k+1)-th expert < 1e-4, the next seed is tried (the seed used is recorded in golden.json).
Finally every checkpoint is reloaded with `from_pretrained` and must reproduce the golden logits.
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import sys

os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV2Config,
    DeepseekV3Config,
    Ernie4_5_MoeConfig,
    FlexOlmoConfig,
    Glm4MoeConfig,
    GptOssConfig,
    MixtralConfig,
    Mxfp4Config,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

torch.set_num_threads(2)
transformers.utils.logging.disable_progress_bar()

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT_SENTENCES = [
    ("The quick brown fox jumps over the lazy dog.", 7),
    ("A mixture of experts sends every token to a few small networks.", 12),
]
GREEDY_TOKENS = 32
MIN_GREEDY_MARGIN = 1e-3
MIN_ROUTER_MARGIN = 1e-4
# Ordering of the selected experts (consecutive gaps inside the top-k) must also be unambiguous.
MIN_ROUTER_RANK_GAP = 1e-5
MAX_SEED_TRIES = 200

CORPUS = """\
The river town woke slowly in the grey light of the morning. Fishermen pulled their boats onto the
sand, and the baker opened the shutters of a small shop that smelled of warm bread and butter. Children
ran along the narrow streets on their way to school, laughing and shouting at the dogs that followed them.

A computer program is a list of instructions that tells a machine what to do. Good programs are written
for people first and for machines second. They are easy to read, easy to test, and easy to change when
the needs of their users change. A careful engineer writes small functions, gives them clear names, and
checks every result against a simple reference before trusting it.

Language models read text as a sequence of tokens. Each token is turned into a vector, and many layers
of attention and feed forward networks mix those vectors together. In a mixture of experts model, a small
router looks at every token and sends it to only a few of the expert networks, so that the model can be
very large while each token still uses only a small part of it.

The weather changed in the afternoon. Dark clouds came in from the sea, the wind turned cold, and the
first drops of rain fell on the roofs of the houses. People hurried home with their collars up, and the
market stalls were covered with sheets of heavy cloth until the storm had passed.

When you cook a meal for friends, start early and keep things simple. Wash the vegetables, cut them into
even pieces, and let the sauce cook slowly while the water comes to the boil. Taste everything as you go,
add a little salt, and remember that a quiet kitchen is a happy kitchen.

History is full of small decisions that changed the course of great events. A letter that arrived a day
late, a bridge that was not built, or a question that nobody thought to ask can matter as much as the
famous battles and the speeches that fill the pages of our books.
"""


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def write_tokenizer(tok, out_dir):
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 64,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def make_prompts(tok):
    prompts = []
    for text, n in PROMPT_SENTENCES:
        ids = tok.encode(text).ids
        assert len(ids) >= n, (text, len(ids))
        prompts.append(ids[:n])
    return prompts


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def common(special, rope_theta):
    return dict(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=None,
    )


def qwen3_moe_config(special, **over):
    kw = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=24,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        moe_intermediate_size=32,
        intermediate_size=96,
        mlp_only_layers=[1],
        decoder_sparse_step=1,
        tie_word_embeddings=False,
        **common(special, 1e6),
    )
    kw.update(over)
    return Qwen3MoeConfig(**kw)


def mixtral_config(special):
    return MixtralConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=40,
        tie_word_embeddings=True,
        **common(special, 1e4),
    )


def qwen2_moe_config(special):
    return Qwen2MoeConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=48,
        intermediate_size=96,  # unused: no dense (mlp_only) layers
        qkv_bias=True,
        tie_word_embeddings=False,
        **common(special, 1e5),
    )


def olmoe_config(special):
    return OlmoeConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=1,
        norm_topk_prob=False,
        intermediate_size=32,
        # Small enough that the clamp really bites (q/k are RMS-normed to ~1, v is not normed).
        clip_qkv=2.0,
        tie_word_embeddings=False,
        **common(special, 5e5),
    )


# gpt-oss: sliding layers with a window shorter than every prompt but the one-token one, sinks,
# router bias, clamped SwiGLU (default alpha and limit, see `reinit`), YaRN without truncation.
GPT_OSS_WINDOW = 4


def gpt_oss_config(special):
    kw = common(special, 1.5e5)
    kw["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 1.5e5,
        "factor": 4.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 16,
    }
    return GptOssConfig(
        hidden_size=64,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=GPT_OSS_WINDOW,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
        attention_bias=True,
        tie_word_embeddings=False,
        **kw,
    )


def flex_olmo_config(special):
    return FlexOlmoConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=7,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        intermediate_size=32,
        tie_word_embeddings=False,
        **common(special, 5e5),
    )


def ernie4_5_moe_config(special):
    # MoE layers 1 and 3 (from moe_layer_start_index every moe_layer_interval), dense 0 and 2;
    # one shared expert. intermediate_size = shared width * kv heads, as llama.cpp's converter
    # derives the shared expert's width from it.
    return Ernie4_5_MoeConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_num_experts=8,
        moe_k=2,
        moe_intermediate_size=32,
        moe_num_shared_experts=1,
        intermediate_size=64,
        moe_layer_start_index=1,
        moe_layer_interval=2,
        use_bias=False,
        tie_word_embeddings=True,
        **common(special, 5e5),
    )


# DeepSeek: multi-head latent attention (heads split into a rotary and a non-rotary part, a latent
# KV of kv_lora_rank), layer 0 dense (first_k_dense_replace), ungated shared experts.
def deepseek_mla(special, rope=None, **over):
    kw = common(special, 1e4)
    if rope is not None:
        kw["rope_parameters"] = rope
    kw.update(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_shared_experts=1,
        moe_intermediate_size=24,
        intermediate_size=80,
        first_k_dense_replace=1,
        tie_word_embeddings=False,
    )
    kw.update(over)
    return kw


# YaRN as DeepSeek-V2-Lite ships it (mscale == mscale_all_dim, so the cos/sin scale is 1 and the
# softmax scale carries mscale^2), on a 16-position original context.
DEEPSEEK_V2_YARN = {
    "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707,
}


def deepseek_v2_lite_config(special):
    """V2-Lite's shape: q_proj (no q_lora_rank), softmax greedy top-k, YaRN."""
    return DeepseekV2Config(**deepseek_mla(
        special, DEEPSEEK_V2_YARN, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
    ))


def deepseek_v2_config(special):
    """V2's shape: q_lora_rank, group_limited_greedy (4 groups of 4, the best 2), scaled weights."""
    return DeepseekV2Config(**deepseek_mla(
        special, q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=3,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0,
    ))


def deepseek_v3_config(special):
    """V3: sigmoid scores + e_score_correction_bias, noaux_tc groups, norm_topk_prob, scaling,
    YaRN with mscale != mscale_all_dim (both the cos/sin and the softmax scale move), interleaved rotary."""
    rope = dict(DEEPSEEK_V2_YARN, mscale=1.0, mscale_all_dim=0.8)
    return DeepseekV3Config(**deepseek_mla(
        special, rope, q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_interleave=True,
    ))


def glm4_moe_config(special):
    """GLM-4 MoE: DeepSeek-V3's router (sigmoid + `e_score_correction_bias`, `noaux_tc` groups,
    norm_topk_prob, scaling) and shared expert, grouped-query attention with q/k/v biases,
    per-head q/k norms and rotary on the first half of each head (`partial_rotary_factor` 0.5)."""
    return Glm4MoeConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention_bias=True,
        use_qk_norm=True,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        moe_intermediate_size=32,
        intermediate_size=96,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        tie_word_embeddings=False,
        **dict(common(special, 1e4), rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 0.5}),
    )


@torch.no_grad()
def deepseek_selection_bias(model):
    """V3's `e_score_correction_bias` is a buffer (reinit draws parameters only): ~0.2 N(0, 1),
    large against sigmoid scores that differ by ~0.1, so it changes choices."""
    g = torch.Generator().manual_seed(99)
    for _, blk in moe_layers(model):
        if blk is not None:
            b = blk.gate.e_score_correction_bias
            b.copy_(0.2 * torch.randn(b.shape, generator=g))


# E2M1 magnitudes, code order (transformers' FP4_VALUES[:8]).
FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4_quantize(w):
    """OCP MXFP4 of `w` [..., rows, cols] along cols: (blocks [..., rows, cols/32, 16] U8 with element 2j
    in byte j's low nibble and 2j + 1 in its high one, scales [..., rows, cols/32] U8 E8M0, the
    dequantized values). Scale 2^ceil(log2(amax / 6)), values rounded to the nearest E2M1."""
    *pre, rows, cols = w.shape
    b = w.reshape(*pre, rows, cols // 32, 32).float()
    amax = b.abs().amax(-1).clamp(min=2.0**-100)
    e = torch.ceil(torch.log2(amax / 6.0))
    q = b / torch.exp2(e)[..., None]
    idx = (q.abs()[..., None] - FP4_MAGNITUDES).abs().argmin(-1)
    codes = (idx + 8 * (q < 0)).to(torch.uint8)
    deq = FP4_MAGNITUDES[idx] * torch.where(q < 0, -1.0, 1.0) * torch.exp2(e)[..., None]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (e + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous(), deq.reshape(w.shape)


@torch.no_grad()
def quantize_experts_mxfp4(model):
    """Replaces every expert matrix by its MXFP4 rounding (the Hub's [E, out, in] row blocks of the
    transposed [E, in, out] parameters), keeping the packed tensors for `save_mxfp4`."""
    model._mxfp4 = {}
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        for proj in ("gate_up_proj", "down_proj"):
            p = getattr(ex, proj)
            blocks, scales, deq = mxfp4_quantize(p.transpose(1, 2))
            p.copy_(deq.transpose(1, 2))
            model._mxfp4[f"model.layers.{i}.mlp.experts.{proj}"] = (blocks, scales)


def save_mxfp4(model, out_dir):
    """bf16 checkpoint with the experts as `{proj}_blocks` / `{proj}_scales` and the Hub's
    `quantization_config`, as openai/gpt-oss-* ship."""
    model.to(torch.bfloat16)
    save_model(model, out_dir)
    model.to(torch.float32)
    path = os.path.join(out_dir, "model.safetensors")
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, (blocks, scales) in model._mxfp4.items():
        del tensors[name]
        tensors[f"{name}_blocks"] = blocks
        tensors[f"{name}_scales"] = scales
    save_file(dict(sorted(tensors.items())), path, metadata={"format": "pt"})
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4",
    }
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def build_model(config, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    reinit(model, seed)
    model.eval()
    return model


@torch.no_grad()
def reinit(model, seed):
    """Linear/embedding/expert weights ~ N(0, 0.2); RMSNorm weights 1 + 0.1 N(0,1); biases 0.1 N(0,1).

    Routing-relevant extras are drawn large enough to matter: gpt-oss's router bias ~ N(0, 1) and
    attention sinks ~ N(0, 1); ERNIE's `moe_statics` selection bias ~ 0.1 N(0, 1) (routing
    probabilities are ~1/8, so it changes choices)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied parameters are yielded once
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("router.bias") or name.endswith(".sinks"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith("mlp.experts.gate_up_proj") and model.config.model_type == "gpt_oss":
            # gpt-oss's SwiGLU clamps at swiglu_limit = 7 (the value llama.cpp hard-codes, so the
            # GGUF fixture needs it too): larger gate/up weights make that clamp bite.
            p.copy_(0.8 * torch.randn(p.shape, generator=g))
        elif name.endswith("e_score_correction_bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias") or name.endswith("_proj_bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            assert p.dim() >= 2, name
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def moe_layers(model):
    """[(layer_idx, moe_block or None)] for every decoder layer."""
    out = []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        out.append((i, mlp if hasattr(mlp, "experts") else None))
    return out


def router_of(blk):
    """The router module of a MoE block (gpt-oss calls it `router`, the others `gate`)."""
    return blk.router if hasattr(blk, "router") else blk.gate


def selection_scores(blk, router_logits, with_bias=True):
    """What the router ranks experts by: softmax probabilities, plus ERNIE's `moe_statics`
    selection bias (gpt-oss ranks raw logits, which orders experts as their softmax does);
    DeepSeek-V3: sigmoid + `e_score_correction_bias`, experts outside the best groups (by the sum of
    their two best) at -inf; V2 `group_limited_greedy`: softmax, outside the best groups (by their
    best) at 0. `with_bias=False`: the same without the selection bias."""
    router = router_of(blk)
    logits = router_logits.float()
    correction = getattr(router, "e_score_correction_bias", None)
    if correction is not None:
        probs = torch.sigmoid(logits) + (correction if with_bias else 0.0)
        return group_limited(probs, router, lambda g: g.topk(2, dim=-1)[0].sum(-1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if getattr(router, "topk_method", None) == "group_limited_greedy":
        return group_limited(probs, router, lambda g: g.max(dim=-1).values, 0.0)
    statics = getattr(router, "moe_statics", None)
    if statics is not None and with_bias:
        probs = statics(probs)
    return probs


def group_limited(scores, router, group_score, fill):
    """`scores` with every expert outside the router's `topk_group` best groups set to `fill`."""
    n, e = scores.shape
    groups = group_score(scores.view(n, router.num_group, e // router.num_group))
    best = torch.topk(groups, k=router.topk_group, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, best, True)
    return scores.masked_fill(~keep.repeat_interleave(e // router.num_group, dim=1), fill)


def count_params(model):
    total = sum(p.numel() for p in model.parameters())
    active = total
    for _, blk in moe_layers(model):
        if blk is None:
            continue
        ex = blk.experts
        # Every per-expert tensor (gate_up_proj, down_proj and gpt-oss's biases).
        per_expert = sum(p[0].numel() for p in ex.parameters())
        router = router_of(blk)
        active -= (router.num_experts - router.top_k) * per_expert
    if not model.config.tie_word_embeddings:
        active -= model.model.embed_tokens.weight.numel()
    return total, active


# --------------------------------------------------------------------------------------------------
# Golden outputs
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_golden(model, prompts):
    layers = moe_layers(model)
    captured = {}
    handles = []
    clip = getattr(model.config, "clip_qkv", None)
    clip_stats = {"q": [0, 0], "k": [0, 0], "v": [0, 0]}
    recording = {"on": False}

    def router_hook(idx):
        def hook(module, args, output):
            if recording["on"]:
                # TopKRouter.forward returns (router_logits, router_scores, router_indices)
                captured[idx] = tuple(t.detach().clone() for t in output)

        return hook

    def clip_hook(key):
        def hook(module, args, output):
            if recording["on"]:
                clip_stats[key][0] += int((output.abs() > clip).sum())
                clip_stats[key][1] += output.numel()

        return hook

    # gpt-oss: how often the clamped SwiGLU's limit bites (gate above it, up outside +-limit).
    limit = getattr(model.config, "swiglu_limit", None)
    swiglu_stats = {"gate": [0, 0], "up": [0, 0]}

    def swiglu_hook(module, args):
        if recording["on"]:
            x, idx = args[0], args[1]
            for e in idx.unique().tolist():
                rows = (idx == e).any(-1)
                gu = x[rows] @ module.gate_up_proj[e] + module.gate_up_proj_bias[e]
                gate, up = gu[..., ::2], gu[..., 1::2]
                swiglu_stats["gate"][0] += int((gate > limit).sum())
                swiglu_stats["up"][0] += int((up.abs() > limit).sum())
                swiglu_stats["gate"][1] += gate.numel()
                swiglu_stats["up"][1] += up.numel()

    for idx, blk in layers:
        if blk is not None:
            handles.append(router_of(blk).register_forward_hook(router_hook(idx)))
            if limit is not None:
                handles.append(blk.experts.register_forward_pre_hook(swiglu_hook))
    if clip is not None:
        for layer in model.model.layers:
            handles.append(layer.self_attn.q_norm.register_forward_hook(clip_hook("q")))
            handles.append(layer.self_attn.k_norm.register_forward_hook(clip_hook("k")))
            handles.append(layer.self_attn.v_proj.register_forward_hook(clip_hook("v")))

    results = []
    logits_out = {}
    bias_changed = [0, 0]  # tokens whose expert set the selection bias changed, tokens
    greedy_min = float("inf")
    router_min = float("inf")
    rank_gap_min = float("inf")
    try:
        for pi, ids in enumerate(prompts):
            captured.clear()
            recording["on"] = True
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            recording["on"] = False
            assert logits.shape == (len(ids), VOCAB_SIZE)
            logits_out[f"prompt{pi}.logits"] = logits.contiguous()

            topk_all, weights_all = [], []
            for idx, blk in layers:
                if blk is None:
                    topk_all.append(None)
                    weights_all.append(None)
                    continue
                r_logits, r_scores, r_idx = captured[idx]
                k = router_of(blk).top_k
                assert r_idx.shape == (len(ids), k)
                probs = selection_scores(blk, r_logits)
                # DeepSeek's routers take an unsorted top-k: record the choices best first.
                order = probs.gather(1, r_idx).argsort(dim=-1, descending=True, stable=True)
                r_idx, r_scores = r_idx.gather(1, order), r_scores.gather(1, order)
                topk_all.append(r_idx.tolist())
                weights_all.append([[float(w) for w in row] for row in r_scores.float()])
                # Margins on the selection scores (in float32, as the routers compute them).
                sp, si = torch.sort(probs, dim=-1, descending=True)
                assert torch.equal(si[:, :k], r_idx), "router order differs from sorted selection scores"
                router = router_of(blk)
                if getattr(router, "moe_statics", None) is not None or hasattr(router, "e_score_correction_bias"):
                    plain = torch.topk(selection_scores(blk, r_logits, with_bias=False), k, dim=-1).indices
                    bias_changed[0] += int((plain.sort(-1).values != r_idx.sort(-1).values).any(-1).sum())
                    bias_changed[1] += len(ids)
                router_min = min(router_min, float((sp[:, k - 1] - sp[:, k]).min()))
                rank_gap_min = min(rank_gap_min, float((sp[:, :k] - sp[:, 1 : k + 1]).min()))

            seq = list(ids)
            for _ in range(GREEDY_TOKENS):
                last = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
                top2 = torch.topk(last, 2)
                greedy_min = min(greedy_min, float(top2.values[0] - top2.values[1]))
                seq.append(int(torch.argmax(last)))
            results.append(
                {
                    "input_ids": list(ids),
                    "router_topk": topk_all,
                    "router_weights": weights_all,
                    "greedy": seq[len(ids) :],
                }
            )
    finally:
        for h in handles:
            h.remove()
    extra = {}
    if clip is not None:
        extra["clip_fraction"] = {k: v[0] / max(v[1], 1) for k, v in clip_stats.items()}
    if limit is not None:
        extra["swiglu_clamp_fraction"] = {k: v[0] / max(v[1], 1) for k, v in swiglu_stats.items()}
    if bias_changed[1]:
        extra["selection_bias_changed_fraction"] = bias_changed[0] / bias_changed[1]
    return results, logits_out, greedy_min, router_min, rank_gap_min, extra


def margins_ok(greedy_min, router_min, rank_gap_min):
    return greedy_min >= MIN_GREEDY_MARGIN and router_min >= MIN_ROUTER_MARGIN and rank_gap_min >= MIN_ROUTER_RANK_GAP


def saved_tensors(out_dir):
    shapes, dtypes = {}, set()
    for fn in sorted(os.listdir(out_dir)):
        if fn.startswith("model") and fn.endswith(".safetensors"):
            with safe_open(os.path.join(out_dir, fn), "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    shapes[k] = list(sl.get_shape())
                    dtypes.add(sl.get_dtype())
    return dict(sorted(shapes.items())), sorted(dtypes)


@torch.no_grad()
def check_reload(out_dir, prompts, logits_ref, atol=1e-5, **load_kw):
    """Reload with from_pretrained (float32) and compare logits, both with the eager reference
    implementations and with transformers' defaults (sdpa attention / grouped_mm experts)."""
    report = {}
    for label, kw in (
        ("eager", dict(attn_implementation="eager", experts_implementation="eager")),
        ("default", {}),
    ):
        m = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, **kw, **load_kw).eval()
        diff = 0.0
        for pi, ids in enumerate(prompts):
            lg = m(input_ids=torch.tensor([ids])).logits[0].float()
            diff = max(diff, float((lg - logits_ref[f"prompt{pi}.logits"]).abs().max()))
        tol = atol if label == "eager" else 1e-4
        if diff > tol:
            raise SystemExit(f"{out_dir}: reload ({label}) logits differ by {diff} > {tol}")
        report[label] = diff
    return report


def write_golden(out_dir, meta, results, logits_out):
    save_file(logits_out, os.path.join(out_dir, "golden.safetensors"))
    doc = dict(meta)
    doc["prompts"] = results
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


def find_model(name, make_config, base_seed, prompts, round_bf16=False, transform=None):
    for seed in range(base_seed, base_seed + MAX_SEED_TRIES):
        model = build_model(make_config(), seed)
        if round_bf16:
            # Golden outputs for a bf16 checkpoint: float32 compute on bf16-rounded weights.
            # (Round parameters only: `model.to(bf16)` would also round the rotary inv_freq buffer.)
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).to(torch.float32))
        if transform is not None:
            transform(model)
        res, logits, gmin, rmin, rgap, extra = run_golden(model, prompts)
        if margins_ok(gmin, rmin, rgap):
            print(f"[{name}] seed {seed}: greedy_min_margin={gmin:.4g} router_min_margin={rmin:.4g} "
                  f"router_min_rank_gap={rgap:.4g}", flush=True)
            return seed, model, res, logits, gmin, rmin, rgap, extra
        print(f"[{name}] seed {seed} rejected: greedy {gmin:.3g} router {rmin:.3g} rank gap {rgap:.3g}",
              flush=True)
    raise SystemExit(f"{name}: no seed satisfied the margins")


def base_meta(model, seed, gmin, rmin, rgap, extra, special, tok):
    total, active = count_params(model)
    meta = {
        "model_type": model.config.model_type,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "seed": seed,
        "num_parameters": total,
        "num_active_parameters": active,
        "greedy_min_margin": gmin,
        "router_min_margin": rmin,
        "router_min_rank_gap": rgap,
        "reference_impl": {"attn_implementation": "eager", "experts_implementation": "eager", "compute_dtype": "float32"},
        "special_tokens": special,
    }
    meta.update(extra)
    chat = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hello there!"}]
    meta["tokenizer_example"] = {
        "text": PROMPT_SENTENCES[1][0],
        "ids": tok.encode(PROMPT_SENTENCES[1][0]).ids,
    }
    meta["chat_example"] = {"messages": chat, "add_generation_prompt": True}
    return meta


def finish_chat_example(out_dir, meta):
    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    ex = meta["chat_example"]
    text = hf_tok.apply_chat_template(ex["messages"], tokenize=False, add_generation_prompt=True)
    ex["text"] = text
    ex["input_ids"] = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert hf_tok.eos_token_id == meta["special_tokens"]["<|im_end|>"]


def save_model(model, out_dir, **kw):
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        model.save_pretrained(out_dir, **kw)


def make_fixture(name, out_root, tok, special, prompts, make_config, base_seed,
                 bf16_sharded=False, eos_list=False, mxfp4_experts=False, bf16=False, transform=None):
    """`bf16`: saved in bf16 (golden outputs on the bf16-rounded weights, computed in float32), to keep
    the fixture small. `mxfp4_experts`: gpt-oss as the Hub ships it: bf16 weights, experts as MXFP4 `*_blocks` /
    `*_scales` U8 tensors (golden outputs computed on exactly those values)."""
    out_dir = os.path.join(out_root, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    seed, model, res, logits, gmin, rmin, rgap, extra = find_model(
        name, make_config, base_seed, prompts, round_bf16=bf16_sharded or mxfp4_experts or bf16,
        transform=quantize_experts_mxfp4 if mxfp4_experts else transform,
    )
    meta = base_meta(model, seed, gmin, rmin, rgap, extra, special, tok)
    if eos_list:
        model.generation_config.bos_token_id = special["<|endoftext|>"]
        model.generation_config.eos_token_id = [special["<|im_end|>"], special["<|endoftext|>"]]
    if bf16_sharded:
        model.to(torch.bfloat16)
        save_model(model, out_dir, max_shard_size="150KB")
        model.to(torch.float32)  # parameters are exactly representable; buffers are not used again
    elif mxfp4_experts:
        save_mxfp4(model, out_dir)
    elif bf16:
        model.to(torch.bfloat16)
        save_model(model, out_dir)
        model.to(torch.float32)
    else:
        save_model(model, out_dir)
    write_tokenizer(tok, out_dir)
    finish_chat_example(out_dir, meta)
    meta["tensors"], meta["tensor_dtypes"] = saved_tensors(out_dir)
    reload_kw = {"quantization_config": Mxfp4Config(dequantize=True)} if mxfp4_experts else {}
    meta["reload_max_abs_diff"] = check_reload(out_dir, prompts, logits, **reload_kw)
    write_golden(out_dir, meta, res, logits)
    return model, meta, res, logits


@torch.no_grad()
def make_fused_copy(src_name, dst_name, out_root, model, tok, prompts, meta, res, logits):
    """Same model as `src_name`, saved in transformers' internal fused-experts layout
    (save_original_format=False): mlp.experts.gate_up_proj [E, 2I, H] / mlp.experts.down_proj [E, H, I]."""
    out_dir = os.path.join(out_root, dst_name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    save_model(model, out_dir, save_original_format=False)
    write_tokenizer(tok, out_dir)
    meta = dict(meta)
    meta["tensors"], meta["tensor_dtypes"] = saved_tensors(out_dir)
    meta["reload_max_abs_diff"] = check_reload(out_dir, prompts, logits)
    # Cross-check the two layouts tensor by tensor.
    src = os.path.join(out_root, src_name, "model.safetensors")
    dst = os.path.join(out_dir, "model.safetensors")
    with safe_open(src, "pt") as a, safe_open(dst, "pt") as b:
        bkeys = set(b.keys())
        for k in b.keys():
            if ".mlp.experts.gate_up_proj" in k:
                pre = k[: -len("gate_up_proj")]
                gu = b.get_tensor(k)
                inter = gu.shape[1] // 2
                for e in range(gu.shape[0]):
                    assert torch.equal(gu[e, :inter], a.get_tensor(f"{pre}{e}.gate_proj.weight"))
                    assert torch.equal(gu[e, inter:], a.get_tensor(f"{pre}{e}.up_proj.weight"))
            elif ".mlp.experts.down_proj" in k:
                pre = k[: -len("down_proj")]
                d = b.get_tensor(k)
                for e in range(d.shape[0]):
                    assert torch.equal(d[e], a.get_tensor(f"{pre}{e}.down_proj.weight"))
            else:
                assert torch.equal(b.get_tensor(k), a.get_tensor(k)), k
        assert all(k in bkeys or ".mlp.experts." in k for k in a.keys())
    meta["fused_copy_of"] = src_name
    write_golden(out_dir, meta, res, logits)
    # The weights duplicate `src_name`'s byte for byte (checked above), so they are not
    # committed: the Rust tests rebuild this file from `src_name` using the tensor names
    # and shapes recorded in golden.json, keeping tests/fixtures under 5 MB.
    os.remove(dst)


@torch.no_grad()
def make_bf16_copy(src_name, dst_name, out_root, model, tok, prompts, meta, res, logits):
    """`src_name` (bf16-exact weights) saved as a plain bf16 checkpoint by save_pretrained: for gpt-oss
    the experts as transformers 5 writes them, fused `gate_up_proj` [E, H, 2I] (gate and up columns
    interleaved) and `down_proj` [E, I, H] with their biases. Same golden outputs."""
    out_dir = os.path.join(out_root, dst_name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    model.to(torch.bfloat16)
    save_model(model, out_dir)
    model.to(torch.float32)
    write_tokenizer(tok, out_dir)
    meta = dict(meta)
    meta["tensors"], meta["tensor_dtypes"] = saved_tensors(out_dir)
    meta["reload_max_abs_diff"] = check_reload(out_dir, prompts, logits)
    meta["bf16_copy_of"] = src_name
    write_golden(out_dir, meta, res, logits)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures", help="output root directory")
    ap.add_argument("--only", nargs="*", help="families to (re)generate (default: all), e.g. gpt_oss ernie4_5_moe")
    args = ap.parse_args()
    want = (lambda name: not args.only or name in args.only)
    os.makedirs(args.out, exist_ok=True)

    tok = train_tokenizer()
    tok2 = train_tokenizer()
    assert tok.to_str() == tok2.to_str(), "tokenizer training is not deterministic"
    special = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    prompts = make_prompts(tok)
    print("special tokens:", special, "prompts:", prompts, flush=True)

    if want("qwen3_moe"):
        q3, q3_meta, q3_res, q3_logits = make_fixture(
            "qwen3_moe", args.out, tok, special, prompts, lambda: qwen3_moe_config(special), 1234, eos_list=True
        )
        make_fused_copy("qwen3_moe", "qwen3_moe_fused", args.out, q3, tok, prompts, q3_meta, q3_res, q3_logits)
    if want("mixtral"):
        make_fixture("mixtral", args.out, tok, special, prompts, lambda: mixtral_config(special), 2345)
    if want("qwen2_moe"):
        make_fixture("qwen2_moe", args.out, tok, special, prompts, lambda: qwen2_moe_config(special), 3456)
    if want("olmoe"):
        make_fixture("olmoe", args.out, tok, special, prompts, lambda: olmoe_config(special), 4567)
    if want("qwen3_moe_bf16_sharded"):
        make_fixture(
            "qwen3_moe_bf16_sharded",
            args.out,
            tok,
            special,
            prompts,
            lambda: qwen3_moe_config(special, num_experts_per_tok=4, norm_topk_prob=False, tie_word_embeddings=True),
            5678,
            bf16_sharded=True,
        )
    # The second-wave families also check a one-token prompt.
    prompts_1 = prompts + [prompts[0][:1]]
    if want("gpt_oss"):
        go, go_meta, go_res, go_logits = make_fixture(
            "gpt_oss", args.out, tok, special, prompts_1, lambda: gpt_oss_config(special), 6789, mxfp4_experts=True
        )
        make_bf16_copy("gpt_oss", "gpt_oss_bf16", args.out, go, tok, prompts_1, go_meta, go_res, go_logits)
    if want("flex_olmo"):
        make_fixture("flex_olmo", args.out, tok, special, prompts_1, lambda: flex_olmo_config(special), 7890, bf16=True)
    if want("deepseek_v2_lite"):
        make_fixture("deepseek_v2_lite", args.out, tok, special, prompts_1, lambda: deepseek_v2_lite_config(special), 9012)
    if want("deepseek_v2"):
        make_fixture("deepseek_v2", args.out, tok, special, prompts_1, lambda: deepseek_v2_config(special), 9123)
    if want("deepseek_v3"):
        make_fixture("deepseek_v3", args.out, tok, special, prompts_1, lambda: deepseek_v3_config(special), 9234,
                     transform=deepseek_selection_bias)
    if want("glm4_moe"):
        make_fixture("glm4_moe", args.out, tok, special, prompts_1, lambda: glm4_moe_config(special), 9345,
                     transform=deepseek_selection_bias)
    if want("ernie4_5_moe"):
        make_fixture("ernie4_5_moe", args.out, tok, special, prompts_1, lambda: ernie4_5_moe_config(special), 8901, bf16=True)

    total = 0
    for root, _, files in os.walk(args.out):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    print(f"total fixture size: {total / 1e6:.3f} MB", flush=True)
    # About 1 MB per family: twelve families and their GGUF copies stay well inside a clone's budget.
    if total > 20_000_000:
        sys.exit("fixtures exceed 20 MB")


if __name__ == "__main__":
    main()
