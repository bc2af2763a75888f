"""TensorBoard event files for a run: `<run>/tb/`, from the records of `metrics.jsonl` (extra: `scalelab[tb]`).

`metrics.jsonl` stays the source of truth. `scalars(record)` turns one of its records into TensorBoard scalars
under the record's own names (`loss`, `val_loss`, `val_bpb`, `lr`, `grad_norm`, `tok_per_s`, ...; a nested
dict such as `comm_calls` becomes `comm_calls/outer`), at the record's `step`. The same function serves both
ways in: `Writer` (train.tensorboard = true: the trainer hands it each record it appends, on rank 0 only) and
`backfill` (`scalelab report --run R --tensorboard`: the whole file, for runs trained without it).

Nothing here is imported unless TensorBoard is asked for; without the `tensorboard` package, asking for it is
one clear error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from scalelab.errors import ConfigError
from scalelab.report import read_metrics

INSTALL = "pip install 'scalelab[tb]'"
BACKFILL_SUFFIX = ".backfill"  # the event file `backfill` writes (events.out.tfevents.<time>.<host>.<pid>.<n>.backfill)


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def summary_writer(asked_by: str):
    """torch's `SummaryWriter` class, or one error line naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"{asked_by} needs the tensorboard package: {INSTALL}") from None
    return SummaryWriter


def scalars(rec: dict) -> dict[str, float]:
    """A metrics.jsonl record as {tag: value}: every number but `step` (the x axis), nested dicts as
    `key/subkey`. An eval line's `tokens` is left out: the train line at that step logs it already."""
    is_eval = "val_loss" in rec
    out: dict[str, float] = {}
    for key, value in rec.items():
        if key == "step" or (is_eval and key == "tokens"):
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if _number(v)})
        elif _number(value):
            out[key] = float(value)
    return out


def tb_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tb"


class Writer:
    """Live events: `write(record)` for each record the trainer appends to metrics.jsonl. A resumed run passes
    `resume_step` (the checkpoint's step): TensorBoard then drops the lost events logged after it, as
    metrics.jsonl was truncated to it."""

    def __init__(self, run_dir: Path, resume_step: int = 0, asked_by: str = "train.tensorboard=true"):
        cls = summary_writer(asked_by)
        self._w = cls(log_dir=str(tb_dir(run_dir)), purge_step=resume_step + 1 if resume_step else None,
                      flush_secs=10)

    def write(self, rec: dict, walltime: float | None = None) -> None:
        step = int(rec["step"])
        for tag, value in scalars(rec).items():
            self._w.add_scalar(tag, value, step, walltime=walltime)
        self._w.flush()  # as metrics.jsonl: on disk when the record is, even if the run dies next

    def close(self) -> None:
        self._w.close()


def backfill(run_dir: Path) -> Path:
    """Write `tb/` from metrics.jsonl: one event file holding every record, which then replaces every event file
    in tb/ (earlier back-fills, and live events, which hold the same records). It is written beside the run and
    renamed into tb/ only when complete, so a failure leaves tb/ as it was. Returns tb/."""
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)  # every line checked before anything is written
    records = sorted(train + evals, key=lambda r: (r["step"], "val_loss" in r))  # the trainer's order
    # Wall times: training seconds (`elapsed`) before metrics.jsonl's last write, so TensorBoard's relative
    # axis shows training time rather than the instant of the back-fill.
    last_elapsed = max((r["elapsed"] for r in train), default=0.0)
    t0 = (run_dir / "metrics.jsonl").stat().st_mtime - last_elapsed
    out = tb_dir(run_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".tb-backfill-", dir=run_dir))
    try:
        w = summary_writer("--tensorboard")(log_dir=str(tmp), filename_suffix=BACKFILL_SUFFIX)
        elapsed = 0.0
        try:
            for rec in records:
                elapsed = rec.get("elapsed", elapsed)
                for tag, value in scalars(rec).items():
                    w.add_scalar(tag, value, int(rec["step"]), walltime=t0 + elapsed)
        finally:
            w.close()
        (new,) = [p for p in tmp.iterdir() if "tfevents" in p.name]
        out.mkdir(exist_ok=True)
        old = [p for p in out.iterdir() if "tfevents" in p.name and p.is_file()]
        os.replace(new, out / new.name)
        for p in old:
            if p.name != new.name:
                p.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
