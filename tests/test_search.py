"""scalelab.search: Algorithm 1's selection against brute force, subsampled curves against the unbiased
estimator, resume without redoing calls, rescore without calls, bad input. The backend here is a scripted
test double (it reads the puzzle's solution), used only to check the selection and bookkeeping logic."""

import dataclasses
import itertools
import json
import random

import numpy as np
import pytest

from scalelab import search
from scalelab.backends import Choice, Response
from scalelab.search import bench, tasks
from scalelab.errors import ScalelabError
from tests.conftest import run_cli


# ------------------------------------------------------------------------------------------- pure logic
def brute_alg1(scores, keys, votes, trigger, thr=0.05):
    best = max(scores)
    sl = [i for i in range(len(scores)) if scores[i] >= best - thr - 1e-12]
    top3 = sorted(range(len(scores)), key=lambda i: -scores[i])[:3]
    trig = len(sl) > 1 if trigger == "alg1" else (
        len(top3) > 1 and scores[top3[0]] - scores[top3[-1]] <= thr + 1e-12 and len({keys[i] for i in top3}) > 1)
    if not trig:
        return max(range(len(scores)), key=lambda i: (scores[i], -i))
    wins = {i: 0.0 for i in sl}
    tally = {i: 0.0 for i in sl}
    for i, j in itertools.combinations(sl, 2):
        vi, vj = votes[(i, j)]
        tally[i] += vi
        tally[j] += vj
        wins[i] += 1 if vi > vj else 0.5 if vi == vj else 0
        wins[j] += 1 if vj > vi else 0.5 if vi == vj else 0
    top = max(wins.values())
    cands = [i for i in sl if wins[i] == top]
    top_t = max(tally[i] for i in cands)
    cands = [i for i in cands if tally[i] == top_t]
    top_s = max(scores[i] for i in cands)
    return min(i for i in cands if scores[i] == top_s)


@pytest.mark.parametrize("trigger", ["alg1", "s31"])
def test_selection_matches_brute_force(trigger):
    rng = random.Random(0)
    for _ in range(400):
        k = rng.randint(1, 9)
        kv = rng.choice([2, 4, 10, 20])
        scores = [rng.randint(0, kv) / kv for _ in range(k)]
        keys = [rng.choice("abc") for _ in range(k)]
        votes = {(i, j): (float(a), float(4 - a)) for i in range(k) for j in range(i + 1, k) for a in [rng.randint(0, 4)]}
        pick, _ = search.select(scores, keys, trigger, 0.05, lambda i, j: votes[(i, j)])
        assert pick == brute_alg1(scores, keys, votes, trigger)


def test_shortlist_and_triggers():
    assert search.shortlist([0.9, 0.86, 0.84, 0.2]) == [0, 1]
    assert search.needs_tiebreak([1.0, 0.97, 0.2], ["x", "x", "y"], "alg1")
    assert not search.needs_tiebreak([1.0, 0.97, 0.96], ["x", "x", "x"], "s31")  # all agree
    assert search.needs_tiebreak([1.0, 0.97, 0.96], ["x", "y", "x"], "s31")
    assert not search.needs_tiebreak([1.0, 0.97, 0.5], ["x", "y", "x"], "s31")  # third not within 5%


def test_subsampled_pass_at_k_matches_unbiased_estimator():
    rng = np.random.default_rng(1)
    recs = []
    for _ in range(30):
        n = 16
        corr = (rng.random(n) < rng.random()).tolist()
        r = search.ProblemRecord(tasks.Problem("p", "q", "1"), responses=["x"] * n, answers=["1"] * n,
                                 keys=["1"] * n, correct=corr, verdicts=[[1.0]] * n, dropped=[False] * n)
        recs.append(r)
    ks = [1, 2, 4, 8, 16]
    cv = search.curves(recs, ks, seeds=400, seed=0)
    for k, est in zip(ks, cv["pass"]):
        exact = np.mean([search.pass_at_k_unbiased(16, sum(r.correct), k) for r in recs])
        assert est == pytest.approx(exact, abs=0.01)
    # Pass@1 from the curve equals the mean sample accuracy
    assert cv["pass"][0] == pytest.approx(np.mean([np.mean(r.correct) for r in recs]), abs=0.01)


