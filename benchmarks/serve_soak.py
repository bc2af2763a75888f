"""Soak test of `scalelab serve`: minutes of mixed traffic from several clients at once, 127.0.0.1 only.

Traffic, drawn at random per request: normal chat and completions, streamed chat, streams the client hangs up
on after a few chunks, non-streamed requests it hangs up on while waiting, malformed bodies, oversized bodies,
and requests over the server's limits. Reported: requests by kind and outcome, errors by class, p50/p95
latency of the normal ones, the server's RSS (after a warm-up of the same traffic, during, and at the end:
growth must stay ≤ 10%) and open file descriptors at start and end, and, at the end, whether the server still gives the same greedy answer it gave at the start.

    .venv/bin/python benchmarks/serve_soak.py [--model smollm2] [--seconds 120] [--clients 8]

Exits 1 when a check fails (a 5xx, RSS growth > 10%, leaked descriptors, a changed answer).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import socket
import statistics
import sys
import threading
import time

from servers import ROOT, start_server

GREEDY = {"messages": [{"role": "user", "content": "Name three prime numbers."}], "max_tokens": 24, "temperature": 0}


def post(port: int, path: str, raw: bytes, timeout: float = 120) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def hang_up_after(port: int, body: dict, chunks: int, wait_s: float) -> str:
    """Send a request on a raw socket, read `chunks` SSE events (or wait `wait_s`), then reset the connection."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        data = json.dumps(body).encode()
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
                  f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        if chunks:
            got = b""
            while got.count(b"data: ") < chunks:
                b = s.recv(4096)
                if not b:
                    return "closed early"
                got += b
        else:
            time.sleep(wait_s)
        return "hung up"
    finally:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()


