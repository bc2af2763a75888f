"""What every report-card section returns, the options a reproduction takes, and the runner its training
runs go through.

A section states its claim, the threshold it judges by (fixed in the code, before anything is measured), the
regime it tests beside the paper's, and a verdict from the one protocol of `verdict.py`. Its training runs are
ordinary run directories trained by `train_runs`: finished runs are reused, interrupted ones resume, and
single-process runs go two at a time on a 2-core machine (one thread each), with one progress display for
the whole card. Runs that go one at a time train in the card's own process, as `scalelab train --resume`
would (the same function, the same files, train.log included): a process per run paid ~5 s each for the
interpreter, torch, torch._dynamo (imported by AdamW's constructor) and matplotlib.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalelab import config as configmod
from scalelab.errors import ScalelabError
from scalelab.papers.verdict import Verdict
from scalelab.report import make_dir, write_text
from scalelab.scaling import finished


@dataclass
class Section:
    key: str
    title: str
    claim: str
    measured: str
    verdict: str  # one of verdict.VERDICTS
    body: str
    images: list[str] = field(default_factory=list)
    threshold: float | str = ""
    regime: dict = field(default_factory=dict)  # what this run tests: params, tokens, steps, ...
    paper_regime: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # the numbers the verdict used
    note: str = ""
    parts: list[Verdict] = field(default_factory=list)  # per-claim verdicts, when a section checks several

    def verdicts(self) -> list[Verdict]:
        """The section's verdict, then one per sub-claim (for verdicts.json)."""
        head = Verdict(self.key, self.claim, self.verdict, self.threshold, regime=self.regime,
                       paper_regime=self.paper_regime, figures=self.figures, note=self.note)
        return [head, *self.parts]


