"""DiLoCo and its scaling laws (Douillard et al., 2023; Charles et al., 2025), the report-card section
`reproduce diloco`.

Claims checked (scaling-laws paper, §4-§6 and App. A): M=1 DiLoCo is no worse than DDP; loss rises mildly with
the number of replicas M; DiLoCo communicates 1/H of DDP's bytes; and, by the paper's own wall-clock model,
DiLoCo reaches DDP's loss several times sooner over a slow link (≥ 5× at 1 Gbit/s for M=4).

Best against best, as the paper tunes: DDP's learning rate from a sweep; for each M, the outer learning rate
from {0.4, 0.6, 0.8, 1.0} (quick: {0.2, 0.4, 0.8}), extended downwards (0.2, 0.1, ...) while the best sits at the grid's low edge, as
the paper extends its grids until the optimum is interior, at the inner learning rate of the paper's fits (`scaling.diloco_hparams`, relative
to DDP's tuned lr), then the inner lr at ½× and 2× that centre (full mode) or at DDP's tuned lr (quick) at the best outer lr. The best configuration of
each arm runs on more seeds; gaps get CIs from the seed spread (paired by seed). Runs are long enough for the
outer Nesterov momentum (a memory of ~10 outer steps) to matter little: ≥ 100 outer steps quick, ≥ 300 full.

Wall-clock follows App. A (`wallclock.py`), applied to the measured loss curves: the steps each arm needs to
reach DDP's final loss, times the per-step wall time at 1, 10 and 100 Gbit/s, at this model's size (its step
compute measured) and projected to the paper's sizes (the measured step ratio carried over; the projection's
assumption). `benchmarks/diloco_comm.py` stays as the real-process measurement on a simulated link.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
from pathlib import Path

from scalelab import config as configmod, wallclock as W
from scalelab.papers import verdict as V
from scalelab.papers.section import Options, Section, train_runs
from scalelab.report import figure, read_metrics, savefig

log = logging.getLogger("scalelab")
MS = (1, 2, 4)
OUTER_LRS = (0.4, 0.6, 0.8, 1.0)
# Quick mode: three points a factor 2 apart over the same range, starting one step below it, where the full grid's
# downward extension found every M's optimum at H = 10 (0.2; 0.1 was worse); the extension rule still applies.
QUICK_OUTER_LRS = (0.2, 0.4, 0.8)
DDP_LRS = (1e-3, 3e-3, 1e-2)
INNER_FACTORS = (0.5, 2.0)  # around the paper's fitted inner lr
M1_THRESHOLD = 0.01  # M=1 − DDP ≤ 1% of DDP's loss (the paper, 35M: −0.1%)
M4_THRESHOLD = 0.05  # M=4 − DDP ≤ 5% (the paper, 35M: +2.0%)
SPEEDUP_TARGET = 5.0  # DiLoCo M=4 to DDP's loss ≥ 5× sooner at 1 Gbit/s
PAPER_REGIME = {"params": "35M-10B", "tokens": "20 tokens/param (Chinchilla)", "H": 30, "outer steps": "hundreds+"}


def sizes(quick: bool, device: str = "cpu") -> dict:
    """A model and per-replica batch where DDP trains well within the budget. H = 10: at a CPU budget of ~1-3k
    steps it is the only H of the paper's {10, 30} that gives ≥ 100 (quick) / ≥ 300 (full) outer steps. A
    1,024-token vocabulary: at d = 64 the tied 4,096-row output head was ~70% of a step's FLOPs.

    Full mode on one GPU (`--device cuda`): the paper's H = 30 over 9,000 steps (300 outer steps), 4 layers at
    d = 256 with the 4,096-token vocabulary, 32 × 128 tokens a step (37M tokens a run, 4 epochs of the stdlib
    corpus). Not yet run on a GPU."""
    if device == "cuda" and not quick:
        return {"H": 30, "steps": 9000, "d_model": 256, "n_layer": 4, "context": 128, "batch": 32, "vocab": 4096,
                "seeds": (0, 1, 2)}
    return {"H": 10, "steps": 1000 if quick else 3000, "d_model": 64, "n_layer": 2, "context": 64, "batch": 16,
            "vocab": 1024, "seeds": (0, 1) if quick else (0, 1, 2)}


def diloco_config(strategy: str, M: int, seed: int, quick: bool, lr: float, outer_lr: float = 0.7,
                  device: str = "cpu") -> configmod.Config:
    z = sizes(quick, device)
    cfg = configmod.load("tiny")
    m, t, d = cfg.model, cfg.train, cfg.distributed
    m.d_model, m.n_layer, m.context = z["d_model"], z["n_layer"], z["context"]
    m.n_head, m.n_kv_head = 4, 2
    cfg.data.vocab_size = z["vocab"]
    t.batch_size, t.max_steps, t.lr, t.seed = z["batch"], z["steps"], lr, seed
    t.warmup_steps, t.eval_every, t.ckpt_every, t.log_every = z["steps"] // 20, z["H"] * 10, z["H"] * 20, z["H"]
    t.eval_batches = 8
    # one thread per process: a run's numbers then do not depend on how many run side by side (thread count
    # changes float reduction order), and at d = 64 two one-thread runs at once beat one two-thread run (1.6×)
    t.threads = 1
    d.strategy, d.inner_steps, d.timeout_s = strategy, z["H"], 600.0
    if device == "cuda":  # one GPU: every replica's process on cuda:0; NCCL refuses two ranks on one device
        t.device, d.backend = "cuda:0", "gloo"
    else:
        t.device = "cpu"
    if strategy == "diloco":
        d.replicas, d.outer_lr = M, outer_lr
    cfg.name = (f"ddp-lr{lr:.3g}" if strategy == "ddp" else f"m{M}-lr{lr:.3g}-o{outer_lr:g}") + f"-s{seed}"
    configmod.validate(cfg)
    return cfg


def run(out: Path, quick: bool, opts: Options | None = None) -> Section:
    from scalelab.scaling import diloco_hparams, param_count

    opts = opts or Options()
    # one-thread runs side by side (see diloco_config): at least two at once wherever there are two cores
    opts = dataclasses.replace(opts, parallel=max(opts.parallel, min(2, os.cpu_count() or 1)))
    z = sizes(quick, opts.device)
    seeds = z["seeds"]
    # the inner lr around the paper's fit: full mode ½× and 2×; quick mode one point, DDP's own tuned lr (the
    # fit extrapolates far below its 35M floor, and at 100 outer steps M=1 lost 8.7% to DDP at the fit alone)
    factors = (None,) if quick else INNER_FACTORS
    outer_lrs = QUICK_OUTER_LRS if quick else OUTER_LRS
    opts.tick(section="diloco", runs=len(DDP_LRS) + len(MS) * (len(outer_lrs) + len(factors))
              + (1 + len(MS)) * (len(seeds) - 1))

    def loss(cfgs: list[configmod.Config]) -> list[float]:
        return [r["val_loss"] for r in train_runs([(c, out / c.name) for c in cfgs], opts)]

    base = diloco_config("ddp", 1, 0, quick, 3e-3, device=opts.device)
    base.model.vocab_size = base.data.vocab_size
    N = param_count(base)
    # DDP's lr; then, per M, the outer lr at the fitted inner lr, then the inner lr around it
    ddp_sweep = dict(zip(DDP_LRS, loss([diloco_config("ddp", 1, 0, quick, lr, device=opts.device)
                                        for lr in DDP_LRS])))
    ddp_lr = min(ddp_sweep, key=ddp_sweep.get)
    sweep: dict[tuple[int, float, float], float] = {}
    best: dict[int, tuple[float, float]] = {}
    centre = {M: ddp_lr * diloco_hparams(N, M)[0] for M in MS}
    grid = {M: list(outer_lrs) for M in MS}

    def sweep_runs(points: list[tuple[int, float, float]], extra: tuple = ()) -> None:
        # every M's points in one call, side by side (one-process runs first, so they pair up on 2 cores)
        cfgs = [*extra, *(diloco_config("diloco", M, 0, quick, lr, o, device=opts.device) for M, lr, o in points)]
        for pt, v in zip(points, loss(cfgs)[len(extra):]):
            sweep[pt] = v

    # DDP's other seeds need only its lr: they run beside the first grid
    sweep_runs([(M, centre[M], o) for M in MS for o in grid[M]],
               extra=tuple(diloco_config("ddp", 1, s, quick, ddp_lr, device=opts.device) for s in seeds[1:]))
    # as the paper does, extend each grid until its optimum is interior (the best outer lr falls with H)
    while edge := [M for M in MS if min(grid[M], key=lambda o: sweep[(M, centre[M], o)]) == min(grid[M]) > 0.05]:
        for M in edge:
            grid[M].append(round(min(grid[M]) / 2, 3))
        sweep_runs([(M, centre[M], grid[M][-1]) for M in edge])
    o_best = {M: min(grid[M], key=lambda o: sweep[(M, centre[M], o)]) for M in MS}
    sweep_runs([(M, ddp_lr if f is None else centre[M] * f, o_best[M]) for M in MS for f in factors])
    for M in MS:
        best[M] = min(((lr, o) for (m, lr, o) in sweep if m == M), key=lambda k: sweep[(M, *k)])
    cfgs = {"ddp": [diloco_config("ddp", 1, s, quick, ddp_lr, device=opts.device) for s in seeds]}
    cfgs |= {f"M={M}": [diloco_config("diloco", M, s, quick, *best[M], device=opts.device) for s in seeds] for M in MS}
    flat = loss([c for v in cfgs.values() for c in v])  # one call: the seeds' runs go side by side
    final = {k: flat[i * len(seeds):(i + 1) * len(seeds)] for i, k in enumerate(cfgs)}
    runs = {k: [out / c.name for c in v] for k, v in cfgs.items()}

    from scalelab.papers.section import unigram_baseline

    unigram = unigram_baseline(base)
    untrained = {k: V.did_not_train(v, unigram) for k, v in final.items()}
    rel = {k: [a / b - 1 for a, b in zip(final[k], final["ddp"])] for k in final if k != "ddp"}
    ci = {k: V.seed_ci(v) for k, v in rel.items()}
    last = {k: read_metrics(runs[k][0])[0][-1] for k in runs}
    comm = {k: last[k]["comm_bytes_total"] / last[k]["tokens"] for k in runs}
    ratio = {k: comm[k] / comm["ddp"] for k in comm if k != "ddp"}
    exact = all(abs(r - 1 / z["H"]) < 1e-9 for r in ratio.values())
    clock = _wallclock(runs, final, N, z)

    parts = []
    if any(untrained.values()):
        v1 = v2 = V.DID_NOT_TRAIN
    else:
        v1 = V.judge(ci["M=1"], M1_THRESHOLD, "le")
        v2 = V.judge(ci["M=4"], M4_THRESHOLD, "le")
    v3 = V.HOLDS if exact else V.DOES_NOT_HOLD
    speed = clock["ours"]["M=4"][1.0]
    speed_paper = clock["projected"]["M=4"][1.0]
    # an arm that never reaches DDP's loss is never sooner to it: the claim does not hold
    v4 = V.DID_NOT_TRAIN if untrained["M=4"] else (
        V.HOLDS if speed_paper is not None and speed_paper >= SPEEDUP_TARGET else V.DOES_NOT_HOLD)
    regime = {"params": N, "tokens": z["steps"] * z["batch"] * z["context"], "steps": z["steps"], "H": z["H"],
              "outer steps": z["steps"] // z["H"], "width": z["d_model"], "seeds": len(seeds)}
    claims = [("M=1 DiLoCo is no worse than DDP", v1, f"(M=1 − DDP)/DDP ≤ {M1_THRESHOLD:.0%} (whole 95% CI)",
               {"rel_gap": ci["M=1"].mean, "ci": [ci["M=1"].lo, ci["M=1"].hi]}),
              ("loss rises mildly with M: M=4 within 5% of DDP", v2, f"(M=4 − DDP)/DDP ≤ {M4_THRESHOLD:.0%} (whole 95% CI)",
               {"rel_gap": ci["M=4"].mean, "ci": [ci["M=4"].lo, ci["M=4"].hi],
                **{f"rel_gap_{k}": ci[k].mean for k in ci}}),
              ("DiLoCo communicates exactly 1/H of DDP's bytes", v3, f"bytes ratio = 1/H = {1 / z['H']:.4f}",
               {f"ratio_{k}": r for k, r in ratio.items()}),
              ("M=4 reaches DDP's loss ≥ 5× sooner at 1 Gbit/s (App. A model, projected to 2.4B)", v4,
               f"speed-up ≥ {SPEEDUP_TARGET:g}× at 1 Gbit/s",
               {"speedup_here_1gbit": speed, "speedup_projected_1gbit": speed_paper})]
    for claim, v, thr, figs in claims:
        parts.append(V.Verdict("diloco", claim, v, thr, regime=regime, figures=figs, paper_regime=PAPER_REGIME))
    verdicts = [c[1] for c in claims]
    verdict = (V.DID_NOT_TRAIN if V.DID_NOT_TRAIN in verdicts else V.DOES_NOT_HOLD if V.DOES_NOT_HOLD in verdicts
               else V.HOLDS if all(v == V.HOLDS for v in verdicts) else V.INCONCLUSIVE)
    _plot(out, runs, unigram, comm)
    measured = (f"M=1 {ci['M=1'].mean:+.1%}, M=2 {ci['M=2'].mean:+.1%}, M=4 {ci['M=4'].mean:+.1%} vs DDP "
                f"({z['steps'] // z['H']} outer steps); bytes ratio {ratio['M=2']:.4f} (1/H = {1 / z['H']:.4f}); "
                f"M=4 to DDP's loss at 1 Gbit/s: {_x(speed)} here, {_x(speed_paper)} projected")
    body = _body(z, N, unigram, ddp_sweep, ddp_lr, sweep, best, final, rel, ci, claims, ratio, clock)
    return Section("diloco", "DiLoCo and its scaling laws (Douillard et al., 2023; Charles et al., 2025)",
                   "M=1 DiLoCo ≤ DDP; loss rises mildly with M; DiLoCo communicates 1/H of DDP; "
                   "≥ 5× sooner to the same loss at 1 Gbit/s", measured, verdict, body, ["diloco.png"],
                   threshold=f"M=1 ≤ +{M1_THRESHOLD:.0%}, M=4 ≤ +{M4_THRESHOLD:.0%}, bytes = 1/H, ≥ {SPEEDUP_TARGET:g}×",
                   regime=regime, paper_regime=PAPER_REGIME,
                   figures={"unigram_nats": unigram, **{f"{k}_final": v for k, v in final.items()},
                            "ddp_lr": ddp_lr, **{f"M{M}_inner_lr": best[M][0] for M in MS},
                            **{f"M{M}_outer_lr": best[M][1] for M in MS}},
                   parts=parts)


def _x(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f}×"


def steps_to(run: Path, target: float) -> int | None:
    """The first evaluated step at which the run's val loss is ≤ target (None if never)."""
    _, evals = read_metrics(run)
    return next((e["step"] for e in evals if e["val_loss"] <= target), None)


