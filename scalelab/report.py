"""The report toolkit, and the report of a training run.

Every report of the lab (training runs, search runs, the report card's sections, horizons, sweeps) is built
with these helpers: atomic writes (`write_text`, `write_json`, `savefig`: never a half-written file over a
good one), `read_metrics` (the one `metrics.jsonl` reader), `figure` (a matplotlib figure on the Agg backend)
and `make_dir` (an output directory, or one clear error). `run_report` reads `config.toml`, `metrics.jsonl`
and `data.json`; nothing is taken from memory, so a report can be rebuilt at any time, even mid-run.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
from pathlib import Path

from scalelab import config as configmod
from scalelab.errors import ScalelabError


TRAIN_KEYS = ("step", "tokens", "loss", "tok_per_s", "flops_per_s", "elapsed")  # what train.py writes, at least
EVAL_KEYS = ("step", "tokens", "val_loss", "val_bpb")


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) from metrics.jsonl. Only its last line may be cut short (by a crash, or a write in
    progress) and is then ignored; any other line that is not a metrics record is an error naming it, so nothing
    is ever built from part of the rows."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ScalelabError(f"{run_dir} has no metrics.jsonl")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # the last item: "" or a line still being written
    except UnicodeDecodeError:
        raise ScalelabError(f"{path} is corrupt: not UTF-8 text") from None
    train, evals = [], []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if no == len(lines):
                continue
            raise ScalelabError(f"{path}:{no}: not a JSON line (the file is corrupt; nothing was written)") from None
        keys = EVAL_KEYS if isinstance(rec, dict) and "val_loss" in rec else TRAIN_KEYS
        if not isinstance(rec, dict) or not all(_number(rec.get(k)) for k in keys):
            raise ScalelabError(f"{path}:{no}: not a metrics record (a train line needs the numbers "
                                f"{', '.join(TRAIN_KEYS)}; an eval line {', '.join(EVAL_KEYS)}); nothing was written")
        (evals if keys is EVAL_KEYS else train).append(rec)
    return train, evals


def figure(*args, **kw):
    """`plt.subplots(*args, **kw)` on the non-interactive Agg backend: (fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def savefig(fig, path: Path) -> None:
    """Write a figure atomically (never a half-written PNG over a good one)."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def make_dir(path: Path) -> Path:
    """Create an output directory, or fail with one line the user can act on."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScalelabError(f"cannot write to output directory {path}: {e.strerror}") from None
    return Path(path)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically: a temporary file beside it, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # one per writer
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (indented, for a person to read)."""
    write_text(path, json.dumps(obj, indent=2))


def plot_loss(run_dir: Path, path: Path, rows: tuple[list[dict], list[dict]] | None = None) -> None:
    train, evals = rows or read_metrics(run_dir)
    fig, ax = figure(figsize=(7, 4))
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", alpha=0.8)
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    ax.set_title(Path(run_dir).name)
    savefig(fig, path)


def _data_line(path: Path) -> str | None:
    """The report's data row from `data.json` (None when the run has none)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tr, val = data["train"], data["val"]
        return (f"| data | {data['corpus']}: {tr['docs']} train / {val['docs']} val documents, {tr['tokens']:,} train "
                f"tokens, {val['bytes'] / val['tokens']:.2f} bytes/token (val); {data['skipped_non_utf8']} non-UTF-8 "
                "files skipped |")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, ZeroDivisionError):
        raise ScalelabError(f"{path} is corrupt (not the data summary a training run writes); "
                            "nothing was written") from None


def run_report(run_dir: Path) -> Path:
    """Write `report.md` and `loss.png` for one training run; return the report's path. Everything is read and
    checked before either file is replaced."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ScalelabError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = configmod.load(run_dir / "config.toml")
    train, evals = read_metrics(run_dir)
    data = _data_line(run_dir / "data.json")
    m, t = cfg.model, cfg.train
    lines = [f"# Run `{cfg.name}`", ""]
    lines += ["| | |", "|---|---|",
              f"| model | {m.n_layer} layers, d={m.d_model}, {m.n_head} heads ({m.n_kv_head} KV), "
              f"context {m.context}, norm {m.norm}, vocab {m.vocab_size} |",
              f"| training | {t.max_steps} steps × {t.batch_size * t.grad_accum} seq × {m.context} tokens, "
              f"lr {t.lr:g}, warmup {t.warmup_steps}, cosine to {t.min_lr_ratio:g}×, seed {t.seed} |"]
    if data:
        lines.append(data)
    if train:
        tps = statistics.median(r["tok_per_s"] for r in train)
        lines.append(f"| speed | median {tps:,.0f} tokens/s, {statistics.median(r['flops_per_s'] for r in train) / 1e9:.1f} "
                     f"GFLOP/s (model FLOPs), {train[-1]['elapsed']:.0f} s of training |")
        lines.append(f"| final train loss | {train[-1]['loss']:.4f} nats/token (step {train[-1]['step']}) |")
        last = train[-1]
        if _number(last.get("comm_bytes_total")) and _number(last.get("link_s_total")):  # ddp / diloco runs
            d = cfg.distributed
            what = "DDP" if d.strategy == "ddp" else f"DiLoCo (H={d.inner_steps}, outer lr {d.outer_lr:g})"
            per_token = last["comm_bytes_total"] / max(last["tokens"], 1)
            lines.append(f"| communication | {what}: {per_token:,.1f} bytes/token "
                         f"handed to collectives by rank 0 ({last['comm_bytes_total']:,} bytes), "
                         f"{last['link_s_total']:.1f} s on the simulated link |")
    if evals:
        e = evals[-1]
        ppl = math.exp(e["val_loss"]) if e["val_loss"] < 700 else math.inf
        lines.append(f"| final val loss | {e['val_loss']:.4f} nats/token = {e['val_bpb']:.4f} bits/byte "
                     f"(step {e['step']}, perplexity {ppl:.2f}) |")
    lines += ["", "![loss](loss.png)", ""]
    plot_loss(run_dir, run_dir / "loss.png", (train, evals))
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
