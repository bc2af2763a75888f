"""METR-style time horizons: per-model logistic fits, hierarchical bootstrap, doubling-time trends.

Follows "Measuring AI Ability to Complete Long Tasks" (Kwa et al., METR, 2025) as coded in
METR/eval-analysis-public @ 2cd6540 (notes: ../shared/papers/time-horizons.md, section 3).

- Weights: per model, 1/(runs of that model on the task) ÷ √(tasks of that model in the family), normalised
  to sum 1 per model ("invsqrt", METR's headline); "equal" (every task counts the same), "none" and "given"
  (a `weight` column) are options. They are recomputed from the runs, not read from METR's precomputed columns.
- Fit: success ~ σ(a + b·log2(human_minutes)) minimising ½b² + C·Σ wᵢℓᵢ (sklearn's LogisticRegression with
  C = 10 = 1/METR's regularization 0.1; the intercept is not penalised). Solved by batched, damped Newton
  steps in numpy over every (replicate, model) pair at once, on data compressed to one point per
  (model, distinct task length, outcome): the loss only depends on those weight sums.
- Horizon at success probability p: 2^((logit p − a)/b) minutes. A model that fails (or succeeds) on every run
  has no crossing point: it is reported as below (above) the task range instead of METR's p50 = 0.
- Bootstrap: families → tasks within each family copy → runs within (task, model), one resample shared by
  all models, weights not renormalised, replicate r drawn from `np.random.default_rng(seed + r)`. The random
  calls are made in METR's order, so with seed 42 the rows drawn are the rows METR's code draws.
- Trend: OLS of ln(max(p50, 1e-3)) on release date in days; doubling time = ln 2 / slope; its CI refits the
  OLS on each replicate (dropping p50s that are NaN, inf or < 1e-3, keeping positive doubling times only).

Deliberately different from METR's code:
- All-fail / all-success models get "below / above the task range" and stay out of the trend (METR: p50 = 0,
  clipped to 1e-3 in the trend; an all-success agent would stop sklearn with an error).
- Fits are solved to convergence; METR's lbfgs stops at sklearn's tol = 1e-4, which moves its p50s by up to
  ~0.5% on the February runs file (GPT-4 0314: 3.669 min against the converged 3.657).
- CIs and the trend band are 95% throughout; METR's headline figure draws an 80% band and prints an 80% CI.
"""

from __future__ import annotations

import csv
import datetime as dt
import difflib
import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scalelab.errors import DataError, ScalelabError

WEIGHTINGS = ("invsqrt", "equal", "none", "given")
TIME_BUCKETS = (1, 4, 16, 64, 256, 960)  # METR's empirical success-rate buckets, minutes
MIN_TREND_HORIZON = 1e-3  # METR clips p50 at 1e-3 min before taking logs (drops such replicates)
# METR's headline trend: every agent with a release date, minus human and its non_frontier_agents.
PRESETS = {
    "frontier11": (
        "GPT-2", "davinci-002 (GPT-3)", "gpt-3.5-turbo-instruct", "GPT-4 0314", "GPT-4 1106", "GPT-4o",
        "Claude 3.5 Sonnet (Old)", "o1-preview", "Claude 3.5 Sonnet (New)", "o1", "Claude 3.7 Sonnet",
    ),
}


# ----------------------------------------------------------------------------------------------- input
def _text_file(read: Callable) -> Callable:
    """A reader of a user's file whose undecodable bytes or unreadable CSV are one DataError naming the file."""
    @functools.wraps(read)
    def wrapper(path, *args, **kw):
        try:
            return read(path, *args, **kw)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        except csv.Error as e:
            raise DataError(f"{path}: not a readable CSV file ({e})") from None
    return wrapper


@dataclass
class Runs:
    """One row per run, as integer codes into sorted name lists (the sort order METR's np.unique gives)."""

    path: Path
    models: list[str]
    tasks: list[str]
    families: list[str]
    model: np.ndarray  # (N,) index into models
    task: np.ndarray  # (N,) index into tasks
    task_family: np.ndarray  # (T,) index into families
    minutes: np.ndarray  # (N,) human minutes of the run's task
    success: np.ndarray  # (N,) 0.0 or 1.0
    weight: np.ndarray | None = None  # (N,) a `weight` column, if the file had one

    def __len__(self) -> int:
        return len(self.model)


_FIELDS = {  # our name: accepted spellings, first found wins
    "model": ("alias", "agent", "model"),
    "task_id": ("task_id",),
    "task_family": ("task_family",),
    "human_minutes": ("human_minutes",),
    "success": ("score_binarized", "success"),
}


