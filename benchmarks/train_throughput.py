"""Training throughput of the `small` recipe as a fraction of this machine's dense-matmul peak.

Trains the small recipe with the real trainer (eager, then torch.compile) for a fixed number of steps and
prints tokens/s and achieved model FLOP/s (6·N + causal attention, see Transformer.flops_per_token) as a
fraction of fp32 `torch.mm` FLOP/s measured in the same process, before and between the runs (the machine
is shared and noisy, so the peak is the median of interleaved measurements). Also prints peak RSS.

    python benchmarks/train_throughput.py [--steps 40] [--modes eager,compile]
    python benchmarks/train_throughput.py --device cuda --set model.d_model=1024 --set model.n_layer=8 ...
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from scalelab import config
from scalelab.train import train

ROOT = Path(__file__).resolve().parents[1]


def mm_flops(device: torch.device, reps: int = 5) -> float:
    """Dense matmul FLOP/s in the dtype training computes in: fp32 on CPU, bf16 (autocast) on CUDA."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast; peak = bf16 torch.mm)")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides, e.g. model.d_model=1024")
    args = ap.parse_args()
    device = torch.device(args.device)
    peaks = [mm_flops(device)]
    results = {}
    for mode in args.modes.split(","):
        cfg = config.load("small",
                          [f"train.max_steps={args.steps}", "train.log_every=5", f"train.eval_every={args.steps}",
                           f"train.ckpt_every={args.steps}", "train.eval_batches=1", "train.warmup_steps=5",
                           f"train.compile={'true' if mode == 'compile' else 'false'}", f"train.device={args.device}",
                           *args.set])
        with tempfile.TemporaryDirectory() as d:
            train(cfg, Path(d) / "run", progress=False)
            rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
        windows = [r for r in rows if "tok_per_s" in r][1:]  # the first window holds warm-up / compilation
        results[mode] = (statistics.median(r["tok_per_s"] for r in windows),
                         statistics.median(r["flops_per_s"] for r in windows))
        peaks.append(mm_flops(device))
    peak = statistics.median(peaks)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    what = torch.cuda.get_device_name(device) + ", bf16 torch.mm 8192³" if device.type == "cuda" else \
        f"{torch.get_num_threads()} threads, fp32 torch.mm 2048³"
    print(f"machine: {what} peak {peak / 1e9:.1f} GFLOP/s "
          f"(median of {len(peaks)}: {', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    print(f"small recipe: {cfg.model.n_layer} layers, d={cfg.model.d_model}, context {cfg.model.context}, "
          f"batch {cfg.train.batch_size}, {args.steps} steps")
    for mode, (tps, fps) in results.items():
        print(f"  {mode:8s} {tps:8,.0f} tokens/s  {fps / 1e9:6.1f} GFLOP/s  = {fps / peak:.2f} of matmul peak "
              f"(target >= 0.40)")
    print(f"peak RSS {rss:.2f} GiB (target < 2 GiB on CPU)")


if __name__ == "__main__":
    main()
