"""The report of a sampling-based search run (`report.md`, `curves.png`, `cost.png` in the run directory).

The report (`report.md` in the run directory) has the paper's Table 1 layout (Pass@1, Consistency@k,
Verification@k, plus Pass@k, Verification@k without tie-break and score-weighted voting), the subsampled
scaling curves (PNG), accuracy against tokens and against dollars for every method (the cost frontier),
tokens per phase with what the prefix cache saved, the prompts used, and example transcripts. Everything is
recomputed from `transcripts.jsonl`, so `scalelab search rescore RUN` rewrites it with no model call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scalelab.report import figure, savefig, write_text
from scalelab.search.analyse import analyse, method_costs
from scalelab.search.formats import make_format, prompt_file
from scalelab.search.run import replay
from scalelab.search.select import vote_accuracy


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(m: dict) -> str:
    lo, hi = m.get("verifier_auroc_ci95") or (float("nan"), float("nan"))
    return f"{lo:.3f} to {hi:.3f}"


def plots(m: dict, run_dir: Path) -> list[str]:
    cv, cfg = m["curves"], m["config"]
    ks = cv["k"]
    fig, axes = figure(1, 2, figsize=(12, 4.2))
    a = axes[0]
    a.plot(ks, cv["pass"], "k--", marker="o", ms=3, label="Pass@k (oracle)")
    a.plot(ks, cv["consistency"], marker="o", ms=3, label="Consistency@k")
    a.plot(ks, cv["verification"], marker="o", ms=3, label="Verification@k (no tie-break)")
    a.plot(ks, cv["weighted_vote"], marker="o", ms=3, label="score-weighted vote@k")
    a.plot(ks, cv["verification_given_pass"], ":", marker="s", ms=3, label="Verification@k | Pass@k (implicit scaling)")
    a.set_xscale("log", base=2)
    a.set_xlabel("k (candidates, subsampled)")
    a.set_ylabel("accuracy")
    a.set_title(f"scaling k_inf (k_verif = {cfg['k_verif']}; {cfg['seeds']} subsample seeds)")
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    b = axes[1]
    if cv.get("kv"):
        b.plot(cv["kv"], cv["verification_by_kv"], marker="o", color="tab:green")
        b.set_xscale("log", base=2)
    b.set_xlabel("k_verif (verifications per candidate, subsampled)")
    b.set_ylabel(f"Verification@{cfg['k_inf']} (no tie-break)")
    b.set_title("scaling k_verif")
    b.grid(alpha=0.3)
    savefig(fig, run_dir / "curves.png")

    mc = method_costs(m)
    has_usd = bool(m.get("dollars")) and (m["dollars"] or {}).get("total", 0) > 0
    fig, axes = figure(1, 2 if has_usd else 1, figsize=(12 if has_usd else 6, 4.2), squeeze=False)
    for ax, unit in zip(axes[0], ["tokens", "usd"] if has_usd else ["tokens"]):
        ax.plot(mc[f"consistency_{unit}"], cv["consistency"], marker="o", ms=3, label="Consistency@k")
        ax.plot(mc[f"verification_{unit}"], cv["verification"], marker="o", ms=3, label="Verification@k")
        ax.plot(mc[f"consistency_{unit}"][:1], cv["pass"][:1], "k*", ms=10, label="Pass@1")
        ax.set_xscale("log")
        ax.set_xlabel("tokens per problem" if unit == "tokens" else f"dollars per problem ({m['price']['generate']})")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_title("accuracy vs compute (each point one k)")
    savefig(fig, run_dir / "cost.png")
    return ["curves.png", "cost.png"]


def _examples(run_dir: Path, limit: int = 2) -> str:
    cfg, task, recs, tr = replay(run_dir)
    per_cons = []
    out = []
    for r in recs:
        corr = np.array(r.correct, dtype=float)
        per_cons.append(vote_accuracy(r.keys, corr))
    order = sorted(range(len(recs)), key=lambda i: (-(recs[i].pick >= 0 and recs[i].correct[recs[i].pick]
                                                      and per_cons[i] < 1), -bool(recs[i].played)))
    for i in order[:limit]:
        r = recs[i]
        s = r.scores()
        out.append(f"**Problem `{r.problem.id}`** (reference answer `{r.problem.answer}`):\n\n> "
                   + r.problem.question.replace("\n", "\n> ") + "\n")
        out.append("| # | final answer | correct | score |\n|---|---|---|---|")
        for j in sorted(range(len(s)), key=lambda j: -s[j])[:6]:
            out.append(f"| {j} | `{r.answers[j]}` | {'yes' if r.correct[j] else 'no'} | {s[j]:.2f} |")
        pick = r.pick
        out.append(f"\nPicked #{pick} ({'correct' if pick >= 0 and r.correct[pick] else 'wrong'}); "
                   f"Consistency@{cfg.k_inf} accuracy on this problem {per_cons[i]:.2f}; "
                   f"tie-break among {r.played or 'none'}.\n")
        v = tr.get(f"ver:{r.problem.id}:{max(pick, 0)}:0")
        if v and v["outputs"]:
            out.append("One verification of the picked candidate:\n\n```\n" + v["outputs"][0]["text"][:1200] + "\n```\n")
        ties = [rec for key, rec in tr.records.items() if key.startswith(f"tie:{r.problem.id}:")]
        if ties:
            out.append("One tie-break comparison:\n\n```\n" + ties[0]["outputs"][0]["text"][:1200] + "\n```\n")
    return "\n".join(out)


def write_report(run_dir: Path, m: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    m = m or analyse(run_dir)
    cfg, acc, n = m["config"], m["accuracy"], m["problems"]
    imgs = plots(m, run_dir)
    K = cfg["k_inf"]
    def count(v: float) -> str:  # expected counts (ties are uniform picks) can be fractional
        return f"{round(v * n)}/{n}" if abs(v * n - round(v * n)) < 1e-9 else f"{v * n:.1f}/{n}"

    rows = "\n".join(f"| {k} | {count(v)} | {_pct(v)} |" for k, v in acc.items())
    u = m["usage"]
    phase_rows = "\n".join(
        f"| {ph} | {x['calls']} | {x['prompt']:,} | {x['cached']:,} | {x['completion']:,} | "
        f"{x['prompt'] - x['cached'] + x['completion']:,} | {x['naive_prompt'] + x['completion']:,} |"
        for ph, x in u.items())
    d = m.get("dollars")
    usd = ("\n".join(f"- {ph}: ${v:,.4f}" for ph, v in d.items()) if d else
           f"- no price for `{m['price']['generate']}`: pass --price NAME (see scalelab/data/prices.toml)")
    g, gn = m["gap_verification_minus_consistency"], m["gap_no_tiebreak"]
    cv = m["curves"]
    fmt = make_format(cfg["prompts"])
    prompts = "\n\n".join(f"`scalelab/prompts/{f}`:\n\n```\n{prompt_file(f).strip()}\n```" for f in fmt.files)
    mc = method_costs(m)
    text = f"""# Sampling-based search with self-verification: `{run_dir.name}`

