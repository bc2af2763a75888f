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
from pathlib import Path

from scalelab import config as configmod
from scalelab.errors import ScalelabError


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) from metrics.jsonl; a line cut short by a crash is ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ScalelabError(f"{run_dir} has no metrics.jsonl")
    train, evals = [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        (evals if "val_loss" in rec else train).append(rec)
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

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (indented, for a person to read)."""
    write_text(path, json.dumps(obj, indent=2))


def plot_loss(run_dir: Path, path: Path) -> None:
    train, evals = read_metrics(run_dir)
    fig, ax = figure(figsize=(7, 4))
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", alpha=0.8)
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(run_dir).name)
    savefig(fig, path)


def run_report(run_dir: Path) -> Path:
    """Write `report.md` and `loss.png` for one training run; return the report's path."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ScalelabError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = configmod.load(run_dir / "config.toml")
    train, evals = read_metrics(run_dir)
    data = json.loads((run_dir / "data.json").read_text()) if (run_dir / "data.json").is_file() else {}
    plot_loss(run_dir, run_dir / "loss.png")
    m, t = cfg.model, cfg.train
    lines = [f"# Run `{cfg.name}`", ""]
    lines += ["| | |", "|---|---|",
              f"| model | {m.n_layer} layers, d={m.d_model}, {m.n_head} heads ({m.n_kv_head} KV), "
              f"context {m.context}, norm {m.norm}, vocab {m.vocab_size} |",
              f"| training | {t.max_steps} steps × {t.batch_size * t.grad_accum} seq × {m.context} tokens, "
              f"lr {t.lr:g}, warmup {t.warmup_steps}, cosine to {t.min_lr_ratio:g}×, seed {t.seed} |"]
    if data:
        lines.append(f"| data | {data['corpus']}: {data['train']['docs']} train / {data['val']['docs']} val documents, "
                     f"{data['train']['tokens']:,} train tokens, {data['val']['bytes'] / data['val']['tokens']:.2f} "
                     f"bytes/token (val); {data['skipped_non_utf8']} non-UTF-8 files skipped |")
    if train:
        tps = statistics.median(r["tok_per_s"] for r in train)
        lines.append(f"| speed | median {tps:,.0f} tokens/s, {statistics.median(r['flops_per_s'] for r in train) / 1e9:.1f} "
                     f"GFLOP/s (model FLOPs), {train[-1]['elapsed']:.0f} s of training |")
        lines.append(f"| final train loss | {train[-1]['loss']:.4f} nats/token (step {train[-1]['step']}) |")
        if "comm_bytes_total" in train[-1]:  # ddp / diloco runs (scalelab/distributed.py)
            d, last = cfg.distributed, train[-1]
            what = "DDP" if d.strategy == "ddp" else f"DiLoCo (H={d.inner_steps}, outer lr {d.outer_lr:g})"
            lines.append(f"| communication | {what}: {last['comm_bytes_total'] / last['tokens']:,.1f} bytes/token "
                         f"handed to collectives by rank 0 ({last['comm_bytes_total']:,} bytes), "
                         f"{last['link_s_total']:.1f} s on the simulated link |")
    if evals:
        e = evals[-1]
        lines.append(f"| final val loss | {e['val_loss']:.4f} nats/token = {e['val_bpb']:.4f} bits/byte "
                     f"(step {e['step']}, perplexity {math.exp(e['val_loss']):.2f}) |")
    lines += ["", "![loss](loss.png)", ""]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
