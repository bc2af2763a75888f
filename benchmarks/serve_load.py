"""Load test of `scalelab serve`'s continuous batching: 1, 4 and 8 concurrent streaming clients, each wanting
128 tokens, on 127.0.0.1, bounded in time.

For each concurrency: aggregate completion tokens/s, p50/p95 time to first token, p50/p95 inter-token latency.
"One at a time" is the single-client rate: the target is ≥ 4× that aggregate with 8 clients. Rounds are
interleaved (1, 4, 8, 1, 4, 8, ...) and medians over rounds are quoted, since other processes share the cores.
Every request asks for exactly `--tokens` tokens (`ignore_eos` is not an OpenAI field, so the prompt asks for
a long answer and the rate counts the tokens actually produced).

    .venv/bin/python benchmarks/serve_load.py [--model smollm2] [--tokens 128] [--rounds 2] [--clients 1,4,8]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time

from servers import start_server

PROMPT = "Write a long story about a dragon who learns to cook. Go on for a long time."


def stream_one(port: int, tokens: int, seed: int, out: list) -> None:
    """One streaming chat request: (first-token latency, inter-token gaps, tokens, wall)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens, "temperature": 1.0,
            "seed": seed, "stream": True}
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    stamps, n = [], 0
    buf = b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            d = json.loads(event[6:])
            for ch in d.get("choices", []):
                if ch.get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
            if d.get("usage"):
                n = d["usage"]["completion_tokens"]
    c.close()
    wall = time.perf_counter() - t0
    out.append((stamps[0] - t0 if stamps else float("nan"), [b - a for a, b in zip(stamps, stamps[1:])], n, wall))


def run_round(port: int, clients: int, tokens: int, seed: int) -> dict:
    out: list = []
    threads = [threading.Thread(target=stream_one, args=(port, tokens, seed + i, out)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(o[0] for o in out)
    gaps = sorted(g for o in out for g in o[1])
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))] if xs else float("nan")  # noqa: E731
    return {"tok_s": sum(o[2] for o in out) / wall, "ttft50": q(ttft, 0.5), "ttft95": q(ttft, 0.95),
            "itl50": q(gaps, 0.5), "itl95": q(gaps, 0.95), "tokens": sum(o[2] for o in out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", default="1,4,8")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]

    server, port = start_server(args.model)
    try:
        run_round(port, 1, 8, 0)  # warm-up
        results: dict[int, list[dict]] = {c: [] for c in levels}
        for r in range(args.rounds):
            for c in levels:
                results[c].append(run_round(port, c, args.tokens, 1000 * r))
                print(f"round {r + 1}: {c} clients: {results[c][-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)

    med = {c: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for c, rs in results.items()}
    base = med[levels[0]]["tok_s"]
    print(f"{args.model}, {args.tokens} tokens per client, medians of {args.rounds} interleaved rounds\n")
    print("| clients | aggregate tok/s | vs 1 client | TTFT p50 | TTFT p95 | inter-token p50 | inter-token p95 |")
    print("|---|---|---|---|---|---|---|")
    for c, m in med.items():
        print(f"| {c} | {m['tok_s']:.1f} | {m['tok_s'] / base:.2f}× | {m['ttft50'] * 1000:.0f} ms | "
              f"{m['ttft95'] * 1000:.0f} ms | {m['itl50'] * 1000:.0f} ms | {m['itl95'] * 1000:.0f} ms |")
    if 8 in med and levels[0] == 1:
        ratio = med[8]["tok_s"] / base
        print(f"\n8 clients vs one at a time: {ratio:.2f}× (target ≥ 4×): {'PASS' if ratio >= 4 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