def test_voting_and_expected_pick():
    corr = np.array([1.0, 0.0, 0.0, 1.0])
    assert search.vote_accuracy(["a", "b", "b", "a"], corr) == 0.5  # tie between a and b
    assert search.vote_accuracy([None, "b", "b", "a"], corr) == 0.0
    assert search.vote_accuracy(["a", "b", "b", "a"], corr, np.array([0.9, 0.1, 0.1, 0.2])) == 1.0
    assert search.expected_pick_accuracy(np.array([0.5, 0.5, 0.1, np.nan]), corr) == 0.5
    assert search.auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0


def test_auroc_equals_the_pairwise_count_and_its_interval_excludes_chance_only_for_a_real_verifier():
    from scalelab.search.select import auroc_bootstrap
    rng = np.random.default_rng(0)
    for _ in range(20):  # the rank identity against the brute-force pairwise count, ties (rounded scores) included
        y = rng.random(60) < 0.4
        s = np.round(rng.random(60) + 0.3 * y, 1)
        pos, neg = s[y][:, None], s[~y][None, :]
        brute = float((pos > neg).mean() + 0.5 * (pos == neg).mean())
        assert search.auroc(list(s), list(y)) == pytest.approx(brute, abs=1e-12)
    assert np.isnan(search.auroc([0.2, 0.3], [True, True]))
    # 40 problems × 8 samples: scores that carry the label exclude 0.5; coin-flip scores straddle it
    labels = [list(rng.random(8) < 0.5) for _ in range(40)]
    good = [[float(y) + rng.normal(0, 0.7) for y in ys] for ys in labels]
    noise = [[float(rng.random()) for _ in ys] for ys in labels]
    a, lo, hi = auroc_bootstrap(good, labels, reps=300)
    assert lo > 0.5 and lo < a < hi
    a, lo, hi = auroc_bootstrap(noise, labels, reps=300)
    assert lo < 0.5 < hi


# ------------------------------------------------------------------------------------------- runs
class Scripted:
    """A test double: solves a Sudoku correctly with probability 0.4 (else swaps two cells), verifies with
    90% accuracy and compares with 80% accuracy, all from the call's seed. Counts its calls."""

    name, price, logprobs = "scripted", "local", True

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def _tick(self):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise search.BackendError("scripted failure")

    @staticmethod
    def _solution(prompt):
        q = prompt.strip().split(" ")[0][1:]
        return next(p.answer for p in tasks.sudoku_problems(30, 0, split="test") if p.question == q)

    def generate(self, prompt, params):
        self._tick()
        n, rng = params.n, random.Random(params.seed)
        sol, lines = self._solution(prompt), prompt.strip().split(" ")
        outs = []
        for _ in range(n):
            if prompt.endswith(" S"):
                g = list(sol)
                if rng.random() > 0.4:
                    i, j = rng.sample([0, 1, 2, 3, 5, 6, 7, 8], 2)
                    g[i], g[j] = g[j], g[i]
                t = "".join(g)
            elif prompt.endswith(" V"):
                ok = lines[1][1:] == sol
                t = "r+ " + ("Y" if ok == (rng.random() < 0.9) else "N")
            else:
                a_ok = lines[1][1:] == sol
                t = "d " + ("A" if a_ok == (rng.random() < 0.8) else "B")
            outs.append(Choice(t, n_tokens=len(t)))
        return Response(outs, len(prompt), sum(o.n_tokens for o in outs), 0, n * len(prompt))

    def prob_yes(self, prompt, yes, no):
        self._tick()
        return Response([], len(prompt), 0, p_yes=0.5)


def _cfg(**kw):
    base = dict(backend="scripted", task="sudoku", n_problems=6, prompts="sudoku", k_inf=8, k_verif=4, k_tie=2,
                seeds=5, max_tokens=20, verify_max_tokens=40)
    base.update(kw)
    return search.SearchConfig(**base)


