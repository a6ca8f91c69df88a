#!/usr/bin/env python3
"""Run a GGUF through llama.cpp (llama-cpp-python) and compare its logits with a fixture's golden ones.

Checks that a file written by tools/make_gguf.py is what llama.cpp expects (tensor layout, Mixtral's
q/k permutation, metadata, tokenizer), independently of Switchyard's reader:

    pip install llama-cpp-python      # builds llama.cpp from source (~30 min on 2 cores)
    python tools/make_gguf.py tests/fixtures/mixtral /tmp/mixtral-f32.gguf --outtype f32
    python tools/check_gguf_llama_cpp.py /tmp/mixtral-f32.gguf tests/fixtures/mixtral

Measured 2026-11-25 (llama-cpp-python 0.3.36, f32 GGUFs, f32 KV cache): mixtral 7.0e-6, qwen2_moe 9.1e-6.
llama.cpp cannot run two fixtures as transformers does: its qwen3moe has no dense `mlp_only_layers`
layers, and its olmoe ignores `clip_qkv` (max |diff| 6.4 on the fixture, which sets it to 2.0).
"""

import json
import sys

import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    gguf_path, fixture = sys.argv[1], sys.argv[2]
    golden = json.load(open(f"{fixture}/golden.json"))
    logits = load_file(f"{fixture}/golden.safetensors")
    # f32 KV cache: the default f16 cache alone moves these logits by ~1e-2.
    llm = Llama(model_path=gguf_path, n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                type_k=0, type_v=0, flash_attn=False)
    worst = 0.0
    for i, prompt in enumerate(golden["prompts"]):
        llm.reset()
        llm.eval(prompt["input_ids"])
        ours = np.array(llm.scores[: len(prompt["input_ids"])])
        worst = max(worst, float(np.abs(ours - logits[f"prompt{i}.logits"]).max()))
    print(f"{gguf_path}: llama.cpp vs transformers max |logit diff| {worst:.3g}")


if __name__ == "__main__":
    main()
