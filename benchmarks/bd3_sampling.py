"""BD3-LM sampling speed vs quality: AR vs BD3-LM L′=16 at T ∈ {16, 8, 4} denoising steps per block.

Trains (or reuses) an AR model and an L′=16 BD3-LM of the same size on the same data and budget in one
directory (the `reproduce bd3lm` quick configuration by default), then samples fixed-length sequences from an
end-of-text start with each sampler: AR with its KV cache (one token per forward), BD3-LM with the KV cache over
clean blocks (T forwards per 16-token block, the first also caching the previous block; 16/T tokens unmasked per step). Configurations
are interleaved within every repetition and medians are quoted, as ratios to AR measured in the same process.
Generative perplexity of seed-0 samples (stopped at end-of-text) is scored by the AR model of the same run.
Target (issue 3): ≥ 3× AR tokens/s at 4 tokens per step, with the generative-perplexity cost beside it. Also
printed: the ceiling on this machine, 16·t(1) / (3·t(16) + t(32)) from the model's own cached forward times.

    python benchmarks/bd3_sampling.py [--runs runs/bench-bd3] [--full] [--n 1,8] [--length 128] [--reps 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scalelab import tokenizer as tokmod
from scalelab.checkpoint import load_run
from scalelab.papers.bd3lm import bd3_config, sampling_frontier
from scalelab.train import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-bd3"), help="where the two runs live (reused)")
    ap.add_argument("--full", action="store_true", help="the full-size reproduction model instead of the quick one")
    ap.add_argument("--n", default="1,8", help="sequences sampled at once, comma-separated (1 = single stream)")
    ap.add_argument("--length", type=int, default=0, help="new tokens per sequence (0 = 2 × context)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--top-p", type=float, default=0.9, help="1 = no nucleus sort (shows the model-side speed-up)")
    args = ap.parse_args()
    quick = not args.full
    for name, block in (("ar", 0), ("l16", 16)):
        train(bd3_config(name, block, quick), args.runs / name, resume=True, progress=False)
    cfg, ar = load_run(args.runs / "ar")
    _, l16 = load_run(args.runs / "l16")
    eot = tokmod.eot_id(tokmod.load(args.runs / "ar" / "tokenizer.json"))
    length = args.length or 2 * cfg.model.context
    ns = tuple(int(x) for x in args.n.split(","))
    rows = sampling_frontier(ar, l16, 16, ns, length, args.reps, eot, ar, args.top_p)
    print(f"model: {cfg.model.n_layer} layers, d={cfg.model.d_model}, context {cfg.model.context}; "
          f"{length} new tokens per sequence; {torch.get_num_threads()} threads; "
          f"top-p {args.top_p}; medians of {args.reps} interleaved repeats")
    print(f"{'n':>3s} {'sampler':22s} {'tok/step':>8s} {'tokens/s':>10s} {'vs AR':>8s} {'gen ppl':>8s}   times (s)")
    for r in rows:
        print(f"{r['n']:3d} {r['name']:22s} {r['tokens_per_step']:8d} {r['tok_per_s']:10,.0f} {r['speedup']:7.2f}× "
              f"{r['gen_ppl']:8.1f}   {', '.join(f'{t:.3f}' for t in r['times'])}")
    for fast in (r for r in rows if r["tokens_per_step"] == 4):
        print(f"target ≥ 3× AR tokens/s at 4 tokens per step, {fast['n']} at once: {fast['speedup']:.2f}× "
              f"({'met' if fast['speedup'] >= 3 else 'not met'}; this machine's ceiling from the model's forward "
              f"costs {fast['ceiling']:.2f}×), gen ppl {fast['gen_ppl']:.1f} vs AR {rows[0]['gen_ppl']:.1f}")


if __name__ == "__main__":
    main()
