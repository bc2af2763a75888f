"""Scaling-law fits for sweeps, and the sweep behind `scalelab sweep diloco`.

Follows "Scaling Laws for DiLoCo" (Charles et al. 2025, §6): per strategy an independent power law
L(N) ≈ A·N^α (their Table 7), and over DiLoCo's replica counts the joint law L(N, M) ≈ A·N^α·M^β (Table 10),
both by ordinary least squares in log space (log L = log A + α log N [+ β log M]). N is the number of
parameters (embeddings included, as the paper's N is in raw parameters). Fit quality: R² and RMS residual in
log space, and, with three or more sizes, the paper's held-out check (Table 11): fit without the largest N and
report |log L − log L̂| there. Deliberately different: the paper also fits parametric forms with a Huber loss
and 256 random L-BFGS starts (Table 13); plain least squares is exact for these log-linear forms.

`sweep diloco` runs the grid sequentially on one machine — DDP, and DiLoCo for each M in --replicas (M
torchrun processes) — at a token budget of --tokens-per-param × N (Chinchilla's 20 by default) or fixed
--steps, then writes sweep.json, scaling.md and scaling.png into --out. Finished runs are reused.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
import numpy as np

from scalelab.errors import ScalelabError
from scalelab.report import read_metrics, write_json


@dataclass
class Fit:
    """L = A·N^alpha [·M^beta], fitted in log space."""

    A: float
    alpha: float
    beta: float | None
    r2: float  # in log space
    rms_log: float  # RMS of log L − log L̂
    n_points: int
    holdout_residual: float | None = None  # |log L − log L̂| at the largest N, fitted without it

    def predict(self, N: float | np.ndarray, M: float | np.ndarray = 1.0) -> np.ndarray:
        out = self.A * np.asarray(N, dtype=float) ** self.alpha
        return out * np.asarray(M, dtype=float) ** self.beta if self.beta is not None else out

    def formula(self) -> str:
        s = f"L = {self.A:.4g}·N^{self.alpha:.4f}"
        return s + (f"·M^{self.beta:.4f}" if self.beta is not None else "")


# Charles et al. 2025: the optimal inner learning rate, DP γ(N) = A·N^α (Table 8) and DiLoCo's joint fit
# γ(N, M) = A·N^α·M^β (Table 10, which the authors recommend), N in parameters; and the best outer learning rate
# per M (Fig. 7, a tentative reading for N ≥ 335M; the paper does not fit it).
INNER_LR_DP = (16319.2, -0.819)
INNER_LR_DILOCO = (22256.0, -0.8827, 0.2929)
OUTER_LR = {1: 0.4, 2: 0.6, 4: 0.6, 8: 0.8}


def diloco_hparams(N: float, M: int) -> tuple[float, float]:
    """(DiLoCo's inner lr as a multiple of DP's tuned lr, outer lr) at N parameters and M replicas, from the
    paper's fits: γ(N, M)/γ_DP(N) — 0.54·M^0.29 at 2M parameters, 0.45·M^0.29 at 35M (below 35M the fits are
    extrapolated). The outer Nesterov step amplifies inner progress, so DiLoCo's best inner lr is below DP's."""
    if M not in OUTER_LR:
        raise ScalelabError(f"the paper's DiLoCo outer learning rates cover M ∈ {{1, 2, 4, 8}}, not {M}")
    (a, x, b), (ad, xd) = INNER_LR_DILOCO, INNER_LR_DP
    return a * N ** x * M ** b / (ad * N ** xd), OUTER_LR[M]


def _lstsq(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float]:
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return coef, r2, float(np.sqrt((resid**2).mean()))


def _check(values: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ScalelabError(f"power-law fits need positive finite {name} values, got {values.tolist()}")


def fit_power_law(N: list[float], L: list[float]) -> Fit:
    """L ≈ A·N^α by least squares on (log N, log L); needs at least two distinct N."""
    n, y = np.asarray(N, dtype=float), np.asarray(L, dtype=float)
    _check(n, "N")
    _check(y, "loss")
    if len(set(n.tolist())) < 2:
        raise ScalelabError("a power law in N needs at least two distinct model sizes")
    X = np.stack([np.ones_like(n), np.log(n)], 1)
    coef, r2, rms = _lstsq(X, np.log(y))
    fit = Fit(float(np.exp(coef[0])), float(coef[1]), None, r2, rms, len(n))
    big = n == n.max()
    if len(set(n[~big].tolist())) >= 2:
        held = fit_power_law(n[~big].tolist(), y[~big].tolist())
        fit.holdout_residual = float(np.abs(np.log(y[big]) - np.log(held.predict(n[big]))).mean())
    return fit


def fit_joint(N: list[float], M: list[float], L: list[float]) -> Fit:
    """L ≈ A·N^α·M^β by least squares on (log N, log M, log L); needs two sizes and two replica counts."""
    n, m, y = (np.asarray(v, dtype=float) for v in (N, M, L))
    for v, name in ((n, "N"), (m, "M"), (y, "loss")):
        _check(v, name)
    if len(set(n.tolist())) < 2 or len(set(m.tolist())) < 2:
        raise ScalelabError("the joint fit needs at least two model sizes and two replica counts")
    X = np.stack([np.ones_like(n), np.log(n), np.log(m)], 1)
    coef, r2, rms = _lstsq(X, np.log(y))
    fit = Fit(float(np.exp(coef[0])), float(coef[1]), float(coef[2]), r2, rms, len(n))
    big = n == n.max()
    if len(set(n[~big].tolist())) >= 2:
        held = fit_joint(n[~big].tolist(), m[~big].tolist(), y[~big].tolist())
        fit.holdout_residual = float(np.abs(np.log(y[big]) - np.log(held.predict(n[big], m[big]))).mean())
    return fit


# --------------------------------------------------------------------------------------------------- sweep
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: list[str], timeout: float = 7200) -> subprocess.CompletedProcess:
    """`scalelab <args>` under torchrun with `nproc` local processes, rendezvous on 127.0.0.1."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "scalelab.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def finished(run_dir: Path, steps: int) -> dict | None:
    """The last train and eval lines of a run that reached `steps`, else None."""
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    train, evals = read_metrics(run_dir)
    train = [r for r in train if "loss" in r and r["step"] == steps]
    evals = [r for r in evals if r["step"] == steps]
    return {**train[-1], **evals[-1]} if train and evals else None


