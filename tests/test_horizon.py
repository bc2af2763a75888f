"""Tests for scalelab.horizon: METR's published numbers, an independent sklearn fit, synthetic recovery,
METR's resampling order, and bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scalelab import cli, horizon as H
from scalelab.errors import ScalelabError

ROOT = Path(__file__).resolve().parents[1]
METR = ROOT.parent / "shared" / "data" / "metr"
FEB_RUNS = METR / "eval-analysis-public_19b0311_2025-02-27" / "all_runs.jsonl"
PAPER_DATES = METR / "eval-analysis-public_2cd6540_2025-03-18" / "release_dates.yaml"
APR_FITS = METR / "cross-domain-horizon_7ce143a_2025-04-14" / "horizons_raw.csv"
JUN_FITS = METR / "cross-domain-horizon_e97c024_2025-07-14" / "logistic_fits" / "headline.csv"
JUN_BOOT = METR / "cross-domain-horizon_e97c024_2025-07-14" / "bootstrap" / "headline.csv"

needs_metr = pytest.mark.skipif(not METR.is_dir(), reason="../shared/data/metr is absent")


def _skip_without(*paths: Path) -> None:
    for p in paths:
        if not p.is_file():
            pytest.skip(f"{p} is absent")


# ------------------------------------------------------------------------------ the four checks
@needs_metr
def test_doubling_time_on_metr_outputs():
    _skip_without(APR_FITS, PAPER_DATES)
    fits, _ = H.load_fits_csv(APR_FITS, [0.5, 0.8])
    dates = H.load_release_dates(PAPER_DATES)
    models, notes = H.select_models("frontier11", fits, dates, PAPER_DATES)
    assert len(models) == 11 and not notes
    trend = H.fit_trend(fits, dates, models, 0.5)
    assert 212 <= trend.doubling_days <= 214  # paper: 212 days
    assert trend.r2 == pytest.approx(0.981, abs=1e-3)
    # The paper's 2024+ acceleration: ~122 days from METR's p50s (notes §2).
    recent, _ = H.select_models("frontier11", fits, dates, PAPER_DATES, after=H._parse_date("2024-01-01", "t"))
    assert H.fit_trend(fits, dates, recent).doubling_days == pytest.approx(122.3, abs=0.1)


@needs_metr
def test_cis_from_metr_bootstrap_equal_metr_columns():
    _skip_without(JUN_FITS, JUN_BOOT, PAPER_DATES)
    reps = H.load_replicates(JUN_BOOT)
    assert len(reps.values[0.5]) == 1000
    with open(JUN_FITS, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 17
    for row in rows:
        for p in (0.5, 0.8):
            lo, hi = H.quantile_ci(reps.column(row["agent"], p))
            label = H.p_label(p)
            # METR rounds its CSV to 6 decimals.
            assert lo == pytest.approx(float(row[f"{label}q0.025"]), abs=6e-7, rel=1e-6), row["agent"]
            assert hi == pytest.approx(float(row[f"{label}q0.975"]), abs=6e-7, rel=1e-6), row["agent"]
    # And the doubling-time CI of the 11-model trend from the same draws (notes §4: 172–247 days).
    fits, _ = H.load_fits_csv(APR_FITS, [0.5])
    dates = H.load_release_dates(PAPER_DATES)
    models, _ = H.select_models("frontier11", fits, dates, PAPER_DATES)
    trend = H.fit_trend(fits, dates, models, 0.5, reps)
    assert (round(trend.ci[0]), round(trend.ci[1])) == (172, 247)


@needs_metr
def test_feb_fits_match_sklearn():
    _skip_without(FEB_RUNS)
    sklearn = pytest.importorskip("sklearn.linear_model")
    runs = H.load_runs(FEB_RUNS)
    fits = {f.model: f for f in H.fit_models(runs, H.run_weights(runs, "invsqrt"), C=10.0)}
    recs = [json.loads(line) for line in FEB_RUNS.read_text().splitlines() if line.strip()]
    checked = 0
    for model in sorted({r["alias"] for r in recs}):
        rs = [r for r in recs if r["alias"] == model]
        y = np.array([r["score_binarized"] for r in rs])
        if len(set(y)) < 2:  # davinci-002 fails every run: no logistic fit exists
            assert fits[model].status == "all_fail" and math.isnan(fits[model].horizon(0.5))
            continue
        X = np.log2([r["human_minutes"] for r in rs]).reshape(-1, 1)
        w = np.array([r["invsqrt_task_weight"] for r in rs])  # METR's precomputed weights, not ours
        lr = sklearn.LogisticRegression(C=10.0, tol=1e-10, max_iter=10_000).fit(X, y, sample_weight=w)
        p50 = 2 ** (-lr.intercept_[0] / lr.coef_[0, 0])
        assert fits[model].horizon(0.5) == pytest.approx(p50, rel=1e-3), model
        checked += 1
    assert checked == 10


def _synthetic_csv(path: Path, seed: int = 0, a: float = 2.5, b: float = -0.5, runs_per_task: int = 6) -> None:
    rng = np.random.default_rng(seed)
    lines, t = ["model,task_id,task_family,human_minutes,success"], 0
    for fam in range(25):
        for _ in range(rng.integers(1, 6)):
            minutes, t = 2 ** rng.uniform(0, 10), t + 1
            for _ in range(runs_per_task):
                y = rng.random() < 1 / (1 + math.exp(-(a + b * math.log2(minutes))))
                lines.append(f"synthetic,t{t},f{fam},{minutes:.6f},{int(y)}")
    path.write_text("\n".join(lines) + "\n")


def test_synthetic_truth_within_ci(tmp_path):
    a, b = 2.5, -0.5  # true p50 = 2^5 = 32 min, p80 = 2^((ln 4 - a)/b) ≈ 4.7 min
    _synthetic_csv(tmp_path / "s.csv", seed=0, a=a, b=b)
    res = H.analyse(tmp_path / "s.csv", n_bootstrap=200, seed=42)
    fit = res.fits[0]
    for p in (0.5, 0.8):
        truth = float(H.horizon_at(a, b, p))
        lo, hi = fit.ci[p]
        assert lo <= truth <= hi, (p, truth, lo, hi)
        assert lo <= fit.horizon(p) <= hi


# ------------------------------------------------------------------------------------- METR fidelity
def _metr_reference_rows(runs: H.Runs, seed: int) -> np.ndarray:
    """METR's family → task → (task, agent) run resampling, written out loop by loop from the description in
    ../shared/papers/time-horizons.md §3 and src/wrangle/bootstrap.py's algorithm."""
    rng = np.random.default_rng(seed)
    family = np.array([runs.families[runs.task_family[t]] for t in runs.task], dtype=object)
    task = np.array([runs.tasks[t] for t in runs.task], dtype=object)
    agent = np.array([runs.models[m] for m in runs.model], dtype=object)
    fams, fam_inv = np.unique(family, return_inverse=True)
    picked_fams = rng.choice(len(fams), size=len(fams), replace=True)
    indices = []
    for f in picked_fams:
        rows = np.flatnonzero(fam_inv == f)
        tasks, t_inv = np.unique(task[rows], return_inverse=True)
        for t in rng.choice(len(tasks), size=len(tasks), replace=True):
            indices.append(rows[t_inv == t])
    indices = np.concatenate(indices)
    keys = np.array([f"{task[i]}|||{agent[i]}" for i in indices])
    groups, g_inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    u = rng.random(len(indices))
    out, offset = [], 0
    for g, n in enumerate(counts):
        members = indices[g_inv == g]
        out.append(members[(u[offset:offset + n] * n).astype(np.int64)])
        offset += n
    return np.concatenate(out)


