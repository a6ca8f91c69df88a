#!/usr/bin/env python3
"""Checks that transformers loads a Switchyard-trained model and agrees with
Switchyard's logits.

    python tools/check_transformers.py --model models/demo \
        [--switchyard target/release/switchyard] [--text "The LORD said"]

Encodes the text with the model's own tokenizer (via transformers), runs
`switchyard logits` on the ids, and compares with transformers in float32.
Exits non-zero if the largest absolute difference exceeds --tol (1e-4).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("models/demo"))
    ap.add_argument("--switchyard", default="target/release/switchyard")
    ap.add_argument("--text", default="The LORD said unto Moses, Let my people go. fn main() { println!(\"Hallo Welt\"); }")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(args.text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.npy"
        subprocess.run(
            [args.switchyard, "logits", "--model", str(args.model),
             "--prompt-ids", ",".join(map(str, ids)), "--out", str(out)],
            check=True,
        )
        ours = np.load(out)

    diff = float(np.abs(ours - ref).max())
    same_argmax = bool((ours.argmax(-1) == ref.argmax(-1)).all())
    print(f"{type(model).__name__}: {len(ids)} tokens, vocab {ref.shape[-1]}, "
          f"max |logit diff| = {diff:.3g} (tolerance {args.tol:g}), argmax agrees: {same_argmax}")
    return 0 if diff <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
