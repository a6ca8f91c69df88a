#!/usr/bin/env python3
"""Switchyard against llama.cpp on the same GGUF, measured so that it holds: `switchyard bench`
and `llama-bench` alternate N times (default 3) on one file, back to back, and the table shows
each engine's median prefill (pp) and decode (tg) over the alternations, the ratio of the
medians, the run-to-run spread of our decode (max / min over the alternations), the date, the
llama.cpp commit and the machine's read bandwidth (median of what `switchyard bench` measured,
ops/bandwidth.rs) with the share of it our decode reaches. Single best runs do not count.

    python3 tools/bench_alternate.py bench-models/qwen3-moe-bench-Q4_0.gguf \\
        --llama-bench ../llama.cpp/build/bin/llama-bench [-n 3] [--threads 2]

Each alternation runs `switchyard bench --threads T --prompt-tokens P --gen-tokens G --repeat R`
(its own medians of R) and `llama-bench -t T -p P -n G -r R -o json` (its means of R).
`--commit` names the llama.cpp commit when the build does not know it (an sdist build says
"unknown"; tools/build_llama_cpp.sh prints the one llama-cpp-python vendors).
"""
import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out.stdout


def ours(a):
    """(pp tok/s, tg tok/s, read GB/s, active MB/token) from one `switchyard bench`."""
    text = run([a.switchyard, "bench", "--model", a.gguf, "--threads", str(a.threads),
                "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens),
                "--repeat", str(a.repeat)])
    bw = re.search(r"machine read bandwidth: ([0-9.]+) GB/s", text)
    row = next((l for l in text.splitlines() if l.startswith("| switchyard |")), None)
    if not bw or not row:
        sys.exit(f"unexpected switchyard bench output:\n{text}")
    cells = [c.strip() for c in row.strip("|").split("|")]
    return float(cells[2]), float(cells[3]), float(bw.group(1)), float(cells[5])


def llama(a):
    """(pp tok/s, tg tok/s, commit) from one `llama-bench`."""
    text = run([a.llama_bench, "-m", a.gguf, "-t", str(a.threads), "-p", str(a.prompt_tokens),
                "-n", str(a.gen_tokens), "-r", str(a.repeat), "-o", "json"])
    tests = json.loads(text)
    pp = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    return pp["avg_ts"], tg["avg_ts"], pp.get("build_commit", "unknown")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("-n", "--alternations", type=int, default=3)
    ap.add_argument("--switchyard", default=os.path.join(ROOT, "target/release/switchyard"))
    ap.add_argument("--llama-bench", default=os.path.join(ROOT, "../llama.cpp/build/bin/llama-bench"))
    ap.add_argument("--commit", help="llama.cpp commit, when llama-bench reports none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    for path in (a.gguf, a.switchyard, a.llama_bench):
        if not os.path.exists(path):
            sys.exit(f"{path} does not exist")

    s_pp, s_tg, bws, l_pp, l_tg = [], [], [], [], []
    commit, active_mb = "unknown", 0.0
    for i in range(a.alternations):
        pp, tg, bw, active_mb = ours(a)
        s_pp.append(pp)
        s_tg.append(tg)
        bws.append(bw)
        pp, tg, commit = llama(a)
        l_pp.append(pp)
        l_tg.append(tg)
        print(f"  alternation {i + 1}: switchyard pp {s_pp[-1]:.1f} tg {s_tg[-1]:.1f} | "
              f"llama.cpp pp {l_pp[-1]:.1f} tg {l_tg[-1]:.1f} | read bw {bw:.1f} GB/s",
              file=sys.stderr, flush=True)
    if commit in ("unknown", "", None) and a.commit:
        commit = a.commit
    med = statistics.median
    bw = med(bws)
    p, g = a.prompt_tokens, a.gen_tokens
    share = active_mb * med(s_tg) / 1e3 / bw
    print(f"\n{os.path.basename(a.gguf)}: {a.alternations} alternations of `switchyard bench "
          f"--threads {a.threads} --prompt-tokens {p} --gen-tokens {g} --repeat {a.repeat}` and "
          f"`llama-bench -t {a.threads} -p {p} -n {g} -r {a.repeat}`, medians; "
          f"{datetime.date.today().isoformat()}, llama.cpp {commit}, read bandwidth {bw:.1f} GB/s "
          f"(median of the alternations)\n")
    print(f"| GGUF | Switchyard pp{p} / tg{g} | llama.cpp pp{p} / tg{g} | ratio pp / tg | "
          f"our tg spread (max/min) | our tg share of read bw |")
    print("|---|---|---|---|---:|---:|")
    print(f"| {os.path.basename(a.gguf)} | {med(s_pp):.1f} / {med(s_tg):.1f} | "
          f"{med(l_pp):.1f} / {med(l_tg):.1f} | {med(s_pp) / med(l_pp):.2f}x / "
          f"{med(s_tg) / med(l_tg):.2f}x | {max(s_tg) / min(s_tg):.3f} | {100 * share:.0f} % |")


if __name__ == "__main__":
    main()
