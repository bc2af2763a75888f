"""Does bf16 training land within seed noise of fp32? The real trainer, a recipe (default tiny, 300 steps),
each seed in float32 and in bfloat16 (autocast, fp32 master weights), final validation loss (evaluated in fp32).

The seed sets both the initialisation and the data order. Seed noise is the spread of fp32's final val loss
over the seeds (max − min); the bf16 effect is the mean over seeds of bf16 − fp32 at the same seed.
Also prints each run's trainer tokens/s (tokens / training time, evaluation excluded).

    python benchmarks/bf16_loss.py [--recipe tiny] [--steps 300] [--seeds 1337,1338] [--threads 0] [--set k=v]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from scalelab import config
from scalelab.train import train

DTYPES = ("float32", "bfloat16")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="1337,1338")
    ap.add_argument("--threads", type=int, default=0, help="train.threads (0 = torch's default)")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    res: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory() as d:
        for seed in seeds:
            for dtype in DTYPES:  # the two dtypes of a seed back to back: a load drift hits both alike
                cfg = config.load(args.recipe, [f"train.max_steps={args.steps}", f"train.seed={seed}",
                                                f"train.dtype={dtype}", f"train.threads={args.threads}",
                                                f"train.ckpt_every={args.steps}", *args.set])
                res[seed, dtype] = s = train(cfg, Path(d) / f"{seed}-{dtype}", progress=False)
                print(f"seed {seed} {dtype:8s}: val loss {s['val_loss']:.4f}, {s['tokens'] / s['elapsed']:,.0f} tok/s",
                      flush=True)
    print(f"\n{args.recipe} recipe, {args.steps} steps; final val loss (nats/token, fp32 eval)")
    print("| seed | float32 | bfloat16 | bf16 − fp32 |")
    print("|---|---|---|---|")
    for seed in seeds:
        a, b = res[seed, "float32"]["val_loss"], res[seed, "bfloat16"]["val_loss"]
        print(f"| {seed} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    fp32, bf16 = ([res[s, dt]["val_loss"] for s in seeds] for dt in DTYPES)
    gap = statistics.mean(b - a for a, b in zip(fp32, bf16))
    noise = max(fp32) - min(fp32)
    print(f"\nbf16 − fp32 (mean over seeds) {gap:+.4f}; seed noise (fp32 max − min) {noise:.4f}: "
          f"{'within' if abs(gap) <= noise else 'OUTSIDE'} seed noise (bf16's own max − min: "
          f"{max(bf16) - min(bf16):.4f})")
    speed = {dt: statistics.median(res[s, dt]["tokens"] / res[s, dt]["elapsed"] for s in seeds) for dt in DTYPES}
    print(f"trainer tokens/s (median over seeds): fp32 {speed['float32']:,.0f}, bf16 {speed['bfloat16']:,.0f} "
          f"({speed['bfloat16'] / speed['float32']:.2f}x)")


if __name__ == "__main__":
    main()