def run_point(out: Path, strategy: str, M: int, d_model: int, steps: int, base: list[str], H: int,
              recipe: Path | None) -> dict:
    """Train one grid point (or reuse it) and return its final metrics."""
    run_dir = out / (f"ddp-d{d_model}" if strategy == "ddp" else f"diloco-m{M}-d{d_model}")
    sets = [*base, f"model.d_model={d_model}", f"train.max_steps={steps}", f"distributed.inner_steps={H}"]
    if strategy == "diloco":
        sets.append(f"distributed.replicas={M}")
    if (done := finished(run_dir, steps)) is None:
        args = ["train", "--quiet", "--resume", "--out", str(run_dir), "--strategy", strategy]
        args += ["--recipe", str(recipe)] if recipe else []
        for s in sets:
            args += ["--set", s]
        # DP's result does not depend on its process count (the global batch is fixed), so one process runs it.
        p = launch(1 if strategy == "ddp" else M, args)
        err = [x for x in p.stderr.splitlines() if x.startswith("error:")]
        if p.returncode or (done := finished(run_dir, steps)) is None:
            raise ScalelabError(err[0][7:] if err else f"sweep run {run_dir} failed:\n{p.stderr[-2000:]}")
    return {"strategy": strategy, "M": M, "d_model": d_model, "run": str(run_dir), "steps": steps,
            "tokens": done["tokens"], "val_loss": done["val_loss"], "comm_bytes": done.get("comm_bytes_total", 0)}


def param_count(cfg) -> int:
    """Parameters of `cfg.model` (embeddings included), counted without building it."""
    from scalelab.model import param_count as count

    return count(cfg.model)


