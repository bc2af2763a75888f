import json
import math
from collections import Counter

import numpy as np
import pytest

from scalelab.errors import ScalelabError
from scalelab.papers.verdict import (
    DID_NOT_TRAIN, DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, NOT_RUN, VERDICTS, VERDICTS_SCHEMA, SeedCI, Verdict,
    did_not_train, judge, n_to_separate, read_verdicts, search_did_not_train, seed_ci, student_t_cdf,
    t_quantile, unigram_cross_entropy, unigram_entropy, validate_verdicts, write_verdicts,
)


# --- baselines and did-not-train ------------------------------------------------------------------------

def test_unigram_cross_entropy_matches_a_direct_count():
    train = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    val = [1, 2, 3, 4, 4, 0]            # token 4 never occurs in train
    vocab, alpha = 6, 0.5
    counts = Counter(train)
    total = len(train) + alpha * vocab
    expected = -sum(math.log((counts.get(t, 0) + alpha) / total) for t in val) / len(val)
    assert unigram_cross_entropy(train, val, vocab, alpha=alpha) == pytest.approx(expected, rel=1e-12)
    # numpy arrays of any integer dtype give the same
    assert unigram_cross_entropy(np.array(train, np.uint16), np.array(val, np.int32), vocab,
                                 alpha=alpha) == pytest.approx(expected, rel=1e-12)
    # add-one smoothing, computed the same way
    total1 = len(train) + vocab
    expected1 = -sum(math.log((counts.get(t, 0) + 1) / total1) for t in val) / len(val)
    assert unigram_cross_entropy(train, val, vocab, alpha=1.0) == pytest.approx(expected1, rel=1e-12)


def test_unigram_entropy_and_its_relation_to_cross_entropy():
    tokens = [0, 0, 1, 2, 2, 2, 2, 3]
    counts = Counter(tokens)
    expected = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())
    assert unigram_entropy(tokens, 5) == pytest.approx(expected, rel=1e-12)
    # entropy lower-bounds the cross-entropy of the split under its own smoothed unigram
    assert unigram_cross_entropy(tokens, tokens, 5) > unigram_entropy(tokens, 5)


def test_unigram_rejects_bad_input():
    with pytest.raises(ScalelabError, match="outside"):
        unigram_cross_entropy([0, 1, 7], [0], 4)
    with pytest.raises(ScalelabError, match="empty"):
        unigram_cross_entropy([0, 1], [], 4)
    with pytest.raises(ScalelabError, match="alpha"):
        unigram_cross_entropy([0, 1], [2], 4, alpha=0.0)
    with pytest.raises(ScalelabError, match="integer"):
        unigram_cross_entropy([0.5, 1.0], [1], 4)


def test_collapsed_arm_did_not_train():
    assert did_not_train(6.50, unigram=6.47)            # above the baseline, within the margin
    assert did_not_train([6.44], unigram=6.47)          # below it, but by less than 0.05 nats
    assert did_not_train([3.9, 6.46], unigram=6.47)     # one collapsed seed is enough


def test_nan_or_diverged_arm_did_not_train():
    assert did_not_train([float("nan")], unigram=6.47)
    assert did_not_train([3.1, float("inf")], unigram=6.47)
    assert did_not_train(9.3, unigram=6.47)                          # far above the baseline
    assert did_not_train(5.2, unigram=6.47, diverged_above=5.0)      # above an explicit ceiling


def test_healthy_arm_trained():
    assert not did_not_train([4.21, 4.25, 4.19], unigram=6.47)
    assert not did_not_train(4.21, unigram=6.47, diverged_above=5.0)
    assert not did_not_train(6.40, unigram=6.47)                     # 0.07 nats below: just clear


def test_search_did_not_train():
    assert search_did_not_train(malformed_fraction=0.8, pass_at_k=0.3)
    assert search_did_not_train(malformed_fraction=0.1, pass_at_k=0.0)
    assert search_did_not_train(malformed_fraction=float("nan"), pass_at_k=0.3)
    assert not search_did_not_train(malformed_fraction=0.1, pass_at_k=0.4)
    with pytest.raises(ScalelabError, match="fraction"):
        search_did_not_train(malformed_fraction=1.5, pass_at_k=0.4)


# --- Student's t -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (5, 2.571), (30, 2.042), (100, 1.984),
                                          (math.inf, 1.960)])