def test_run_resume_rescore(tmp_path):
    b = Scripted()
    search.run_search(_cfg(), tmp_path / "full", gen=b, ver=b)
    full_calls = b.calls
    m_full = search.analyse(tmp_path / "full")
    # interrupted after 17 calls, then resumed: no finished call is redone
    bad = Scripted(fail_after=17)
    with pytest.raises(search.BackendError, match="rerun the same command"):
        search.run_search(_cfg(), tmp_path / "cut", gen=bad, ver=bad)
    assert bad.calls == 18
    again = Scripted()
    search.run_search(_cfg(), tmp_path / "cut", gen=again, ver=again)
    assert again.calls == full_calls - 17
    m_cut = search.analyse(tmp_path / "cut")
    assert m_cut["accuracy"] == m_full["accuracy"]
    lines = (tmp_path / "cut" / "transcripts.jsonl").read_text().splitlines()
    assert len(lines) == len({json.loads(x)["key"] for x in lines}) == full_calls
    # rescore: the same metrics, no backend at all
    m2 = search.analyse(tmp_path / "full")
    assert m2["accuracy"] == m_full["accuracy"]
    acc = m_full["accuracy"]
    assert acc["Pass@8"] >= acc["Verification@8"] >= 0 and m_full["tiebreaks_played"] >= 1
    assert m_full["verifier_auroc"] > 0.7
    assert m_full["usage"]["generate"]["calls"] == 6
    rep = search.write_report(tmp_path / "full").read_text()
    assert "Table 1" in rep and (tmp_path / "full" / "curves.png").is_file() and "sudoku-model-v3" in rep


class Algebra:
    """Generator and judge doubles for a MATH-style task: answers written differently from the reference."""

    name, price, logprobs = "algebra", "local", False

    def __init__(self):
        self.calls = 0

    def generate(self, prompt, params):
        self.calls += 1
        n, text = params.n, prompt[-1]["content"]
        if "Reply with one word" in text:  # the judge: 1+x^2 is x^2+1, 2x+2 is not
            outs = [Choice("Yes" if "1+x^2" in text.split("final answer:")[1] else "No", n_tokens=1)]
        else:
            outs = [Choice(f"So the answer is \\boxed{{{a}}}.", n_tokens=8) for a in (["1+x^2", "2x+2"] * n)[:n]]
        return Response(outs, 10, sum(o.n_tokens for o in outs), 0, 10)


def test_llm_judge_grades_free_form_answers(tmp_path):
    f = tmp_path / "math.jsonl"
    f.write_text(json.dumps({"problem": "Expand (x^2+1).", "solution": "It is $\\boxed{x^2+1}$."}) + "\n")
    cfg = search.SearchConfig(backend="algebra", verifier="checker", task=str(f), n_problems=1, k_inf=4, k_verif=1,
                              tiebreak=False, seeds=2, max_tokens=20, judge="algebra")
    without = search.SearchConfig(**{**dataclasses.asdict(cfg), "judge": ""})
    b = Algebra()
    search.run_search(without, tmp_path / "plain", gen=b)
    assert search.analyse(tmp_path / "plain")["accuracy"]["Pass@1"] == 0  # "1+x^2" ≠ "x^2+1" as strings
    search.run_search(cfg, tmp_path / "judged", gen=b, judge=b)
    m = search.analyse(tmp_path / "judged")  # rescored from transcripts: no backend given
    assert m["accuracy"]["Pass@1"] == 0.5 and m["accuracy"]["Pass@4"] == 1.0
    grades = [json.loads(x) for x in (tmp_path / "judged" / "judge.jsonl").read_text().splitlines()]
    assert len(grades) == 2 and all(g["phase"] == "judge" for g in grades)  # one per distinct answer
    assert m["usage"]["generate"]["calls"] == 1  # the judge's calls are grading, not the method's cost


def test_verification_benchmark_from_a_run(tmp_path):
    """Entries hold one correct and one wrong response (per the checker); the Scripted verifier is right 90% of
    the time and its comparator 80%, so the benchmark must find a good verifier, and rescoring needs no calls."""
    b = Scripted()
    search.run_search(_cfg(n_problems=12), tmp_path / "run", gen=b, ver=b)
    items = bench.build_items(tmp_path / "run")
    assert items and all(it["correct"] != it["wrong"] for it in items)
    for it in items:
        p = tasks.Problem(**it["problem"])
        task = tasks.Task("t", [p])
        assert task.is_correct(p, it["correct_answer"]) and not task.is_correct(p, it["wrong_answer"])
    m = bench.run(tmp_path / "run", tmp_path / "bench", k=5, backend=b)
    a = m["accuracy"]
    assert m["items"] == len(items) and a["correct@k"] >= 0.8 and a["wrong@k"] >= 0.8 and a["compare@k"] >= 0.6
    again = bench.score(items, tmp_path / "bench", None, "sudoku", k=5)  # transcripts only
    assert again["accuracy"] == a
    assert "Table 7" in (tmp_path / "bench" / "report.md").read_text()


