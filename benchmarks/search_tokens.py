"""Tokens actually computed by a sampling-based search run vs the naive count, and its wall-clock.

Naive = every prompt of every sample prefilled from scratch (n × prompt tokens per call) plus the completions.
Computed = prompt tokens not served by the engine's prefix cache (each call prefills its prompt once for all
of its n samples, and a verification prompt reuses the cached KV of the question) plus the completions.
Target: computed ≤ 0.5 × naive for k_inf = 16, k_verif = 4 on the embedded model.

Wall-clock per problem, sequential (one call after another) vs batched (a problem's verifications, and a
tie-break round, in one continuous batch), interleaved over `--rounds` fresh runs each; medians. The two must
select identically (the same seeds give the same samples). Target: batched ≥ 4× less wall-clock per problem.

    python benchmarks/search_tokens.py [--n 1] [--k 16] [--kv 4] [--max-tokens 64] [--threads 0] [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from scalelab import search


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="smollm2")
    ap.add_argument("--tasks", default="arithmetic")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tiebreak", action="store_true", help="also run the tie-breaks (Algorithm 1)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    root = Path(a.out or tempfile.mkdtemp(prefix="search-tokens-"))
    cfg = search.SearchConfig(backend=a.backend, task=a.tasks, n_problems=a.n, k_inf=a.k, k_verif=a.kv, k_tie=2,
                              max_tokens=a.max_tokens, verify_max_tokens=a.max_tokens, threads=a.threads,
                              tiebreak=a.tiebreak)
    t0 = time.perf_counter()
    gen = search.search_backend(cfg.backend)
    t_load = time.perf_counter() - t0
    walls: dict[str, list[float]] = {"sequential": [], "batched": []}
    picks: dict[str, list] = {}
    for r in range(a.rounds):
        for mode in ("sequential", "batched"):
            out = root / f"{mode}-{r}"
            gen.engine.prefix.store.clear()  # every run starts cold
            t0 = time.perf_counter()
            recs = search.run_search(cfg, out, gen=gen, ver=gen, batched=mode == "batched")
            walls[mode].append((time.perf_counter() - t0) / a.n)
            picks[mode] = [(rec.pick, rec.scores()) for rec in recs]
    tr = search.Transcripts(root / "batched-0" / "transcripts.jsonl")
    u = search.usage_by_phase(tr)
    print(f"{a.backend}: {a.n} problem(s), k_inf={a.k}, k_verif={a.kv}, max_tokens={a.max_tokens}, "
          f"threads={a.threads or 'default'}; run dirs under {root}")
    print(f"{'phase':<10}{'calls':>7}{'prompt':>9}{'cached':>9}{'completion':>12}{'computed':>10}{'naive':>10}{'ratio':>7}")
    tot_c = tot_n = 0
    for ph, x in u.items():
        comp = x["prompt"] - x["cached"] + x["completion"]
        naive = x["naive_prompt"] + x["completion"]
        tot_c, tot_n = tot_c + comp, tot_n + naive
        if x["calls"]:
            print(f"{ph:<10}{x['calls']:>7}{x['prompt']:>9}{x['cached']:>9}{x['completion']:>12}{comp:>10}{naive:>10}"
                  f"{comp / naive:>7.2f}")
    print(f"total computed {tot_c:,} vs naive {tot_n:,} tokens: {tot_c / tot_n:.2f}x (target <= 0.5x)")
    seq, bat = statistics.median(walls["sequential"]), statistics.median(walls["batched"])
    print(f"wall-clock per problem (median of {a.rounds}): sequential {seq:.1f} s, batched {bat:.1f} s: "
          f"{seq / bat:.2f}x less (target >= 4x); model load {t_load:.1f} s")
    print(f"same selections and scores: {picks['sequential'] == picks['batched']}")


if __name__ == "__main__":
    main()
