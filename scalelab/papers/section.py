"""What every report-card section returns, and the options a reproduction takes."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Section:
    key: str
    title: str
    claim: str
    measured: str
    verdict: str  # "holds", "does not hold", "not run"
    body: str
    images: list[str] = field(default_factory=list)


@dataclass
class Options:
    """What a reproduction may be pointed at, from `scalelab reproduce`'s flags."""

    shared: Path | None = None  # the lab's shared data (holds data/metr); None = look for ../shared
    sss_model: Path | None = None  # a Sudoku model trained by `scalelab search train-sudoku`, reused by `sss`

    def shared_dir(self) -> Path | None:
        """--shared, else ../shared beside the working directory or beside the checkout holding this package."""
        here = Path(__file__).resolve().parents[2]
        cands = [self.shared] if self.shared is not None else [Path.cwd().parent / "shared", here.parent / "shared"]
        return next((Path(c) for c in cands if (Path(c) / "data").is_dir()), None)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))
