#!/usr/bin/env python3
"""Convert a Hugging Face MoE checkpoint directory to GGUF the way llama.cpp's converter does.

Mirrors `convert_hf_to_gguf.py` (conversion/base.py, qwen.py, llama.py, olmo.py at llama.cpp
2bbcf7fc) for the four architectures Switchyard runs, using the same `gguf` Python package:

  * architectures: qwen3_moe -> `qwen3moe`, qwen2_moe -> `qwen2moe`, mixtral -> `llama`, olmoe -> `olmoe`;
  * tensor names from gguf-py's own `get_tensor_name_map` (so they are llama.cpp's names, not ours);
  * routed experts stacked into merged 3-D tensors `blk.N.ffn_{gate,up,down}_exps.weight`
    ([n_expert, out, in] in PyTorch order), from per-expert tensors or from transformers 5's fused
    `experts.gate_up_proj` / `experts.down_proj`;
  * Mixtral (`llama`): q_proj / k_proj rows permuted to llama.cpp's interleaved rotary layout
    (`LlamaModel.permute`); the other three are stored as-is (NEOX rotary);
  * tensor types: 1-D tensors, `*_norm.weight`, biases and the router `ffn_gate_inp` stay F32;
    everything else gets the output type, falling back to F16 when a row is not a whole number of
    quantization blocks (as the converter does on `QuantError`);
  * metadata: `{arch}.block_count`, `.context_length`, `.embedding_length`, `.feed_forward_length`,
    `.attention.head_count(_kv)`, `.attention.key_length`, `.rope.freq_base`,
    `.attention.layer_norm_rms_epsilon`, `.expert_count`, `.expert_used_count`,
    `.expert_feed_forward_length`, `.expert_shared_feed_forward_length`, `general.file_type`;
  * tokenizer: `tokenizer.ggml.model = gpt2` with tokens / token_type / merges / special ids /
    chat template, built like `TextModel._set_vocab_gpt2` (AutoTokenizer + gguf.SpecialVocab).

Deliberate differences from the upstream converter, each because the upstream value would not
describe the checkpoint: OLMoE's RMS epsilon is written from config.json (upstream hard-codes 1e-5)
and its `clip_qkv` as `olmoe.attention.clamp_kqv` (upstream drops it); `expert_weights_norm` is
written from `norm_topk_prob` (llama.cpp hard-codes it per architecture and ignores the key);
`tokenizer.ggml.pre` is chosen from the tokenizer's pre-tokenizer (one of llama.cpp's names:
`gpt-2`, `qwen2`, `llama-bpe`) rather than from a hash table of known models.

llama.cpp itself loads these files and reproduces transformers' logits from the f32 ones
(tools/check_gguf_llama_cpp.py: Mixtral 7e-6, Qwen2-MoE 9e-6). `q4_0` is not an upstream converter type (llama.cpp makes it with `llama-quantize`);
here it is "pure" Q4_0 with the converter's F32 exceptions.

Usage (venv: see tools/requirements.txt):

    python tools/make_gguf.py MODEL_DIR OUT.gguf --outtype q8_0
    python tools/make_gguf.py bench-models/qwen3-moe-bench \\
        bench-models/qwen3-moe-bench-q4_0.gguf --outtype q4_0 --tokenizer-from tests/fixtures/qwen3_moe
    python tools/make_gguf.py --fixtures tests/fixtures   # the committed test GGUFs
        # (tests/fixtures/gguf/: one f16 file per architecture, plus random blocks of every quantized
        #  type with gguf-py's dequantization of them, quant-blocks.gguf)

A checkpoint without tokenizer.json (the bench model) needs `--tokenizer-from DIR`; the vocabulary
is padded with `[PAD{i}]` (UNUSED) tokens up to the model's vocab_size.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

torch.set_num_threads(2)

ARCHS = {
    "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
    "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
    "mixtral": gguf.MODEL_ARCH.LLAMA,
    "olmoe": gguf.MODEL_ARCH.OLMOE,
}

OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}

# Pre-tokenizer regexes llama.cpp knows by name (llama-vocab.cpp), for `tokenizer.ggml.pre`.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The committed test GGUFs: (fixture, outtype), one per architecture, f16 to keep them small
# (tests/gguf.rs re-encodes them to other types at test time).
FIXTURES = [
    ("qwen3_moe", "f16"),
    ("mixtral", "f16"),
    ("qwen2_moe", "f16"),
    ("olmoe", "f16"),
]

# Byte offsets of the f16 scales in one block of each type (ggml-common.h), which random test
# blocks set to finite values; every other byte is random.
BLOCK_SCALES = {
    gguf.GGMLQuantizationType.Q4_0: [0],
    gguf.GGMLQuantizationType.Q4_1: [0, 2],
    gguf.GGMLQuantizationType.Q5_0: [0],
    gguf.GGMLQuantizationType.Q5_1: [0, 2],
    gguf.GGMLQuantizationType.Q8_0: [0],
    gguf.GGMLQuantizationType.Q2_K: [80, 82],
    gguf.GGMLQuantizationType.Q3_K: [108],
    gguf.GGMLQuantizationType.Q4_K: [0, 2],
    gguf.GGMLQuantizationType.Q5_K: [0, 2],
    gguf.GGMLQuantizationType.Q6_K: [208],
}


def write_quant_blocks(out: Path) -> None:
    """Random blocks of every quantized type, each with gguf-py's dequantization as `ref.<TYPE>`.

    gguf-py cannot quantize the K types, but it can dequantize them; random blocks (finite
    scales) exercise every bit of the format, which is what a decoder test needs.
    """
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(out, "blocks")
    rows, cols = 2, 256
    for qtype, scales in BLOCK_SCALES.items():
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = rows * cols // block_elems
        blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
        for at in scales:
            d = rng.uniform(0.001, 0.05, size=n_blocks).astype(np.float16)
            d *= np.where(rng.random(n_blocks) < 0.5, -1, 1).astype(np.float16)
            blocks[:, at:at + 2] = d.view(np.uint8).reshape(n_blocks, 2)
        data = blocks.reshape(rows, cols // block_elems * block_bytes)
        w.add_tensor(f"q.{qtype.name}", data, raw_dtype=qtype)
        ref = gguf.quants.dequantize(data, qtype).astype(np.float32)
        assert ref.shape == (rows, cols) and np.isfinite(ref).all()
        w.add_tensor(f"ref.{qtype.name}", ref)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({out.stat().st_size:,} bytes)", file=sys.stderr)


def read_tensors(model_dir: Path):
    """Yields (name, float32 torch tensor) from every safetensors file, in file and key order."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        sys.exit(f"{model_dir}: no model*.safetensors files")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).to(torch.float32)


def permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """`LlamaModel.permute` from convert_hf_to_gguf.py (rotate-half rows -> interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def hf_tensors(model_dir: Path, cfg: dict, n_experts: int):
    """Yields (hf_name, tensor) with experts merged into `...experts.{gate,up,down}_proj.weight` [E, out, in]."""
    model_type = cfg["model_type"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    pending: dict[int, dict[str, torch.Tensor]] = {}
    wids = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    for name, t in read_tensors(model_dir):
        if model_type == "mixtral":
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                t = permute(t, n_head, n_head)
            if name.endswith(("k_proj.weight", "k_proj.bias")):
                t = permute(t, n_head, n_kv)
        parts = name.split(".")
        if ".experts." not in name:
            yield name, t
            continue
        bid = int(parts[2])
        module = parts[3]  # mlp | block_sparse_moe
        base = f"model.layers.{bid}.{module}.experts"
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.gate_up_proj.weight"):
            n_ff = t.shape[-2] // 2
            yield f"{base}.gate_proj.weight", t[..., :n_ff, :].contiguous()
            yield f"{base}.up_proj.weight", t[..., n_ff:, :].contiguous()
            continue
        if name.endswith("experts.down_proj") or name.endswith("experts.down_proj.weight"):
            yield f"{base}.down_proj.weight", t
            continue
        # Per-expert: model.layers.{bid}.{module}.experts.{xid}.{wid}.weight
        xid, wid = int(parts[5]), parts[6]
        wid = wids.get(wid, wid)
        layer = pending.setdefault(bid, {})
        layer[f"{xid}.{wid}"] = t
        if len(layer) == n_experts * 3:
            for w in ("gate_proj", "up_proj", "down_proj"):
                yield f"{base}.{w}.weight", torch.stack([layer[f"{x}.{w}"] for x in range(n_experts)])
            del pending[bid]
    if any(pending.values()):
        sys.exit(f"unmerged experts left over: {sorted(k for d in pending.values() for k in d)[:5]}")


def gguf_name(tmap: gguf.TensorNameMap, fallback: gguf.TensorNameMap, hf_name: str) -> str:
    # The stacked `mlp.experts.{gate,up,down}_proj` names map for every arch (Mixtral's too).
    name = hf_name.replace(".block_sparse_moe.experts.", ".mlp.experts.")
    new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        # Qwen3-MoE dense `mlp_only_layers`: llama.cpp's qwen3moe has no dense FFN tensors (the
        # upstream converter fails here); write llama's names, which Switchyard reads.
        new = fallback.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            sys.exit(f"cannot map tensor {hf_name!r} to a GGUF name")
        print(f"warning: {hf_name} -> {new} is not a llama.cpp tensor of this architecture", file=sys.stderr)
    return new


def tensor_type(new_name: str, hf_name: str, n_dims: int, out_qtype, bid):
    """The converter's choice (conversion/base.py prepare_tensors)."""
    if n_dims <= 1 or new_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if bid is not None and new_name == f"blk.{bid}.ffn_gate_inp.weight":
        return gguf.GGMLQuantizationType.F32
    if not hf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return out_qtype


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for p in pres:
        if p.get("type") == "Split":
            regex = p.get("pattern", {}).get("Regex", "")
            if regex == QWEN2_REGEX:
                return "qwen2"
            if regex == LLAMA3_REGEX:
                return "llama-bpe"
            sys.exit(f"pre-tokenizer regex not recognised: {regex!r}")
        if p.get("type") == "ByteLevel" and p.get("use_regex", True):
            return "gpt-2"
    return "default"