def _parse_row(get: Callable[[str], object], where: str) -> tuple[str, str, str, float, float, float | None]:
    vals: dict[str, object] = {}
    for name, spellings in _FIELDS.items():
        v = next((get(s) for s in spellings if get(s) not in (None, "")), None)
        if v is None:
            raise DataError(f"{where}: missing field '{spellings[0]}'")
        vals[name] = v
    try:
        minutes = float(vals["human_minutes"])  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"{where}: human_minutes must be a number, got {vals['human_minutes']!r}") from None
    if not (math.isfinite(minutes) and minutes > 0):
        raise DataError(f"{where}: human_minutes must be a positive number of minutes, got {minutes:g}")
    s = vals["success"]
    s = {"true": 1.0, "false": 0.0}.get(s.strip().lower(), s) if isinstance(s, str) else s
    try:
        success = float(s)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        success = float("nan")
    if success not in (0.0, 1.0):
        raise DataError(f"{where}: success must be 0 or 1, got {vals['success']!r} "
                        "(continuous scores are not fitted; binarize them first, as METR's score_binarized)")
    w = get("weight")
    weight = None
    if w not in (None, ""):
        try:
            weight = float(w)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            weight = float("nan")
        if not (math.isfinite(weight) and weight >= 0):
            raise DataError(f"{where}: weight must be a non-negative number, got {w!r}")
    return str(vals["model"]), str(vals["task_id"]), str(vals["task_family"]), minutes, success, weight


def _rows_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec.get


def _rows_csv(path: Path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return
        for spellings in _FIELDS.values():
            if not any(s in reader.fieldnames for s in spellings):
                name = "model" if spellings[0] == "alias" else spellings[0]
                raise DataError(f"{path}:1: missing column '{name}' "
                                "(need model, task_id, task_family, human_minutes, success[, weight])")
        for rec in reader:
            if None in rec:  # more cells than header columns
                raise DataError(f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(rec[None])} cells, "
                                f"header has {len(reader.fieldnames)}")
            yield reader.line_num, rec.get


@_text_file
def load_runs(path: Path) -> Runs:
    """Read METR's runs JSONL or a plain CSV (model, task_id, task_family, human_minutes, success[, weight])."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = _rows_csv(path) if path.suffix.lower() == ".csv" else _rows_jsonl(path)
    recs, family_of, first_seen = [], {}, {}
    for lineno, get in rows:
        where = f"{path}:{lineno}"
        rec = _parse_row(get, where)
        model, task, family = rec[:3]
        if family_of.setdefault(task, family) != family:
            raise DataError(f"{where}: task '{task}' is in family '{family}' here but in "
                            f"'{family_of[task]}' on line {first_seen[task]}")
        first_seen.setdefault(task, lineno)
        recs.append(rec)
    if not recs:
        raise DataError(f"{path}: no runs found (empty file)")
    weights = [r[5] for r in recs]
    if any(w is None for w in weights) and not all(w is None for w in weights):
        i = next(i for i, w in enumerate(weights) if w is None)
        raise DataError(f"{path}: some runs have a weight and some do not (e.g. run {i + 1})")
    models, tasks = sorted({r[0] for r in recs}), sorted(family_of)
    families = sorted(set(family_of.values()))
    mi, ti, fi = ({n: i for i, n in enumerate(x)} for x in (models, tasks, families))
    return Runs(
        path=path, models=models, tasks=tasks, families=families,
        model=np.array([mi[r[0]] for r in recs]), task=np.array([ti[r[1]] for r in recs]),
        task_family=np.array([fi[family_of[t]] for t in tasks]),
        minutes=np.array([r[3] for r in recs]), success=np.array([r[4] for r in recs]),
        weight=None if weights[0] is None else np.array(weights, dtype=float),
    )


def _parse_date(value: object, where: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise DataError(f"{where}: release date must be YYYY-MM-DD, got {value!r}") from None


@_text_file
def load_release_dates(path: Path) -> dict[str, dt.date]:
    """METR's release_dates.yaml (`date: {alias: YYYY-MM-DD}`; a flat mapping also works) or a CSV
    with columns model, release_date."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        out = {}
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            names = reader.fieldnames or []
            mcol = next((c for c in ("model", "alias", "agent") if c in names), None)
            dcol = next((c for c in ("release_date", "date") if c in names), None)
            if mcol is None or dcol is None:
                raise DataError(f"{path}:1: need columns model and release_date")
            for rec in reader:
                if rec.get(mcol):
                    out[rec[mcol]] = _parse_date(rec.get(dcol), f"{path}:{reader.line_num}")
    else:
        import yaml

        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise DataError(f"{path}{line}: not valid YAML") from None
        except (ValueError, TypeError, OverflowError) as e:  # PyYAML's constructors, e.g. a date 2024-13-45
            raise DataError(f"{path}: a value is not valid ({str(e).splitlines()[0]}); "
                            "release dates are YYYY-MM-DD") from None
        if isinstance(doc, dict) and isinstance(doc.get("date"), dict):
            doc = doc["date"]
        if not isinstance(doc, dict):
            raise DataError(f"{path}: expected `date: {{model: YYYY-MM-DD}}` (METR's release_dates.yaml)")
        out = {str(k): _parse_date(v, f"{path}: model '{k}'") for k, v in doc.items()}
    if not out:
        raise DataError(f"{path}: no release dates found (empty file)")
    return out


