"""A verification benchmark built from any search run, and a verifier scored on it (Zhao et al. 2025, §6).

The paper curates (question, one correct response, one incorrect response) entries from the residuals of its
own runs and scores verifiers on two tasks (its Table 7): *scoring* — given one response, is it correct? —
reported separately on the correct and the wrong responses, and *comparison* — given both, with one known to
be correct, which is it? Each with a single sample (Pass@1) and with the majority of k samples (Cons@k).

`build_items` takes the entries from a finished search run: every problem whose candidates hold both a correct
and a wrong extracted answer gives one entry, with the first correct response and, as the wrong one, the
first response of the most-voted wrong answer (the residual that fooled the sampler most often; the paper
picks its entries by hand). Responses that give no answer are never used. `score` runs a verifier on them with
the run's prompt format: scoring uses the same verification conversation as the search; comparison shows the
two responses in a seeded random order (A/B balanced). Every call goes to `transcripts.jsonl` in the output
directory, so an interrupted benchmark resumes and is re-scored without calls.

    scalelab search bench RUN [--verifier SPEC] [--k 5] [--out DIR]
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from scalelab.backends import Backend
from scalelab.errors import ScalelabError
from scalelab.report import make_dir, write_json, write_text
from scalelab.search import tasks as tasksmod
from scalelab.search.formats import make_format
from scalelab.search.run import SearchConfig, Searcher, load_config, replay, search_backend

# The paper's Table 7 (percent): scoring accuracy on correct / wrong responses, comparison accuracy.
PAPER_TABLE7 = [("Claude 3.5 Sonnet", "Pass@1", 89.6, 22.5, 56.1), ("Claude 3.5 Sonnet", "Cons@5", 90.3, 17.5, 61.2),
                ("o1-preview", "Pass@1", 100, 68.8, 84.5), ("o1-preview", "Cons@5", 100, 79.4, 92),
                ("Gemini 2.0 Flash Thinking", "Pass@1", 75.4, 56.5, 80),
                ("Gemini 2.0 Flash Thinking", "Cons@5", 77.4, 55, 89.1), ("Random", "", 80, 20, 50)]


def build_items(run_dir: Path) -> list[dict]:
    """(question, correct response, wrong response) entries from a search run's transcripts (no model call)."""
    _, _, recs, _ = replay(run_dir)
    items = []
    for rec in recs:
        right = [i for i, ok in enumerate(rec.correct) if ok]
        wrong = [i for i, ok in enumerate(rec.correct) if not ok and rec.answers[i] is not None]
        if not right or not wrong:
            continue
        votes = Counter(rec.keys[i] for i in wrong)
        top = max(votes, key=lambda k: (votes[k], -next(i for i in wrong if rec.keys[i] == k)))
        j = next(i for i in wrong if rec.keys[i] == top)
        items.append({"id": rec.problem.id, "problem": rec.problem.__dict__, "correct": rec.responses[right[0]],
                      "wrong": rec.responses[j], "correct_answer": rec.answers[right[0]],
                      "wrong_answer": rec.answers[j], "wrong_votes": votes[top]})
    return items


