"""Selection math of sampling-based search (Zhao et al. 2025, Algorithm 1 and §2), as pure functions.

Algorithm 1's shortlist (scores within `threshold` of the best), the two tie-break triggers (Algorithm 1's
|S_best| > 1, and §3.1's "top three within 0.05 and disagreeing"), the round-robin tournament, and the
baselines' accuracies from the same samples: Pass@k (with Chen et al.'s unbiased estimator), Consistency@k
and score-weighted votes, the expected accuracy of a uniform pick among tied maxima, the verifier's AUROC and
a paired bootstrap over problems. Nothing here calls a model or touches a file.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

def shortlist(scores: list[float], threshold: float = 0.05) -> list[int]:
    """Algorithm 1 step 3: indices scoring within `threshold` of the best."""
    best = max(scores)
    return [i for i, s in enumerate(scores) if s >= best - threshold - 1e-12]


def needs_tiebreak(scores: list[float], keys: list, trigger: str, threshold: float = 0.05) -> bool:
    """alg1: more than one candidate in the shortlist. s31: the top three are within `threshold` of one
    another and do not all share a final answer."""
    if trigger == "alg1":
        return len(shortlist(scores, threshold)) > 1
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:3]
    if len(order) < 2:
        return False
    close = scores[order[0]] - scores[order[-1]] <= threshold + 1e-12
    return close and len({keys[i] for i in order}) > 1


def tournament(cands: list[int], votes: Callable[[int, int], tuple[float, float]],
               scores: list[float]) -> tuple[int, dict[int, float]]:
    """Round robin over `cands`; votes(i, j) -> (votes for i, votes for j). Returns the winner and wins."""
    wins = {i: 0.0 for i in cands}
    tally = {i: 0.0 for i in cands}
    for a_pos, i in enumerate(cands):
        for j in cands[a_pos + 1:]:
            vi, vj = votes(i, j)
            tally[i] += vi
            tally[j] += vj
            if vi > vj:
                wins[i] += 1
            elif vj > vi:
                wins[j] += 1
            else:
                wins[i] += 0.5
                wins[j] += 0.5
    best = max(cands, key=lambda i: (wins[i], tally[i], scores[i], -i))
    return best, wins


def select(scores: list[float], keys: list, trigger: str, threshold: float,
           votes: Callable[[int, int], tuple[float, float]] | None) -> tuple[int, list[int]]:
    """Algorithm 1's pick (first index among maxima without a tie-break). Returns (pick, shortlist played)."""
    sl = shortlist(scores, threshold)
    if votes is not None and needs_tiebreak(scores, keys, trigger, threshold):
        return tournament(sl, votes, scores)[0], sl
    return max(range(len(scores)), key=lambda i: (scores[i], -i)), []


def pick(method: str, scores: list[float], keys: list, dropped: list[bool] | None = None) -> int:
    """One candidate for a method without a tournament (what a served request returns; `select` plays
    Algorithm 1's). `sss` / `best-of-n`: the top score, lowest index first. `consistency`: the most common
    final answer (equal counts: the one seen first), its first candidate. `pyes-vote`: the final answer with
    the largest sum of scores (equal sums: the one seen first), its best-scoring candidate. Candidates dropped
    by preliminary scoring are not picked; with no extracted answer, votes fall back to the top score."""
    live = [i for i in range(len(scores)) if not (dropped and dropped[i])] or list(range(len(scores)))
    if not live:
        return 0
    best = max(live, key=lambda i: (scores[i], -i))
    if method in ("sss", "best-of-n"):
        return best
    if method not in ("consistency", "pyes-vote"):
        raise ValueError(f"unknown method {method!r}")
    tot: dict[Any, float] = {}
    for i in live:
        if keys[i] is not None:
            tot[keys[i]] = tot.get(keys[i], 0.0) + (1.0 if method == "consistency" else scores[i])
    if not tot:
        return best
    top = max(tot.values())
    winner = next(k for k in tot if tot[k] >= top - 1e-12)  # dicts keep first-seen order
    members = [i for i in live if keys[i] == winner]
    return members[0] if method == "consistency" else max(members, key=lambda i: (scores[i], -i))


def expected_pick_accuracy(values: np.ndarray, correct: np.ndarray) -> float:
    """Accuracy of picking uniformly among the arg-max of `values` (NaN = not selectable)."""
    ok = ~np.isnan(values)
    if not ok.any():
        return 0.0
    m = np.nanmax(values)
    tied = ok & (values >= m - 1e-12)
    return float(correct[tied].mean())


def vote_accuracy(keys: list, correct: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Consistency@k (weights None) or weighted voting: the answer with the largest (weighted) count wins;
    a tie counts as a uniform pick among the tied answers. Unextracted answers (None) do not vote."""
    tot: dict[Any, float] = defaultdict(float)
    ok: dict[Any, bool] = {}
    for i, k in enumerate(keys):
        if k is None:
            continue
        tot[k] += 1.0 if weights is None else float(weights[i])
        ok[k] = bool(correct[i])
    if not tot:
        return 0.0
    m = max(tot.values())
    tied = [k for k, v in tot.items() if v >= m - 1e-12]
    return sum(ok[k] for k in tied) / len(tied)


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """1 − C(n−c, k)/C(n, k) (Chen et al. 2021): the exact expectation the subsampled curve estimates."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Probability a correct sample outscores a wrong one (ties count half). NaN without both classes."""
    return _auroc_ranked(np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool))


def _auroc_ranked(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC by the Mann-Whitney identity: (sum of the correct samples' midranks − n₊(n₊+1)/2) / (n₊·n₋)."""
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]  # 1-based midranks, ties share their mean rank
    return float((mid[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_bootstrap(scores: list[list[float]], labels: list[list[bool]], reps: int = 1000,
                    seed: int = 0) -> tuple[float, float, float]:
    """AUROC over every sample and its 95% percentile interval, resampling problems (a problem's samples share
    its difficulty, so they are not independent). `scores[i]`/`labels[i]` are problem i's samples."""
    lens = np.array([len(s) for s in scores])
    flat_s = np.array([x for s in scores for x in s], dtype=float)
    flat_y = np.array([y for ys in labels for y in ys], dtype=bool)
    point = _auroc_ranked(flat_s, flat_y)
    if len(scores) < 2 or point != point:
        return point, float("nan"), float("nan")
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(reps):
        pick = rng.integers(0, len(scores), size=len(scores))
        idx = np.concatenate([np.arange(starts[i], starts[i] + lens[i]) for i in pick])
        a = _auroc_ranked(flat_s[idx], flat_y[idx])
        if a == a:
            boots.append(a)
    if not boots:
        return point, float("nan"), float("nan")
    return point, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over problems and its 95% percentile bootstrap interval (problems resampled)."""
    d = a - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(reps, len(d)))].mean(axis=1)
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))
