"""The verdict protocol: how every paper section of the report card judges its claim.

A section reproduces one claim of a paper (e.g. "DiLoCo M=2 is within 1% of DP's loss") at the lab's small
scale and hands back a `Verdict`: one of five words, the threshold it was judged against, the regime it ran at
beside the paper's regime, and the figures it used, so the report card can be recomputed and argued with.
One protocol, so that "holds" means the same thing in every section:

- **did not train** comes first. A comparison between arms means nothing if an arm never learned, so an arm
  whose final loss is non-finite, diverged, or ended within `margin` nats of the unigram baseline (the
  cross-entropy of a model that learned token frequencies only) is reported as such, never as a verdict on
  the paper. Search sections use the analogue: mostly malformed samples or Pass@k ≈ 0.
- **holds / does not hold / inconclusive** come from a confidence interval over seeds, not from one run:
  Student's t on the seed spread (the t quantile is computed here, exactly for integer degrees of freedom,
  so there is no scipy dependency). The claim "gap ≤ threshold" holds when the whole interval lies on its
  side, does not hold when the whole interval lies on the other side, and is inconclusive when it straddles;
  an inconclusive verdict reports `n_to_separate`, the number of seeds that would separate it if the spread
  stayed the same, so "inconclusive" is a statement about budget rather than a shrug.
- **not run** is for a section skipped (missing data, `--quick`), so the card still lists it.

Seeds are paired by default: the lab runs every arm on the same seeds (same init, same data order), so the
per-seed differences remove the variance the arms share; `paired=False` gives Welch's interval instead.

`verdicts.json` is the machine-readable card: a JSON list of `Verdict.to_json()` objects, written atomically
and checked by `validate_verdicts` (its shape is documented in `VERDICTS_SCHEMA`). Non-finite numbers are
rejected rather than written as the non-standard `NaN`: record a missing or non-finite figure as null.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.errors import ScalelabError

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
INCONCLUSIVE = "inconclusive"
DID_NOT_TRAIN = "did not train"
NOT_RUN = "not run"
VERDICTS = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, DID_NOT_TRAIN, NOT_RUN)

# Jeffreys / Krichevsky–Trofimov prior: unseen tokens get a finite probability, while add-one would move a
# visible share of the mass to unseen ids when the vocabulary is large and the train split small.
UNIGRAM_ALPHA = 0.5


# ---------------------------------------------------------------------------------------------------------
# Baselines and "did not train"


def _token_array(tokens: Sequence[int] | np.ndarray, vocab_size: int, name: str) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.size == 0:
        raise ScalelabError(f"the {name} split is empty: a unigram baseline needs tokens")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ScalelabError(f"the {name} split must hold integer token ids, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64)
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ScalelabError(f"the {name} split has token ids outside [0, {vocab_size}): "
                            f"min {arr.min()}, max {arr.max()}")
    return arr


def unigram_cross_entropy(train_tokens: Sequence[int] | np.ndarray, val_tokens: Sequence[int] | np.ndarray,
                          vocab_size: int, alpha: float = UNIGRAM_ALPHA) -> float:
    """Cross-entropy (nats/token) of the val split under the train split's add-alpha unigram distribution.

    p(v) = (count_train(v) + alpha) / (n_train + alpha·vocab_size). This is the loss of a model that learned
    token frequencies and nothing else: the baseline a trained language model must clearly beat.
    """
    if vocab_size < 1:
        raise ScalelabError(f"vocab_size must be at least 1, got {vocab_size}")
    if not alpha > 0:
        raise ScalelabError(f"alpha must be > 0 so unseen tokens have a finite loss, got {alpha}")
    train = _token_array(train_tokens, vocab_size, "train")
    val = _token_array(val_tokens, vocab_size, "val")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    log_p = np.log(counts + alpha) - math.log(train.size + alpha * vocab_size)
    return float(-log_p[val].mean())


def unigram_entropy(tokens: Sequence[int] | np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of a split's own empirical unigram distribution (no smoothing).

    A lower bound for `unigram_cross_entropy` of that split: the gap between them is what the train/val
    frequency mismatch (and the smoothing) costs.
    """
    arr = _token_array(tokens, vocab_size, "given")
    p = np.bincount(arr, minlength=vocab_size)
    p = p[p > 0] / arr.size
    return float(-(p * np.log(p)).sum())


