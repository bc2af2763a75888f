"""DiLoCo and its scaling laws (Douillard et al., 2023; Charles et al., 2025): DDP vs DiLoCo M ∈ {1, 2, 4} at
an equal token budget, with the learning rates of the scaling-laws paper's fits, and communication per token."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from scalelab import config as configmod
from scalelab.papers.section import Options, Section, mean_sd
from scalelab.report import figure, read_metrics, savefig

log = logging.getLogger("scalelab")


DILOCO_H = 30
DILOCO_MS = (1, 2, 4)


def diloco_overrides(quick: bool, seed: int) -> list[str]:
    """The tiny recipe, equal tokens for every strategy; evaluations at DiLoCo's outer steps (every H)."""
    steps = 240 if quick else 600
    return [f"train.max_steps={steps}", f"train.warmup_steps={steps // 10}", f"train.eval_every={DILOCO_H}",
            f"train.ckpt_every={DILOCO_H * 4}", "train.eval_batches=16", "train.log_every=10", f"train.seed={seed}",
            "distributed.timeout_s=600"]


def _diloco_params(cfg: configmod.Config) -> int:
    from scalelab.scaling import param_count

    cfg.model.vocab_size = cfg.data.vocab_size
    return param_count(cfg)


def run(out: Path, quick: bool, opts: Options | None = None) -> Section:
    """DDP vs DiLoCo M ∈ {1, 2, 4} (H = 30, outer SGD lr 0.7 Nesterov 0.9) at an equal token budget."""
    from scalelab.scaling import run_point

    recipe = configmod.recipe_path("tiny")
    seeds = (0,) if quick else (0, 1)
    from scalelab.scaling import diloco_hparams

    base = configmod.load(recipe)
    d_model, lr = base.model.d_model, base.train.lr
    N = _diloco_params(base)
    hp = {M: diloco_hparams(N, M) for M in DILOCO_MS}  # (inner lr / DDP's, outer lr), the paper's fits
    res: dict[str, list[dict]] = {}
    for seed in seeds:  # strategies interleaved within each seed
        for key, strategy, M in [("ddp", "ddp", 1)] + [(f"M={m}", "diloco", m) for m in DILOCO_MS]:
            log.info(f"DiLoCo reproduction: {key} seed {seed}")
            sets = diloco_overrides(quick, seed)
            if strategy == "diloco":
                sets += [f"train.lr={lr * hp[M][0]:.6g}", f"distributed.outer_lr={hp[M][1]}"]
            rec = run_point(out / f"s{seed}", strategy, M, d_model, int(sets[0].split("=")[1]), sets, DILOCO_H, recipe)
            res.setdefault(key, []).append(rec)
    keys = list(res)
    loss = {k: statistics.fmean(r["val_loss"] for r in res[k]) for k in keys}
    tokens = res["ddp"][0]["tokens"]
    bpt = {k: res[k][0]["comm_bytes"] / tokens for k in keys}
    # Seed noise: with two seeds, the sd of the DDP/M=1 finals; one seed (quick) falls back to 0.02 nats, about
    # what this recipe's seeds differ by (see the DyT section).
    if len(seeds) > 1:
        noise = max(statistics.stdev(r["val_loss"] for r in res[k]) for k in ("ddp", "M=1"))
        tol = max(2 * noise, 0.005)
    else:
        tol = 0.02
    rel = {k: loss[k] / loss["ddp"] - 1 for k in keys}
    c1 = loss["M=1"] <= loss["ddp"] + tol
    c2 = all(loss[f"M={a}"] <= loss[f"M={b}"] + tol for a, b in zip(DILOCO_MS, DILOCO_MS[1:])) and rel["M=4"] <= 0.05
    ratio = {k: bpt[k] / bpt["ddp"] for k in keys if k != "ddp"}
    c3 = all(abs(ratio[k] - 1 / DILOCO_H) < 1e-9 for k in ratio)

    fig, (a, b) = figure(1, 2, figsize=(11, 4))
    for i, k in enumerate(keys):
        _, evals = read_metrics(Path(res[k][0]["run"]))
        a.plot([e["tokens"] for e in evals], [e["val_loss"] for e in evals], marker="o", ms=3, color=f"C{i}",
               label="DDP" if k == "ddp" else f"DiLoCo {k}")
    a.set_xlabel("training tokens")
    a.set_ylabel("val loss (global model, nats/token)")
    a.set_title(f"equal tokens, H={DILOCO_H} (seed {seeds[0]})")
    a.grid(alpha=0.3)
    a.legend()
    b.bar(range(len(keys)), [bpt[k] for k in keys], color=[f"C{i}" for i in range(len(keys))])
    b.set_xticks(range(len(keys)), ["DDP" if k == "ddp" else k for k in keys])
    b.set_yscale("log")
    b.set_ylabel("bytes per token (rank 0 payload)")
    b.set_title("communication")
    b.grid(alpha=0.3, axis="y")
    savefig(fig, out / "diloco.png")

    cfg = configmod.load(recipe, diloco_overrides(quick, seeds[0]))
    hps = "; ".join(f"M={M}: inner {lr * r:.3g}, outer {o:g}" for M, (r, o) in hp.items())
    per_seed = {k: " / ".join(f"{r['val_loss']:.4f}" for r in res[k]) for k in keys}
    rows = "\n".join(f"| {'DDP' if k == 'ddp' else 'DiLoCo ' + k} | {per_seed[k]} | "
                     f"{loss[k]:.4f} | {rel[k]:+.2%} | {bpt[k]:,.1f} |" for k in keys)
    body = f"""The tiny recipe ({cfg.model.n_layer} layers, d={cfg.model.d_model}, context {cfg.model.context}) for \
{cfg.train.max_steps} steps × {cfg.train.batch_size} sequences = {tokens:,} tokens per run, the same global batch and \
token budget for every strategy (DiLoCo's M replicas each take B/M = {cfg.train.batch_size}/M sequences per inner step, \
as in Charles et al. 2025). AdamW with warmup + cosine, clipping 1: DDP at lr {cfg.train.lr:g}; DiLoCo's inner lr and \
outer lr per M from the scaling-laws paper ({hps}: inner lr = DDP's × γ(N, M)/γ_DP(N) from its Tables 8 and 10, \
outer lr from its Fig. 7), outer SGD with Nesterov momentum {cfg.distributed.outer_momentum:g}, H = {DILOCO_H}; M torchrun \
processes (gloo) per DiLoCo run, DDP as one process (its math does not depend on the process count). Validation on \
the global model every H steps; seeds {', '.join(map(str, seeds))}.

| strategy | final val loss per seed | mean | vs DDP | bytes/token |
|---|---|---|---|---|
{rows}

- M=1 DiLoCo vs DDP: {rel['M=1']:+.2%} (paper, 35M: −0.1%). Holds if ≤ DDP + {tol:.3f} nats \
({'2 × seed sd' if len(seeds) > 1 else 'an assumed seed noise; run without --quick for a measured one'}): \
**{'yes' if c1 else 'no'}**.
- Loss vs M: {', '.join(f'{k} {rel[k]:+.2%}' for k in keys if k != 'ddp')} vs DDP (paper, 35M: −0.1%, +0.7%, +2.0%). \
Holds if non-decreasing in M within the same tolerance and M=4 within +5% of DDP: **{'yes' if c2 else 'no'}**.
- Communication: DiLoCo/DDP bytes per token = {', '.join(f'{k} {ratio[k]:.5f}' for k in ratio)} vs 1/H = \
{1 / DILOCO_H:.5f}: **{'exact' if c3 else 'not exact'}**. (Payload handed to the all-reduce by one rank; a ring \
all-reduce puts 2·(n−1)/n of it on each link.)
- Why the gaps are larger than the paper's: this run has {cfg.train.max_steps // DILOCO_H} outer steps, fewer \
than the ~10-step memory of the outer Nesterov momentum (μ = 0.9), whose first steps overshoot the replicas' \
average (1.33× the outer gradient at step 1, 1.9× at step 2; the val-loss curve shows it at the first evaluation); \
the paper's 35M model trains for 0.7B tokens, i.e. hundreds of outer steps at H = 30 (derived from its batch-size fits). \
The learning rates here come from the paper's fits, extrapolated below its smallest model (35M; this one has \
~{N / 1e6:.1f}M parameters), not from a sweep; the paper's gaps also shrink with N.
- Not reproduced here: the scaling of these gaps with N (see `scalelab sweep diloco`), a learning-rate sweep per M, \
and 20·N-token budgets.
"""
    holds = c1 and c2 and c3
    measured = (f"M=1 {rel['M=1']:+.1%}, M=2 {rel['M=2']:+.1%}, M=4 {rel['M=4']:+.1%} vs DDP; bytes/token ratio "
                f"{ratio['M=2']:.4f} (1/H = {1 / DILOCO_H:.4f})")
    return Section("diloco", "DiLoCo and its scaling laws (Douillard et al., 2023; Charles et al., 2025)",
                   "M=1 DiLoCo is no worse than DDP; loss rises mildly with M; DiLoCo communicates 1/H of DDP",
                   measured, "holds" if holds else "does not hold", body, ["diloco.png"])
