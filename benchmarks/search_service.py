"""Search as a service: `scalelab serve` answering `sss:` requests, against the CLI `scalelab search` on the
same questions, in the same run.

For each question (arithmetic word problems, the search's own generator), interleaved in ABBA order over
`--repeats` rounds (CLI, endpoint, endpoint, CLI, ...; a drifting load on a shared machine then hits both
alike): the CLI searches it alone (`scalelab search` over a one-problem JSONL; its wall-clock is the sum of
its calls' seconds, so process start, model loading and the search logic between calls are left out), and
one client asks the endpoint the same question with the same settings (wall-clock measured by the client). The two make the same calls: the endpoint's message is the CLI's solve prompt,
`search.question` is the bare question the CLI's verifications quote, and the CLI's problem is named "served"
with the request's seed, so every call's seed is the same; the script checks that both select the same
candidate from the same samples. Then `--clients` clients ask all the questions at once.

Prints per-request wall-clock (each question's median over its repeats, then the median over questions), the
endpoint's overhead over the CLI (the median of the per-question ratios), the seconds of each phase's model
calls on both sides, requests per minute with one and with `--clients` clients, and the share of prompt
tokens the prefix cache saved.
Target: the endpoint adds <= 10% over the CLI per request.

    python benchmarks/search_service.py [--n 4] [--repeats 2] [--k 8] [--kv 2] [--max-tokens 96] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import ROOT, start_server  # noqa: E402

from scalelab.search import replay, tasks  # noqa: E402
from scalelab.search.formats import prompt_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=4, help="questions")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--kv", type=int, default=2)
    ap.add_argument("--k-tie", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="CLI/endpoint pairs per question, in ABBA order")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if min(a.n, a.repeats, a.clients, a.k, a.kv, a.k_tie) < 1:
        ap.error("--n, --repeats, --clients, --k, --kv and --k-tie must be >= 1")
    root = Path(a.out or tempfile.mkdtemp(prefix="search-service-"))
    problems = tasks.arithmetic_problems(a.n, seed=0)
    opts = {"k": a.k, "kv": a.kv, "k_tie": a.k_tie, "max_tokens": a.max_tokens, "verify_max_tokens": a.max_tokens}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # the KV budget of the CLI's batched calls (LocalBackend.generate_many: 1024 MiB), so both batch alike
    server, port = start_server(a.model, extra=("--log-dir", str(root / "served"), "--kv-mib", "1024"))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)

    def ask(i: int, seed: int) -> tuple[float, dict]:
        t0 = time.perf_counter()
        r = client.chat.completions.create(
            model=f"sss:{a.model}", messages=[{"role": "user", "content": prompt_file("sss-solve-v1.txt").format(
                question=problems[i].question)}],
            extra_body={"search": dict(opts, seed=seed, question=problems[i].question)})
        return time.perf_counter() - t0, r.model_extra["scalelab_search"]

    cli_s, one_s, cli_tok, one_tok, exts = [], [], [], [], []
    cli_phase, one_phase = [], []  # per question: seconds of each phase's model calls

    def computed(ext: dict) -> int:
        return sum(u["prompt_tokens"] - u["cached_tokens"] + u["completion_tokens"] for u in ext["tokens"].values())

    def run_cli(i: int, r: int) -> tuple[float, list[dict]]:
        d = root / f"cli-{i}-{r}"
        d.mkdir(parents=True)
        (d / "q.jsonl").write_text(json.dumps({"id": "served", "question": problems[i].question,
                                               "answer": problems[i].answer}) + "\n")
        subprocess.run([sys.executable, "-m", "scalelab.cli", "search", "--backend", a.model, "--tasks",
                        str(d / "q.jsonl"), "-n", "1", "--k", str(a.k), "--kv", str(a.kv), "--max-tokens",
                        str(a.max_tokens), "--verify-max-tokens", str(a.max_tokens), "--set",
                        f"search.k_tie={a.k_tie}", "--seed", str(i), "--out", str(d / "run")], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        calls = [json.loads(x) for x in (d / "run" / "transcripts.jsonl").read_text().splitlines()]
        return sum(c["seconds"] for c in calls), calls

    try:
        ask(0, 999)  # warm-up: the first request pays for lazy setup
        for i, p in enumerate(problems):
            cs, os_, ext, calls = [], [], None, None
            for r in range(a.repeats):  # ABBA: CLI first in even rounds, endpoint first in odd ones
                for side in (("cli", "one") if r % 2 == 0 else ("one", "cli")):
                    if side == "cli":
                        sec, calls = run_cli(i, r)
                        cs.append(sec)
                    else:
                        sec, ext = ask(i, i)
                        os_.append(sec)
            cli_s.append(statistics.median(cs))
            one_s.append(statistics.median(os_))
            cli_tok.append(sum(c["usage"]["prompt"] - c["usage"]["cached"] + c["usage"]["completion"] for c in calls))
            one_tok.append(computed(ext))
            exts.append(ext)
            by_phase: dict[str, float] = {}
            for c in calls:
                by_phase[c["phase"]] = by_phase.get(c["phase"], 0.0) + c["seconds"]
            cli_phase.append(by_phase)
            one_phase.append({k: v for k, v in ext["seconds"].items() if k != "total"})
            cli_texts = [o["text"] for c in calls if c["key"] == "gen:served" for o in c["outputs"]]
            same = cli_texts == [c["text"] for c in ext["candidates"]] and \
                replay(root / f"cli-{i}-{a.repeats - 1}" / "run")[2][0].pick == ext["selected"]
            print(f"question {i}: CLI {' / '.join(f'{x:.1f}' for x in cs)} s ({len(calls)} calls, {cli_tok[-1]} "
                  f"tokens computed), endpoint {' / '.join(f'{x:.1f}' for x in os_)} s "
                  f"({sum(u['calls'] for u in ext['tokens'].values())} calls, {one_tok[-1]} tokens; model calls "
                  f"{sum(one_phase[-1].values()):.1f} s, server total {ext['seconds']['total']:.1f} s); "
                  f"ratio {one_s[-1] / cli_s[-1]:.3f}; {'same' if same else 'DIFFERENT'} samples and pick", flush=True)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            many = list(pool.map(lambda i: ask(i % a.n, 100 + i), range(a.clients)))
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    exts += [e for _, e in many]
    prompt = sum(u["prompt_tokens"] for e in exts for u in e["tokens"].values())
    cached = sum(u["cached_tokens"] for e in exts for u in e["tokens"].values())
    cli, one = statistics.median(cli_s), statistics.median(one_s)
    ratio = statistics.median(o / c for o, c in zip(one_s, cli_s))
    print(f"\nper request (medians of {a.n} questions x {a.repeats} repeats, k={a.k}, kv={a.kv}, k_tie={a.k_tie}, "
          f"max_tokens={a.max_tokens}):")
    print(f"  CLI scalelab search   {cli:8.1f} s")
    print(f"  endpoint, 1 client    {one:8.1f} s   overhead {100 * (ratio - 1):+.1f}% (median of per-question "
          f"ratios; target <= +10%)")
    for ph in sorted({k for d in cli_phase for k in d}):
        c = statistics.median(d.get(ph, 0.0) for d in cli_phase)
        o = statistics.median(d.get(ph, 0.0) for d in one_phase)
        print(f"  {ph:<20s}  model calls: CLI {c:6.1f} s, endpoint {o:6.1f} s ({100 * (o / max(c, 1e-9) - 1):+.1f}%)")
    # where the endpoint's time goes: its model calls (as the CLI's are counted), the search around them on the
    # server, and the HTTP round trip
    calls_s = [sum(v for k, v in e["seconds"].items() if k != "total") for e in exts[:a.n]]
    total_s = [e["seconds"]["total"] for e in exts[:a.n]]
    print(f"  endpoint breakdown    model calls {statistics.median(calls_s):.1f} s "
          f"({100 * (statistics.median(c / x for c, x in zip(calls_s, cli_s)) - 1):+.1f}% vs the CLI's calls), "
          f"search logic {statistics.median(t - c for t, c in zip(total_s, calls_s)):.2f} s, "
          f"HTTP and client {statistics.median(o - t for o, t in zip(one_s, total_s)):.2f} s")
    rate_cli = statistics.median(t / s for t, s in zip(cli_tok, cli_s))
    rate_one = statistics.median(t / s for t, s in zip(one_tok, one_s))
    print(f"  computed tokens/s     CLI {rate_cli:.0f}, endpoint {rate_one:.0f}   overhead per token "
          f"{100 * (rate_cli / rate_one - 1):+.1f}%")
    print(f"  endpoint, {a.clients} clients   {statistics.median(s for s, _ in many):8.1f} s   "
          f"(all {a.clients} in {wall:.1f} s)")
    print(f"requests per minute: 1 client {60 / one:.2f}; {a.clients} clients {60 * a.clients / wall:.2f} "
          f"({one * a.clients / wall:.2f}x)")
    print(f"prefix cache: {cached} of {prompt} prompt tokens served from cache ({100 * cached / max(1, prompt):.1f}%)")
    print(f"logs: {root}")


if __name__ == "__main__":
    main()