def test_resampler_draws_metr_rows(tmp_path):
    _synthetic_csv(tmp_path / "s.csv", seed=3)
    lines = (tmp_path / "s.csv").read_text().splitlines()
    # a second model on a subset of tasks, names chosen so "task|||agent" ordering differs from (task, agent)
    extra = [ln.replace("synthetic", "a-model") for ln in lines[1::3]]
    (tmp_path / "s.csv").write_text("\n".join(lines + extra) + "\n")
    runs = H.load_runs(tmp_path / "s.csv")
    sampler = H.Resampler(runs)
    for seed in (42, 43, 1041):
        ours = np.sort(sampler.draw(np.random.default_rng(seed)))
        assert np.array_equal(ours, np.sort(_metr_reference_rows(runs, seed)))


@needs_metr
def test_weights_equal_metr_precomputed_columns():
    _skip_without(FEB_RUNS)
    runs = H.load_runs(FEB_RUNS)
    recs = [json.loads(line) for line in FEB_RUNS.read_text().splitlines() if line.strip()]
    for scheme, col in (("invsqrt", "invsqrt_task_weight"), ("equal", "equal_task_weight")):
        np.testing.assert_allclose(H.run_weights(runs, scheme), [r[col] for r in recs], atol=1e-9)
    assert np.array_equal(np.sort(H.Resampler(runs).draw(np.random.default_rng(42))),
                          np.sort(_metr_reference_rows(runs, 42)))