def _wallclock(runs: dict, final: dict, N: int, z: dict) -> dict:
    """Time to DDP's final loss (mean over seeds) at 1/10/100 Gbit/s, by App. A's model: here (DDP's measured
    step compute, this model's size) and projected (the measured step ratio at 2.4B parameters, the paper's
    largest Table 3 size we use: tokens per step 2M, 64 chips at 300 TFLOP/s, MFU 0.4)."""
    target = statistics.fmean(final["ddp"])
    train, _ = read_metrics(runs["ddp"][0])
    step_s = statistics.median(r["step_time"] for r in train[1:] or train)
    n_ddp = steps_to(runs["ddp"][0], target) or z["steps"]
    out: dict = {"target": target, "step_s": step_s, "steps": {}, "ours": {}, "projected": {}}
    for k in runs:
        n = steps_to(runs[k][0], target)
        out["steps"][k] = n
        strat = W.DP if k == "ddp" else W.diloco(z["H"], int(k.split("=")[1]))
        # every arm on the same 4 workers: DDP all-reduces over all 4, DiLoCo's M replicas split them
        here = W.time_to_loss(n, step_s, strat, N, assumptions=W.Assumptions(
            n_params=N, step_compute_s=step_s, bytes_per_param=4.0, nodes=4))
        proj = (W.project_time_to_loss(n / n_ddp, 2.4e9, 2 ** 21, 64, strat, mfu=0.4, assumptions=W.Assumptions(
            n_params=2.4e9, step_compute_s=1.0, nodes=4)) if n is not None else {g: None for g in (1.0, 10.0, 100.0)})
        out["ours"][k], out["projected"][k] = here, proj
    for kind in ("ours", "projected"):
        base = out[kind]["ddp"]
        out[kind] = {k: {g: (None if t is None or base[g] is None else base[g] / t) for g, t in v.items()}
                     for k, v in out[kind].items()}
    return out


