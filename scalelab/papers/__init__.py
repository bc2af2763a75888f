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
from scalelab.papers.section import CardProgress, Options, Section
from scalelab.papers.verdict import write_verdicts
from scalelab.report import make_dir, write_text

PAPERS = {
    "dyt": "scalelab.papers.dyt",
    "horizon": "scalelab.papers.horizon",
    "diloco": "scalelab.papers.diloco",
    "bd3lm": "scalelab.papers.bd3lm",
    "sss": "scalelab.papers.sss",
}

__all__ = ["PAPERS", "Options", "Section", "reproduce"]


def reproduce(papers: list[str], out: Path, quick: bool = False, opts: Options | None = None,
              progress: bool = True) -> Path:
    """Run the named sections and write `out/report.md` and `out/verdicts.json`; return the report's path.
    Each section's runs go under `out/<paper>[-quick][-cuda]/`, so a card of another size never reuses them."""
    unknown = [p for p in papers if p not in PAPERS]
    if unknown:
        raise ScalelabError(f"unknown paper {unknown[0]!r} (choose from {', '.join(PAPERS)})")
    opts = opts or Options()
    check_device(opts.device)
    out = make_dir(Path(out))
    sections = []
    suffix = ("-quick" if quick else "") + ("-cuda" if opts.device == "cuda" else "")
    with CardProgress(enabled=progress) as bar:
        opts.progress = bar
        for p in papers:
            sub = make_dir(out / (p + suffix if p != "horizon" else p))
            bar.section(p, 1)
            s = importlib.import_module(PAPERS[p]).run(sub, quick, opts)
            s.body = s.body.replace("](horizon/", f"]({sub.name}/")
            s.images = [f"{sub.name}/{img}" for img in s.images]
            sections.append(s)
    write_verdicts(out / "verdicts.json", [v for s in sections for v in s.verdicts()])
    return write_card(out / "report.md", sections, papers, quick, opts.device)


def check_device(device: str) -> None:
    """A card's --device: cpu, or cuda where this torch sees a GPU; else one clear error, before any work."""
    if device not in ("cpu", "cuda"):
        raise ScalelabError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ScalelabError("--device cuda, but this torch sees no CUDA device (install a CUDA build of torch)")


def _regime(d: dict) -> str:
    return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in d.items()) or "—"


def write_card(path: Path, sections: list[Section], papers: list[str], quick: bool, device: str = "cpu") -> Path:
    lines = ["# scalelab report card", "",
             f"{'Quick' if quick else 'Full'} reproductions (`scalelab reproduce {' '.join(papers)}"
             f"{' --quick' if quick else ''}{' --device cuda' if device == 'cuda' else ''}`). Each section states "
             "the paper's claim, the threshold it is judged by (fixed before measuring), the regime it tests "
             "beside the paper's, what this run measured, and a verdict: holds, does not hold, inconclusive (the "
             "interval straddles the threshold), or did not train (an arm never left the unigram baseline: no gap "
             "is computed from it). Machine-readable: "
             "[verdicts.json](verdicts.json).", "",
             "| paper | claim | threshold | measured | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {s.key} | {s.claim} | {s.threshold} | {s.measured} | **{s.verdict}** |" for s in sections]
    for s in sections:
        lines += ["", f"## {s.title}", "", f"**Claim.** {s.claim}.", "",
                  f"**Regime.** Here: {_regime(s.regime)}. The paper: {_regime(s.paper_regime)}.", "",
                  f"**Measured.** {s.measured}. Verdict: **{s.verdict}** (threshold: {s.threshold}).", ""]
        if s.note:
            lines += [f"*{s.note}*", ""]
        lines += [s.body.strip(), ""]
        lines += [f"![{s.key}]({img})" for img in s.images]
    write_text(path, "\n".join(lines) + "\n")
    return path