def test_fit_is_warm_start_independent():
    rng = np.random.default_rng(1)
    x = np.linspace(0, 10, 30)
    w1, w0 = rng.random((5, 30)), rng.random((5, 30))
    a1, b1 = H.fit_logistic(x, w1, w0, 10.0)
    a2, b2 = H.fit_logistic(x, w1, w0, 10.0, a0=np.full(5, 8.0), b0=np.full(5, 3.0))
    np.testing.assert_allclose(a1, a2, atol=1e-8)
    np.testing.assert_allclose(b1, b2, atol=1e-8)


# ---------------------------------------------------------------------------------------- the report
def _write_csv(path: Path, rows: list[str], header: str = "model,task_id,task_family,human_minutes,success") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_report_end_to_end_and_all_fail_model(tmp_path):
    _synthetic_csv(tmp_path / "s.csv", seed=1)
    lines = (tmp_path / "s.csv").read_text().splitlines()
    lines += [ln.replace("synthetic", "later") for ln in lines[1:]]
    lines += [",".join(["zero", *ln.split(",")[1:4], "0"]) for ln in lines[1:40]]  # fails every run
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    dates = _write_csv(tmp_path / "d.csv", ["synthetic,2023-01-01", "later,2024-01-01", "zero,2022-01-01"],
                       header="model,release_date")
    out = tmp_path / "report"
    cli.horizon(tmp_path / "s.csv", release_dates=dates, out=out, n_bootstrap=30, p="50,80,95")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bootstrap.csv", "headline.png", "horizons.csv", "report.md", "success_vs_length.png"]
    md = (out / "report.md").read_text()
    assert "below task range" in md and "excluded zero" in md and "| p95 |" in md
    with open(out / "horizons.csv", newline="") as f:
        rows = {r["agent"]: r for r in csv.DictReader(f)}
    assert rows["zero"]["status"] == "all_fail" and rows["zero"]["p50"] == ""
    reps = H.load_replicates(out / "bootstrap.csv")
    assert reps.values[0.95].shape == (30, 3)

    # A failure while writing leaves the previous report as it was, and no temporary files.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import scalelab.horizon_report as R

    def boom(*_):
        raise RuntimeError("disk full")

    orig, R._write_md = R._write_md, boom
    try:
        with pytest.raises(RuntimeError):
            cli.horizon(tmp_path / "s.csv", release_dates=dates, out=out, n_bootstrap=10, seed=7)
    finally:
        R._write_md = orig
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ----------------------------------------------------------------------------------------- bad input
GOOD = "m,t1,f1,5,1"


@pytest.mark.parametrize("rows, message", [
    (["m,t1,f1,5,1", "m,t2,f1,,0"], "bad.csv:3: missing field 'human_minutes'"),
    (["m,t1,f1,5,1", "m,t2,f1,0,0"], "bad.csv:3: human_minutes must be a positive number of minutes, got 0"),
    (["m,t1,f1,-2,1"], "bad.csv:2: human_minutes must be a positive number"),
    (["m,t1,f1,5,0.5"], "bad.csv:2: success must be 0 or 1, got '0.5'"),
    (["m,t1,f1,5,2"], "bad.csv:2: success must be 0 or 1"),
    (["m,t1,f1,5,1", "m,t1,f2,5,1"], "bad.csv:3: task 't1' is in family 'f2' here but in 'f1' on line 2"),
    ([], "bad.csv: no runs found (empty file)"),
])
def test_bad_csv(tmp_path, rows, message):
    path = _write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(ScalelabError) as e:
        H.load_runs(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_csv_header_and_empty_file(tmp_path):
    with pytest.raises(ScalelabError, match=r"bad.csv:1: missing column 'task_family'"):
        H.load_runs(_write_csv(tmp_path / "bad.csv", [GOOD], header="model,task_id,human_minutes,success"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ScalelabError, match=r"empty.jsonl: no runs found \(empty file\)"):
        H.load_runs(tmp_path / "empty.jsonl")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ScalelabError, match=r"empty.csv: no runs found"):
        H.load_runs(tmp_path / "empty.csv")


def test_bad_jsonl(tmp_path):
    ok = {"task_id": "a/1", "task_family": "a", "alias": "m", "human_minutes": 3.0, "score_binarized": 1}
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(ok) + "\n\n" + '{"task_id": "a/2", "task_family": \n')
    with pytest.raises(ScalelabError, match=r"runs.jsonl:3: not valid JSON"):
        H.load_runs(path)
    path.write_text(json.dumps(ok) + "\n" + json.dumps({k: v for k, v in ok.items() if k != "alias"}) + "\n")
    with pytest.raises(ScalelabError, match=r"runs.jsonl:2: missing field 'alias'"):
        H.load_runs(path)
    path.write_text(json.dumps({**ok, "score_binarized": 0.7}) + "\n")
    with pytest.raises(ScalelabError, match=r"runs.jsonl:1: success must be 0 or 1, got 0.7 \(continuous"):
        H.load_runs(path)
    path.write_text(json.dumps({**ok, "human_minutes": 0}) + "\n")
    with pytest.raises(ScalelabError, match=r"runs.jsonl:1: human_minutes must be a positive"):
        H.load_runs(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ScalelabError, match=r"runs.jsonl:1: expected a JSON object"):
        H.load_runs(path)


