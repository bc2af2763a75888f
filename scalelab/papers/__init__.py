"""Paper reproductions and the report card (`scalelab reproduce`).

Each paper is one module with `run(out, quick, opts) -> Section`: it runs (or resumes) its experiment under
`out`, states the paper's claim, what was measured and a verdict, and writes its plots. Runs are ordinary run
directories, so an interrupted reproduction picks up where it stopped, and finished runs are reused.
`PAPERS` is the registry (imported on use, so `import scalelab.papers` stays light); `reproduce` runs the
named sections and writes one report card.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from scalelab.errors import ScalelabError
from scalelab.papers.section import Options, Section
from scalelab.report import make_dir, write_text

PAPERS = {
    "dyt": "scalelab.papers.dyt",
    "horizon": "scalelab.papers.horizon",
    "diloco": "scalelab.papers.diloco",
    "bd3lm": "scalelab.papers.bd3lm",
    "sss": "scalelab.papers.sss",
}

__all__ = ["PAPERS", "Options", "Section", "reproduce"]


def reproduce(papers: list[str], out: Path, quick: bool = False, opts: Options | None = None) -> Path:
    """Run the named sections and write `out/report.md`; return its path."""
    unknown = [p for p in papers if p not in PAPERS]
    if unknown:
        raise ScalelabError(f"unknown paper {unknown[0]!r} (choose from {', '.join(PAPERS)})")
    out = Path(out)
    make_dir(out)
    sections = []
    for p in papers:
        sub = out / (f"{p}-quick" if quick and p != "horizon" else p)
        sub.mkdir(parents=True, exist_ok=True)
        s = importlib.import_module(PAPERS[p]).run(sub, quick, opts or Options())
        s.body = s.body.replace("](horizon/", f"]({sub.name}/")
        s.images = [f"{sub.name}/{img}" for img in s.images]
        sections.append(s)
    lines = ["# scalelab report card", "",
             f"{'Quick' if quick else 'Full'} reproductions (`scalelab reproduce {' '.join(papers)}"
             f"{' --quick' if quick else ''}`). Each section states the paper's claim, what this run measured, "
             "and whether the claim holds at this scale.", "",
             "| paper | claim | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {s.key} | {s.claim} | {s.measured} | **{s.verdict}** |" for s in sections]
    for s in sections:
        lines += ["", f"## {s.title}", "", f"**Claim.** {s.claim}.", "", f"**Measured.** {s.measured}. "
                  f"Verdict: **{s.verdict}**.", "", s.body.strip(), ""]
        lines += [f"![{s.key}]({img})" for img in s.images]
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
