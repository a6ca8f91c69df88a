#!/usr/bin/env python3
"""The README's expert-placement table: `switchyard plan` then `switchyard simulate` for every
(trace, devices, nodes) asked, printed as one Markdown table with the plan beside the engines'
three placements (contiguous, round-robin, EPLB greedy) and the solver's gap.

    python3 tools/placement_table.py --bin target/release/switchyard \\
        --trace demo=heldout.parquet --trace bench=bench.parquet \\
        [--devices 4 8] [--nodes 1 2] [--batch 256] [--time-limit 60] [--work DIR]

Every figure is per step of --batch tokens: max/mean device load (expert-token pairs summed
over MoE layers), tokens dispatched to another device and to another node. The plan is made
from the same trace it is replayed on (in-sample). The plan files go to --work (default: a
temporary directory), written as `NAME-D-N.json`. Needs only the standard library.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def run(cmd):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out.stdout, out.stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/switchyard")
    ap.add_argument("--trace", action="append", required=True, help="NAME=TRACE.parquet")
    ap.add_argument("--devices", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--work")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="placement-")
    os.makedirs(work, exist_ok=True)

    print("| model | devices x nodes | placement | max load | mean load | cross-device tokens "
          "| cross-node tokens | solver |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for spec in args.trace:
        name, _, path = spec.partition("=")
        for devices in args.devices:
            for nodes in args.nodes:
                plan = os.path.join(work, f"{name}-{devices}-{nodes}.json")
                common = ["--trace", path, "--devices", str(devices), "--nodes", str(nodes),
                          "--batch", str(args.batch)]
                run([args.bin, "plan", *common, "--time-limit", str(args.time_limit), "--out", plan])
                with open(plan) as f:
                    solver = json.load(f)["solver"]
                out, _ = run([args.bin, "simulate", *common, "--plan", plan, "--json"])
                rows = json.loads(out)
                gap = solver.get("gap")
                gap = "n/a" if gap is None else f"{100 * gap:.1f} %"
                said = (f"{solver['method']} ({solver['status']}), gap {gap}, "
                        f"{solver.get('local_search_moves') or 0} swaps, {solver['seconds']:.0f} s")
                for i, r in enumerate(rows):
                    label = "**plan**" if r["placement"] == "plan" else r["placement"]
                    print(f"| {name if i == 0 else ''} | {f'{devices} x {nodes}' if i == 0 else ''} "
                          f"| {label} | {r['max_load']:.1f} | {r['mean_load']:.1f} "
                          f"| {r['cross_device_tokens']:.1f} | {r['cross_node_tokens']:.1f} "
                          f"| {said if i == 0 else ''} |", flush=True)
    print(f"plan files in {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
