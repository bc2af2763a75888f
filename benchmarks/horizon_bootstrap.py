"""Benchmark: 1,000 hierarchical bootstrap replicates of METR's time-horizon fits.

Data: METR's February 2025 runs file (7,063 runs, 11 agents incl. human) with every run copied `--copies` times
(3 → 21,189 runs), all models fitted on every replicate. Target (issue 6): ≤ 10 s on 2 cores.

Baseline, measured in the same process: the naive loop METR's pipeline runs (src/wrangle/bootstrap.py), i.e.
per replicate a loop-based family → task → run resample and one scikit-learn LogisticRegression(C=10) per model
on the row-level data. It is timed on `--naive-replicates` replicates and extrapolated linearly to the full count
(the output says so). METR spreads that loop over joblib workers; here both sides run in one process.

    .venv/bin/python benchmarks/horizon_bootstrap.py [--replicates 1000] [--copies 3] [--naive-replicates 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import warnings
from pathlib import Path

import numpy as np

from scalelab import horizon as H

FEB_RUNS = Path(__file__).resolve().parents[2] / "shared/data/metr/eval-analysis-public_19b0311_2025-02-27/all_runs.jsonl"


def replicate_runs(runs: H.Runs, copies: int) -> H.Runs:
    """Every run repeated `copies` times (as if each had been rerun), row order kept."""
    rep = lambda a: np.repeat(a, copies)  # noqa: E731
    return dataclasses.replace(runs, model=rep(runs.model), task=rep(runs.task), minutes=rep(runs.minutes),
                               success=rep(runs.success), weight=None)


def naive_resample(runs: H.Runs, rng: np.random.Generator) -> np.ndarray:
    """METR's resampling written as a plain loop with boolean masks (same draws as H.Resampler)."""
    fam_of_row = runs.task_family[runs.task]
    picked = []
    for f in rng.choice(len(runs.families), size=len(runs.families), replace=True):
        rows = np.flatnonzero(fam_of_row == f)
        tasks, inv = np.unique(runs.task[rows], return_inverse=True)
        for t in rng.choice(len(tasks), size=len(tasks), replace=True):
            picked.append(rows[inv == t])
    idx = np.concatenate(picked)
    keys = np.array([f"{runs.tasks[runs.task[i]]}|||{runs.models[runs.model[i]]}" for i in idx])
    _, g_inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    u, out, off = rng.random(len(idx)), [], 0
    for g, n in enumerate(counts):
        out.append(idx[g_inv == g][(u[off:off + n] * n).astype(np.int64)])
        off += n
    return np.concatenate(out)


def naive_bootstrap(runs: H.Runs, w: np.ndarray, n: int, seed: int, C: float) -> tuple[np.ndarray, float, float]:
    """p50s (n, M), seconds spent resampling, seconds spent in sklearn."""
    from sklearn.linear_model import LogisticRegression

    out = np.full((n, len(runs.models)), np.nan)
    x_all = np.log2(runs.minutes)
    t_resample = t_fit = 0.0
    for r in range(n):
        t0 = time.perf_counter()
        rows = naive_resample(runs, np.random.default_rng(seed + r))
        t1 = time.perf_counter()
        t_resample += t1 - t0
        for m in range(len(runs.models)):
            sel = rows[runs.model[rows] == m]
            y = runs.success[sel]
            if len(np.unique(y)) < 2:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lr = LogisticRegression(C=C).fit(x_all[sel].reshape(-1, 1), y, sample_weight=w[sel])
            out[r, m] = 2 ** (-lr.intercept_[0] / lr.coef_[0, 0])
        t_fit += time.perf_counter() - t1
    return out, t_resample, t_fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=FEB_RUNS)
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--naive-replicates", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("-C", type=float, default=10.0)
    args = ap.parse_args()

    runs = replicate_runs(H.load_runs(args.runs), args.copies)
    w = H.run_weights(runs, "invsqrt")
    fits = H.fit_models(runs, w, args.C)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"data: {args.runs.name} x{args.copies} = {len(runs)} runs, {len(runs.models)} models, "
          f"{len(runs.tasks)} tasks, {len(runs.families)} families; {cores} cores available")

    t0 = time.perf_counter()
    reps = H.bootstrap(runs, w, fits, [0.5, 0.8], args.replicates, args.seed, args.C)
    ours = time.perf_counter() - t0
    sampler = H.Resampler(runs)
    t0 = time.perf_counter()
    for r in range(args.replicates):
        sampler.draw(np.random.default_rng(args.seed + r))
    ours_resample = time.perf_counter() - t0
    print(f"scalelab (vectorised resample + batched Newton): {args.replicates} replicates in {ours:.2f} s "
          f"({1e3 * ours / args.replicates:.2f} ms/replicate; resampling alone {ours_resample:.2f} s)")

    k = min(args.naive_replicates, args.replicates)
    t0 = time.perf_counter()
    naive, t_res, t_fit = naive_bootstrap(runs, w, k, args.seed, args.C)
    naive_k = time.perf_counter() - t0
    scale = args.replicates / k
    naive_full = naive_k * scale
    print(f"naive loop (METR-style resample + sklearn per model): {k} replicates in {naive_k:.2f} s, "
          f"extrapolated to {args.replicates}: {naive_full:.1f} s (resampling {t_res * scale:.1f} s, "
          f"sklearn fits {t_fit * scale:.1f} s)")
    print(f"ratio naive/ours: {naive_full / ours:.0f}x overall; fits only: "
          f"{t_fit * scale / max(ours - ours_resample, 1e-9):.0f}x (sklearn {t_fit * scale:.1f} s vs "
          f"{ours - ours_resample:.2f} s)")

    mine = reps.values[0.5][:k]
    both = np.isfinite(mine) & np.isfinite(naive) & (naive > 1e-3)
    rel = np.abs(mine[both] / naive[both] - 1)
    print(f"agreement on the {k} shared replicates: same NaN pattern: {np.array_equal(np.isnan(mine), np.isnan(naive))}; "
          f"p50 relative difference median {np.median(rel):.1e}, max {rel.max():.1e} "
          f"(sklearn's default tol=1e-4 stops early; ours is converged)")


if __name__ == "__main__":
    main()
