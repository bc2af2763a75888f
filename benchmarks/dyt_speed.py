"""Step time of DyT against RMSNorm and LayerNorm: whole model and norm layers alone, same run, interleaved.

The DyT paper (Table 7) reports −8% whole-model training time for LLaMA-7B, eager BF16 on a GPU, against HF's
unfused RMSNorm. Here all three norms are PyTorch's own (nn.RMSNorm / nn.LayerNorm, fused where PyTorch has
kernels) against an eager DyT, eager or compiled. Rounds rotate the order of the norms; medians are quoted.

    python benchmarks/dyt_speed.py                       # CPU, tiny-recipe width
    python benchmarks/dyt_speed.py --device cuda --d-model 2048 --n-layer 8 --context 2048 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scalelab.config import ModelConfig
from scalelab.model import Transformer, loss_fn, make_norm

NORMS = ("rmsnorm", "layernorm", "dyt")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per norm per round")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    heads = max(1, args.d_model // 64)
    models, norms = {}, {}
    for n in NORMS:
        cfg = ModelConfig(vocab_size=args.vocab, context=args.context, d_model=args.d_model, n_layer=args.n_layer,
                          n_head=heads, n_kv_head=heads, norm=n)
        torch.manual_seed(0)
        m = Transformer(cfg).to(device)
        models[n] = (m, torch.compile(m) if args.compile else m, torch.optim.AdamW(m.parameters(), lr=1e-4))
        layer = make_norm(cfg, "other").to(device)
        norms[n] = torch.compile(layer) if args.compile else layer
    x = torch.randint(0, args.vocab, (args.batch, args.context), device=device)
    h = torch.randn(args.batch, args.context, args.d_model, device=device, requires_grad=True)

    def model_step(n: str) -> None:
        m, f, opt = models[n]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(f(x), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def norm_step(n: str) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = norms[n](h)
        y.float().sum().backward()

    for n in NORMS:  # warm-up (and compilation)
        for _ in range(2):
            model_step(n)
            norm_step(n)
    sync(device)
    times: dict[str, dict[str, list[float]]] = {"model": {n: [] for n in NORMS}, "norm": {n: [] for n in NORMS}}
    for r in range(args.rounds):
        order = NORMS[r % 3:] + NORMS[:r % 3]
        for n in order:
            for kind, fn, reps in (("model", model_step, args.steps), ("norm", norm_step, args.steps * 10)):
                sync(device)
                t = time.perf_counter()
                for _ in range(reps):
                    fn(n)
                sync(device)
                times[kind][n].append((time.perf_counter() - t) / reps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; d_model {args.d_model}, {args.n_layer} layers, context {args.context}, batch {args.batch}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {'compiled' if args.compile else 'eager'}; "
          f"medians of {args.rounds} interleaved rounds")
    for kind, label in (("model", "training step (fwd+bwd+AdamW)"), ("norm", "one norm layer fwd+bwd")):
        med = {n: statistics.median(times[kind][n]) for n in NORMS}
        print(f"  {label}: " + ", ".join(f"{n} {med[n] * 1e3:.3f} ms" for n in NORMS)
              + f"; DyT/RMSNorm {med['dyt'] / med['rmsnorm']:.3f}×, DyT/LayerNorm {med['dyt'] / med['layernorm']:.3f}×")


if __name__ == "__main__":
    main()
