#!/usr/bin/env python3
"""Create the random-weight Qwen3-MoE bench model of the project's reference peer benchmarks (2026-11-25).

The shape of OLMoE-1B-7B at half width: vocab 32000, hidden 1024, 16 layers, 16 query / 4 KV heads
of 64, 64 experts top-8, moe_intermediate_size 512, untied embeddings, rope theta 1e6, RMS eps 1e-6.
1,719,176,192 parameters (277 M active per token), written as one bf16 `model.safetensors` of ~3.4 GB.

Weights are drawn directly (normal, std 0.02, seed 4321; norms are ones) and written tensor by tensor
in the Hub layout (per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, as `save_pretrained`
writes it and as candle-transformers' `qwen3_moe` reads it), so no 7 GB float32 model is ever built.
config.json carries both spellings (`num_experts` / `num_local_experts`, `rope_theta` /
`rope_parameters`) so transformers, candle-transformers and Switchyard all read it.

    python tools/make_bench_model.py --out bench-models/qwen3-moe-bench

Not committed (bench-models/ is gitignored); takes a few minutes and ~3.5 GB of disk.
"""

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(2)

CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_experts": 64,
    "num_local_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "sliding_window": None,
    "use_sliding_window": False,
    "max_window_layers": 16,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "use_cache": True,
    "dtype": "bfloat16",
    "torch_dtype": "bfloat16",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-models/qwen3-moe-bench")
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    args = ap.parse_args()

    cfg = dict(CONFIG, num_hidden_layers=args.layers, max_window_layers=args.layers)
    h, ffn, n_exp = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    gen = torch.Generator().manual_seed(args.seed)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * cfg["initializer_range"]).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": randn(cfg["vocab_size"], h)}
    for l in range(args.layers):
        p = f"model.layers.{l}"
        tensors[f"{p}.input_layernorm.weight"] = ones(h)
        tensors[f"{p}.post_attention_layernorm.weight"] = ones(h)
        tensors[f"{p}.self_attn.q_proj.weight"] = randn(nh * hd, h)
        tensors[f"{p}.self_attn.k_proj.weight"] = randn(nkv * hd, h)
        tensors[f"{p}.self_attn.v_proj.weight"] = randn(nkv * hd, h)
        tensors[f"{p}.self_attn.o_proj.weight"] = randn(h, nh * hd)
        tensors[f"{p}.self_attn.q_norm.weight"] = ones(hd)
        tensors[f"{p}.self_attn.k_norm.weight"] = ones(hd)
        tensors[f"{p}.mlp.gate.weight"] = randn(n_exp, h)
        for e in range(n_exp):
            q = f"{p}.mlp.experts.{e}"
            tensors[f"{q}.gate_proj.weight"] = randn(ffn, h)
            tensors[f"{q}.up_proj.weight"] = randn(ffn, h)
            tensors[f"{q}.down_proj.weight"] = randn(h, ffn)
        print(f"layer {l + 1}/{args.layers}", flush=True)
    tensors["model.norm.weight"] = ones(h)
    tensors["lm_head.weight"] = randn(cfg["vocab_size"], h)

    n_params = sum(t.numel() for t in tensors.values())
    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"wrote {args.out}: {n_params:,} parameters")


if __name__ == "__main__":
    main()