def proc_stats(pid: int) -> tuple[int, int]:
    """(RSS in bytes, open file descriptors) of a process, from /proc."""
    rss = next(int(line.split()[1]) * 1024 for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def client(port: int, until: float, seed: int, log: list, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    msgs = [{"role": "user", "content": rng.choice(["hi", "What is 2+2?", "Name a colour.", "Tell me a joke."])}]
    while time.time() < until:
        kind = rng.choices(["chat", "completion", "stream", "hangup-stream", "hangup-wait", "malformed", "oversized",
                            "over-limit"], [3, 2, 2, 1, 1, 1, 1, 1])[0]
        t0 = time.time()
        outcome = "?"
        try:
            if kind == "chat":
                status, _ = post(port, "/v1/chat/completions", json.dumps(
                    {"messages": msgs, "max_tokens": rng.randint(4, 32), "n": rng.choice([1, 2])}).encode())
                outcome = str(status)
            elif kind == "completion":
                status, _ = post(port, "/v1/completions", json.dumps(
                    {"prompt": "The capital of France is", "max_tokens": rng.randint(4, 24)}).encode())
                outcome = str(status)
            elif kind == "stream":
                status, body = post(port, "/v1/chat/completions", json.dumps(
                    {"messages": msgs, "max_tokens": rng.randint(4, 32), "stream": True}).encode())
                outcome = str(status) if body.rstrip().endswith(b"data: [DONE]") else f"{status} unterminated"
            elif kind == "hangup-stream":
                outcome = hang_up_after(port, {"messages": msgs, "max_tokens": 400, "n": 2, "stream": True}, 3, 0)
            elif kind == "hangup-wait":
                outcome = hang_up_after(port, {"messages": msgs, "max_tokens": 400}, 0, rng.uniform(0.05, 1.0))
            elif kind == "malformed":
                raw = rng.choice([b"{not json", b"[1,2]", b'{"messages": 5}', b'{"prompt": [-1]}', b"\xff\xfe",
                                  b'{"messages": [{"role": "wizard", "content": "x"}]}'])
                outcome = str(post(port, rng.choice(["/v1/chat/completions", "/v1/completions"]), raw)[0])
            elif kind == "oversized":
                outcome = str(post(port, "/v1/completions", json.dumps({"prompt": "x" * (2 << 20)}).encode())[0])
            else:
                outcome = str(post(port, "/v1/chat/completions", json.dumps(
                    {"messages": msgs, "max_tokens": 10 ** 9}).encode())[0])
        except (OSError, http.client.HTTPException) as e:
            outcome = f"client error {type(e).__name__}"
        with lock:
            log.append((kind, outcome, time.time() - t0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of the same traffic before the baseline")
    args = ap.parse_args()

    errlog = open(ROOT / "runs" / "serve_soak.log" if (ROOT / "runs").is_dir() else os.devnull, "w")
    server, port = start_server(args.model, stderr=errlog)
    try:
        status, first = post(port, "/v1/chat/completions", json.dumps(GREEDY).encode())
        answer0 = json.loads(first)["choices"][0]["message"]["content"]
        lock = threading.Lock()
        # warm-up: the same traffic for a while, so the baseline RSS includes the allocator's working set for a
        # full batch (freed KV caches stay mapped in the allocator: that is not a leak)
        warm: list = []
        until = time.time() + args.warmup
        threads = [threading.Thread(target=client, args=(port, until, 100 + i, warm, lock)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(1.0)
        rss0, fd0 = proc_stats(server.pid)
        log: list = []
        until = time.time() + args.seconds
        threads = [threading.Thread(target=client, args=(port, until, i, log, lock)) for i in range(args.clients)]
        for t in threads:
            t.start()
        samples = []
        while any(t.is_alive() for t in threads):  # RSS over the soak: a leak grows, a working set plateaus
            samples.append(proc_stats(server.pid)[0])
            time.sleep(args.seconds / 8)
        for t in threads:
            t.join()
        time.sleep(1.0)  # let hung-up requests be dropped
        rss1, fd1 = proc_stats(server.pid)
        status, last = post(port, "/v1/chat/completions", json.dumps(GREEDY).encode())
        answer1 = json.loads(last)["choices"][0]["message"]["content"] if status == 200 else None
    finally:
        server.terminate()
        server.wait(timeout=30)

    by = collections.Counter((k, o) for k, o, _ in log)
    print(f"{len(log)} requests from {args.clients} clients in {args.seconds:.0f} s against {args.model}\n")
    print("| kind | outcome | count |\n|---|---|---|")
    for (k, o), n in sorted(by.items()):
        print(f"| {k} | {o} | {n} |")
    classes = collections.Counter(o[0] + "xx" if o[:1].isdigit() else o for _, o, _ in log)
    normal = sorted(s for k, o, s in log if k in ("chat", "completion", "stream") and o == "200")
    p50 = statistics.median(normal) if normal else float("nan")
    p95 = normal[int(0.95 * (len(normal) - 1))] if normal else float("nan")
    print(f"\noutcomes by class: {dict(classes)}")
    print(f"normal requests served: {len(normal)}; latency p50 {p50:.2f} s, p95 {p95:.2f} s")
    growth = rss1 / rss0 - 1
    print(f"server RSS after a {args.warmup:.0f} s warm-up {rss0 / 2**20:.0f} MiB → {rss1 / 2**20:.0f} MiB "
          f"({growth:+.1%}); during the soak: {', '.join(f'{x / 2**20:.0f}' for x in samples)} MiB; "
          f"open fds {fd0} → {fd1}")
    print(f"same greedy answer at the end: {answer1 == answer0} ({answer1!r})")
    fails = [msg for bad, msg in [(classes.get("5xx", 0) > 0, "5xx answers"), (growth > 0.10, "RSS grew > 10%"),
                                  (fd1 > fd0 + 4, "file descriptors leaked"), (answer1 != answer0, "answer changed"),
                                  (not normal, "no normal request served")] if bad]
    print("PASS" if not fails else "FAIL: " + ", ".join(fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
