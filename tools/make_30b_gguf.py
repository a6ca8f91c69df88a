#!/usr/bin/env python3
"""Write a random-weight Q8_0 GGUF with Qwen3-30B-A3B's shape, larger than this machine's memory.

48 layers, 128 experts top-8, hidden 2048, `moe_intermediate_size` 768, 32 query / 4 KV heads of
128, vocab 151936, rope theta 1e6: 30.5 B parameters, ~32.5 GB as Q8_0 (the norms and the router
stay F32, as llama.cpp's converter keeps them). Metadata and tensor names are what llama.cpp's
`convert_hf_to_gguf.py` writes for `qwen3moe` (merged `ffn_{gate,up,down}_exps`), so llama.cpp
and Switchyard both run it; the vocabulary is the test fixtures' tiny BPE padded with `[PAD{i}]`
tokens up to 151936 (as `tools/make_gguf.py --tokenizer-from` pads it).

The file is never held in memory: tensors are written one at a time from a fixed pool of random
Q8_0 blocks (scale 0.02 * sqrt(3) / 127, quants uniform in [-127, 127], i.e. weights of std ~0.02),
each tensor starting at its own random offset into the pool, so no two tensors share bytes at the
same positions. Written to OUT.tmp, then renamed.

    python tools/make_30b_gguf.py OUT.gguf [--layers 48]      # ~32.5 GB, a few minutes of disk writes

Needs numpy and gguf-py (tools/requirements.txt); keep OUT outside the repository.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf  # noqa: E402
from make_gguf import add_vocab  # noqa: E402

SHAPE = dict(
    vocab=151936,
    hidden=2048,
    layers=48,
    heads=32,
    kv_heads=4,
    head_dim=128,
    experts=128,
    top_k=8,
    expert_ffn=768,
    context=40960,
    rope_theta=1e6,
    eps=1e-6,
)
Q8 = gguf.GGMLQuantizationType.Q8_0
BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])  # 34 bytes, gguf's block_q8_0
POOL_BLOCKS = 1 << 21  # 68 MiB of random blocks


def pool(rng):
    p = np.empty(POOL_BLOCKS, dtype=BLOCK)
    p["d"] = np.float16(0.02 * np.sqrt(3.0) / 127.0)
    p["qs"] = rng.integers(-127, 128, size=(POOL_BLOCKS, 32), dtype=np.int8)
    return p.view(np.uint8)


def q8_bytes(shape):
    """Byte shape of a Q8_0 tensor of numpy shape `shape` (rows of `shape[-1]` weights)."""
    assert shape[-1] % 32 == 0, shape
    return (*shape[:-1], shape[-1] // 32 * BLOCK.itemsize)


def tensors(s):
    """(name, numpy shape, Q8_0 or F32) in the order llama.cpp's converter writes them."""
    h, hd = s["hidden"], s["head_dim"]
    yield "token_embd.weight", (s["vocab"], h), Q8
    for b in range(s["layers"]):
        p = f"blk.{b}."
        yield p + "attn_norm.weight", (h,), None
        yield p + "attn_q.weight", (s["heads"] * hd, h), Q8
        yield p + "attn_k.weight", (s["kv_heads"] * hd, h), Q8
        yield p + "attn_v.weight", (s["kv_heads"] * hd, h), Q8
        yield p + "attn_output.weight", (h, s["heads"] * hd), Q8
        yield p + "attn_q_norm.weight", (hd,), None
        yield p + "attn_k_norm.weight", (hd,), None
        yield p + "ffn_norm.weight", (h,), None
        yield p + "ffn_gate_inp.weight", (s["experts"], h), None
        yield p + "ffn_gate_exps.weight", (s["experts"], s["expert_ffn"], h), Q8
        yield p + "ffn_up_exps.weight", (s["experts"], s["expert_ffn"], h), Q8
        yield p + "ffn_down_exps.weight", (s["experts"], h, s["expert_ffn"]), Q8
    yield "output_norm.weight", (h,), None
    yield "output.weight", (s["vocab"], h), Q8


def data(name, shape, qtype, blocks, rng):
    if qtype is None:
        if "gate_inp" in name:
            return rng.normal(0.0, 0.02, size=shape).astype(np.float32)
        return np.ones(shape, dtype=np.float32)
    nbytes = int(np.prod(q8_bytes(shape)))
    start = int(rng.integers(0, POOL_BLOCKS)) * BLOCK.itemsize
    reps = -(-(start + nbytes) // blocks.size)
    out = np.tile(blocks, reps)[start : start + nbytes] if reps > 1 else blocks[start : start + nbytes]
    return out.reshape(q8_bytes(shape))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=SHAPE["layers"], help="fewer layers for a quick check")
    ap.add_argument(
        "--tokenizer-from",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "tests/fixtures/qwen3_moe",
    )
    args = ap.parse_args()
    s = dict(SHAPE, layers=args.layers)
    rng = np.random.default_rng(30_3)
    blocks = pool(rng)
    tmp = args.out.with_name(args.out.name + ".tmp")

    w = gguf.GGUFWriter(tmp, "qwen3moe")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("qwen3-30b-a3b-shape-random")
    w.add_block_count(s["layers"])
    w.add_context_length(s["context"])
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(6144)
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(s["rope_theta"])
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_expert_count(s["experts"])
    w.add_expert_used_count(s["top_k"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_expert_feed_forward_length(s["expert_ffn"])
    w.add_expert_weights_norm(True)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, args.tokenizer_from, s["vocab"])

    plan = list(tensors(s))
    for name, shape, qtype in plan:
        if qtype is None:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            b = q8_bytes(shape)
            w.add_tensor_info(name, b, np.dtype(np.uint8), int(np.prod(b)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    written = 0
    for i, (name, shape, qtype) in enumerate(plan):
        t = data(name, shape, qtype, blocks, rng)
        w.write_tensor_data(t)
        written += t.nbytes
        if name.endswith("ffn_down_exps.weight"):
            print(f"\r{name}: {written / 1e9:.1f} GB", end="", file=sys.stderr, flush=True)
    w.close()
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out} ({args.out.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