def did_not_train(final_losses: float | Sequence[float], unigram: float, margin: float = 0.05,
                  diverged_above: float | None = None) -> bool:
    """True if an arm never learned: any of its (per-seed) final losses is non-finite, diverged, or ends
    within `margin` nats of the unigram baseline.

    "Within margin or above" is one test, loss ≥ unigram − margin: a loss above the baseline by more than the
    margin is a divergence. `diverged_above` adds an absolute ceiling (e.g. the loss at initialisation). One
    bad seed is enough: an interval over seeds that mixes a collapsed run with healthy ones means nothing.
    """
    losses = np.atleast_1d(np.asarray(final_losses, dtype=np.float64))
    if losses.size == 0:
        raise ScalelabError("did_not_train needs at least one final loss")
    if not math.isfinite(unigram):
        raise ScalelabError(f"the unigram baseline must be finite, got {unigram}")
    if not np.isfinite(losses).all():
        return True
    if (losses >= unigram - margin).any():
        return True
    return diverged_above is not None and bool((losses > diverged_above).any())


def search_did_not_train(malformed_fraction: float, pass_at_k: float, max_malformed: float = 0.5,
                         min_pass: float = 0.02) -> bool:
    """The search-section analogue of `did_not_train`: most samples unparseable, or Pass@k ≈ 0.

    Either way the verifier and the selection rule had nothing to work with, so no claim about search is
    being tested.
    """
    for name, value in (("malformed_fraction", malformed_fraction), ("pass_at_k", pass_at_k)):
        if math.isfinite(value) and not 0.0 <= value <= 1.0:
            raise ScalelabError(f"{name} is a fraction in [0, 1], got {value}")
    if not (math.isfinite(malformed_fraction) and math.isfinite(pass_at_k)):
        return True
    return malformed_fraction > max_malformed or pass_at_k < min_pass


# ---------------------------------------------------------------------------------------------------------
# Student's t


def student_t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with integer df ≥ 1, exactly (Abramowitz & Stegun 26.7.3–26.7.4).

    With θ = atan(t/√df), A = P(|T| ≤ t) is a finite series in cos²θ: for odd df (2/π)(θ + sinθ·Σ), for
    even df sinθ·Σ; each term is the previous one times cos²θ·(2k−1)/(2k) (even) or 2k/(2k+1) (odd).
    """
    if df < 1 or int(df) != df:
        raise ScalelabError(f"degrees of freedom must be a positive integer, got {df}")
    df = int(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    else:
        total = 0.0
        if df > 1:
            term = math.cos(theta)
            total = term
            for k in range(1, (df - 1) // 2):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
        a = 2.0 / math.pi * (theta + s * total)
    return 0.5 + math.copysign(0.5 * a, t)


def normal_quantile(p: float) -> float:
    """The standard normal quantile, by bisection on Φ(x) = (1 + erf(x/√2))/2."""
    if not 0.0 < p < 1.0:
        raise ScalelabError(f"a quantile needs 0 < p < 1, got {p}")
    return _bisect(lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))), p, -40.0, 40.0)


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (df = math.inf gives the normal).

    Bisection on the exact CDF up to df = 200; beyond, the Cornish–Fisher expansion in 1/df, whose error
    there is below 1e-7, keeps it O(1) for the large n that `n_to_separate` may try.
    """
    if not 0.0 < p < 1.0:
        raise ScalelabError(f"a quantile needs 0 < p < 1, got {p}")
    if math.isinf(df):
        return normal_quantile(p)
    if df > 200:
        z = normal_quantile(p)
        return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
                + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))
    return _bisect(lambda x: student_t_cdf(x, int(df)), p, -1e7, 1e7)


