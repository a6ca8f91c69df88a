#!/usr/bin/env python3
"""N concurrent streaming clients against an OpenAI-compatible server on loopback
for a bounded time: aggregate decode tokens/s, p50/p99 time to first token and
inter-token latency. Standard library only; works against `switchyard serve` and
llama-server alike (both speak /v1/completions with stream: true).

    switchyard serve --model M --max-concurrent 16 &
    python3 tools/bench_serve.py --url http://127.0.0.1:8080 --streams 1,4,16 --seconds 30

Each client sends greedy completions of --max-tokens tokens back to back until the
time is up; tokens are counted from the final usage chunk (stream_options.include_usage),
latencies from the SSE chunks (both servers send one per token, llama-server with
empty text for tokens it cannot render alone). Only loopback addresses are accepted.

A soak run is the same with one stream count, a long time and the server's pid:

    python3 tools/bench_serve.py --streams 64 --seconds 600 --server-pid $PID

It counts every response by HTTP status (and transport errors), samples the
server's resident memory every --rss-every seconds, and prints its level after
the first minute, at the end and at its peak; it exits non-zero on any 5xx, any
transport error or a server that is gone.
"""
import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def client(url, model, max_tokens, deadline, out, lock, index):
    body = {"prompt": f"Story {index}: once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    data = json.dumps(body).encode()
    while time.time() < deadline:
        req = urllib.request.Request(url + "/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        stamps = []
        used = None
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                status = r.status
                for line in r:
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        break
                    chunk = json.loads(payload)
                    if chunk.get("usage"):
                        used = chunk["usage"].get("completion_tokens")
                    # A chunk per token, even where its text is empty (llama-server
                    # sends "" for tokens it cannot render on their own).
                    if chunk.get("choices"):
                        stamps.append(time.perf_counter())
        except urllib.error.HTTPError as e:
            status = e.code
            # 429 is the server's back-pressure: wait as told, then go on.
            retry = e.headers.get("Retry-After") if e.headers else None
            time.sleep(min(float(retry or 1), 5))
        except (urllib.error.URLError, OSError, ValueError) as e:
            status = f"error: {type(e).__name__}"
            time.sleep(1)
        with lock:
            out["status"][status] = out["status"].get(status, 0) + 1
        if not stamps:
            continue
        with lock:
            out["ttft"].append(stamps[0] - start)
            out["itl"].extend(b - a for a, b in zip(stamps, stamps[1:]))
            out["tokens"] += used if used is not None else len(stamps)


def rss_kib(pid):
    """The process's resident set in KiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def sample_rss(pid, every, deadline, samples):
    start = time.time()
    while time.time() < deadline:
        samples.append((time.time() - start, rss_kib(pid)))
        time.sleep(every)
    samples.append((time.time() - start, rss_kib(pid)))


def run(url, model, streams, seconds, max_tokens, server_pid=None, rss_every=5.0):
    out = {"ttft": [], "itl": [], "tokens": 0, "status": {}}
    lock = threading.Lock()
    start = time.time()
    deadline = start + seconds
    threads = [threading.Thread(target=client, args=(url, model, max_tokens, deadline, out, lock, i))
               for i in range(streams)]
    rss = []
    if server_pid is not None:
        threads.append(threading.Thread(target=sample_rss, args=(server_pid, rss_every, deadline, rss)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - start
    return {
        "status": out["status"],
        "rss": rss,
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
    ap.add_argument("--server-pid", type=int, default=None,
                    help="sample this process's RSS (a soak run) and fail on 5xx or transport errors")
    ap.add_argument("--rss-every", type=float, default=5.0)
    args = ap.parse_args()
    host = urllib.parse.urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"{host}: only loopback servers are benchmarked")
    if not 0 < args.seconds <= 900:
        raise SystemExit("--seconds must be in (0, 900]")
    if args.server_pid is not None and rss_kib(args.server_pid) is None:
        raise SystemExit(f"no process {args.server_pid} to sample")
    failed = False
    print("| streams | aggregate tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | requests |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in [int(s) for s in args.streams.split(",")]:
        r = run(args.url, args.model, n, args.seconds, args.max_tokens, args.server_pid, args.rss_every)
        print(f"| {n} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} "
              f"| {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | {r['requests']} |", flush=True)
        if args.server_pid is None:
            continue
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["status"].items(), key=str))
        print(f"responses by status: {statuses}")
        bad = {k: v for k, v in r["status"].items() if not isinstance(k, int) or k >= 500}
        rss = r["rss"]
        if any(v is None for _, v in rss):
            print("the server is gone")
            failed = True
        else:
            after_minute = next((v for t, v in rss if t >= 60), rss[-1][1])
            peak, end = max(v for _, v in rss), rss[-1][1]
            print(f"server RSS: {after_minute / 1024:.1f} MiB after the first minute, "
                  f"{end / 1024:.1f} MiB at the end ({100 * (end / after_minute - 1):+.1f} %), "
                  f"peak {peak / 1024:.1f} MiB, {len(rss)} samples")
        if bad:
            print(f"failures: {bad}")
            failed = True
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