def test_resume_with_other_settings_is_refused(tmp_path):
    b = Scripted()
    search.run_search(_cfg(n_problems=1), tmp_path / "r", gen=b, ver=b)
    with pytest.raises(ScalelabError, match="different settings"):
        search.run_search(_cfg(n_problems=1, k_inf=4), tmp_path / "r", gen=b, ver=b)


def test_preliminary_scoring_and_checker(tmp_path):
    b = Scripted()
    search.run_search(_cfg(prelim=True, prelim_k=2, prelim_cap=2, k_verif=4), tmp_path / "p", gen=b, ver=b)
    m = search.analyse(tmp_path / "p")
    assert m["dropped_by_prelim"] > 0
    search.run_search(_cfg(verifier="checker"), tmp_path / "c", gen=Scripted(), ver=None)
    mc = search.analyse(tmp_path / "c")
    assert mc["accuracy"]["Verification@8 (no tie-break)"] == mc["accuracy"]["Pass@8"]


@pytest.mark.parametrize("args,msg", [(["--k", "0"], "k-inf must be"), (["--kv", "-1"], "k-verif must be"),
                                      (["--backend", "nope"], "unknown backend")])
def test_cli_bad_input(tmp_path, args, msg):
    p = run_cli("search", "--tasks", "arithmetic", "--out", str(tmp_path / "x"), *args)
    assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    """A finished search run with its report and metrics written."""
    d = tmp_path_factory.mktemp("search") / "run"
    b = Scripted()
    search.run_search(_cfg(n_problems=3, k_inf=4, k_verif=2), d, gen=b, ver=b)
    search.write_report(d)
    return d


@pytest.mark.parametrize("name,text,msg", [
    ("search.json", '{"backend": "scripted", "k_inf": 8', "search.json is corrupt: not valid JSON"),
    ("search.json", "[1, 2]", "search.json is corrupt: expected a JSON object of search settings, got list"),
    ("search.json", '{"k_inf": "many"}', "search.json: search.k_inf must be an integer, got 'many'"),
    ("search.json", '{"k_inf": 0}', "search.json: k-inf must be an integer >= 1, got 0"),
    ("search.json", '{"colour": "red"}', "search.json: unknown config key search.colour"),
    ("problems.jsonl", '{"id": "p1", "question": "q"', "problems.jsonl:1: not a problem record"),
    ("problems.jsonl", '{"id": 1, "question": "q", "answer": "4"}', "problems.jsonl:1: not a problem record"),
    ("problems.jsonl", '{"id": "p", "question": "q", "answer": "4", "colour": 1}', "problems.jsonl:1: not a problem"),
])
def test_rescore_corrupt_run_files_one_line(reported_run, tmp_path, name, text, msg):
    """A corrupt search.json (or problems.jsonl) was a traceback in `search rescore`; now one line, and the
    report and metrics stay as they were."""
    import shutil

    d = tmp_path / "run"
    shutil.copytree(reported_run, d)
    (d / name).write_text(text)
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    p = run_cli("search", "rescore", str(d), timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and msg in p.stderr, p.stderr
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before


def test_rescore_corrupt_transcript_record(reported_run, tmp_path):
    """A transcript line that is valid JSON but not a call record was a KeyError/TypeError in replay; a corrupt
    line in the middle is refused when its problem cannot be replayed, while a last line cut short by a crash is
    the usual interrupted run."""
    import shutil

    d = tmp_path / "run"
    shutil.copytree(reported_run, d)
    lines = (d / "transcripts.jsonl").read_text().splitlines(keepends=True)
    rec = json.loads(lines[0])
    for bad in ({**rec, "outputs": 5}, {**rec, "usage": {"prompt": "ten"}}, {**rec, "phase": "dance"}, [rec]):
        (d / "transcripts.jsonl").write_text(json.dumps(bad) + "\n" + "".join(lines[1:]))
        with pytest.raises(ScalelabError, match=r"transcripts.jsonl:1: not a call record, and 1 problem\(s\) cannot"):
            search.analyse(d)
    (d / "transcripts.jsonl").write_text("".join(lines[1:]) + lines[0][:20])  # cut short: that problem is unfinished
    assert search.analyse(d)["problems"] == 2
