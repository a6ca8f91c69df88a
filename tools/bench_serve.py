#!/usr/bin/env python3
"""N concurrent streaming clients against an OpenAI-compatible server on loopback
for a bounded time: aggregate decode tokens/s, p50/p99 time to first token and
inter-token latency. Standard library only; works against `switchyard serve` and
llama-server alike (both speak /v1/completions with stream: true).

    switchyard serve --model M --max-concurrent 16 &
    python3 tools/bench_serve.py --url http://127.0.0.1:8080 --streams 1,4,16 --seconds 30

Each client sends greedy completions of --max-tokens tokens back to back until the
time is up; a token is one SSE chunk with non-empty text (both servers send one
per token). Only loopback addresses are accepted.
"""
import argparse
import json
import statistics
import threading
import time
import urllib.parse
import urllib.request


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def client(url, model, max_tokens, deadline, out, lock, index):
    body = {"prompt": f"Story {index}: once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    if model:
        body["model"] = model
    data = json.dumps(body).encode()
    while time.time() < deadline:
        req = urllib.request.Request(url + "/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        stamps = []
        with urllib.request.urlopen(req, timeout=300) as r:
            for line in r:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                chunk = json.loads(payload)
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    stamps.append(time.perf_counter())
        if not stamps:
            continue
        with lock:
            out["ttft"].append(stamps[0] - start)
            out["itl"].extend(b - a for a, b in zip(stamps, stamps[1:]))
            out["tokens"] += len(stamps)


def run(url, model, streams, seconds, max_tokens):
    out = {"ttft": [], "itl": [], "tokens": 0}
    lock = threading.Lock()
    start = time.time()
    deadline = start + seconds
    threads = [threading.Thread(target=client, args=(url, model, max_tokens, deadline, out, lock, i))
               for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - start
    return {
        "streams": streams,
        "tokens_per_s": out["tokens"] / elapsed,
        "ttft_p50_ms": 1e3 * percentile(out["ttft"], 0.5),
        "ttft_p99_ms": 1e3 * percentile(out["ttft"], 0.99),
        "itl_p50_ms": 1e3 * percentile(out["itl"], 0.5),
        "itl_p99_ms": 1e3 * percentile(out["itl"], 0.99),
        "requests": len(out["ttft"]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default=None)
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    host = urllib.parse.urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"{host}: only loopback servers are benchmarked")
    if not 0 < args.seconds <= 900:
        raise SystemExit("--seconds must be in (0, 900]")
    print("| streams | aggregate tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | requests |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in [int(s) for s in args.streams.split(",")]:
        r = run(args.url, args.model, n, args.seconds, args.max_tokens)
        print(f"| {n} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} "
              f"| {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | {r['requests']} |", flush=True)


if __name__ == "__main__":
    main()