def sweep_diloco(out: Path, sizes: list[int], replicas: list[int], H: int, recipe: Path | None,
                 overrides: list[str], steps: int | None, tokens_per_param: float, ddp: bool = True,
                 log=None) -> dict:
    """Run the grid and fit the laws; returns the sweep record (also written as sweep.json)."""
    from scalelab import config as configmod, data as datamod

    if not sizes or any(s < 1 for s in sizes) or not replicas or any(m < 1 for m in replicas) or H < 1:
        raise ScalelabError("--sizes and --replicas must be positive integers and --h >= 1")
    cfg = configmod.load(recipe, overrides)
    for M in replicas:
        if cfg.train.batch_size % M:
            raise ScalelabError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by every M in --replicas")
    out.mkdir(parents=True, exist_ok=True)
    vocab = datamod.prepare(cfg.data).meta["vocab_size"]
    points = []
    for d in sizes:
        c = configmod.load(recipe, [*overrides, f"model.d_model={d}"])
        c.model.vocab_size = vocab
        N = param_count(c)
        tokens_per_step = c.train.batch_size * c.train.grad_accum * c.model.context
        n_steps = steps or max(H, math.ceil(tokens_per_param * N / tokens_per_step))
        grid = ([("ddp", 1)] if ddp else []) + [("diloco", M) for M in replicas]
        for strategy, M in grid:
            if log:
                log(f"sweep: {strategy} M={M} d_model={d} N={N:,} steps={n_steps}")
            rec = run_point(out, strategy, M, d, n_steps, overrides, H, recipe)
            points.append(dict(rec, N=N))
    record = {"sizes": sizes, "replicas": replicas, "H": H, "points": points, "fits": fit_sweep(points)}
    write_json(out / "sweep.json", record)
    write_sweep_report(out, record)
    return record


def fit_sweep(points: list[dict]) -> dict:
    fits: dict = {}
    for key in sorted({("ddp" if p["strategy"] == "ddp" else f"M={p['M']}") for p in points}):
        sel = [p for p in points if ("ddp" if p["strategy"] == "ddp" else f"M={p['M']}") == key]
        if len({p["N"] for p in sel}) >= 2:
            fits[key] = asdict(fit_power_law([p["N"] for p in sel], [p["val_loss"] for p in sel]))
    dl = [p for p in points if p["strategy"] == "diloco"]
    if len({p["N"] for p in dl}) >= 2 and len({p["M"] for p in dl}) >= 2:
        fits["joint"] = asdict(fit_joint([p["N"] for p in dl], [p["M"] for p in dl], [p["val_loss"] for p in dl]))
    return fits


def write_sweep_report(out: Path, record: dict) -> Path:
    from scalelab.report import figure, savefig, write_text

    points, fits = record["points"], record["fits"]
    keys = sorted({("ddp" if p["strategy"] == "ddp" else f"M={p['M']}") for p in points})
    fig, ax = figure(figsize=(7, 4.5))
    for i, key in enumerate(keys):
        sel = sorted((p for p in points if ("ddp" if p["strategy"] == "ddp" else f"M={p['M']}") == key),
                     key=lambda p: p["N"])
        color = f"C{i}"
        label = "DDP" if key == "ddp" else f"DiLoCo {key}"
        ax.scatter([p["N"] for p in sel], [p["val_loss"] for p in sel], color=color, label=label)
        if key in fits:
            f = Fit(**fits[key])
            xs = np.geomspace(min(p["N"] for p in sel), max(p["N"] for p in sel), 50)
            ax.plot(xs, f.predict(xs), color=color, alpha=0.7, label=f"{label}: α={f.alpha:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final val loss (nats/token)")
    ax.set_title(f"DiLoCo scaling sweep (H={record['H']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    savefig(fig, out / "scaling.png")
    lines = [f"# DiLoCo scaling sweep (H = {record['H']})", "",
             "| strategy | M | d_model | N | steps | tokens | val loss | comm bytes (rank 0) |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['strategy']} | {p['M']} | {p['d_model']} | {p['N']:,} | {p['steps']} | {p['tokens']:,} | "
              f"{p['val_loss']:.4f} | {p['comm_bytes']:,} |" for p in points]
    lines += ["", "Fits (least squares in log space; R² and RMS residual in log space; held-out = |log L − log L̂| "
              "at the largest N when fitted without it):", "",
              "| fit | formula | R² | RMS log residual | held-out residual |", "|---|---|---|---|---|"]
    for key, f in fits.items():
        fit = Fit(**f)
        held = f"{fit.holdout_residual:.4f}" if fit.holdout_residual is not None else "–"
        lines.append(f"| {key} | {fit.formula()} | {fit.r2:.4f} | {fit.rms_log:.4f} | {held} |")
    lines += ["", "For reference, Charles et al. 2025 (35M–2.4B, C4): DP α = −0.0953; DiLoCo M=1/2/4/8 α = −0.0961, "
              "−0.0969, −0.0992, −0.1018; joint L = 19.226·N^−0.0985·M^0.0116.", "", "![scaling](scaling.png)", ""]
    path = out / "scaling.md"
    write_text(path, "\n".join(lines))
    return path