def test_t_quantile_95_against_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_other_levels_and_cdf():
    assert t_quantile(0.95, 10) == pytest.approx(1.812, abs=5e-4)     # 90% two-sided
    assert t_quantile(0.995, 5) == pytest.approx(4.032, abs=5e-4)     # 99% two-sided
    assert t_quantile(0.025, 4) == pytest.approx(-2.776, abs=5e-4)    # symmetry
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75)              # Cauchy: 1/2 + atan(1)/π
    assert student_t_cdf(1.0, 2) == pytest.approx(0.5 + 0.5 / math.sqrt(3))   # closed form for df=2
    for df in (3, 8, 31):
        assert student_t_cdf(t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-9)
    # the large-df expansion joins the exact branch smoothly
    assert t_quantile(0.975, 201) == pytest.approx(t_quantile(0.975, 200), abs=1e-4)


# --- intervals and judging -------------------------------------------------------------------------------

def test_seed_ci_one_arm_and_paired_difference():
    a = [3.10, 3.14, 3.12, 3.16]
    ci = seed_ci(a)
    sd = float(np.std(a, ddof=1))
    half = t_quantile(0.975, 3) * sd / 2
    assert (ci.mean, ci.n, ci.sd) == (pytest.approx(3.13), 4, pytest.approx(sd))
    assert (ci.lo, ci.hi) == (pytest.approx(3.13 - half), pytest.approx(3.13 + half))
    # paired: the interval is over per-seed differences, which cancels what the arms share
    b = [3.00, 3.05, 3.01, 3.06]
    paired = seed_ci(a, b)
    diffs = np.subtract(a, b)
    assert paired.mean == pytest.approx(diffs.mean()) and paired.sd == pytest.approx(diffs.std(ddof=1))
    welch = seed_ci(a, b, paired=False)
    assert welch.mean == pytest.approx(paired.mean) and welch.half_width > paired.half_width
    with pytest.raises(ScalelabError, match="same number"):
        seed_ci([1.0, 2.0], [1.0])
    with pytest.raises(ScalelabError, match="non-finite"):
        seed_ci([1.0, float("nan")])


def test_single_seed_is_inconclusive():
    ci = seed_ci([0.3])
    assert math.isinf(ci.lo) and math.isinf(ci.hi)
    assert judge(ci, 0.0, "le") == INCONCLUSIVE and n_to_separate(ci, 0.0) is None


def test_clearly_separated_intervals_hold_or_not():
    gap = seed_ci([0.010, 0.012, 0.011, 0.009])           # a small gap, tightly measured
    assert judge(gap, 0.05, "le") == HOLDS
    assert judge(gap, 0.05, "ge") == DOES_NOT_HOLD
    assert judge(gap, 0.001, "ge") == HOLDS
    assert judge(gap, 0.001, "le") == DOES_NOT_HOLD
    with pytest.raises(ScalelabError, match="direction"):
        judge(gap, 0.0, "lt")


def _samples_with(mean: float, sd: float, n: int) -> np.ndarray:
    z = np.linspace(-1.0, 1.0, n)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean + sd * z


def test_straddling_interval_is_inconclusive_and_n_to_separate_separates():
    ci = seed_ci([0.01, 0.05, 0.03])                 # mean 0.03, sd 0.02, n 3: the CI spans 0
    assert ci.lo < 0.0 < ci.hi
    assert judge(ci, 0.0, "le") == INCONCLUSIVE
    n = n_to_separate(ci, 0.0)
    assert n is not None and n > ci.n
    # with n seeds of the same mean and spread, the interval clears the threshold ...
    more = seed_ci(_samples_with(ci.mean, ci.sd, n))
    assert more.sd == pytest.approx(ci.sd) and more.lo > 0.0
    assert judge(more, 0.0, "le") == DOES_NOT_HOLD
    # ... and n is the smallest such number
    fewer = seed_ci(_samples_with(ci.mean, ci.sd, n - 1))
    assert judge(fewer, 0.0, "le") == INCONCLUSIVE


def test_n_to_separate_edge_cases():
    on_threshold = SeedCI(mean=0.0, lo=-1.0, hi=1.0, n=3, sd=1.0)
    assert n_to_separate(on_threshold, 0.0) is None
    # a large spread against a tiny gap still finishes, through the large-df expansion
    n = n_to_separate(SeedCI(mean=0.001, lo=-1.0, hi=1.0, n=3, sd=1.0), 0.0)
    assert n == pytest.approx((1.96 / 0.001) ** 2, rel=1e-3)


# --- verdicts.json ---------------------------------------------------------------------------------------

def _verdict(**overrides) -> Verdict:
    ci = seed_ci([0.004, 0.006, 0.005])
    fields = dict(section="diloco", claim="DiLoCo M=2 is within 1% of DP's final loss",
                  verdict=judge(ci, 0.01, "le"), threshold=0.01,
                  regime={"params": 3.2e6, "tokens": 6.4e7, "steps": 500, "outer_steps": 17, "width": 128},
                  paper_regime={"params": 2.4e9, "tokens": 4.8e10},
                  figures={**ci.to_figures("gap_"), "unigram": 6.47, "losses_dp": [3.01, 3.02, 3.0],
                           "n_to_separate": None, "trained": True, "unit": "relative"},
                  note="paired seeds")
    fields.update(overrides)
    return Verdict(**fields)