def _bisect(cdf: Any, p: float, lo: float, hi: float) -> float:
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------------------
# Seed intervals and judging


@dataclass(frozen=True)
class SeedCI:
    """Mean and confidence interval of one arm, or of a difference between arms, over seeds.

    `sd` is the spread of one seed's value (of the per-seed difference when paired); `n` the number of seeds
    per arm; `df` the t degrees of freedom used. With one seed the interval is unbounded: no spread, no claim.
    """

    mean: float
    lo: float
    hi: float
    n: int
    sd: float
    level: float = 0.95
    df: float = math.nan

    @property
    def half_width(self) -> float:
        return 0.5 * (self.hi - self.lo)

    def to_figures(self, prefix: str = "") -> dict[str, float | int | None]:
        """The interval as verdict figures (non-finite bounds become None, as verdicts.json requires)."""
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None
        return {f"{prefix}mean": num(self.mean), f"{prefix}ci_lo": num(self.lo), f"{prefix}ci_hi": num(self.hi),
                f"{prefix}n_seeds": self.n, f"{prefix}sd": num(self.sd), f"{prefix}ci_level": self.level}


def _seed_values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ScalelabError(f"{name} has no seeds")
    if not np.isfinite(arr).all():
        raise ScalelabError(f"{name} has a non-finite value: check did_not_train before building an interval")
    return arr


def seed_ci(values_a: Sequence[float] | np.ndarray, values_b: Sequence[float] | np.ndarray | None = None,
            level: float = 0.95, paired: bool = True) -> SeedCI:
    """Student-t interval for mean(a), or for mean(a − b) when `values_b` is given.

    Paired (default): a[i] and b[i] share seed i, so the interval is over the differences a[i] − b[i].
    Unpaired: Welch's interval, df by Welch–Satterthwaite rounded down (conservative); `sd` is then
    √(sd_a² + sd_b²), the spread of a difference of two independent seeds, and `n` the smaller arm.
    """
    if not 0.0 < level < 1.0:
        raise ScalelabError(f"the confidence level must be in (0, 1), got {level}")
    a = _seed_values(values_a, "values_a")
    if values_b is None:
        return _one_sample_ci(a, level)
    b = _seed_values(values_b, "values_b")
    if paired:
        if a.size != b.size:
            raise ScalelabError(f"paired seeds need the same number in both arms, got {a.size} and {b.size}")
        return _one_sample_ci(a - b, level)
    return _welch_ci(a, b, level)


def _one_sample_ci(x: np.ndarray, level: float) -> SeedCI:
    mean, n = float(x.mean()), int(x.size)
    if n < 2:
        return SeedCI(mean, -math.inf, math.inf, n, math.nan, level)
    sd = float(x.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return SeedCI(mean, mean - half, mean + half, n, sd, level, float(n - 1))


def _welch_ci(a: np.ndarray, b: np.ndarray, level: float) -> SeedCI:
    mean, n = float(a.mean() - b.mean()), int(min(a.size, b.size))
    if n < 2:
        return SeedCI(mean, -math.inf, math.inf, n, math.nan, level)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    sd = float(math.sqrt(a.var(ddof=1) + b.var(ddof=1)))
    se = math.sqrt(va + vb)
    if se == 0.0:
        return SeedCI(mean, mean, mean, n, 0.0, level, float(a.size + b.size - 2))
    df = float(math.floor((va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))))
    half = t_quantile(0.5 + level / 2, max(df, 1.0)) * se
    return SeedCI(mean, mean - half, mean + half, n, sd, level, df)


