"""DyT: Transformers without Normalization (Zhu et al., 2025): LayerNorm vs RMSNorm vs DyT at an equal token
budget on the tiny recipe, several seeds, and where DyT's inputs saturate."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from scalelab import config as configmod
from scalelab.papers.section import Options, Section, mean_sd
from scalelab.report import figure, read_metrics, savefig

log = logging.getLogger("scalelab")


DYT_NORMS = ("layernorm", "rmsnorm", "dyt")


def dyt_config(norm: str, seed: int, quick: bool) -> configmod.Config:
    """The tiny recipe at an equal token budget for every norm; only the norm and the seed change."""
    cfg = configmod.load("tiny")
    cfg.name = f"{norm}-s{seed}"
    cfg.model.norm = norm
    cfg.train.seed = seed
    cfg.train.max_steps = 150 if quick else 1000
    cfg.train.warmup_steps = 15 if quick else 50
    cfg.train.eval_every = 50 if quick else 250
    cfg.train.ckpt_every = 50 if quick else 250
    cfg.train.eval_batches = 16
    configmod.validate(cfg)
    return cfg


def dyt_saturation(run: Path) -> list[tuple[str, float, float]]:
    """For each DyT layer of a trained run: (name, fraction of inputs with |α·x| > 2, RMS of its input x) on one
    validation batch. |α·x| > 2 means tanh is within 4% of ±1 and passes back < 7% of the gradient."""
    import torch

    from scalelab import data as datamod
    from scalelab.checkpoint import load_run
    from scalelab.model import DyT

    cfg, model = load_run(run)
    toks = datamod.prepare(cfg.data).tokens("val")
    x, _ = datamod.eval_batches(toks, cfg.model.context, cfg.train.batch_size, 1)[0]
    out: list[tuple[str, float, float]] = []
    hooks = [mod.register_forward_hook(lambda mod, inp, _o, name=name: out.append(
        (name if name != "norm" else "norm (final)", float((mod.alpha * inp[0]).abs().gt(2).float().mean()), float(inp[0].pow(2).mean().sqrt()))))
        for name, mod in model.named_modules() if isinstance(mod, DyT)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def run(out: Path, quick: bool, opts: Options | None = None) -> Section:
    from scalelab.train import train

    seeds = (0, 1) if quick else (0, 1, 2)
    final: dict[str, list[float]] = {n: [] for n in DYT_NORMS}
    step_time: dict[str, list[float]] = {n: [] for n in DYT_NORMS}
    curves: dict[str, list[tuple[list[int], list[float]]]] = {n: [] for n in DYT_NORMS}
    for seed in seeds:  # norms interleaved within each seed, so machine noise hits all three alike
        for norm in DYT_NORMS:
            cfg = dyt_config(norm, seed, quick)
            run = out / cfg.name
            log.info(f"DyT reproduction: {cfg.name} ({cfg.train.max_steps} steps)")
            summary = train(cfg, run, resume=True, progress=True)
            final[norm].append(summary["val_loss"])
            rows, evals = read_metrics(run)
            step_time[norm].append(statistics.median(r["step_time"] for r in rows[1:] or rows))
            curves[norm].append(([e["tokens"] for e in evals], [e["val_loss"] for e in evals]))

    mean = {n: mean_sd(final[n])[0] for n in DYT_NORMS}
    sd = {n: mean_sd(final[n])[1] for n in DYT_NORMS}
    k = len(seeds)
    gap = {ref: mean["dyt"] - mean[ref] for ref in ("rmsnorm", "layernorm")}
    se = {ref: math.sqrt((sd["dyt"] ** 2 + sd[ref] ** 2) / k) for ref in ("rmsnorm", "layernorm")}
    ratio = {ref: statistics.median(step_time["dyt"]) / statistics.median(step_time[ref]) for ref in ("rmsnorm", "layernorm")}
    # The claim: DyT's loss is within ~0.02 of the normalised model's. With k seeds we can only resolve a gap
    # to about 2 standard errors, so the claim holds if the gap is at most 0.02 plus that resolution.
    tol = {ref: 0.02 + 2 * se[ref] for ref in se}
    holds = all(gap[ref] <= tol[ref] for ref in gap)

    fig, (a, b) = figure(1, 2, figsize=(11, 4))
    colors = {"layernorm": "tab:blue", "rmsnorm": "tab:green", "dyt": "tab:red"}
    for n in DYT_NORMS:
        for i, (x, y) in enumerate(curves[n]):
            a.plot(x, y, color=colors[n], alpha=0.7, label=n if i == 0 else None, marker="o", ms=3)
        b.scatter([n] * k, final[n], color=colors[n], alpha=0.6)
        b.errorbar([n], [mean[n]], yerr=[sd[n] if k > 1 else 0], color="black", capsize=6, marker="_", ms=20)
    a.set_xlabel("training tokens")
    a.set_ylabel("val loss (nats/token)")
    a.set_title("validation loss, every seed")
    a.grid(alpha=0.3)
    a.legend()
    b.set_ylabel("final val loss (nats/token)")
    b.set_title(f"final loss: seeds and mean ± sd (n={k})")
    b.grid(alpha=0.3, axis="y")
    savefig(fig, out / "dyt.png")

    cfg = dyt_config("dyt", 0, quick)
    tokens = cfg.train.max_steps * cfg.train.batch_size * cfg.model.context
    sat = dyt_saturation(out / cfg.name)
    sat_rows = "\n".join(f"| {name} | {frac:.0%} | {rms:.2f} |" for name, frac, rms in sat)
    rows = "\n".join(f"| {n} | {' / '.join(f'{v:.4f}' for v in final[n])} | {mean[n]:.4f} ± {sd[n]:.4f} | "
                     f"{statistics.median(step_time[n]) * 1000:.0f} ms |" for n in DYT_NORMS)
    body = f"""Same model, data order and budget for each norm: {cfg.model.n_layer} layers, d={cfg.model.d_model}, \
