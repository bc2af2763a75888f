"""Decode speed of the lab's engine, per --quant arm, vs llama.cpp (llama-cpp-python) on the same GGUF file.

(a) single-stream greedy decode, tokens/s; (b) 16 samples of one prompt, 128 new tokens each, wall-clock;
(c) peak RSS of each arm, measured in a fresh subprocess per arm (load + one (a) and one (b) run) so that one
arm's peak does not hide another's. Beside each arm's rate: the bytes of weights one decode step reads
(`quant.weight_bytes`: the matmuls in their stored format and the norms, not the embedding table), the
memory-bandwidth bound that gives (measured read bandwidth ÷ bytes) and the kernel ceiling (one step's matmuls
alone, caches flushed: the rate before any other op). Rounds are interleaved (every arm and the baseline in
each round) and repeated; medians are quoted, as ratios against llama.cpp measured in the same run (other
processes share the cores: absolute numbers are noisy). EOS is disabled on both sides so every sample runs to
its token budget. Both sides use the same number of threads (--threads, default torch's).

    .venv/bin/python benchmarks/decode.py [--model smollm2] [--quant none,int8,int4] [--repeats 3] [--threads N]
    make bench-llamacpp   # installs llama-cpp-python into .venv (builds llama.cpp: needs cmake and a C++ compiler)

Falls back to transformers' `generate` as the baseline when llama-cpp-python is not installed. --profile prints
torch.profiler's top ops for 32 single-stream steps of each quantised arm.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from scalelab import gguf, quant
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


def matmul_ceiling(model: torch.nn.Module, reps: int = 9) -> float:
    """Steps/s of one decode step's matrix-vector products alone (every nn.Linear / QuantLinear on one row, in
    the dtype the model runs them in), caches flushed between steps."""
    mats = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, quant.QuantLinear))]
    flush = torch.ones(64 << 20)
    dt = next(model.parameters()).dtype
    xs = [torch.randn(1, m.in_features, dtype=dt) for m in mats]
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            flush.sum()
            t0 = time.perf_counter()
            for m, x in zip(mats, xs):
                m(x)
            times.append(time.perf_counter() - t0)
    return 1 / statistics.median(times)


def load(path, arm: str):
    """An arm: none (fp32), bf16 (no quantisation, bf16), int8 or int4."""
    if arm == "bf16":
        return gguf.load(path, dtype=torch.bfloat16)
    return gguf.load(path, quant=arm)


def rss_child(args) -> None:
    """--rss-of ARM: load, one single-stream and one batched run, print the peak RSS (GiB) as JSON."""
    gm = load(gguf.resolve(args.model), args.rss_of)
    eng = Engine(gm.model, stop_ids=[], prefix_cache=0)
    ids = gm.tokenizer.encode(gguf.render_chat(gm.chat_template, PROMPT)).ids
    eng.generate(ids, SamplingParams(max_tokens=args.single_tokens, temperature=0))
    eng.generate(ids, SamplingParams(n=args.samples, max_tokens=args.tokens, temperature=0.8, seed=0))
    print(json.dumps({"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)}))


def profile(eng: Engine, ids: list[int], steps: int = 32) -> str:
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        eng.generate(ids, SamplingParams(max_tokens=steps, temperature=0))
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quant", default="none,int8,int4", help="arms: none (fp32) | bf16 | int8 | int4, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--single-tokens", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch and llama.cpp threads (0 = torch's default)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rss-of", default="", help=argparse.SUPPRESS)  # the child of (c)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_of:
        return rss_child(args)
    threads = torch.get_num_threads()
    arms = args.quant.split(",")
    path = gguf.resolve(args.model)
    rss = {}
    for arm in arms:  # (c) first, each in a fresh process, before this one holds anything
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--rss-of", arm, "--threads",
                              str(threads), "--tokens", str(args.tokens), "--samples", str(args.samples),
                              "--single-tokens", str(args.single_tokens)], capture_output=True, text=True, check=True)
        rss[arm] = json.loads(out.stdout.strip().splitlines()[-1])["rss_gib"]
    models = {arm: load(path, arm) for arm in arms}
    gm = next(iter(models.values()))
    engines = {arm: Engine(m.model, stop_ids=[], prefix_cache=0) for arm, m in models.items()}
    text = gguf.render_chat(gm.chat_template, PROMPT)
    ids = gm.tokenizer.encode(text).ids

    def ours_single(arm: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        g = engines[arm].generate(ids, SamplingParams(max_tokens=args.single_tokens, temperature=0))
        return time.perf_counter() - t0, g.completion_tokens

    def ours_batch(arm: str, seed: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        g = engines[arm].generate(ids, SamplingParams(n=args.samples, max_tokens=args.tokens, temperature=0.8,
                                                      seed=seed))
        return time.perf_counter() - t0, g.completion_tokens

    try:
        from llama_cpp import Llama

        llm = Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False,
                    seed=0)
        no_eos = {i: -1e9 for i in gm.stop_ids}
        import llama_cpp

        base_name = f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, {threads} threads, its own kernels)"

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
        base_name = "transformers generate, fp32 (llama-cpp-python not installed: make bench-llamacpp)"
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

    base_single()  # warm-ups
    for arm in arms:
        ours_single(arm)
    keys = ["base_a", "base_b", *(f"{a}_a" for a in arms), *(f"{a}_b" for a in arms)]
    rounds: dict[str, list] = {k: [] for k in keys}
    for r in range(args.repeats):  # interleaved: every arm and the baseline in every round
        rounds["base_a"].append(base_single())
        for arm in arms:
            rounds[f"{arm}_a"].append(ours_single(arm))
        rounds["base_b"].append(base_batch(r))
        for arm in arms:
            rounds[f"{arm}_b"].append(ours_batch(arm, r))

    def rate(key: str) -> float:
        return statistics.median(n / t for t, n in rounds[key])

    def wall(key: str) -> float:
        return statistics.median(t for t, _ in rounds[key])

    bw = bandwidth_gbs()
    file_bytes = path.stat().st_size
    print(f"model {gm.name} ({path.name}), {threads} threads; baseline: {base_name}")
    print(f"prompt {len(ids)} tokens; medians of {args.repeats} interleaved rounds; memory read bandwidth "
          f"{bw:.1f} GB/s; llama.cpp reads ~{file_bytes / 1e6:.0f} MB per step (the file) -> bound "
          f"{bw * 1e9 / file_bytes:.0f} steps/s")
    print(f"baseline: (a) {rate('base_a'):.1f} tok/s; (b) {wall('base_b'):.1f} s ({rate('base_b'):.0f} tok/s)")
    print("| arm | (a) tok/s | (a) vs llama.cpp | (b) s | (b) speed vs llama.cpp | (c) peak RSS GiB | "
          "MB/step | bandwidth bound steps/s | matmul ceiling steps/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arm in arms:
        m = models[arm].model
        mb = quant.weight_bytes(m)
        print(f"| {arm} | {rate(arm + '_a'):.1f} | {rate(arm + '_a') / rate('base_a'):.2f}x | {wall(arm + '_b'):.1f} | "
              f"{wall('base_b') / wall(arm + '_b'):.2f}x | {rss[arm]:.2f} | {mb / 1e6:.0f} | {bw * 1e9 / mb:.0f} | "
              f"{matmul_ceiling(m):.0f} |")
    print("targets (int4): (a) >= 0.7x, (b) >= 2x, (c) <= 0.5 GiB")
    if args.profile:
        for arm in arms:
            if arm not in ("none", "bf16"):
                print(f"--- {arm}: torch.profiler, 32 single-stream steps, top ops by self CPU time")
                print(profile(engines[arm], ids))


if __name__ == "__main__":
    main()
