"""`scalelab compare RUN [RUN ...]`: several training runs' curves of one metric in one plot, and one table.

Everything is read from the run directories (`config.toml`, `metrics.jsonl`, `tokenizer.json`) with the report
toolkit, and checked before anything is written: `compare.png` (the runs' curves of `--metric` against tokens,
steps or seconds of training) and `compare.md` (per run: the config keys that differ between the runs, then the
final values of the main metrics), each written atomically.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from scalelab import config as configmod
from scalelab.errors import ScalelabError
from scalelab.report import figure, make_dir, read_metrics, savefig, write_text

X_AXES = {"tokens": "tokens", "steps": "step", "seconds": "elapsed"}  # --x: the metrics.jsonl field it reads
NATS = ("loss", "val_loss")  # per token: they compare only between runs that share a tokenizer
FINAL = ("loss", "val_loss", "val_bpb")  # the table's final metrics (plus --metric)
NOT_METRICS = {"step", "tokens", "elapsed"}  # x axes, not curves


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Run:
    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ScalelabError(f"run {path} does not exist")
        if not (self.path / "config.toml").is_file():
            raise ScalelabError(f"{path} is not a run directory (no config.toml)")
        self.config = _flatten(configmod.load(self.path / "config.toml").to_dict())
        self.train, self.evals = read_metrics(self.path)
        self.label = self.path.name

    def rows(self, metric: str) -> list[dict]:
        """The metrics.jsonl records holding `metric` (train or eval lines, whichever have it)."""
        return [r for r in self.train + self.evals if _number(r.get(metric))]

    def tokenizer(self) -> str:
        """What decides a token: the run's tokenizer.json, or (without one) its data config."""
        tok = self.path / "tokenizer.json"
        if tok.is_file():
            return hashlib.sha256(tok.read_bytes()).hexdigest()
        return repr({k: v for k, v in self.config.items() if k.startswith("data.")})

    def x(self, rows: list[dict], axis: str) -> list[float]:
        field = X_AXES[axis]
        if field != "elapsed":
            return [r[field] for r in rows]
        # eval lines carry no `elapsed`: the training seconds at their step, from the train lines around it
        import numpy as np

        steps = [0] + [r["step"] for r in self.train]
        secs = [0.0] + [r["elapsed"] for r in self.train]
        return [r["elapsed"] if _number(r.get("elapsed")) else float(np.interp(r["step"], steps, secs)) for r in rows]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str):
        return f"`{v}`" if v else '`""`'
    return str(v).lower() if isinstance(v, bool) else str(v)


def compare(paths: list[Path], metric: str = "val_loss", x: str = "tokens",
            out: Path = Path("runs/compare")) -> Path:
    """Write `compare.png` and `compare.md` into `out`; return the Markdown file's path."""
    if not paths:
        raise ScalelabError("compare needs at least one run directory: scalelab compare RUN [RUN ...]")
    if x not in X_AXES:
        raise ScalelabError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    runs = [Run(p) for p in paths]
    if len({r.label for r in runs}) < len(runs):  # same directory names: label with the paths as given
        for r, p in zip(runs, paths):
            r.label = str(p)
    known = sorted({k for r in runs for rec in r.train + r.evals for k, v in rec.items()
                    if _number(v)} - NOT_METRICS)
    if metric not in known:
        raise ScalelabError(f"unknown metric {metric!r}; the runs' metrics.jsonl have: {', '.join(known)}")
    for r in runs:
        if not r.rows(metric):
            raise ScalelabError(f"{r.path} has no {metric} values in its metrics.jsonl")
    if metric in NATS and (other := next((r for r in runs if r.tokenizer() != runs[0].tokenizer()), None)):
        raise ScalelabError(f"{runs[0].path} and {other.path} use different tokenizers, so {metric} (nats per token) "
                            f"does not compare between them; compare bits per byte instead: --metric val_bpb")
    keys = sorted({k for r in runs for k in r.config})
    differ = [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]
    finals = [*FINAL, *([metric] if metric not in FINAL else [])]

    out = make_dir(out)
    fig, ax = figure(figsize=(7, 4))
    is_eval = all("val_loss" in rec for r in runs for rec in r.rows(metric))
    for r in runs:
        rows = r.rows(metric)
        ax.plot(r.x(rows, x), [rec[metric] for rec in rows], "o-" if is_eval else "-", label=r.label,
                alpha=0.85, markersize=3)
    ax.set_xlabel({"tokens": "tokens", "steps": "steps", "seconds": "seconds of training"}[x])
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{metric} vs {x}")

    lines = [f"# Compare: `{metric}` vs {x}", "", f"{len(runs)} run(s): " + ", ".join(f"`{r.path}`" for r in runs), ""]
    head = ["run", *(f"`{k}`" for k in differ), "step", "tokens", *(f"final {m}" for m in finals)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        last = (r.train + r.evals)
        step = max(rec["step"] for rec in last) if last else None
        tokens = max(rec["tokens"] for rec in last) if last else None
        vals = [(r.rows(m) or [{}])[-1].get(m) for m in finals]
        lines.append("| " + " | ".join([r.label, *(_cell(r.config.get(k)) for k in differ), _cell(step),
                                         _cell(tokens), *(_cell(v) for v in vals)]) + " |")
    lines.append("")
    lines.append("Config: the keys that differ between the runs." if differ else
                 "Config: the runs' configs are identical.")
    lines += ["", "![compare](compare.png)", ""]
    savefig(fig, out / "compare.png")
    path = out / "compare.md"
    write_text(path, "\n".join(lines))
    return path