context {cfg.model.context}, {cfg.train.max_steps} steps × {cfg.train.batch_size} sequences = {tokens:,} tokens of \
the default corpus per run, lr {cfg.train.lr:g}, seeds {', '.join(map(str, seeds))}. DyT uses the paper's LLaMA \
recipe: a learnable scalar α per layer (α0 = 1.0 attention / 1.0 other at this width, the Table 12 entry for \
width 1024, held below it), γ and β per channel, every norm replaced (the final one too), and a learnable \
√d scale after the embedding.

| norm | final val loss per seed | mean ± sd | median step time |
|---|---|---|---|
{rows}

- Gap DyT − RMSNorm: **{gap['rmsnorm']:+.4f}** nats/token (standard error {se['rmsnorm']:.4f}); \
DyT − LayerNorm: **{gap['layernorm']:+.4f}** (s.e. {se['layernorm']:.4f}).
- Seed-to-seed noise (sd of the final loss): {', '.join(f'{n} {sd[n]:.4f}' for n in DYT_NORMS)}.
- Step time DyT / RMSNorm: **{ratio['rmsnorm']:.3f}×**, DyT / LayerNorm: **{ratio['layernorm']:.3f}×** \
(eager PyTorch on CPU; the paper's −8% whole-model speed-up was eager BF16 on a GPU against HF's unfused \
RMSNorm, and vanishes against fused kernels).
- Verdict rule: the claim holds if DyT's gap to each normalised model is ≤ 0.02 + 2 standard errors \
(≤ {tol['rmsnorm']:.4f} vs RMSNorm, ≤ {tol['layernorm']:.4f} vs LayerNorm). This is a ~{tokens / 1e6:.1f}M-token \
run of a ~1M-parameter model; the paper's numbers are 7B–70B LLaMA on 200B tokens.

Where DyT's inputs sit after training (seed 0, one validation batch): the share of inputs where tanh is \
saturated (|α·x| > 2, gradient < 7% of the linear regime) and the RMS of the residual stream entering each layer. \
Without a normalisation, nothing stops the residual stream from growing; once it is large, DyT acts as a sign \
function and passes little gradient, while the learnable α can only shrink by about lr per step.

| DyT layer | saturated | input RMS |
|---|---|---|
{sat_rows}
"""
    measured = (f"DyT − RMSNorm {gap['rmsnorm']:+.3f} ± {se['rmsnorm']:.3f}, DyT − LayerNorm "
                f"{gap['layernorm']:+.3f} ± {se['layernorm']:.3f} nats/token; step time ×{ratio['rmsnorm']:.2f} vs RMSNorm")
    return Section("dyt", "DyT: Transformers without Normalization (Zhu et al., 2025)",
                   "DyT matches normalised models: LLaMA loss within ~0.01–0.02 (e.g. 7B 1.59 → 1.60)",
                   measured, "holds" if holds else "does not hold", body, ["dyt.png"])
