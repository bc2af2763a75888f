"""Tokens actually computed by a sampling-based search run vs the naive count, and its wall-clock.

Naive = every prompt of every sample prefilled from scratch (n × prompt tokens per call) plus the completions.
Computed = prompt tokens not served by the engine's prefix cache (each call prefills its prompt once for all
of its n samples, and a verification prompt reuses the cached KV of the question) plus the completions.
Target (issue 7): computed ≤ 0.5 × naive for k_inf = 16, k_verif = 4 on the embedded model.

    python benchmarks/search_tokens.py [--n 1] [--k 16] [--kv 4] [--max-tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="search-tokens-"))
    cfg = search.SearchConfig(backend=a.backend, task=a.tasks, n_problems=a.n, k_inf=a.k, k_verif=a.kv, k_tie=2,
                              max_tokens=a.max_tokens, verify_max_tokens=a.max_tokens, threads=a.threads,
                              tiebreak=False)
    t0 = time.perf_counter()
    gen = search.search_backend(cfg.backend)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    search.run_search(cfg, out, gen=gen, ver=gen)
    wall = time.perf_counter() - t0
    tr = search.Transcripts(out / "transcripts.jsonl")
    u = search.usage_by_phase(tr)
    print(f"{a.backend}: {a.n} problem(s), k_inf={a.k}, k_verif={a.kv}, max_tokens={a.max_tokens}, "
          f"threads={a.threads}; run dir {out}")
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
    print(f"wall-clock {wall:.1f} s for the search (+ {t_load:.1f} s loading the model)")


if __name__ == "__main__":
    main()
