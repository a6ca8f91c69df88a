#!/usr/bin/env python3
"""Checks that transformers loads a checkpoint written by `switchyard prune`,
agrees with Switchyard on it, and, on a prompt whose routing in the original
model never touched a removed expert, agrees with the original model too.

    python tools/check_pruned_transformers.py --fixture tests/fixtures/qwen3_moe \
        [--switchyard target/debug/switchyard] [--keep-per-layer 6]

Steps:
1. Route a short prompt through the original model in transformers and record,
   per MoE layer, the experts it used (`output_router_logits`, top-k by hand).
2. Write a calibration text that is that prompt's decoded text and prune by
   frequency with `switchyard prune --keep-per-layer N`: experts the prompt never
   used score 0 and go first, so the prompt's routing avoids every removed one
   whenever N is at least the number of experts it used in each layer.
3. Load the pruned directory with AutoModelForCausalLM and compare its logits on
   the prompt with the original's and with `switchyard logits` on the pruned one.
Exits non-zero if either difference exceeds --tol (1e-4).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def used_experts(model, ids, top_k):
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    used = []
    for logits in out.router_logits or ():
        if logits is None:
            continue
        top = torch.topk(logits.float().softmax(-1), top_k, dim=-1).indices
        used.append(sorted(set(top.flatten().tolist())))
    return out.logits[0].float().numpy(), used


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", type=Path, default=Path("tests/fixtures/qwen3_moe"))
    ap.add_argument("--switchyard", default="target/debug/switchyard")
    ap.add_argument("--text", default="The quick brown fox")
    ap.add_argument("--keep-per-layer", type=int, default=None)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.fixture)
    ids = tok(args.text, add_special_tokens=False)["input_ids"][:3]
    cfg = AutoConfig.from_pretrained(args.fixture)
    top_k = cfg.num_experts_per_tok
    original = AutoModelForCausalLM.from_pretrained(args.fixture, dtype=torch.float32).eval()
    ref, used = used_experts(original, ids, top_k)
    n_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts")
    widest = max(len(u) for u in used)
    keep = args.keep_per_layer or max(widest, top_k)
    if keep < widest:
        print(f"--keep-per-layer {keep} is below the {widest} experts the prompt uses in one layer")
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calibration = tmp / "calibration.txt"
        calibration.write_text(tok.decode(ids))
        out = tmp / "pruned"
        subprocess.run(
            [args.switchyard, "prune", "--model", str(args.fixture), "--calibration",
             str(calibration), "--keep-per-layer", str(keep), "--by", "frequency",
             "--out", str(out)],
            check=True,
        )
        record = json.loads((out / "pruning.json").read_text())
        pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = pruned(torch.tensor([ids])).logits[0].float().numpy()
        npy = tmp / "logits.npy"
        subprocess.run(
            [args.switchyard, "logits", "--model", str(out),
             "--prompt-ids", ",".join(map(str, ids)), "--out", str(npy)],
            check=True,
        )
        ours = np.load(npy)

    vs_original = float(np.abs(theirs - ref).max())
    vs_switchyard = float(np.abs(theirs - ours).max())
    print(f"{type(pruned).__name__}: {n_experts} -> {record['experts_after']} experts per layer "
          f"(prompt used at most {widest}), removed {record['removed']}")
    print(f"transformers pruned vs original: max |logit diff| = {vs_original:.3g}; "
          f"transformers vs switchyard on the pruned checkpoint: {vs_switchyard:.3g} "
          f"(tolerance {args.tol:g})")
    return 0 if max(vs_original, vs_switchyard) <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