def score(items: list[dict], out: Path, backend: Backend | None, prompts: str, k: int = 5,
          temperature: float = 1.0, max_tokens: int = 256, seed: int = 0) -> dict:
    """Scoring (correct / wrong) and comparison accuracy, Pass@1 and Cons@k, over `items`. backend None:
    from the transcripts only."""
    if k < 1:
        raise ScalelabError(f"k must be >= 1, got {k}")
    fmt = make_format(prompts)
    cfg = SearchConfig(seed=seed)
    s = Searcher(cfg, out, tasksmod.Task("bench", []), None, backend, fmt)
    rng = random.Random(seed)
    tallies = {key: [0, 0] for key in ("correct@1", "correct@k", "wrong@1", "wrong@k", "compare@1", "compare@k")}
    unparsed = 0

    def majority(votes: list[int | None], positive) -> bool:
        good = sum(v == positive for v in votes)
        return good * 2 > len(votes)

    for it in items:
        p = tasksmod.Problem(**it["problem"])
        for side, truth in (("correct", 1), ("wrong", 0)):
            r = s.call(f"score:{it['id']}:{side}", "verify", p.id, backend, fmt.verify(p, it[side]), k, temperature,
                       max_tokens, fmt.stop)
            verdicts = [fmt.parse_verdict(o["text"]) for o in r["outputs"]]
            unparsed += sum(v is None for v in verdicts)
            tallies[f"{side}@1"][0] += verdicts[0] == truth
            tallies[f"{side}@k"][0] += majority(verdicts, truth)
            tallies[f"{side}@1"][1] += 1
            tallies[f"{side}@k"][1] += 1
        a_first = rng.random() < 0.5
        a, b = (it["correct"], it["wrong"]) if a_first else (it["wrong"], it["correct"])
        r = s.call(f"compare:{it['id']}", "tiebreak", p.id, backend, fmt.compare(p, a, b), k, temperature, max_tokens,
                   fmt.stop)
        picks = [fmt.parse_winner(o["text"]) for o in r["outputs"]]
        want = "A" if a_first else "B"
        unparsed += sum(x is None for x in picks)
        tallies["compare@1"][0] += picks[0] == want
        tallies["compare@k"][0] += majority(picks, want)
        tallies["compare@1"][1] += 1
        tallies["compare@k"][1] += 1
    acc = {key: (hit / n if n else 0.0) for key, (hit, n) in tallies.items()}
    return {"items": len(items), "k": k, "accuracy": acc, "unparsed": unparsed}


def run(run_dir: Path, out: Path, verifier: str = "", k: int = 5, seed: int = 0,
        backend: Backend | None = None) -> dict:
    """Build the benchmark from `run_dir`, score a verifier (default: the run's own), write report.md."""
    cfg = load_config(run_dir)
    spec = verifier or (cfg.backend if cfg.verifier in ("same", "checker") else cfg.verifier)
    items = build_items(run_dir)
    if not items:
        raise ScalelabError(f"{run_dir} has no problem with both a correct and a wrong answer: nothing to compare")
    out = Path(out)
    make_dir(out)
    write_text(out / "items.jsonl", "".join(json.dumps(it) + "\n" for it in items))
    if backend is None:
        backend = search_backend(spec, cfg.retries, cfg.quant)
    m = score(items, out, backend, cfg.prompts, k, cfg.verify_temperature, cfg.verify_max_tokens, seed)
    m.update(source=str(run_dir), verifier=spec)
    write_json(out / "metrics.json", m)
    a = m["accuracy"]
    paper = "\n".join(f"| {name} | {s} | {c} | {w} | {cmp} |" for name, s, c, w, cmp in PAPER_TABLE7)
    write_text(out / "report.md", f"""# Verification benchmark from `{run_dir}`

{len(items)} entries (question, one correct response, one wrong response), built from the search run's own
samples: the first correct response and the first response of the most-voted wrong answer. Verifier:
`{spec}`, {k} samples per question at T = {cfg.verify_temperature}; {m['unparsed']} samples gave no verdict (counted
as wrong). Entries: [items.jsonl](items.jsonl); every call: [transcripts.jsonl](transcripts.jsonl).

| verifier | setting | scoring: correct | scoring: wrong | comparison |
|---|---|---|---|---|
| this run's | Pass@1 | {100 * a['correct@1']:.1f} | {100 * a['wrong@1']:.1f} | {100 * a['compare@1']:.1f} |
| this run's | Cons@{k} | {100 * a['correct@k']:.1f} | {100 * a['wrong@k']:.1f} | {100 * a['compare@k']:.1f} |
{paper}

Paper rows: Zhao et al. 2025, Table 7 (their hand-curated entries from Gemini 1.5 Pro's residuals, not these).
""")
    return m
