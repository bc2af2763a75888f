"""Token accounting and dollar costs for test-time search.

The SSS paper (Zhao et al. 2025, §5 "compute") prices its method in output tokens and dollars: 200·50·13k ≈
130M output tokens per AIME question, about $650 at $5 per 1M tokens, $200 with preliminary scoring and about
$12 with Flash verifying. This module does the same bookkeeping for every run, per phase (generation,
verification, tie-break) and per problem, so reports can plot accuracy against tokens and against dollars.

Notable choices:
- Prices live in a TOML table shipped as package data (`scalelab/data/prices.toml`), each entry with its
  source and date; a user file with the same format overrides or extends it.
- Prompt tokens served from a prefix cache are counted separately (`cached`): providers that discount cached
  input bill them at `cached_input`, and the local engine does not recompute them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from scalelab.errors import ScalelabError

PHASES = ("generate", "verify", "tiebreak")


@dataclass
class Price:
    name: str
    input: float  # $ per 1M uncached prompt tokens
    output: float  # $ per 1M completion tokens
    cached_input: float | None = None  # $ per 1M cached prompt tokens (None = no discount)
    source: str = ""
    date: str = ""
    note: str = ""

    def dollars(self, prompt: int, completion: int, cached: int = 0) -> float:
        cached_rate = self.input if self.cached_input is None else self.cached_input
        return ((prompt - cached) * self.input + cached * cached_rate + completion * self.output) / 1e6


def _parse(text: str, origin: str) -> dict[str, Price]:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScalelabError(f"price table {origin} is not valid TOML: {e}") from None
    out = {}
    for name, e in raw.items():
        if not isinstance(e, dict) or not {"input", "output"} <= set(e):
            raise ScalelabError(f"price table {origin}: entry [{name}] needs numbers `input` and `output` "
                                f"($ per 1M tokens)")
        unknown = set(e) - {"input", "output", "cached_input", "source", "date", "note"}
        if unknown:
            raise ScalelabError(f"price table {origin}: entry [{name}] has unknown key {sorted(unknown)[0]!r}")
        try:
            vals = {k: float(e[k]) for k in ("input", "output", "cached_input") if k in e}
        except (TypeError, ValueError):
            raise ScalelabError(f"price table {origin}: entry [{name}] has a non-numeric price") from None
        if any(v < 0 for v in vals.values()):
            raise ScalelabError(f"price table {origin}: entry [{name}] has a negative price")
        out[name] = Price(name, vals["input"], vals["output"], vals.get("cached_input"), str(e.get("source", "")),
                          str(e.get("date", "")), str(e.get("note", "")))
    return out


def load_prices(user: str | Path | None = None) -> dict[str, Price]:
    """The shipped table, overridden entry by entry by `user` (a TOML file of the same format)."""
    table = _parse(resources.files("scalelab").joinpath("data/prices.toml").read_text(), "prices.toml")
    if user:
        p = Path(user)
        if not p.is_file():
            raise ScalelabError(f"price table not found: {p}")
        table.update(_parse(p.read_text(), str(p)))
    return table


def get_price(name: str, table: dict[str, Price]) -> Price:
    if name not in table:
        raise ScalelabError(f"no price for {name!r} (known: {', '.join(sorted(table))}); add it with --prices FILE")
    return table[name]


@dataclass
class Usage:
    """Token counts of model calls: prompt (all prompt tokens, as billed), cached (of those, served from a
    prefix cache), completion."""

    calls: int = 0
    prompt: int = 0
    cached: int = 0
    completion: int = 0

    def add(self, prompt: int, completion: int, cached: int = 0, calls: int = 1) -> None:
        self.calls += calls
        self.prompt += prompt
        self.cached += cached
        self.completion += completion

    def __iadd__(self, other: Usage) -> Usage:
        self.add(other.prompt, other.completion, other.cached, other.calls)
        return self

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    @property
    def computed(self) -> int:
        """Tokens the model actually ran over: prompt tokens not in a cache, plus completions."""
        return self.prompt - self.cached + self.completion


@dataclass
class Ledger:
    """Usage per (problem, phase); phases are `PHASES`."""

    by: dict[tuple[str, str], Usage] = field(default_factory=dict)

    def record(self, problem: str, phase: str, prompt: int, completion: int, cached: int = 0, calls: int = 1) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.by.setdefault((problem, phase), Usage()).add(prompt, completion, cached, calls)

    def phase(self, phase: str) -> Usage:
        u = Usage()
        for (_, ph), v in self.by.items():
            if ph == phase:
                u += v
        return u

    def total(self) -> Usage:
        u = Usage()
        for v in self.by.values():
            u += v
        return u

    def dollars(self, gen_price: Price, verify_price: Price | None = None) -> dict[str, float]:
        """Dollars per phase; verification and tie-break may run on another (priced) model."""
        vp = verify_price or gen_price
        out = {}
        for ph in PHASES:
            u = self.phase(ph)
            out[ph] = (gen_price if ph == "generate" else vp).dollars(u.prompt, u.completion, u.cached)
        out["total"] = sum(out.values())
        return out