# ---------------------------------------------------------------------------------------------- weights
def run_weights(runs: Runs, scheme: str = "invsqrt") -> np.ndarray:
    """Per-run weights, normalised to sum 1 within each model (METR's compute_task_weights)."""
    M, T, F = len(runs.models), len(runs.tasks), len(runs.families)
    mt = runs.model * T + runs.task
    n_runs = np.bincount(mt, minlength=M * T)  # runs per (model, task)
    if scheme == "none":
        w = np.ones(len(runs))
    elif scheme == "given":
        if runs.weight is None:
            raise DataError(f"{runs.path}: --weighting given needs a 'weight' column")
        w = runs.weight.copy()
    elif scheme in ("equal", "invsqrt"):
        w = 1.0 / n_runs[mt]
        if scheme == "invsqrt":  # family size counted over the model's own tasks
            m_of, t_of = np.divmod(np.flatnonzero(n_runs), T)
            n_fam = np.bincount(m_of * F + runs.task_family[t_of], minlength=M * F)
            w = w / np.sqrt(n_fam[runs.model * F + runs.task_family[runs.task]])
    else:
        raise ScalelabError(f"unknown weighting '{scheme}' (choose from {', '.join(WEIGHTINGS)})")
    total = np.bincount(runs.model, weights=w, minlength=M)
    if np.any(total[np.unique(runs.model)] <= 0):
        bad = runs.models[int(np.flatnonzero(total <= 0)[0])]
        raise DataError(f"{runs.path}: the weights of model '{bad}' sum to 0")
    return w / total[runs.model]


# ------------------------------------------------------------------------------------------------- fit
def _objective(a, b, x, w1, w0, C):
    z = a[..., None] + b[..., None] * x
    return 0.5 * b**2 + C * (w1 * np.logaddexp(0, -z) + w0 * np.logaddexp(0, z)).sum(-1)