Zhao et al. 2025, Algorithm 1, on **{cfg['task']}** ({n} problems) with generator `{cfg['backend']}` and \
verifier `{cfg['verifier']}`: k_inf = {K} at σ_inf = {cfg['temperature']}, k_verif = {cfg['k_verif']} at \
σ_verif = {cfg['verify_temperature']} (score: {'P(Yes) from logprobs' if cfg['score'] == 'prob' else 'mean verdict'}), \
k_tie = {cfg['k_tie']}, shortlist threshold {cfg['threshold']}, tie-break trigger `{cfg['trigger']}` \
({'Algorithm 1' if cfg['trigger'] == 'alg1' else '§3.1'}), preliminary scoring {'on' if cfg['prelim'] else 'off'}. \
Prompts: `{cfg['prompts']}`. All numbers below come from `transcripts.jsonl` (`scalelab search rescore {run_dir}`).

## Table 1 (this run)

| method | correct | accuracy |
|---|---|---|
{rows}

- Verification@{K} − Consistency@{K}: **{100 * g['mean']:+.1f} points** (95% CI {100 * g['ci95'][0]:+.1f} to \
{100 * g['ci95'][1]:+.1f}, paired bootstrap over problems); without tie-break {100 * gn['mean']:+.1f} \
({100 * gn['ci95'][0]:+.1f} to {100 * gn['ci95'][1]:+.1f}).
- Tie-breaks played on {m['tiebreaks_played']} of {n} problems. Verifier AUROC on the run's own samples: \
{m['verifier_auroc']:.3f} (95% CI {_ci(m)}, bootstrap over problems).
- Answers that could not be extracted: {m['unextracted']} of {m['samples']} samples (scored as wrong); \
verdicts that could not be parsed: {m['unparsed_verdicts']} (scored 0); dropped by preliminary scoring: \
{m['dropped_by_prelim']}.
- Implicit scaling (§2.2): Verification@k among subsamples that hold a correct answer, by k: \
{', '.join(f'k={k}: {v:.3f}' for k, v in zip(cv['k'], cv['verification_given_pass']))}. \
"Ambiguous" questions by the paper's filter: {m['ambiguous_questions']}.

![curves]({imgs[0]})

## Cost

| phase | calls | prompt tokens | of which cached | completion tokens | tokens computed | naive (no prefix sharing) |
|---|---|---|---|---|---|---|
{phase_rows}

Per problem: {mc['gen_tokens_per_sample']:.0f} tokens per sample, {mc['verify_tokens_per_candidate']:.0f} \
tokens to verify one candidate {cfg['k_verif']} times. Dollars (generator priced as `{m['price']['generate']}`, \
verifier as `{m['price']['verify']}`):
{usd}

![cost]({imgs[1]})

## Prompts

{prompts}

## Example transcripts

{_examples(run_dir)}
"""
    path = run_dir / "report.md"
    write_text(path, text)
    return path