def judge(ci: SeedCI, threshold: float, direction: str) -> str:
    """The verdict on the claim "value ≤ threshold" (direction "le") or "value ≥ threshold" ("ge").

    Holds when the whole interval is on the claim's side (the boundary counts for the claim), does not hold
    when the whole interval is strictly on the other side, inconclusive when it straddles.
    """
    if direction not in ("le", "ge"):
        raise ScalelabError(f"direction must be 'le' (value ≤ threshold) or 'ge' (value ≥ threshold), "
                            f"got {direction!r}")
    if direction == "le":
        if ci.hi <= threshold:
            return HOLDS
        return DOES_NOT_HOLD if ci.lo > threshold else INCONCLUSIVE
    if ci.lo >= threshold:
        return HOLDS
    return DOES_NOT_HOLD if ci.hi < threshold else INCONCLUSIVE


def n_to_separate(ci: SeedCI, threshold: float, max_n: int = 10_000_000) -> int | None:
    """Seeds needed for the interval's half-width to drop below |mean − threshold|, at the same sd and level.

    The smallest n with t_{n−1}·sd/√n < |mean − threshold|. None when no number of seeds would do (the mean
    sits on the threshold, or the spread is unknown because there was a single seed) or it exceeds `max_n`.
    """
    gap = abs(ci.mean - threshold)
    if gap == 0.0 or not math.isfinite(ci.sd):
        return None
    if ci.sd == 0.0:
        return max(ci.n, 2)
    q = 0.5 + ci.level / 2
    # t > z for every finite df, so the normal-theory n is a lower bound to start from.
    n = max(2, math.ceil((normal_quantile(q) * ci.sd / gap) ** 2))
    while n <= max_n:
        if t_quantile(q, n - 1) * ci.sd / math.sqrt(n) < gap:
            return n
        n += 1
    return None


# ---------------------------------------------------------------------------------------------------------
# Verdicts and verdicts.json

REQUIRED_KEYS = ("section", "claim", "verdict", "threshold", "regime", "figures")
OPTIONAL_KEYS = ("paper_regime", "note")

_SCALAR = {"type": ["number", "string", "boolean", "null"]}
_VALUE = {"anyOf": [_SCALAR, {"type": "array", "items": {"type": "number"}}]}
VERDICTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "scalelab verdicts.json",
    "description": "One object per report-card claim; numbers are finite (null for a missing figure).",
    "type": "array",
    "items": {
        "type": "object",
        "required": list(REQUIRED_KEYS),
        "additionalProperties": False,
        "properties": {
            "section": {"type": "string", "minLength": 1},
            "claim": {"type": "string"},
            "verdict": {"enum": list(VERDICTS)},
            "threshold": {"type": ["number", "string"]},
            "regime": {"type": "object", "additionalProperties": _VALUE},
            "paper_regime": {"type": "object", "additionalProperties": _VALUE},
            "figures": {"type": "object", "additionalProperties": _VALUE},
            "note": {"type": "string"},
        },
    },
}


@dataclass
class Verdict:
    """One report-card line: the claim, its verdict and everything needed to recompute and argue with it."""

    section: str
    claim: str
    verdict: str
    threshold: float | str
    regime: dict[str, Any] = field(default_factory=dict)
    paper_regime: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        raw = {"section": self.section, "claim": self.claim, "verdict": self.verdict, "threshold": self.threshold,
               "regime": self.regime, "paper_regime": self.paper_regime, "figures": self.figures, "note": self.note}
        _check_entry(raw, f"verdict for section {self.section!r}")

    def to_json(self) -> dict[str, Any]:
        return {"section": self.section, "claim": self.claim, "verdict": self.verdict,
                "threshold": self.threshold, "regime": dict(self.regime), "paper_regime": dict(self.paper_regime),
                "figures": dict(self.figures), "note": self.note}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Verdict:
        _check_entry(obj, "verdict")
        return cls(**{k: obj[k] for k in REQUIRED_KEYS + OPTIONAL_KEYS if k in obj})


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _value_problem(v: Any) -> str | None:
    if v is None or isinstance(v, (str, bool)):
        return None
    if _is_number(v):
        return None if math.isfinite(v) else f"is {v}; record a missing or non-finite number as null"
    if isinstance(v, list):
        for x in v:
            if not _is_number(x):
                return f"is a list holding {x!r}; lists may hold numbers only"
            if not math.isfinite(x):
                return f"is a list holding {x}; lists may hold finite numbers only"
        return None
    return f"has type {type(v).__name__}; expected a number, string, bool, null or list of numbers"


