#!/usr/bin/env python3
"""Generate Switchyard's golden test fixtures (tiny random-weight MoE checkpoints + reference outputs).

Everything is built locally (no Hugging Face hub access needed): a byte-level BPE tokenizer is trained
on the English text embedded below, and each model is created from a transformers config class with
`AutoModelForCausalLM.from_config`, re-initialised from a fixed seed, run in float32 on the CPU and
saved with `save_pretrained` exactly as transformers writes it (tensor names are never renamed).

Setup (the venv lives OUTSIDE the repository):

    python3 -m venv /work/pyenv/venv
    /work/pyenv/venv/bin/pip install -r tools/requirements.txt
    # (the PyPI torch wheel is fine; it is only used on the CPU here)

Regenerate (from the repository root):

    /work/pyenv/venv/bin/python tools/make_fixtures.py --out tests/fixtures

The script is deterministic: fixed seeds, float32, 2 CPU threads, eager attention and eager experts
for the reference run.  For every fixture it writes `tests/fixtures/<name>/`:

    config.json, generation_config.json, model*.safetensors[, model.safetensors.index.json]
    tokenizer.json, tokenizer_config.json          (shared tiny ChatML tokenizer, vocab 384)
    golden.safetensors   float32 `prompt{i}.logits` [seq, vocab] for each prompt
    golden.json          token ids, per-layer router top-k ids/weights, 32-token greedy continuations,
                         parameter counts, the tensor names/shapes written, robustness margins

Fixtures: qwen3_moe, qwen3_moe_fused, mixtral, qwen2_moe, olmoe, qwen3_moe_bf16_sharded.
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
    MixtralConfig,
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
    """Linear/embedding/expert weights ~ N(0, 0.2); RMSNorm weights 1 + 0.1 N(0,1); biases 0.1 N(0,1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied parameters are yielded once
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
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


def count_params(model):
    total = sum(p.numel() for p in model.parameters())
    active = total
    for _, blk in moe_layers(model):
        if blk is None:
            continue
        ex = blk.experts
        per_expert = ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()
        active -= (blk.gate.num_experts - blk.gate.top_k) * per_expert
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

    for idx, blk in layers:
        if blk is not None:
            handles.append(blk.gate.register_forward_hook(router_hook(idx)))
    if clip is not None:
        for layer in model.model.layers:
            handles.append(layer.self_attn.q_norm.register_forward_hook(clip_hook("q")))
            handles.append(layer.self_attn.k_norm.register_forward_hook(clip_hook("k")))
            handles.append(layer.self_attn.v_proj.register_forward_hook(clip_hook("v")))

    results = []
    logits_out = {}
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
                assert r_idx.shape == (len(ids), blk.gate.top_k)
                topk_all.append(r_idx.tolist())
                weights_all.append([[float(w) for w in row] for row in r_scores.float()])
                # Margins on the routing probabilities (softmax in float32, as the routers do).
                probs = torch.softmax(r_logits.float(), dim=-1)
                sp, si = torch.sort(probs, dim=-1, descending=True)
                k = blk.gate.top_k
                assert torch.equal(si[:, :k], r_idx), "router order differs from sorted probabilities"
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
def check_reload(out_dir, prompts, logits_ref, atol=1e-5):
    """Reload with from_pretrained (float32) and compare logits, both with the eager reference
    implementations and with transformers' defaults (sdpa attention / grouped_mm experts)."""
    report = {}
    for label, kw in (
        ("eager", dict(attn_implementation="eager", experts_implementation="eager")),
        ("default", {}),
    ):
        m = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, **kw).eval()
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


def find_model(name, make_config, base_seed, prompts, round_bf16=False):
    for seed in range(base_seed, base_seed + MAX_SEED_TRIES):
        model = build_model(make_config(), seed)
        if round_bf16:
            # Golden outputs for a bf16 checkpoint: float32 compute on bf16-rounded weights.
            # (Round parameters only: `model.to(bf16)` would also round the rotary inv_freq buffer.)
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).to(torch.float32))
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
                 bf16_sharded=False, eos_list=False):
    out_dir = os.path.join(out_root, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    seed, model, res, logits, gmin, rmin, rgap, extra = find_model(
        name, make_config, base_seed, prompts, round_bf16=bf16_sharded
    )
    meta = base_meta(model, seed, gmin, rmin, rgap, extra, special, tok)
    if eos_list:
        model.generation_config.bos_token_id = special["<|endoftext|>"]
        model.generation_config.eos_token_id = [special["<|im_end|>"], special["<|endoftext|>"]]
    if bf16_sharded:
        model.to(torch.bfloat16)
        save_model(model, out_dir, max_shard_size="150KB")
        model.to(torch.float32)  # parameters are exactly representable; buffers are not used again
    else:
        save_model(model, out_dir)
    write_tokenizer(tok, out_dir)
    finish_chat_example(out_dir, meta)
    meta["tensors"], meta["tensor_dtypes"] = saved_tensors(out_dir)
    meta["reload_max_abs_diff"] = check_reload(out_dir, prompts, logits)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures", help="output root directory")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    tok = train_tokenizer()
    tok2 = train_tokenizer()
    assert tok.to_str() == tok2.to_str(), "tokenizer training is not deterministic"
    special = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    prompts = make_prompts(tok)
    print("special tokens:", special, "prompts:", prompts, flush=True)

    q3, q3_meta, q3_res, q3_logits = make_fixture(
        "qwen3_moe", args.out, tok, special, prompts, lambda: qwen3_moe_config(special), 1234, eos_list=True
    )
    make_fused_copy("qwen3_moe", "qwen3_moe_fused", args.out, q3, tok, prompts, q3_meta, q3_res, q3_logits)
    make_fixture("mixtral", args.out, tok, special, prompts, lambda: mixtral_config(special), 2345)
    make_fixture("qwen2_moe", args.out, tok, special, prompts, lambda: qwen2_moe_config(special), 3456)
    make_fixture("olmoe", args.out, tok, special, prompts, lambda: olmoe_config(special), 4567)
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

    total = 0
    for root, _, files in os.walk(args.out):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    print(f"total fixture size: {total / 1e6:.3f} MB", flush=True)
    if total > 5_000_000:
        sys.exit("fixtures exceed 5 MB")


if __name__ == "__main__":
    main()
