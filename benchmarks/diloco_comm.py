"""DDP vs DiLoCo over a simulated slow link: bytes per token and wall-clock to the same validation loss.

M = 4 torchrun processes on this machine (gloo), the same model, data and token budget; DDP all-reduces the
gradient every step, DiLoCo (H = 30, outer SGD Nesterov 0.9) all-reduces the outer gradient every H steps.
DiLoCo's learning rates follow the scaling-laws paper (`scaling.diloco_hparams`: inner lr = DDP's × the ratio
of the paper's fitted optimal inner lrs at this N and M, outer lr 0.6 for M = 4); `--no-paper-hparams` runs
DiLoCo with DDP's lr and the original paper's outer lr 0.7. Both go over a simulated link (`distributed.link_gbps`, default 1 Gbit/s): each process sleeps for
the time a bandwidth-optimal ring all-reduce of its payload, 2·P·(M−1)/M bytes, would take on it
(Charles et al. 2025, App. A). Runs are interleaved (DDP, DiLoCo, DDP, DiLoCo, ...) so the shared machine's
noise hits both alike; ratios are per pair, and the medians are quoted.

Time to target: the target is the higher of the two final validation losses (a loss both runs reach), and a
run's time is its training wall-clock (`elapsed`, rank 0, evaluations excluded) at its first evaluation at or
below the target. Evaluations are every H steps, at DiLoCo's outer steps, on the global model.

    python benchmarks/diloco_comm.py [--repeats 2] [--steps 900] [--gbps 1] [--h 30] [--no-paper-hparams]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(strategy: str, out: Path, args: argparse.Namespace, lr: float, outer_lr: float = 0.7) -> dict:
    sets = {"model.context": args.context, "model.d_model": args.d_model, "model.n_layer": 2, "model.n_head": 4,
            "model.n_kv_head": 2, "train.batch_size": args.batch, "train.max_steps": args.steps, "train.warmup_steps": 30,
            "train.lr": lr, "distributed.outer_lr": outer_lr, "train.eval_every": args.h, "train.eval_batches": 4, "train.ckpt_every": args.steps,
            "train.log_every": 10, "distributed.link_gbps": args.gbps, "distributed.inner_steps": args.h,
            "distributed.timeout_s": 120}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(args.procs),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "scalelab.cli", "train",
           "--quiet", "--recipe", "tiny", "--out", str(out), "--strategy", strategy]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode:
        sys.exit(f"{strategy} run failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    elapsed_at = {r["step"]: r["elapsed"] for r in train}
    return {"evals": [(e["step"], elapsed_at.get(e["step"]), e["val_loss"]) for e in evals],
            "bytes": train[-1]["comm_bytes_total"], "wire": train[-1]["comm_wire_bytes_total"],
            "tokens": train[-1]["tokens"], "elapsed": train[-1]["elapsed"], "link_s": train[-1]["link_s_total"],
            "final": evals[-1]["val_loss"]}


def time_to(res: dict, target: float) -> float:
    return next(t for _, t, loss in res["evals"] if loss <= target + 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=900, help="DDP and inner steps (900 = 30 outer steps at H = 30)")
    ap.add_argument("--lr", type=float, default=3e-3, help="DDP's AdamW lr")
    ap.add_argument("--paper-hparams", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--h", type=int, default=30)
    ap.add_argument("--gbps", type=float, default=1.0)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences), split over the processes")
    ap.add_argument("--context", type=int, default=32)
    args = ap.parse_args()
    from scalelab import config as configmod
    from scalelab.scaling import diloco_hparams, param_count

    cfg = configmod.load("tiny", [f"model.d_model={args.d_model}", "model.n_layer=2",
                                                          "model.n_head=4", "model.n_kv_head=2"])
    cfg.model.vocab_size = cfg.data.vocab_size
    N = param_count(cfg)
    ratio, outer = diloco_hparams(N, args.procs) if args.paper_hparams else (1.0, 0.7)
    print(f"{N / 1e6:.2f}M parameters; DDP lr {args.lr:g}; DiLoCo inner lr {args.lr * ratio:.3g} "
          f"({ratio:.2f}× DDP's), outer lr {outer:g}", flush=True)
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            ddp = run("ddp", Path(tmp) / f"ddp{rep}", args, args.lr)
            dl = run("diloco", Path(tmp) / f"diloco{rep}", args, args.lr * ratio, outer)
            target = max(ddp["final"], dl["final"])
            t_ddp, t_dl = time_to(ddp, target), time_to(dl, target)
            pairs.append({"bytes_ratio": dl["bytes"] / ddp["bytes"], "time_ratio": t_ddp / t_dl, "target": target,
                          "t_ddp": t_ddp, "t_diloco": t_dl, "ddp": ddp, "diloco": dl,
                          "equal_tokens_ratio": ddp["elapsed"] / dl["elapsed"],
                          "link_share_ddp": ddp["link_s"] / ddp["elapsed"]})
            print(f"pair {rep + 1}: target {target:.4f} | DDP {t_ddp:.1f} s (final {ddp['final']:.4f}, link "
                  f"{ddp['link_s']:.1f} s) | DiLoCo {t_dl:.1f} s (final {dl['final']:.4f}, link {dl['link_s']:.1f} s)"
                  f" | wall-clock ratio {t_ddp / t_dl:.2f}x", flush=True)
    med = lambda k: statistics.median(p[k] for p in pairs)  # noqa: E731
    each = ", ".join(f"{p['time_ratio']:.2f}" for p in pairs)
    d, l = pairs[0]["ddp"], pairs[0]["diloco"]
    print(f"\n{args.procs} processes, H={args.h}, simulated link {args.gbps:g} Gbit/s, {d['tokens']:,} tokens each")
    print(f"bytes per token (this rank's payload): DDP {d['bytes'] / d['tokens']:.1f}, DiLoCo "
          f"{l['bytes'] / l['tokens']:.1f}")
    print(f"bytes ratio DiLoCo/DDP: {med('bytes_ratio'):.5f} (1/H = {1 / args.h:.5f})")
    print(f"wall-clock to the same val loss, DDP/DiLoCo: median {med('time_ratio'):.2f}x over {len(pairs)} "
          f"interleaved pairs ({each}); target >= 5x")
    print(f"wall-clock at equal tokens, DDP/DiLoCo: median {med('equal_tokens_ratio'):.2f}x; the simulated link is "
          f"{med('link_share_ddp'):.0%} of DDP's wall-clock (the rest is compute: {args.procs} processes on "
          f"{os.cpu_count()} cores)")
    print(f"final val loss: DDP {statistics.median(p['ddp']['final'] for p in pairs):.4f}, DiLoCo "
          f"{statistics.median(p['diloco']['final'] for p in pairs):.4f} (equal tokens)")


if __name__ == "__main__":
    main()
