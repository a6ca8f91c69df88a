#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on a GGUF, measured the way `llama-bench` and
`switchyard bench` measure: pp = one batch of the whole prompt, tg = single-token
decode steps from an empty cache, tg @ depth = the same after the prompt. Median of
`--repeat` runs after a warm-up, random token ids. Use it to compare both engines on
the identical file, back to back, on the same (noisy, shared) machine.

    python tools/bench_llama_cpp.py bench-models/qwen3-moe-bench-q4_0.gguf

llama-cpp-python builds llama.cpp from source on install (with -march=native here:
its libggml-cpu.so carries AVX-512 VNNI code); the per-token Python call adds a few
microseconds per step, under 0.1 % of a decode step of the bench model.
"""
import argparse
import random
import statistics
import time

import llama_cpp


def batch_of(tokens, start_pos, logits_last):
    b = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    b.n_tokens = len(tokens)
    for i, t in enumerate(tokens):
        b.token[i] = t
        b.pos[i] = start_pos + i
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = 0
        b.logits[i] = 1 if (logits_last and i == len(tokens) - 1) else 0
    return b


def decode(ctx, tokens, start_pos):
    b = batch_of(tokens, start_pos, True)
    rc = llama_cpp.llama_decode(ctx, b)
    llama_cpp.llama_batch_free(b)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")


def run_once(ctx, vocab, prompt, gen):
    """Prefill seconds, then seconds for `gen` greedy-free single-token steps."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    t = time.perf_counter()
    decode(ctx, prompt, 0)
    pp = time.perf_counter() - t
    pos = len(prompt)
    rng = random.Random(7)
    t = time.perf_counter()
    for _ in range(gen):
        decode(ctx, [rng.randrange(vocab)], pos)
        pos += 1
    return pp, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(a.gguf.encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {a.gguf}")
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = a.prompt_tokens + a.gen_tokens + 16
    cp.n_batch = max(a.prompt_tokens, 1)
    cp.n_ubatch = max(a.prompt_tokens, 1)
    cp.n_threads = a.threads
    cp.n_threads_batch = a.threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    rng = random.Random(4321)
    prompt = [rng.randrange(vocab) for _ in range(a.prompt_tokens)]

    run_once(ctx, vocab, prompt[:16], 4)
    pps, tgs, depths = [], [], []
    for r in range(a.repeat):
        pp, depth = run_once(ctx, vocab, prompt, a.gen_tokens)
        _, tg = run_once(ctx, vocab, prompt[:1], a.gen_tokens)
        pps.append(a.prompt_tokens / pp)
        tgs.append(a.gen_tokens / tg)
        depths.append(a.gen_tokens / depth)
        print(f"  run {r + 1}: prefill {pps[-1]:.1f} tok/s, decode {tgs[-1]:.1f} tok/s, "
              f"at depth {depths[-1]:.1f} tok/s", flush=True)
    p, g = a.prompt_tokens, a.gen_tokens
    print(f"\n| engine | file | pp{p} tok/s | tg{g} tok/s | tg{g} @ depth {p} tok/s |")
    print("|---|---|---:|---:|---:|")
    print(f"| llama.cpp (llama-cpp-python {llama_cpp.__version__}) | {a.gguf} | "
          f"{statistics.median(pps):.1f} | {statistics.median(tgs):.1f} | "
          f"{statistics.median(depths):.1f} |")


if __name__ == "__main__":
    main()