def test_verdict_to_json_has_exactly_the_protocol_keys():
    assert set(_verdict().to_json()) == {"section", "claim", "verdict", "threshold", "regime", "figures",
                                         "paper_regime", "note"}
    assert set(VERDICTS) == {HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, DID_NOT_TRAIN, NOT_RUN}
    assert VERDICTS_SCHEMA["items"]["properties"]["verdict"]["enum"] == list(VERDICTS)


def test_verdicts_json_round_trips(tmp_path):
    verdicts = [_verdict(), _verdict(section="dyt", verdict=NOT_RUN, threshold="n/a", figures={}),
                _verdict(section="sss", verdict=DID_NOT_TRAIN, threshold=0.02)]
    path = write_verdicts(tmp_path, verdicts)
    assert path == tmp_path / "verdicts.json"
    loaded = json.loads(path.read_text())
    validate_verdicts(loaded)
    assert loaded == [v.to_json() for v in verdicts]
    assert read_verdicts(path) == verdicts
    assert [p.name for p in tmp_path.iterdir()] == ["verdicts.json"]     # no temp file left behind


def test_write_is_atomic_and_refuses_invalid_verdicts(tmp_path):
    path = write_verdicts(tmp_path / "verdicts.json", [_verdict()])
    before = path.read_text()
    bad = _verdict()
    bad.figures["loss"] = float("nan")           # mutated after construction: caught at write time
    with pytest.raises(ScalelabError, match="null"):
        write_verdicts(path, [bad])
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["verdicts.json"]


def test_validate_rejects_a_bad_verdict_string():
    obj = [_verdict().to_json()]
    obj[0]["verdict"] = "mostly holds"
    with pytest.raises(ScalelabError, match="'verdict' is 'mostly holds'; expected one of holds"):
        validate_verdicts(obj)
    with pytest.raises(ScalelabError, match="verdict"):
        _verdict(verdict="yes")


def test_validate_rejects_a_missing_key():
    obj = [_verdict().to_json(), _verdict().to_json()]
    del obj[1]["figures"]
    with pytest.raises(ScalelabError, match=r"entry 1 \(section 'diloco'\): missing key 'figures'"):
        validate_verdicts(obj)


def test_validate_rejects_a_non_dict_regime():
    obj = [_verdict().to_json()]
    obj[0]["regime"] = [["params", 1e6]]
    with pytest.raises(ScalelabError, match="'regime' must be an object, got list"):
        validate_verdicts(obj)
    with pytest.raises(ScalelabError, match="'regime' must be an object"):
        _verdict(regime="small")


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.update(extra=1), "unknown key 'extra'"),
    (lambda o: o["figures"].update(curve={"a": 1}), "figures\\['curve'\\] has type dict"),
    (lambda o: o["figures"].update(seeds=[1.0, "x"]), "lists may hold numbers only"),
    (lambda o: o.update(threshold=None), "'threshold' must be a finite number or a string"),
    (lambda o: o.update(section=""), "'section' must be a non-empty string"),
])
def test_validate_rejects_other_shape_errors(mutate, message):
    obj = _verdict().to_json()
    mutate(obj)
    with pytest.raises(ScalelabError, match=message):
        validate_verdicts([obj])
    with pytest.raises(ScalelabError, match="JSON list"):
        validate_verdicts({"verdicts": [obj]})


def test_read_verdicts_reports_bad_files(tmp_path):
    with pytest.raises(ScalelabError, match="no verdicts file"):
        read_verdicts(tmp_path)
    (tmp_path / "verdicts.json").write_text("[{")
    with pytest.raises(ScalelabError, match="not valid JSON"):
        read_verdicts(tmp_path)


def test_reproduce_writes_a_valid_verdicts_json(tmp_path):
    """The card end to end on the one section that needs no training (METR's own fits): verdicts.json validates
    and the card states the threshold and both regimes."""
    import json

    from scalelab import papers
    from tests.conftest import SHARED

    if not (SHARED / "data" / "metr").is_dir():
        pytest.skip("needs ../shared/data/metr")
    path = papers.reproduce(["horizon"], tmp_path / "card", opts=papers.Options(shared=SHARED), progress=False)
    obj = json.loads((tmp_path / "card" / "verdicts.json").read_text())
    validate_verdicts(obj)
    assert [v["section"] for v in obj] == ["horizon"] and obj[0]["verdict"] == "holds"
    assert abs(obj[0]["figures"]["doubling_days"] - 212) <= 2
    text = path.read_text()
    assert "|doubling time − 212 days| ≤ 2" in text and "**Regime.** Here:" in text