def test_unknown_models_and_bad_dates(tmp_path):
    _synthetic_csv(tmp_path / "s.csv", seed=2)
    yaml_dates = tmp_path / "dates.yaml"
    yaml_dates.write_text("date:\n  synthetc: 2024-01-01\n  other: 2023-01-01\n")
    with pytest.raises(ScalelabError, match=r"dates.yaml: no release date for model 'synthetic' "
                                            r"\(did you mean 'synthetc'\?\)"):
        H.analyse(tmp_path / "s.csv", release_dates=yaml_dates, models="synthetic", n_bootstrap=0)
    with pytest.raises(ScalelabError, match=r"--models: unknown model 'nope'"):
        H.analyse(tmp_path / "s.csv", release_dates=yaml_dates, models="nope", n_bootstrap=0)
    bad_csv = _write_csv(tmp_path / "d.csv", ["synthetic,2024-13-01"], header="model,release_date")
    with pytest.raises(ScalelabError, match=r"d.csv:2: release date must be YYYY-MM-DD, got '2024-13-01'"):
        H.load_release_dates(bad_csv)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ScalelabError, match=r"empty.yaml: expected `date: \{model: YYYY-MM-DD\}`"):
        H.load_release_dates(tmp_path / "empty.yaml")
    with pytest.raises(ScalelabError, match=r"--weighting: unknown 'sqrt'"):
        H.analyse(tmp_path / "s.csv", weighting="sqrt", n_bootstrap=0)
    with pytest.raises(ScalelabError, match=r"--p: 150 is not"):
        H.parse_ps("50,150")


def test_cli_exit_code(tmp_path):
    if not (ROOT / "scalelab" / "cli.py").is_file():
        pytest.skip("scalelab/cli.py does not exist yet")
    bad = _write_csv(tmp_path / "bad.csv", ["m,t1,f1,0,1"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "scalelab.cli", "horizon", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    if "No such command" in proc.stderr:
        pytest.skip("scalelab.cli does not register `horizon` yet")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("bad.csv:2: human_minutes must be a positive number "
                                                         "of minutes, got 0")


def test_impossible_yaml_date_is_one_error(tmp_path):
    """PyYAML builds dates itself and raises ValueError (not YAMLError) for 2024-13-45: that was a traceback."""
    yaml_dates = tmp_path / "dates.yaml"
    yaml_dates.write_text("date:\n  m: 2024-13-45\n")
    with pytest.raises(ScalelabError, match=r"dates.yaml: a value is not valid \(month must be in 1..12\); "
                                            r"release dates are YYYY-MM-DD"):
        H.load_release_dates(yaml_dates)
    (tmp_path / "latin1.yaml").write_bytes("date:\n  caf\xe9: 2024-01-01\n".encode("latin-1"))
    with pytest.raises(ScalelabError, match=r"latin1.yaml: not UTF-8 text"):
        H.load_release_dates(tmp_path / "latin1.yaml")
    (tmp_path / "latin1.csv").write_bytes("model,task_id,task_family,human_minutes,success\ncaf\xe9,t,f,1,1\n"
                                          .encode("latin-1"))
    with pytest.raises(ScalelabError, match=r"latin1.csv: not UTF-8 text"):
        H.load_runs(tmp_path / "latin1.csv")


@pytest.mark.parametrize("args, message", [
    (["-b", "-1"], "--bootstrap must be >= 0 replicates (0: no bootstrap, no CIs), got -1"),
    (["--seed", "-3"], "--seed must be >= 0 (replicate r uses default_rng(seed + r)), got -3"),
    (["--set", "horizon.level=1.5"], "horizon.level must be in (0, 1), got 1.5"),
])
def test_bad_bootstrap_settings_leave_the_report(tmp_path, args, message):
    """`horizon -b -1` silently wrote a report without CIs over the existing one; a negative seed was a traceback."""
    _synthetic_csv(tmp_path / "s.csv", seed=3)
    out = tmp_path / "report"
    cli.horizon(tmp_path / "s.csv", out=out, n_bootstrap=5)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "scalelab.cli", "horizon", str(tmp_path / "s.csv"), "-o", str(out),
                           *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {message}"], proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
