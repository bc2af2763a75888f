"""How far each --quant moves a GGUF model from the fp32 path (every tensor dequantised to fp32), on held-out text.

Text: Python standard-library source files (`scalelab.data.stdlib_files()`, offline everywhere), one window of
`--chunk` tokens from the start of each of `--tokens / --chunk` files spread evenly over the sorted list; the
greedy prompts are the first `--prompt-len` tokens of `--prompts` other files. Nothing here was tuned on them.

Per mode, against the fp32 reference on the same tokens:
- mean per-token KL(fp32 ‖ quant) in nats, top-1 agreement (same argmax), perplexity ratio quant / fp32;
- on two paths, because they compute differently: `prefill` (each window in one forward: the dequantise-then-
  dense-matmul path of `quant.QuantLinear` for more rows than `quant.DENSE_ROWS[mode]`, and a tied head's
  bf16 table, as prompts and scoring run) and `decode` (each window fed through the KV cache `--step` tokens
  at a time: the int4/int8 kernels and the head's own quantised copy, as generation of a few samples runs);
- greedy agreement: the share of prompts whose first `--gen` greedy tokens are identical to fp32's, and the
  mean length of the common prefix.
Mode `bf16` (no quantisation, every tensor bf16) is listed for scale: it isolates what bf16 activations cost.

    .venv/bin/python benchmarks/quant_quality.py [--model smollm2] [--modes bf16,int8,int4] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from scalelab import gguf
from scalelab.data import stdlib_files
from scalelab.engine import Engine, SamplingParams
from scalelab.model import KVCache


def windows(tok, n: int, length: int, skip: int = 0) -> list[list[int]]:
    """The first `length` tokens of n stdlib files (spread evenly, each long enough), skipping the first `skip`."""
    files = [f for f in stdlib_files() if f.stat().st_size > 8 * length]
    step = max(1, len(files) // (n + skip))
    out = []
    for f in files[step // 2::step][skip:]:
        ids = tok.encode(f.read_text(errors="replace")).ids
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    return out


@torch.inference_mode()
def logprobs(model, ids: list[int], step: int | None) -> torch.Tensor:
    """(T, V) fp32 log-probabilities of every next token: one forward, or `step` tokens at a time via a KV cache."""
    x = torch.tensor([ids])
    if step is None:
        out = model(x)
    else:
        cache = KVCache(model.cfg, 1, len(ids), dtype=next(model.parameters()).dtype)
        out = torch.cat([model(x[:, i:i + step], cache=cache) for i in range(0, len(ids), step)], dim=1)
    return out[0].float().log_softmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--modes", default="bf16,int8,int4")
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--step", type=int, default=4, help="decode path: tokens per forward through the KV cache "
                    "(4: the kernels, as for one sample; quant.TIED_ROWS)")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    ref = gguf.load(args.model)  # the fp32 path
    models = {}
    for m in args.modes.split(","):
        models[m] = (gguf.load(args.model, dtype=torch.bfloat16) if m == "bf16" else
                     gguf.load(args.model, dtype=torch.bfloat16, quant=m)).model
    texts = windows(ref.tokenizer, args.tokens // args.chunk, args.chunk)
    prompts = windows(ref.tokenizer, args.prompts, args.prompt_len, skip=len(texts))
    n_tok = sum(len(t) - 1 for t in texts)
    stats = {(m, p): {"kl": 0.0, "top1": 0, "nll": 0.0} for m in models for p in ("prefill", "decode")}
    nll_ref = 0.0
    for ids in texts:
        lr = logprobs(ref.model, ids, None)[:-1]
        target = torch.tensor(ids[1:])[:, None]
        nll_ref -= lr.gather(1, target).sum().item()
        for m, net in models.items():
            for path, step in (("prefill", None), ("decode", args.step)):
                lq = logprobs(net, ids, step)[:-1]
                s = stats[(m, path)]
                s["kl"] += (lr.exp() * (lr - lq)).sum().item()
                s["top1"] += (lr.argmax(-1) == lq.argmax(-1)).sum().item()
                s["nll"] -= lq.gather(1, target).sum().item()
    greedy = {}
    params = SamplingParams(max_tokens=args.gen, temperature=0)
    ref_out = [Engine(ref.model, prefix_cache=0).generate(p, params).completions[0].tokens for p in prompts]
    for m, net in models.items():
        eng = Engine(net, prefix_cache=0)
        same, prefix = 0, 0
        for p, r in zip(prompts, ref_out):
            out = eng.generate(p, params).completions[0].tokens
            same += out == r
            prefix += next((i for i, (a, b) in enumerate(zip(out, r)) if a != b), min(len(out), len(r)))
        greedy[m] = (same / len(prompts), prefix / len(prompts))
    print(f"model {ref.name} ({gguf.resolve(args.model).name}); reference: the fp32 path (every tensor dequantised "
          f"to fp32); {torch.get_num_threads()} threads")
    print(f"text: {len(texts)} windows x {args.chunk} tokens of Python stdlib source = {n_tok} predicted tokens; "
          f"greedy: {len(prompts)} prompts of {args.prompt_len} tokens, {args.gen} new tokens each")
    print(f"fp32 perplexity {math.exp(nll_ref / n_tok):.3f}")
    print("| mode | path | mean KL (nats/token) | top-1 agreement | ppl ratio | greedy identical | "
          "mean common prefix |")
    print("|---|---|---|---|---|---|---|")
    for m in models:
        for path in ("prefill", "decode"):
            s = stats[(m, path)]
            g = greedy[m] if path == "decode" else None
            print(f"| {m} | {path} | {s['kl'] / n_tok:.5f} | {100 * s['top1'] / n_tok:.2f}% | "
                  f"{math.exp((s['nll'] - nll_ref) / n_tok):.4f} | "
                  + (f"{100 * g[0]:.0f}% | {g[1]:.1f} / {args.gen} |" if g else "| |"))
    print(f"({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
