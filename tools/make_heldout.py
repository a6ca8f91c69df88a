#!/usr/bin/env python3
"""Writes the demo model's held-out text: the tail of each corpus file that
`switchyard train` held out (the last 2% of its tokens, as src/train/data.rs
splits it), decoded back to text with the demo tokenizer.

    apt-get update && apt-get install -y bible-kjv fortunes fortunes-min fortunes-de fortunes-es fortunes-it
    python3 tools/build_demo_corpus.py --out /tmp/demo-corpus
    python3 tools/make_heldout.py --corpus /tmp/demo-corpus --out models/demo/heldout.txt

Needs the `tokenizers` package (tools/requirements.txt). Files are taken in name
order, as training reads them; their held-out parts are joined by <|endoftext|>.
"""

import argparse
from pathlib import Path

from tokenizers import Tokenizer

EOT = "<|endoftext|>"
HOLDOUT_FRACTION = 0.02  # src/train/mod.rs, TrainConfig::holdout_fraction


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, default=Path("models/demo/tokenizer.json"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    tok = Tokenizer.from_file(str(args.tokenizer))
    parts, total = [], 0
    for f in sorted(p for p in args.corpus.rglob("*") if p.is_file()):
        text = f.read_bytes().decode("utf-8", errors="replace")
        ids = tok.encode(text, add_special_tokens=False).ids
        split = len(ids) - int(len(ids) * HOLDOUT_FRACTION)
        tail = ids[split:]
        total += len(tail)
        # Decoding keeps <|endoftext|> separators that the file itself contains.
        parts.append(tok.decode(tail, skip_special_tokens=False))
        print(f"{f.name}: {len(ids)} tokens, {len(tail)} held out")
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(EOT.join(parts) + EOT)
    tmp.rename(args.out)
    print(f"{total} held-out tokens -> {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