def fit_logistic(x: np.ndarray, w1: np.ndarray, w0: np.ndarray, C: float,
                 a0: np.ndarray | None = None, b0: np.ndarray | None = None,
                 tol: float = 1e-10, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ½b² + C·Σₓ [w1ₓ·ℓ(1, a + b·x) + w0ₓ·ℓ(0, a + b·x)] for a batch of problems.

    # x: (X,) distinct log2 minutes; w1, w0: (..., X) weight of successes / failures at each x
    # returns a, b: (...). Problems without both outcomes have no minimiser and come back NaN.
    """
    batch = w1.shape[:-1]
    ok = (w1.sum(-1) > 0) & (w0.sum(-1) > 0)
    w1, w0 = np.where(ok[..., None], w1, 1.0), np.where(ok[..., None], w0, 1.0)
    if a0 is None:
        a0 = np.log(w1.sum(-1) / w0.sum(-1))
    a = np.broadcast_to(a0, batch).astype(float).copy()
    b = np.zeros(batch) if b0 is None else np.broadcast_to(b0, batch).astype(float).copy()
    a[~np.isfinite(a)], b[~np.isfinite(b)] = 0.0, 0.0
    for _ in range(max_iter):
        z = a[..., None] + b[..., None] * x
        p = 1.0 / (1.0 + np.exp(-z))
        r = C * (w0 * p - w1 * (1.0 - p))  # C·Σ w (p − y), per x
        s = C * (w1 + w0) * p * (1.0 - p)
        ga, gb = r.sum(-1), b + (r * x).sum(-1)
        haa, hab, hbb = s.sum(-1), (s * x).sum(-1), 1.0 + (s * x * x).sum(-1)
        det = haa * hbb - hab**2
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        if np.max(np.abs(da) + np.abs(db), initial=0.0) < tol:
            break
        # Backtracking keeps far-from-optimum starts (and near-separable data) from overshooting.
        f0, t, decrease = _objective(a, b, x, w1, w0, C), np.ones(batch), ga * da + gb * db
        for _ in range(40):
            bad = _objective(a - t * da, b - t * db, x, w1, w0, C) > f0 - 1e-4 * t * decrease + 1e-12 * np.abs(f0)
            if not bad.any():
                break
            t = np.where(bad, t / 2, t)
        a, b = a - t * da, b - t * db
    return np.where(ok, a, np.nan), np.where(ok, b, np.nan)


def horizon_at(a, b, p: float):
    """Task length (minutes) at which the fitted success probability is p: 2^((logit p − a)/b)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.exp2((math.log(p / (1 - p)) - np.asarray(a)) / np.asarray(b))


@dataclass
class ModelFit:
    model: str
    slope: float
    intercept: float
    status: str = "ok"  # ok | all_fail | all_success | positive_slope
    n_runs: int = 0
    n_tasks: int = 0
    min_minutes: float = float("nan")
    max_minutes: float = float("nan")
    average: float = float("nan")
    bce_loss: float = float("nan")
    buckets: dict[str, float] = field(default_factory=dict)
    given: dict[float, float] = field(default_factory=dict)  # horizons read from a fits file
    ci: dict[float, tuple[float, float]] = field(default_factory=dict)  # p -> (lo, hi)

    def horizon(self, p: float) -> float:
        """Minutes at success probability p; NaN when it lies beyond the task range (all fail/succeed)."""
        if p in self.given:
            return self.given[p]
        if self.status in ("all_fail", "all_success"):
            return float("nan")
        return float(horizon_at(self.intercept, self.slope, p))

    def describe(self, p: float) -> str:
        """The horizon as a person should read it, saying when it is outside the tasks that were run."""
        if self.status == "all_fail":
            return f"below task range (all runs failed; shortest task {self.min_minutes:.3g} min)"
        if self.status == "all_success":
            return f"above task range (all runs succeeded; longest task {self.max_minutes:.3g} min)"
        h, text = self.horizon(p), fmt_minutes(self.horizon(p))
        if h < self.min_minutes:
            text += f" (extrapolated below the shortest task, {self.min_minutes:.3g} min)"
        elif h > self.max_minutes:
            text += f" (extrapolated beyond the longest task, {self.max_minutes:.3g} min)"
        return text


def fmt_minutes(m: float) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.3g}" if m < 10 else f"{m:.1f}"