class CardProgress:
    """One progress display for the whole card: the section, the run, and an ETA from runs done so far."""

    def __init__(self, enabled: bool = True):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.fields[section]}"), TextColumn("{task.description}"),
                            BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), disable=not enabled)
        self.task = None

    def __enter__(self) -> CardProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def section(self, name: str, runs: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task("", total=max(1, runs), section=name)

    def run(self, name: str) -> None:
        if self.task is not None:
            self.bar.update(self.task, description=name)

    def done(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)


@dataclass
class Options:
    """What a reproduction may be pointed at, from `scalelab reproduce`'s flags."""

    shared: Path | None = None  # the lab's shared data (holds data/metr); None = look for ../shared
    sss_model: Path | None = None  # a Sudoku model trained by `scalelab search train-sudoku`, reused by `sss`
    # Training runs at once. 1 (each with torch's threads) is the measured best for the tiny recipe on 2 cores:
    # two one-thread runs side by side took 0.33-0.48 s/step each against 0.16 s/step alone with two threads.
    parallel: int = 1
    # cpu | cuda: with cuda every training run goes to one GPU and full mode takes each section's GPU sizes
    # (dyt.GPU_SIZES, diloco.sizes, bd3lm.GPU_SIZES); quick mode keeps its sizes and only moves the runs
    device: str = "cpu"
    progress: CardProgress | None = None

    def shared_dir(self) -> Path | None:
        """--shared, else ../shared beside the working directory or beside the checkout holding this package."""
        here = Path(__file__).resolve().parents[2]
        cands = [self.shared] if self.shared is not None else [Path.cwd().parent / "shared", here.parent / "shared"]
        return next((Path(c) for c in cands if (Path(c) / "data").is_dir()), None)

    def tick(self, section: str | None = None, runs: int = 0, run: str | None = None, done: int = 0) -> None:
        if self.progress is None:
            return
        if section is not None:
            self.progress.section(section, runs)
        if run is not None:
            self.progress.run(run)
        if done:
            self.progress.done(done)


def unigram_baseline(cfg: configmod.Config) -> float:
    """Cross-entropy of the val split under the train split's unigram distribution (nats/token)."""
    from scalelab import data as datamod
    from scalelab.papers import verdict as V

    prepared = datamod.prepare(cfg.data)
    return V.unigram_cross_entropy(prepared.tokens("train"), prepared.tokens("val"), prepared.meta["vocab_size"])


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


# ---------------------------------------------------------------------------------------------- the runner
def train_runs(jobs: list[tuple[configmod.Config, Path]], opts: Options | None = None) -> list[dict]:
    """Train every (config, run directory) pair; return each run's final train + eval line.

    Each run is `scalelab train --resume` (its resolved recipe is written to `<run>.toml` beside it), in its own
    process, `opts.parallel` processes at a time (a DiLoCo run of M replicas counts M; when more than one
    process runs, each gets one thread); with `opts.parallel` = 1 a single-process run trains in this process
    instead (`_train_here`). A finished run is reused."""
    opts = opts or Options()
    results: dict[int, dict] = {}
    pending: list[int] = []
    for i, (cfg, run) in enumerate(jobs):
        if (done := finished(run, cfg.train.max_steps)) is not None:
            results[i] = done
            opts.tick(done=1)
        else:
            pending.append(i)
    running: dict[int, tuple[subprocess.Popen, Any]] = {}
    budget = max(1, opts.parallel)  # processes at once; a DiLoCo run of M replicas takes M
    try:
        while pending or running:
            while pending:
                cfg, run = jobs[pending[0]]
                used = sum(_procs(jobs[j][0]) for j in running)
                if running and used + _procs(cfg) > budget:
                    break
                i = pending.pop(0)
                opts.tick(run=cfg.name)
                if budget == 1 and cfg.distributed.strategy == "single":
                    results[i] = _train_here(cfg, Path(run))
                    opts.tick(done=1)
                    continue
                running[i] = _launch(cfg, Path(run), one_thread=budget > 1 or _procs(cfg) > 1)
            for i, (proc, logf) in list(running.items()):
                if proc.poll() is None:
                    continue
                logf.close()
                del running[i]
                cfg, run = jobs[i]
                done = finished(run, cfg.train.max_steps)
                if proc.returncode or done is None:
                    lines = (Path(run) / "train.log").read_text(errors="replace").splitlines()
                    err = [x for x in lines if x.startswith("error:")]
                    raise ScalelabError(err[-1][7:] if err else f"training run {run} failed (see {run}/train.log)")
                results[i] = done
                opts.tick(done=1)
            time.sleep(0.2)
    finally:
        for proc, logf in running.values():  # an error or an interrupt stops the other runs too
            proc.terminate()
            proc.wait(timeout=30)
            logf.close()
    return [results[i] for i in range(len(jobs))]


def _procs(cfg: configmod.Config) -> int:
    """Processes a run takes: DiLoCo one per replica (M); DDP one (its math does not depend on the process
    count: the global batch is fixed); single one."""
    d = cfg.distributed
    return max(1, d.replicas) if d.strategy == "diloco" else 1


def _write_recipe(cfg: configmod.Config, run: Path) -> Path:
    """The run directory, and the run's resolved recipe beside it as `<run>.toml`."""
    make_dir(run)
    recipe = run.with_name(run.name + ".toml")
    write_text(recipe, configmod.to_toml(cfg))
    return recipe


def _train_here(cfg: configmod.Config, run: Path) -> dict:
    """`scalelab train --recipe <run>.toml --out <run> --resume --quiet`, in this process: the same trainer and
    report, its log lines appended to `<run>/train.log` (not to the card's console), torch's thread count put
    back afterwards. The run's numbers equal a fresh process's (tested): the trainer seeds everything it draws."""
    import copy
    import logging

    import torch

    from scalelab import report, train as trainmod

    _write_recipe(cfg, run)
    logger, threads = logging.getLogger("scalelab"), torch.get_num_threads()
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.handlers, logger.propagate, logger.level
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    try:
        summary = trainmod.train(copy.deepcopy(cfg), run, resume=True, progress=False)  # it fills in cfg's fields
        path = report.run_report(run)
        logger.info(f"val loss {summary['val_loss']:.4f} nats/token, {summary['val_bpb']:.4f} bits/byte; report: {path}")
    except ScalelabError as e:
        logger.error(f"error: {e}")
        raise
    except Exception as e:  # a bug, not a user's error: its traceback goes to train.log, as a process's would
        logger.exception("training failed")
        raise ScalelabError(f"training run {run} failed: {type(e).__name__}: {e} (see {run}/train.log)") from e
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
        handler.close()
        torch.set_num_threads(threads)
    done = finished(run, cfg.train.max_steps)
    if done is None:
        raise ScalelabError(f"training run {run} did not finish (see {run}/train.log)")
    return done


def _launch(cfg: configmod.Config, run: Path, one_thread: bool) -> tuple[subprocess.Popen, Any]:
    from scalelab.scaling import free_port

    if one_thread:
        cfg.train.threads = 1
    recipe = _write_recipe(cfg, run)
    logf = open(run / "train.log", "a")
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if one_thread else {}))
    cmd = [sys.executable, "-m", "scalelab.cli"]
    if cfg.distributed.strategy != "single":  # torchrun on this machine, rendezvous on 127.0.0.1
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(_procs(cfg)),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "scalelab.cli"]
    proc = subprocess.Popen([*cmd, "train", "--recipe", str(recipe), "--out", str(run), "--resume", "--quiet"],
                            stdout=logf, stderr=subprocess.STDOUT, env=env)
    return proc, logf
