"""Analysis of a sampling-based search run, from its transcripts only (Zhao et al. 2025, §2 and §5): every
method's accuracy at k_inf (Table 1's layout), the subsampled scaling curves over k_inf and k_verif, the
verifier's AUROC, implicit scaling, token usage per phase and its dollar cost, and each method's cost per
problem at every curve point (the cost frontier).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from scalelab.backends import price_name
from scalelab.report import write_json
from scalelab.search import cost as costmod
from scalelab.search.run import ProblemRecord, Transcripts, replay
from scalelab.search.select import auroc_bootstrap, expected_pick_accuracy, paired_bootstrap, vote_accuracy

def usage_by_phase(tr: Transcripts) -> dict[str, dict[str, int]]:
    out = {ph: {"calls": 0, "prompt": 0, "cached": 0, "completion": 0, "naive_prompt": 0} for ph in costmod.PHASES}
    for r in tr.records.values():
        u, o = r["usage"], out[r["phase"]]
        o["calls"] += 1
        for k in ("prompt", "cached", "completion", "naive_prompt"):
            o[k] += int(u.get(k, 0))
    return out


def curves(recs: list[ProblemRecord], ks: list[int], seeds: int, seed: int = 0,
           verif_ks: list[int] | None = None) -> dict:
    """Subsampled scaling curves (the paper's §2 protocol): for each k and seed, k of the k_inf candidates
    (without replacement) with their scores; tie-breaking omitted, as in the paper's figures."""
    rng = np.random.default_rng(seed)
    names = ("pass", "consistency", "verification", "weighted_vote")
    res = {n: [] for n in names}
    res["verification_given_pass"] = []
    for k in ks:
        acc = {n: [] for n in names}
        cond = []
        for r in recs:
            K = len(r.responses)
            if K == 0:
                continue
            corr = np.array(r.correct, dtype=float)
            sc = np.array([np.nan if r.dropped[i] else s for i, s in enumerate(r.scores())])
            for _ in range(seeds):
                idx = rng.choice(K, size=min(k, K), replace=False)
                p = float(corr[idx].max())
                v = expected_pick_accuracy(sc[idx], corr[idx])
                acc["pass"].append(p)
                acc["consistency"].append(vote_accuracy([r.keys[i] for i in idx], corr[idx]))
                acc["verification"].append(v)
                acc["weighted_vote"].append(vote_accuracy([r.keys[i] for i in idx], corr[idx],
                                                          np.nan_to_num(sc[idx])))
                if p > 0:
                    cond.append(v)
        for n in names:
            res[n].append(float(np.mean(acc[n])) if acc[n] else 0.0)
        res["verification_given_pass"].append(float(np.mean(cond)) if cond else float("nan"))
    res["k"] = list(ks)
    if verif_ks:  # the verification axis: k_inf candidates, kv of their verifications each
        res["kv"], res["verification_by_kv"] = list(verif_ks), []
        for kv in verif_ks:
            vals = []
            for r in recs:
                corr = np.array(r.correct, dtype=float)
                for _ in range(seeds):
                    sc = np.array([np.nan if r.dropped[i] or not v else
                                   float(np.mean(rng.choice(v, size=min(kv, len(v)), replace=False)))
                                   for i, v in enumerate(r.verdicts)])
                    vals.append(expected_pick_accuracy(sc, corr))
            res["verification_by_kv"].append(float(np.mean(vals)) if vals else 0.0)
    return res


def analyse(run_dir: Path, trigger: str | None = None) -> dict:
    """Every metric of a run, from its transcripts only. Written to `metrics.json` (`metrics-s31.json` when
    rescored with the other trigger)."""
    run_dir = Path(run_dir)
    cfg, task, recs, tr = replay(run_dir, trigger)
    n = len(recs)
    per = {"pass1": [], "passk": [], "cons": [], "verif": [], "verif_tb": [], "wvote": []}
    for r in recs:
        corr = np.array(r.correct, dtype=float)
        sc = np.array([np.nan if r.dropped[i] else s for i, s in enumerate(r.scores())])
        per["pass1"].append(float(corr.mean()))
        per["passk"].append(float(corr.max()))
        per["cons"].append(vote_accuracy(r.keys, corr))
        per["verif"].append(expected_pick_accuracy(sc, corr))
        per["wvote"].append(vote_accuracy(r.keys, corr, np.nan_to_num(sc)))
        per["verif_tb"].append(float(r.correct[r.pick]) if cfg.tiebreak and r.pick >= 0 else per["verif"][-1])
    arr = {k: np.array(v) for k, v in per.items()}
    K = cfg.k_inf
    ks = sorted({1, 2, 4, 8, 16, 32, 64, 128, 200, K} & set(range(1, K + 1)))
    kvs = sorted({1, 2, 4, 8, 16, 32, 50, cfg.k_verif} & set(range(1, cfg.k_verif + 1)))
    cv = curves(recs, ks, cfg.seeds, cfg.seed, kvs if cfg.verifier != "checker" else None)
    au = auroc_bootstrap([[s for i, s in enumerate(r.scores()) if not r.dropped[i]] for r in recs],
                         [[c for i, c in enumerate(r.correct) if not r.dropped[i]] for r in recs])
    usage = usage_by_phase(tr)
    prices = costmod.load_prices(cfg.prices_file or None)
    gen_price = cfg.price or price_name(cfg.backend)
    ver_price = cfg.verifier_price or gen_price
    dollars = None
    if gen_price in prices and ver_price in prices:
        led = costmod.Ledger()
        for ph, u in usage.items():
            led.record("all", ph, u["prompt"], u["completion"], u["cached"], u["calls"])
        dollars = led.dollars(prices[gen_price], prices[ver_price])
    gap = paired_bootstrap(arr["verif_tb"], arr["cons"]) if n else (0, 0, 0)
    gap_nt = paired_bootstrap(arr["verif"], arr["cons"]) if n else (0, 0, 0)
    tie_played = sum(1 for r in recs if r.played)
    # the paper's ambiguous questions (§2): drop those Consistency@k_inf gets right and those whose samples are
    # all correct or all wrong
    amb = [i for i, r in enumerate(recs) if per["cons"][i] < 1 and 0 < per["pass1"][i] < 1]
    m = {
        "config": dataclasses.asdict(cfg), "problems": n, "problems_in_run": len(task.problems), "samples": sum(len(r.responses) for r in recs),
        "unextracted": sum(a is None for r in recs for a in r.answers),
        "unparsed_verdicts": sum(r.unparsed for r in recs),
        "dropped_by_prelim": sum(sum(r.dropped) for r in recs),
        "accuracy": {"Pass@1": float(arr["pass1"].mean()), f"Pass@{K}": float(arr["passk"].mean()),
                     f"Consistency@{K}": float(arr["cons"].mean()),
                     f"Verification@{K} (no tie-break)": float(arr["verif"].mean()),
                     f"Verification@{K}": float(arr["verif_tb"].mean()),
                     f"Score-weighted vote@{K}": float(arr["wvote"].mean())},
        "gap_verification_minus_consistency": {"mean": gap[0], "ci95": [gap[1], gap[2]]},
        "gap_no_tiebreak": {"mean": gap_nt[0], "ci95": [gap_nt[1], gap_nt[2]]},
        "tiebreaks_played": tie_played,
        "verifier_auroc": au[0],
        "verifier_auroc_ci95": [au[1], au[2]],  # a bootstrap over problems
        "ambiguous_questions": len(amb),
        "curves": cv, "usage": usage, "dollars": dollars, "price": {"generate": gen_price, "verify": ver_price},
        "per_problem": per,
    }
    write_json(run_dir / ("metrics.json" if trigger is None else f"metrics-{trigger}.json"), m)
    return m


def method_costs(m: dict) -> dict:
    """Tokens and dollars per problem for each method at each curve k (generation and verification scale
    with k; tie-break cost is only known at k = k_inf)."""
    c, u, n = m["config"], m["usage"], max(1, m["problems"])
    k_inf, kv = c["k_inf"], c["k_verif"]
    gen_tok = (u["generate"]["prompt"] + u["generate"]["completion"]) / (n * k_inf)
    ver_tok = (u["verify"]["prompt"] + u["verify"]["completion"]) / (n * k_inf)  # all k_verif of one candidate
    d = m.get("dollars") or {}
    gen_usd = d.get("generate", 0.0) / (n * k_inf)
    ver_usd = d.get("verify", 0.0) / (n * k_inf)
    ks = m["curves"]["k"]
    return {"k": ks, "kv": kv,
            "consistency_tokens": [k * gen_tok for k in ks], "verification_tokens": [k * (gen_tok + ver_tok) for k in ks],
            "consistency_usd": [k * gen_usd for k in ks], "verification_usd": [k * (gen_usd + ver_usd) for k in ks],
            "gen_tokens_per_sample": gen_tok, "verify_tokens_per_candidate": ver_tok}