@dataclass
class Design:
    """Runs compressed for fitting: the loss depends only on weight sums per (model, distinct x, outcome)."""

    x: np.ndarray  # (X,) distinct log2(minutes)
    cell: np.ndarray  # (N,) flat index into (M, X, 2) of each run
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, runs: Runs) -> "Design":
        x, xid = np.unique(np.log2(runs.minutes), return_inverse=True)
        cell = (runs.model * len(x) + xid) * 2 + runs.success.astype(int)
        return cls(x, cell, (len(runs.models), len(x), 2))

    def sums(self, rows: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(M, X, 2) weight sums of the given rows (with repeats) – one bootstrap replicate."""
        n = int(np.prod(self.shape))
        return np.bincount(self.cell[rows], weights=w[rows], minlength=n).reshape(self.shape)


def fit_models(runs: Runs, w: np.ndarray, C: float = 10.0) -> list[ModelFit]:
    """The point fit of every model in `runs` (METR's agent_regression)."""
    d = Design.of(runs)
    W = d.sums(np.arange(len(runs)), w)  # (M, X, 2)
    a, b = fit_logistic(d.x, W[..., 1], W[..., 0], C)
    fits = []
    for m, name in enumerate(runs.models):
        rows = runs.model == m
        y, wm, mins = runs.success[rows], w[rows], runs.minutes[rows]
        fit = ModelFit(name, float(b[m]), float(a[m]), n_runs=int(rows.sum()),
                       n_tasks=len(np.unique(runs.task[rows])), min_minutes=float(mins.min()),
                       max_minutes=float(mins.max()), average=float(np.sum(wm * y) / np.sum(wm)))
        for lo, hi in zip(TIME_BUCKETS[:-1], TIME_BUCKETS[1:]):
            inb = (mins >= lo) & (mins < hi)
            rate = np.sum(wm[inb] * y[inb]) / np.sum(wm[inb]) if inb.any() else np.nan
            fit.buckets[f"{lo}-{hi} min"] = float(rate)
        if np.all(y == 0) or np.all(y == 1):
            fit.status = "all_fail" if np.all(y == 0) else "all_success"
            fit.slope, fit.intercept = float("nan"), float("nan")
        else:
            prob = np.clip(1 / (1 + np.exp(-(fit.intercept + fit.slope * np.log2(mins)))), 1e-15, 1 - 1e-15)
            fit.bce_loss = float(-np.sum(wm * (y * np.log(prob) + (1 - y) * np.log(1 - prob))) / np.sum(wm))
            if fit.slope >= 0:
                fit.status = "positive_slope"
        fits.append(fit)
    return fits


# ------------------------------------------------------------------------------------------- bootstrap
class Resampler:
    """METR's hierarchical bootstrap (src/wrangle/bootstrap.py), vectorised per replicate.

    METR resamples families, then tasks inside each family copy (one rng.choice per copy, in copy order), then
    draws runs within each (task_id, agent) group: the groups are ordered by the string "task|||agent", group g
    holds its runs tiled once per copy of the task, and takes ⌊u·count⌋ of its slice of one rng.random(L).
    Making the same calls in the same order reproduces METR's rows for the same seed.
    """

    def __init__(self, runs: Runs):
        T = len(runs.tasks)
        self.n_tasks = T
        self.family_tasks = [np.flatnonzero(runs.task_family == f) for f in range(len(runs.families))]
        pairs = sorted({(int(t), int(m)) for t, m in zip(runs.task, runs.model)},
                       key=lambda tm: f"{runs.tasks[tm[0]]}|||{runs.models[tm[1]]}")
        pair_of = {tm: i for i, tm in enumerate(pairs)}
        pid = np.array([pair_of[(int(t), int(m))] for t, m in zip(runs.task, runs.model)])
        self.pair_rows = np.argsort(pid, kind="stable")  # rows grouped by pair, file order within
        self.pair_n = np.bincount(pid, minlength=len(pairs))
        self.pair_start = np.concatenate([[0], np.cumsum(self.pair_n)[:-1]])
        self.pair_task = np.array([t for t, _ in pairs])

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Row indices of one replicate (with repeats)."""
        F = len(self.family_tasks)
        fams = rng.choice(F, size=F, replace=True)
        picked = [ft[rng.choice(len(ft), size=len(ft), replace=True)] for ft in (self.family_tasks[f] for f in fams)]
        copies = np.bincount(np.concatenate(picked), minlength=self.n_tasks)
        count = copies[self.pair_task] * self.pair_n
        u = rng.random(int(count.sum()))
        g = np.repeat(np.arange(len(count)), count)
        pos = (u * count[g]).astype(np.int64) % self.pair_n[g]
        return self.pair_rows[self.pair_start[g] + pos]


@dataclass
class Replicates:
    """Bootstrap horizons: values[p] is (R, M) minutes, NaN where a model could not be fitted."""

    models: list[str]
    values: dict[float, np.ndarray]

    def column(self, model: str, p: float) -> np.ndarray | None:
        if p not in self.values or model not in self.models:
            return None
        return self.values[p][:, self.models.index(model)]


def bootstrap(runs: Runs, w: np.ndarray, fits: list[ModelFit], ps: Sequence[float], n: int = 1000,
              seed: int = 42, C: float = 10.0, chunk: int = 50,
              progress: Callable[[int], None] | None = None) -> Replicates:
    """n hierarchical replicates; every model refitted on each, warm-started from its point fit."""
    d, sampler = Design.of(runs), Resampler(runs)
    a0 = np.array([0.0 if math.isnan(f.intercept) else f.intercept for f in fits])
    b0 = np.array([0.0 if math.isnan(f.slope) else f.slope for f in fits])
    out = {p: np.full((n, len(fits)), np.nan) for p in ps}
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        W = np.stack([d.sums(sampler.draw(np.random.default_rng(seed + r)), w) for r in range(start, stop)])
        a, b = fit_logistic(d.x, W[..., 1], W[..., 0], C, a0, b0)  # (R, M)
        for p in ps:
            out[p][start:stop] = horizon_at(a, b, p)
        if progress:
            progress(stop - start)
    return Replicates(list(runs.models), out)


def p_label(p: float) -> str:
    return f"p{100 * p:g}"


def save_replicates(reps: Replicates, path: Path) -> None:
    """METR's bootstrap CSV layout: one row per replicate, columns `<model>_p50`, `<model>_p80`, …"""
    cols = [(m, p) for i, m in enumerate(reps.models) for p in reps.values]
    with open(path, "w", encoding="utf-8", newline="") as f:
        wr = csv.writer(f)
        wr.writerow([f"{m}_{p_label(p)}" for m, p in cols])
        R = len(next(iter(reps.values.values()))) if reps.values else 0
        for r in range(R):
            wr.writerow(["" if math.isnan(v) else repr(float(v))
                         for v in (reps.values[p][r, reps.models.index(m)] for m, p in cols)])


@_text_file
def load_replicates(path: Path) -> Replicates:
    """Read a replicate CSV written by `save_replicates` or METR's bootstrap/headline.csv."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise DataError(f"{path}: no bootstrap replicates found (empty file)")
    keys = []
    for col in rows[0]:
        model, _, label = col.rpartition("_p")
        try:
            keys.append((model, float(label) / 100) if model else None)
        except ValueError:
            keys.append(None)
    if not any(keys):
        raise DataError(f"{path}:1: no columns named like '<model>_p50'")
    try:
        data = np.array([[float(c) if c.strip() else np.nan for c in row] for row in rows[1:] if row], dtype=float)
    except ValueError:
        bad = next(i for i, row in enumerate(rows[1:], 2) if any(_not_float(c) for c in row))
        raise DataError(f"{path}:{bad}: a value is not a number") from None
    models = sorted({k[0] for k in keys if k})
    values = {p: np.full((len(data), len(models)), np.nan) for p in sorted({k[1] for k in keys if k})}
    for j, k in enumerate(keys):
        if k:
            values[k[1]][:, models.index(k[0])] = data[:, j]
    return Replicates(models, values)


def _not_float(c: str) -> bool:
    try:
        float(c) if c.strip() else None
        return False
    except ValueError:
        return True


def quantile_ci(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """METR's per-model CI: nanquantile at (1 ± level)/2 over replicates (axis 0)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN
        lo, hi = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


# ----------------------------------------------------------------------------------------------- trend
@dataclass
class Trend:
    p: float
    models: list[str]
    slope: float  # ln(minutes) per day
    intercept: float  # ln(minutes) at day 0 = 1970-01-01 (matplotlib's date2num epoch)
    r2: float
    excluded: dict[str, str]
    ci: tuple[float, float] = (float("nan"), float("nan"))  # doubling time, days
    n_kept: int = 0
    n_replicates: int = 0
    boot_lines: np.ndarray | None = None  # (K, 2) slope, intercept of replicates with ≥ 2 usable points

    @property
    def doubling_days(self) -> float:
        return math.log(2) / self.slope if self.slope else float("inf")


def date_days(d: dt.date) -> float:
    return float((d - dt.date(1970, 1, 1)).days)


def ols(days: np.ndarray, logh: np.ndarray, mask: np.ndarray | None = None):
    """Row-wise OLS of logh on days over the masked entries: returns slope, intercept, R² (arrays).

    # days: (K,); logh, mask: (R, K)
    """
    logh = np.atleast_2d(logh)
    m = np.ones(logh.shape, bool) if mask is None else np.atleast_2d(mask)
    n = m.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        xm = (m * days).sum(-1) / n
        ym = np.where(m, logh, 0).sum(-1) / n
        dx, dy = np.where(m, days - xm[:, None], 0), np.where(m, logh - ym[:, None], 0)
        slope = (dx * dy).sum(-1) / (dx * dx).sum(-1)
        r2 = 1 - ((dy - slope[:, None] * dx) ** 2).sum(-1) / (dy * dy).sum(-1)
    return slope, ym - slope * xm, r2


def fit_trend(fits: list[ModelFit], dates: dict[str, dt.date], models: Sequence[str], p: float = 0.5,
              reps: Replicates | None = None, level: float = 0.95) -> Trend:
    """ln(p-horizon) ~ release day over `models`, with the doubling-time CI from `reps` (METR's fit_trendline
    and add_bootstrap_confidence_region)."""
    by_name = {f.model: f for f in fits}
    use, excluded = [], {}
    for m in models:
        h = by_name[m].horizon(p)
        if by_name[m].status in ("all_fail", "all_success"):
            excluded[m] = by_name[m].describe(p)
        elif not math.isfinite(h):
            excluded[m] = "no finite horizon"
        else:
            use.append(m)
    if len(use) < 2:
        raise ScalelabError(f"the trend needs at least 2 models with a finite {p_label(p)} and a release date, "
                            f"got {len(use)}")
    days = np.array([date_days(dates[m]) for m in use])
    logh = np.log(np.clip([by_name[m].horizon(p) for m in use], MIN_TREND_HORIZON, None))
    slope, intercept, r2 = (float(v[0]) for v in ols(days, logh))
    trend = Trend(p, use, slope, intercept, r2, excluded)
    cols = [reps.column(m, p) for m in use] if reps is not None else []
    if cols and all(c is not None for c in cols):
        H = np.stack(cols, axis=1)  # (R, K)
        ok = np.isfinite(H) & (H >= MIN_TREND_HORIZON)
        with np.errstate(divide="ignore", invalid="ignore"):
            s, b, _ = ols(days, np.log(np.where(ok, H, 1.0)), ok)
        fitted = (ok.sum(-1) >= 2) & np.isfinite(s)
        doubling = math.log(2) / s[fitted & (s > 0)]
        trend.n_replicates, trend.n_kept = len(H), len(doubling)
        trend.boot_lines = np.stack([s[fitted], b[fitted]], axis=1)
        if len(doubling):
            lo, hi = np.percentile(doubling, [50 * (1 - level), 50 * (1 + level)])
            trend.ci = (float(lo), float(hi))
    return trend


def select_models(spec: str | None, fits: list[ModelFit], dates: dict[str, dt.date], dates_path: Path | None,
                  after: dt.date | None = None) -> tuple[list[str], list[str]]:
    """The models that enter the trend, and notes on preset members that are absent.

    None or "all": every fitted model with a release date except `human`; a preset name: its members found in the
    fits; otherwise a comma list, where every name must be fitted and dated.
    """
    fitted, notes = [f.model for f in fits], []
    if spec in (None, "", "all"):
        chosen = [m for m in fitted if m in dates and m != "human"]
    elif spec in PRESETS:
        chosen = [m for m in PRESETS[spec] if m in fitted]
        missing = [m for m in PRESETS[spec] if m not in fitted]
        if missing:
            notes.append(f"preset {spec}: not in the runs: {', '.join(missing)}")
    else:
        chosen = [m.strip() for m in spec.split(",") if m.strip()]
        for m in chosen:
            if m not in fitted:
                raise ScalelabError(f"--models: unknown model '{m}'{_did_you_mean(m, fitted)} "
                                    f"(presets: {', '.join(PRESETS)})")
    for m in chosen:
        if m not in dates:
            src = dates_path or "the release dates (pass --release-dates)"
            raise DataError(f"{src}: no release date for model '{m}'{_did_you_mean(m, dates)}")
    if after is not None:
        chosen = [m for m in chosen if dates[m] >= after]
    return chosen, notes


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@_text_file
def load_fits_csv(path: Path, ps: Sequence[float]) -> tuple[list[ModelFit], dict[str, dt.date]]:
    """Per-model results instead of runs: METR's logistic_fits/headline.csv (agent, coefficient, intercept,
    p50, p50q0.025, …, release_date) or our horizons.csv. Horizons and CIs in the file are used as given."""
    fits, dates = [], {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        mcol = next((c for c in ("agent", "model") if c in (reader.fieldnames or [])), None)
        if mcol is None:
            raise DataError(f"{path}:1: a fits CSV needs an 'agent' or 'model' column")
        for rec in reader:
            where = f"{path}:{reader.line_num}"
            try:
                a, b = float(rec["intercept"]), float(rec["coefficient"])
                fit = ModelFit(rec[mcol], b, a, average=float(rec.get("average") or "nan"))
                for p in ps:
                    if rec.get(p_label(p)):
                        fit.given[p] = float(rec[p_label(p)])
                    lo, hi = (rec.get(f"{p_label(p)}q{q}") for q in ("0.025", "0.975"))
                    if lo and hi:
                        fit.ci[p] = (float(lo), float(hi))
            except (TypeError, ValueError) as e:
                raise DataError(f"{where}: not a number ({e})") from None
            if b == -math.inf:  # METR's convention for an agent that failed every run
                fit.status, fit.given = "all_fail", {}
            elif b >= 0:
                fit.status = "positive_slope"
            if rec.get("release_date"):
                dates[fit.model] = _parse_date(rec["release_date"], where)
            fits.append(fit)
    if not fits:
        raise DataError(f"{path}: no models found (empty file)")
    return fits, dates


@_text_file
def _is_fits_csv(path: Path) -> bool:
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
    return "coefficient" in header and "intercept" in header


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class HorizonConfig:
    """Every option of `scalelab horizon`, as a config section (`[horizon]` in a TOML file, `--set horizon.KEY=V`,
    unknown keys are errors). Paths are strings; "" means not given."""

    release_dates: str = ""
    models: str = ""  # frontier11 | all | a comma list; "" = all models with a release date
    weighting: str = "invsqrt"  # invsqrt (METR) | equal | none | given
    C: float = 10.0  # inverse L2 strength on the slope (METR: 10)
    bootstrap: int = 1000  # hierarchical bootstrap replicates (0: none)
    seed: int = 42  # replicate r uses default_rng(seed + r) (METR: 42)
    p: str = "50,80"  # success levels, percent or fraction
    replicates: str = ""  # saved replicates to reuse instead of bootstrapping
    after: str = ""  # only models released on or after this date enter the trend
    level: float = 0.95

    def analyse(self, source: Path, progress: Callable[[int], None] | None = None) -> HorizonResult:
        opt = lambda v: Path(v) if v else None  # noqa: E731
        return analyse(source, opt(self.release_dates), self.models or None, self.weighting, self.C, self.bootstrap,
                       self.seed, parse_ps(self.p), opt(self.replicates),
                       _parse_date(self.after, "--after") if self.after else None, progress, self.level)


@dataclass
class HorizonResult:
    source: Path
    runs: Runs | None
    fits: list[ModelFit]
    dates: dict[str, dt.date]
    ps: list[float]
    trends: list[Trend]
    reps: Replicates | None
    settings: dict[str, object]
    notes: list[str]


def parse_ps(text: str) -> list[float]:
    """'50,80' or '0.5,0.8' → [0.5, 0.8]."""
    ps = []
    for tok in text.replace(" ", "").split(","):
        try:
            v = float(tok)
        except ValueError:
            raise ScalelabError(f"--p: '{tok}' is not a number") from None
        v = v / 100 if v >= 1 else v
        if not 0 < v < 1:
            raise ScalelabError(f"--p: {tok} is not a success probability in (0, 1) or a percent in (0, 100)")
        ps.append(v)
    return sorted(set(ps), key=ps.index)


def analyse(source: Path, release_dates: Path | None = None, models: str | None = None,
            weighting: str = "invsqrt", C: float = 10.0, n_bootstrap: int = 1000, seed: int = 42,
            ps: Sequence[float] = (0.5, 0.8), replicates: Path | None = None, after: dt.date | None = None,
            progress: Callable[[int], None] | None = None, level: float = 0.95) -> HorizonResult:
    """Everything `scalelab horizon` computes, without writing anything."""
    if weighting not in WEIGHTINGS:
        raise ScalelabError(f"--weighting: unknown '{weighting}' (choose from {', '.join(WEIGHTINGS)})")
    if not C > 0:
        raise ScalelabError(f"-C must be positive, got {C:g}")
    if n_bootstrap < 0:
        raise ScalelabError(f"--bootstrap must be >= 0 replicates (0: no bootstrap, no CIs), got {n_bootstrap}")
    if seed < 0:
        raise ScalelabError(f"--seed must be >= 0 (replicate r uses default_rng(seed + r)), got {seed}")
    if not 0 < level < 1:
        raise ScalelabError(f"horizon.level must be in (0, 1), got {level:g}")
    source, ps = Path(source), list(ps)
    runs, reps, notes = None, None, []
    if _is_fits_csv(source):
        fits, dates = load_fits_csv(source, ps)
        notes.append(f"{source} holds per-model fits, not runs: horizons are taken as given, nothing is refitted")
    else:
        runs = load_runs(source)
        w = run_weights(runs, weighting)
        fits, dates = fit_models(runs, w, C), {}
        if replicates is None and n_bootstrap > 0:
            reps = bootstrap(runs, w, fits, ps, n_bootstrap, seed, C, progress=progress)
    if release_dates is not None:
        dates = {**dates, **load_release_dates(release_dates)}
    if replicates is not None:
        reps = load_replicates(replicates)
    if reps is not None:
        for f in fits:
            for p in ps:
                col = reps.column(f.model, p)
                if col is not None:
                    f.ci[p] = tuple(float(v) for v in quantile_ci(col, level))  # type: ignore[assignment]
    trends = []
    if dates:
        chosen, more = select_models(models, fits, dates, release_dates, after)
        notes += more
        if len(chosen) >= 2:
            trends = [fit_trend(fits, dates, chosen, p, reps, level) for p in ps]
        else:
            notes.append(f"no trend: {len(chosen)} selected model(s) with release dates")
    elif models:
        raise ScalelabError("--models selects the trend's models; it needs --release-dates")
    n_reps = 0 if reps is None else len(next(iter(reps.values.values())))
    settings = {"weighting": weighting, "C": C, "bootstrap": n_reps,
                "seed": seed, "release_dates": str(release_dates) if release_dates else None,
                "replicates_file": str(replicates) if replicates else None,
                "models": models or "all", "after": after.isoformat() if after else None, "level": level}
    return HorizonResult(source, runs, fits, dates, ps, trends, reps, settings, notes)