def _body(z, N, unigram, ddp_sweep, ddp_lr, sweep, best, final, rel, ci, claims, ratio, clock) -> str:
    ddp_rows = "\n".join(f"| DDP | {lr:.3g} | — | {v:.4f} |" for lr, v in sorted(ddp_sweep.items()))
    di_rows = "\n".join(f"| M={M} | {lr:.3g} | {o:g} | {v:.4f} |" for (M, lr, o), v in sorted(sweep.items()))
    best_rows = "\n".join(
        f"| {k} | {'lr ' + f'{ddp_lr:.3g}' if k == 'ddp' else 'inner ' + f'{best[int(k[2:])][0]:.3g}, outer ' + f'{best[int(k[2:])][1]:g}'} | "
        f"{' / '.join(f'{v:.4f}' for v in final[k])} | "
        + ("—" if k == "ddp" else f"{ci[k].mean:+.2%} (95% CI {ci[k].lo:+.2%} to {ci[k].hi:+.2%})") + " |"
        for k in final)
    claim_rows = "\n".join(f"| {c} | {thr} | **{v}** |" for c, v, thr, _ in claims)
    clock_rows = "\n".join(
        f"| {k} | {clock['steps'][k] if clock['steps'][k] is not None else 'never'} | "
        + " | ".join(_x(clock["ours"][k][g]) for g in (1.0, 10.0, 100.0)) + " | "
        + " | ".join(_x(clock["projected"][k][g]) for g in (1.0, 10.0, 100.0)) + " |" for k in final if k != "ddp")
    return f"""The tiny recipe narrowed to {z['n_layer']} layers, d={z['d_model']}, context {z['context']} \
(~{N / 1e6:.2f}M parameters) for {z['steps']} steps × {z['batch']} sequences (global batch; DiLoCo's M replicas \
take {z['batch']}/M each), H = {z['H']}: {z['steps'] // z['H']} outer steps. AdamW inner optimizer with warmup + \
cosine, outer SGD with Nesterov momentum 0.9. Every DiLoCo run is M torchrun processes (gloo); DDP runs as one process \
(its math does not depend on the process count); every process has one thread, so no run's numbers depend on what ran beside it. The val split's unigram cross-entropy is {unigram:.4f} nats/token.

Sweep (seed 0, final val loss of the global model):

| arm | inner lr | outer lr | final val loss |
|---|---|---|---|
{ddp_rows}
{di_rows}

Each arm at its best configuration, seeds {', '.join(map(str, z['seeds']))} (gaps paired by seed):

| arm | configuration | final val loss per seed | vs DDP |
|---|---|---|---|
{best_rows}

| claim | threshold | verdict |
|---|---|---|
{claim_rows}

Wall-clock by the scaling-laws paper's App. A model (`scalelab/wallclock.py`; its Table 6 is reproduced in 21 of 25 \
cells, see its docstring): steps to DDP's mean final loss ({clock['target']:.4f}) read off each arm's seed-0 val curve, \
times the per-step wall time over a slow link. Here: DDP's measured compute {clock['step_s'] * 1000:.1f} ms per step, \
fp32 gradients of this model, 4 workers, no overlap. Projected: the same step ratio at 2.4B parameters, 2M tokens per \
step on 64 chips at 300 TFLOP/s and 40% MFU, bf16, 4 workers, no overlap; that the ratio carries over as N grows \
is the projection's assumption (the paper's scaling laws are the evidence for it). Speed-up over DDP to the same loss:

| arm | steps to target | here 1 Gbit/s | here 10 | here 100 | projected 1 Gbit/s | projected 10 | projected 100 |
|---|---|---|---|---|---|---|---|
{clock_rows}

Bytes per token handed to the all-reduce by rank 0, DiLoCo / DDP: {', '.join(f'{k} {r:.5f}' for k, r in ratio.items())} \
(1/H = {1 / z['H']:.5f}).
"""


def _plot(out: Path, runs: dict, unigram: float, comm: dict) -> None:
    fig, (a, b) = figure(1, 2, figsize=(11, 4))
    for i, (k, rs) in enumerate(runs.items()):
        _, evals = read_metrics(rs[0])
        a.plot([e["tokens"] for e in evals], [e["val_loss"] for e in evals], marker="o", ms=2, color=f"C{i}",
               label="DDP" if k == "ddp" else f"DiLoCo {k}")
    a.axhline(unigram, color="grey", ls="--", lw=1, label="unigram baseline")
    a.set_xlabel("training tokens")
    a.set_ylabel("val loss (global model, nats/token)")
    a.set_title("best configuration per arm (seed 0)")
    a.grid(alpha=0.3)
    a.legend()
    keys = list(comm)
    b.bar(range(len(keys)), [comm[k] for k in keys], color=[f"C{i}" for i in range(len(keys))])
    b.set_xticks(range(len(keys)), ["DDP" if k == "ddp" else k for k in keys])
    b.set_yscale("log")
    b.set_ylabel("bytes per token (rank 0 payload)")
    b.set_title("communication")
    b.grid(alpha=0.3, axis="y")
    savefig(fig, out / "diloco.png")
