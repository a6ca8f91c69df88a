#!/usr/bin/env python3
"""Convert a checkpoint directory with llama.cpp's own `convert_hf_to_gguf.py` (not a re-implementation),
for the families whose GGUF files Switchyard reads as llama.cpp writes them (`gpt-oss`, `ernie4_5-moe`,
`deepseek2`, ...).

Only the vocabulary step is adapted, because the test fixtures' tokenizer is a tiny byte-level BPE that
no released model uses: the converter identifies a BPE pre-tokenizer by hashing its output against the
known models (it raises on an unknown hash), so it is told `gpt-2` (the fixtures' pre-tokenizer is GPT-2's
byte-level regex); and ERNIE's converter reads a SentencePiece `tokenizer.model`, which the fixtures do
not have, and GLM-4 MoE's looks up GLM's special tokens (`[gMASK]`, `<|user|>`, ...), which the fixtures'
tokenizer does not have, so both take the BPE vocabulary the way the converter does for every `gpt2`-type
model. Tensors, their names, types and layouts, and all other metadata are the converter's.

Usage (llama.cpp's source tree, e.g. from tools/build_llama_cpp.sh, and a venv with torch, transformers
and its gguf-py; see tools/requirements.txt):

    python tools/llama_cpp_gguf.py --llama-cpp LLAMA_CPP_SRC MODEL_DIR OUT.gguf [--outtype f16]
    python tools/llama_cpp_gguf.py --llama-cpp LLAMA_CPP_SRC --fixtures tests/fixtures   # the committed ones
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (fixture directory, GGUF file written under tests/fixtures/gguf/); gpt_oss's experts stay MXFP4, as
# the converter keeps an MXFP4 checkpoint's experts.
FIXTURES = [
    ("gpt_oss", "gpt_oss-f16.gguf"),
    ("ernie4_5_moe", "ernie4_5_moe-f16.gguf"),
    ("deepseek_v2_lite", "deepseek_v2_lite-f16.gguf"),
    ("deepseek_v2", "deepseek_v2-f16.gguf"),
    ("deepseek_v3", "deepseek_v3-f16.gguf"),
    ("glm4_moe", "glm4_moe-f16.gguf"),
]


def convert(llama_cpp: Path, model_dir: Path, out: Path, outtype: str) -> None:
    sys.path.insert(0, str(llama_cpp))
    sys.path.insert(1, str(llama_cpp / "gguf-py"))
    import convert_hf_to_gguf as upstream  # noqa: E402
    from conversion import base, ernie, glm  # noqa: E402

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    ernie.Ernie4_5Model.set_vocab = lambda self: self._set_vocab_gpt2()
    glm.Glm4MoeModel.set_vocab = lambda self: self._set_vocab_gpt2()
    tmp = out.with_name(out.name + ".tmp")
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    upstream.main()
    os.replace(tmp, out)  # never a half-written fixture


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (has convert_hf_to_gguf.py)")
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--outtype", default="f16")
    ap.add_argument("--fixtures", type=Path, help="write every GGUF fixture of FIXTURES under DIR/gguf")
    args = ap.parse_args()
    if args.fixtures:
        for name, file in FIXTURES:
            convert(args.llama_cpp, args.fixtures / name, args.fixtures / "gguf" / file, "f16")
    elif args.model and args.out:
        convert(args.llama_cpp, args.model, args.out, args.outtype)
    else:
        ap.error("give MODEL_DIR OUT.gguf, or --fixtures DIR")


if __name__ == "__main__":
    main()
