"""search/tasks.py and search/cost.py: generators against brute-force oracles, loaders, extraction, prices."""

import itertools
import json
from fractions import Fraction
from pathlib import Path

import pytest

from scalelab.search import cost, tasks
from scalelab.errors import DataError, ScalelabError

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _valid_by_definition(g):
    rows = [g[4 * r:4 * r + 4] for r in range(4)]
    cols = [g[c::4] for c in range(4)]
    boxes = [[g[(r0 + a) * 4 + c0 + b] for a in range(2) for b in range(2)] for r0 in (0, 2) for c0 in (0, 2)]
    return all(sorted(x) == [1, 2, 3, 4] for x in rows + cols + boxes)


def test_288_grids_match_independent_enumeration():
    # oracle: every row is a permutation; keep the 4-tuples of permutations that form a valid grid
    perms = list(itertools.permutations([1, 2, 3, 4]))
    brute = {sum(rows, ()) for rows in itertools.product(perms, repeat=4) if _valid_by_definition(sum(rows, ()))}
    assert len(brute) == 288
    assert set(tasks.all_grids(4)) == brute


def test_puzzles_unique_by_brute_force_and_checker():
    probs = tasks.sudoku_problems(40, seed=3, clues=(4, 5))
    assert len({p.question for p in probs}) == 40
    grids = tasks.all_grids(4)
    for p in probs:
        puz = tasks.text_to_grid(p.question, 4)
        assert p.meta["clues"] in (4, 5) and sum(1 for d in puz if d) == p.meta["clues"]
        fits = [g for g in grids if all(c == 0 or c == d for c, d in zip(puz, g))]
        assert len(fits) == 1 and tasks.grid_to_text(fits[0], 4) == p.answer
        assert tasks.count_solutions(puz, 4, limit=5) == 1  # brute-force solver agrees
        # the checker accepts exactly the solution among all 288 grids
        ok = [g for g in grids if tasks.sudoku_valid(puz, list(g), 4)]
        assert ok == fits
    assert tasks.sudoku_problems(5, seed=3) == tasks.sudoku_problems(5, seed=3)  # seeded


def test_split_is_disjoint_and_larger_sizes():
    tr = {p.question for p in tasks.sudoku_problems(100, 0, split="train")}
    te = {p.question for p in tasks.sudoku_problems(30, 0, split="test")}
    assert not tr & te and all(tasks.puzzle_split(q) == "test" for q in te)
    p6 = tasks.sudoku_problems(2, 0, size=6)[0]
    puz = tasks.text_to_grid(p6.question, 6)
    assert tasks.count_solutions(puz, 6) == 1
    assert tasks.sudoku_valid(puz, tasks.text_to_grid(p6.answer, 6), 6)


def test_checker_rejects_wrong_grids():
    p = tasks.sudoku_problems(1, 0)[0]
    puz, sol = tasks.text_to_grid(p.question, 4), tasks.text_to_grid(p.answer, 4)
    bad = list(sol)
    bad[0], bad[1] = bad[1], bad[0]
    assert not tasks.sudoku_valid(puz, bad, 4)
    assert not tasks.sudoku_valid(puz, None, 4) and not tasks.sudoku_valid(puz, sol[:15], 4)
    t = tasks.Task("s", [p])
    assert t.is_correct(p, t.extract(p, "A" + p.answer + "\n"))
    assert t.extract(p, "no grid here") is None


def test_arithmetic_answers_recomputed():
    for level in (1, 2, 3, 4):
        for p in tasks.arithmetic_problems(30, seed=1, level=level):
            assert int(p.answer) > 0 and p.question.endswith("now?")
    with pytest.raises(ScalelabError):
        tasks.arithmetic_problems(1, 0, level=9)


def test_extraction_and_equivalence():
    assert tasks.extract_number("x\n#### 1,234") == "1,234"
    assert tasks.extract_number(r"so \boxed{42}.") == "42"
    assert tasks.extract_number("The answer is $18.") == "$18"
    assert tasks.extract_number("nothing") is None
    assert tasks.answers_equivalent("1,000", "1000.0") and tasks.answers_equivalent(r"\frac{1}{2}", "0.5")
    assert not tasks.answers_equivalent("3", "4") and not tasks.answers_equivalent(None, "4")
    assert tasks.parse_number("-3/4") == Fraction(-3, 4)
    assert tasks.last_boxed(r"\boxed{\frac{a}{b}} and \boxed{x^{2}}") == "x^{2}"
    assert tasks.answers_equivalent(r"\left(1,2\right)", "(1,2)")


def test_jsonl_loaders_and_line_numbers(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "q1", "answer": "work\n#### 1,200"}) + "\n\n"
                 + json.dumps({"problem": "q2", "solution": r"so \boxed{\frac{1}{3}}"}) + "\n")
    ps = tasks.load_jsonl(f)
    assert [p.answer for p in ps] == ["1200", r"\frac{1}{3}"] and ps[1].kind == "number"
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"b.jsonl:2"):
        tasks.load_jsonl(bad)
    bad.write_text(json.dumps({"question": "q", "answer": "no final"}) + "\n")
    with pytest.raises(DataError, match=r":1: GSM8K"):
        tasks.load_jsonl(bad, style="gsm8k")
    with pytest.raises(DataError):
        tasks.load_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.skipif(not (SHARED / "data" / "gsm8k" / "test.jsonl").is_file(), reason="../shared not present")
def test_gsm8k_loads_whole():
    ps = tasks.load_jsonl(SHARED / "data" / "gsm8k" / "test.jsonl")
    assert len(ps) == 1319 and ps[0].answer == "18"
    assert all(tasks.parse_number(p.answer) is not None for p in ps)


def test_prices_shipped_and_overridable(tmp_path):
    table = cost.load_prices()
    for name in ("gpt-4.5-preview", "o1", "o1-pro", "deepseek-v3", "deepseek-r1", "ernie-4.5", "ernie-x1"):
        assert table[name].source and table[name].date
    assert table["o1"].dollars(1_000_000, 1_000_000) == pytest.approx(75.0)
    assert table["deepseek-v3"].dollars(1_000_000, 0, cached=1_000_000) == pytest.approx(0.07)
    f = tmp_path / "p.toml"
    f.write_text('[o1]\ninput = 1\noutput = 2\nsource = "mine"\n[mymodel]\ninput = 0.5\noutput = 1\n')
    t2 = cost.load_prices(f)
    assert t2["o1"].output == 2 and t2["mymodel"].input == 0.5 and "o1-pro" in t2
    f.write_text('[x]\ninput = "a"\noutput = 1\n')
    with pytest.raises(ScalelabError, match="non-numeric"):
        cost.load_prices(f)
    led = cost.Ledger()
    led.record("p", "generate", 100, 50)
    led.record("p", "verify", 200, 10, cached=150)
    assert led.total().computed == 100 + 50 + 50 + 10
    d = led.dollars(table["o1"])
    assert d["total"] == pytest.approx(d["generate"] + d["verify"] + d["tiebreak"])