def add_vocab(w: gguf.GGUFWriter, tok_dir: Path, vocab_size: int) -> None:
    """`TextModel._set_vocab_gpt2`: tokens, token types, merges, special ids, chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    reverse_vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse_vocab) >= vocab_size:
        sys.exit(f"tokenizer has ids up to {max(reverse_vocab)}, but vocab_size is {vocab_size}")
    added_vocab = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens, toktypes = [], []
    for i in range(vocab_size):
        if i not in reverse_vocab:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        token = reverse_vocab[i]
        if token in added_vocab:
            special = added_decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            toktypes.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    tokenizer_json = json.loads((tok_dir / "tokenizer.json").read_text())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    special_vocab = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=len(tokens))
    special_vocab.add_to_gguf(w, quiet=True)


def convert(model_dir: Path, out: Path, outtype: str, tokenizer_from: Path | None) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    model_type = cfg["model_type"]
    if model_type not in ARCHS:
        sys.exit(f"{model_dir}: model_type {model_type!r} not supported ({', '.join(ARCHS)})")
    arch = ARCHS[model_type]
    out_qtype, ftype = OUTTYPES[outtype]
    n_layers = cfg["num_hidden_layers"]
    n_experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    fallback = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(model_dir.name)
    # TextModel.set_gguf_parameters
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    if cfg.get("intermediate_size") is not None:
        w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    if cfg.get("num_key_value_heads") is not None:
        w.add_head_count_kv(cfg["num_key_value_heads"])
    rope = cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta"))
    if rope_theta is not None:
        w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(n_experts)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("head_dim") is not None:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_file_type(ftype)
    # Architecture extras.
    if model_type in ("qwen3_moe", "qwen2_moe"):
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if model_type == "mixtral":
        w.add_vocab_size(cfg["vocab_size"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        w.add_rope_dimension_count(head_dim)
    if model_type == "olmoe" and cfg.get("clip_qkv") is not None:
        w.add_clamp_kqv(cfg["clip_qkv"])
    if cfg.get("norm_topk_prob") is not None:
        w.add_expert_weights_norm(bool(cfg["norm_topk_prob"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tok_dir = tokenizer_from or model_dir
    if (tok_dir / "tokenizer.json").exists():
        add_vocab(w, tok_dir, cfg["vocab_size"])
    else:
        sys.exit(f"{tok_dir}: no tokenizer.json (pass --tokenizer-from DIR)")
    for hf_name, t in hf_tensors(model_dir, cfg, n_experts):
        bid = int(hf_name.split(".")[2]) if hf_name.startswith("model.layers.") else None
        new_name = gguf_name(tmap, fallback, hf_name)
        data = t.squeeze().numpy()
        qtype = tensor_type(new_name, hf_name, data.ndim, out_qtype, bid)
        try:
            q = gguf.quants.quantize(data, qtype)
        except gguf.QuantError as e:
            print(f"{new_name}: {e}, falling back to F16", file=sys.stderr)
            qtype = gguf.GGMLQuantizationType.F16
            q = gguf.quants.quantize(data, qtype)
        w.add_tensor(new_name, q, raw_dtype=qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {outtype})", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", type=Path)
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--outtype", choices=sorted(OUTTYPES), default="f16")
    ap.add_argument("--tokenizer-from", type=Path, help="directory with tokenizer.json if MODEL_DIR has none")
    ap.add_argument("--fixtures", type=Path, help="write the test GGUFs into FIXTURES/gguf/")
    args = ap.parse_args()
    if args.fixtures is not None:
        out_dir = args.fixtures / "gguf"
        out_dir.mkdir(exist_ok=True)
        for name, outtype in FIXTURES:
            convert(args.fixtures / name, out_dir / f"{name}-{outtype}.gguf", outtype, None)
        write_quant_blocks(out_dir / "quant-blocks.gguf")
        return
    if args.model_dir is None or args.out is None:
        ap.error("MODEL_DIR and OUT are required (or --fixtures DIR)")
    convert(args.model_dir, args.out, args.outtype, args.tokenizer_from)


if __name__ == "__main__":
    main()
