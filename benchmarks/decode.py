"""Decode speed of the lab's engine vs llama.cpp (llama-cpp-python) on the same GGUF file, side by side.

(a) single-stream greedy decode, tokens/s; (b) 16 samples of one prompt, 128 new tokens each, wall-clock.
Also: the memory-bandwidth bound for decode (measured read bandwidth ÷ bytes of weights read per step), the
rate torch's own matrix-vector kernels stream those weights at (what caps an fp32 PyTorch decoder here), and
our peak RSS (measured before llama.cpp is loaded). Runs are interleaved and repeated; medians are quoted,
as ratios against llama.cpp measured in the same run (other processes share the cores: absolute numbers are
noisy). EOS is disabled on both sides so every sample really runs to its token budget.

    .venv/bin/python benchmarks/decode.py [--model smollm2] [--repeats 3] [--tokens 128] [--samples 16]

Falls back to transformers' `generate` as the baseline when llama-cpp-python is not installed.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from scalelab import gguf
from scalelab.engine import Engine, SamplingParams

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """Read bandwidth of this machine's memory, GB/s: a sum over a tensor far larger than the caches (median)."""
    a = torch.ones(mb * (1 << 20) // 4)
    a.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return a.numel() * 4 / statistics.median(times) / 1e9


def gemv_gbs(model: torch.nn.Module, reps: int = 9) -> float:
    """Weight bytes streamed per second by one decode step's matrix-vector products, caches flushed between
    steps: what torch's CPU kernels reach out of the bandwidth above."""
    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    flush = torch.ones(64 << 20)
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in mats}
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            flush.sum()
            t0 = time.perf_counter()
            for w in mats:
                torch.nn.functional.linear(xs[w.shape[1]], w)
            times.append(time.perf_counter() - t0)
    return sum(w.numel() * w.element_size() for w in mats) / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--single-tokens", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    threads = torch.get_num_threads()
    path = gguf.resolve(args.model)
    gm = gguf.load(path, dtype=getattr(torch, args.dtype))
    eng = Engine(gm.model, stop_ids=[], prefix_cache=0)  # no EOS, no cache between runs: fair to the baseline
    text = gguf.render_chat(gm.chat_template, PROMPT)
    ids = gm.tokenizer.encode(text).ids

    def ours_single() -> tuple[float, int]:
        t0 = time.perf_counter()
        g = eng.generate(ids, SamplingParams(max_tokens=args.single_tokens, temperature=0))
        return time.perf_counter() - t0, g.completion_tokens

    def ours_batch(seed: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        g = eng.generate(ids, SamplingParams(n=args.samples, max_tokens=args.tokens, temperature=0.8, seed=seed))
        return time.perf_counter() - t0, g.completion_tokens

    ours_single()  # warm-up
    rounds = {"ours_a": [ours_single()], "ours_b": [ours_batch(0)]}
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)

    try:
        from llama_cpp import Llama

        llm = Llama(str(path), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False, seed=0)
        no_eos = {i: -1e9 for i in gm.stop_ids}
        base_name = f"llama.cpp (llama-cpp-python, {threads} threads, its own Q4_1 kernels)"

        def base_single() -> tuple[float, int]:
            t0 = time.perf_counter()
            r = llm(text, max_tokens=args.single_tokens, temperature=0, logit_bias=no_eos)
            return time.perf_counter() - t0, r["usage"]["completion_tokens"]

        def base_batch(seed: int) -> tuple[float, int]:  # its Python API decodes one sequence at a time
            t0, n = time.perf_counter(), 0
            for i in range(args.samples):
                r = llm(text, max_tokens=args.tokens, temperature=0.8, seed=seed * 1000 + i, logit_bias=no_eos)
                n += r["usage"]["completion_tokens"]
            return time.perf_counter() - t0, n
    except ImportError:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        base_name = "transformers generate (llama-cpp-python not installed)"
        x = torch.tensor([ids])

        def base_single() -> tuple[float, int]:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(x, max_new_tokens=args.single_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, min_new_tokens=args.single_tokens)
            return time.perf_counter() - t0, out.shape[1] - x.shape[1]

        def base_batch(seed: int) -> tuple[float, int]:
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(x, max_new_tokens=args.tokens, do_sample=True, temperature=0.8, top_p=1.0,
                                  top_k=0, num_return_sequences=args.samples, min_new_tokens=args.tokens,
                                  pad_token_id=0)
            return time.perf_counter() - t0, (out.shape[1] - x.shape[1]) * args.samples

    base_single()  # warm-up
    rounds.update(base_a=[], base_b=[])
    for r in range(args.repeats):  # interleaved
        rounds["base_a"].append(base_single())
        if r:
            rounds["ours_a"].append(ours_single())
        rounds["base_b"].append(base_batch(r))
        if r:
            rounds["ours_b"].append(ours_batch(r))

    def rate(key: str) -> float:
        return statistics.median(n / t for t, n in rounds[key])

    def wall(key: str) -> float:
        return statistics.median(t for t, _ in rounds[key])

    weight_bytes = sum(p.numel() * p.element_size() for p in gm.model.parameters())  # tied: counted once
    file_bytes = path.stat().st_size
    bw, mv = bandwidth_gbs(), gemv_gbs(gm.model)
    print(f"model {gm.name} ({path.name}), {args.dtype}, {threads} threads; baseline: {base_name}")
    print(f"prompt {len(ids)} tokens; medians of {args.repeats} interleaved rounds")
    print(f"(a) single-stream greedy, {args.single_tokens} tokens: ours {rate('ours_a'):.1f} tok/s, "
          f"baseline {rate('base_a'):.1f} tok/s, ratio {rate('ours_a') / rate('base_a'):.2f}x (target >= 0.5x)")
    print(f"(b) {args.samples} samples x {args.tokens} tokens: ours {wall('ours_b'):.1f} s "
          f"({rate('ours_b'):.0f} tok/s), baseline {wall('base_b'):.1f} s ({rate('base_b'):.0f} tok/s), "
          f"speed ratio {wall('base_b') / wall('ours_b'):.2f}x (target >= 1.0x)")
    print(f"memory read bandwidth {bw:.1f} GB/s; bytes per decode step: ours {weight_bytes / 1e6:.0f} MB "
          f"({args.dtype} weights) -> bound {bw * 1e9 / weight_bytes:.0f} steps/s; llama.cpp ~{file_bytes / 1e6:.0f} MB "
          f"(Q4_1 file) -> bound {bw * 1e9 / file_bytes:.0f} steps/s")
    print(f"torch's {args.dtype} matrix-vector products stream the weights at {mv:.1f} GB/s here (cold caches) -> "
          f"{mv * 1e9 / weight_bytes:.0f} steps/s for the matmuls alone, before any other op")
    print(f"peak RSS (ours, before the baseline loads): {rss_gib:.2f} GiB (target < 1.5 GiB)")


if __name__ == "__main__":
    main()