def _check_entry(entry: Any, where: str) -> None:
    """Raise ScalelabError naming the first problem with one verdict object."""
    if not isinstance(entry, Mapping):
        raise ScalelabError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        raise ScalelabError(f"{where}: missing key {missing[0]!r}")
    unknown = sorted(set(entry) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ScalelabError(f"{where}: unknown key {unknown[0]!r}")
    if not isinstance(entry["section"], str) or not entry["section"]:
        raise ScalelabError(f"{where}: 'section' must be a non-empty string, got {entry['section']!r}")
    if not isinstance(entry["claim"], str):
        raise ScalelabError(f"{where}: 'claim' must be a string, got {type(entry['claim']).__name__}")
    if entry["verdict"] not in VERDICTS:
        raise ScalelabError(f"{where}: 'verdict' is {entry['verdict']!r}; expected one of {', '.join(VERDICTS)}")
    threshold = entry["threshold"]
    if not (isinstance(threshold, str) or (_is_number(threshold) and math.isfinite(threshold))):
        raise ScalelabError(f"{where}: 'threshold' must be a finite number or a string, got {threshold!r}")
    if not isinstance(entry.get("note", ""), str):
        raise ScalelabError(f"{where}: 'note' must be a string, got {type(entry['note']).__name__}")
    for key in ("regime", "paper_regime", "figures"):
        if key not in entry:
            continue
        table = entry[key]
        if not isinstance(table, Mapping):
            raise ScalelabError(f"{where}: {key!r} must be an object, got {type(table).__name__}")
        for name, value in table.items():
            if not isinstance(name, str):
                raise ScalelabError(f"{where}: {key!r} has a non-string key {name!r}")
            problem = _value_problem(value)
            if problem:
                raise ScalelabError(f"{where}: {key}[{name!r}] {problem}")


def validate_verdicts(obj: Any) -> None:
    """Check a loaded verdicts.json against `VERDICTS_SCHEMA`; raise ScalelabError on the first problem."""
    if not isinstance(obj, list):
        raise ScalelabError(f"verdicts.json must hold a JSON list of verdicts, got {type(obj).__name__}")
    for i, entry in enumerate(obj):
        section = entry.get("section") if isinstance(entry, Mapping) else None
        where = f"verdicts.json entry {i}" + (f" (section {section!r})" if isinstance(section, str) else "")
        _check_entry(entry, where)


def write_verdicts(path: str | os.PathLike[str], verdicts: Sequence[Verdict]) -> Path:
    """Write `verdicts` as verdicts.json, atomically: a temp file in the same directory, then os.replace.

    `path` is the file, or a directory to write verdicts.json into. A reader never sees a half-written card,
    and an invalid verdict raises before anything is written.
    """
    target = Path(path)
    if target.is_dir():
        target = target / "verdicts.json"
    payload = [v.to_json() for v in verdicts]
    validate_verdicts(payload)
    text = json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def read_verdicts(path: str | os.PathLike[str]) -> list[Verdict]:
    """Load and validate verdicts.json (a file, or a directory holding one)."""
    source = Path(path)
    if source.is_dir():
        source = source / "verdicts.json"
    try:
        obj = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScalelabError(f"no verdicts file at {source}") from None
    except json.JSONDecodeError as e:
        raise ScalelabError(f"{source} is not valid JSON: {e}") from None
    validate_verdicts(obj)
    return [Verdict.from_json(entry) for entry in obj]

