"""Training throughput, side by side: ours in fp32, ours in bf16, and transformers' LlamaForCausalLM.

Every arm runs whole optimizer steps as scalelab's trainer does (train._train): forward (under bf16 autocast
for the bf16 arms: fp32 master weights, gradients and AdamW state), the fp32 cross-entropy `loss_fn`, backward,
gradient clipping at train.grad_clip, AdamW from `train.make_optimizer` (foreach, decay on matrices only),
zero_grad. All arms see the same random token batches at a recipe's shape (default: small) and batch, under
one torch thread count. The peer is `LlamaForCausalLM` (sdpa attention) built from a LlamaConfig of the same
width, depth, heads, KV heads, context, vocabulary, tying and SwiGLU width; its logits go through the same
loss. The arms run in interleaved rounds (order rotated each round, so a drifting load on a shared machine
hits all alike); tokens/s is the median over rounds. Model FLOP/s (6·N + causal attention, see
Transformer.flops_per_token) is also given as a fraction of this process's `torch.mm` peak in the arm's
dtype (medians of measurements before and after the rounds). --profile prints the top ops by self CPU time
of one step of each arm.

An arm is {ours,peer}-{fp32,bf16}, with -compile appended for torch.compile of the forward (as
train.compile does); the default is the four eager arms.

    python benchmarks/train_throughput.py [--rounds 7] [--steps 3] [--threads N] [--arms ours-fp32,ours-bf16,peer-fp32,peer-bf16]
    python benchmarks/train_throughput.py --arms ours-bf16,ours-bf16-compile,peer-bf16,peer-bf16-compile
    python benchmarks/train_throughput.py --recipe tiny --set model.d_model=256 --set train.batch_size=8
    python benchmarks/train_throughput.py --profile --rounds 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from scalelab import config
from scalelab.model import Transformer, loss_fn, mlp_hidden
from scalelab.train import make_optimizer


ARMS = tuple(f"{m}-{d}{c}" for c in ("", "-compile") for m in ("ours", "peer") for d in ("fp32", "bf16"))


def mm_flops(device: torch.device, dtype: torch.dtype, reps: int = 5) -> float:
    """Dense matmul FLOP/s in `dtype` (bf16 on CPUs with AMX/AVX512-BF16 runs through oneDNN)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peer_model(m: config.ModelConfig) -> torch.nn.Module:
    """transformers' LLaMA at our model's shape (the same parameter count: checked by the caller)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    pc = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=mlp_hidden(m),
                     num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.n_kv_head,
                     max_position_embeddings=m.context, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                     rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, use_cache=False,
                     initializer_range=m.init_std, attn_implementation="sdpa")
    return LlamaForCausalLM(pc)


class Arm:
    """One model + AdamW, and `step()`: one whole optimizer step on the next batch."""

    def __init__(self, name: str, cfg: config.Config, device: torch.device, batches: list[torch.Tensor]):
        self.name, self.device, self.batches, self.i = name, device, batches, 0
        self.bf16 = "-bf16" in name
        torch.manual_seed(cfg.train.seed)
        if name.startswith("ours"):
            self.model = Transformer(cfg.model).to(device)
            fwd = self.model
        else:
            self.model = peer_model(cfg.model).to(device)
            fwd = lambda x: self.model(input_ids=x).logits  # noqa: E731
        self.fwd = torch.compile(fwd) if name.endswith("-compile") else fwd
        self.optimizer = make_optimizer(self.model, cfg.train)
        self.clip = cfg.train.grad_clip
        self.model.train()

    def step(self) -> float:
        b = self.batches[self.i % len(self.batches)].to(self.device)
        self.i += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = loss_fn(self.fwd(b[:, :-1]), b[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def profile(arm: Arm, top: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if arm.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        arm.step()
        sync(arm.device)
    key = "self_cuda_time_total" if arm.device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- {arm.name}: top {top} ops by self time, one step")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=40))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="small", help="the shape, batch and optimizer settings (a recipe name or TOML)")
    ap.add_argument("--set", action="append", default=[], help="config overrides, e.g. model.d_model=512")
    ap.add_argument("--arms", default=",".join(ARMS[:4]), help=f"comma-separated, from {', '.join(ARMS)}")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (tokens/s = median over rounds)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per arm per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per arm before the rounds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for every arm (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--profile", action="store_true", help="after the rounds, the top ops of one step per arm")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = config.load(args.recipe, args.set)
    cfg.model.vocab_size = cfg.data.vocab_size  # the tokenizer's size at most; the speed barely depends on it
    names = args.arms.split(",")
    if unknown := [n for n in names if n not in ARMS]:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
    B, T = cfg.train.batch_size, cfg.model.context
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=g) for _ in range(4)]
    arms = [Arm(n, cfg, device, batches) for n in names]
    counts = {sum(p.numel() for p in a.model.parameters()) for a in arms}
    assert len(counts) == 1, f"the arms differ in parameter count: {counts}"  # the peer is the same model
    peaks = {dt: [mm_flops(device, dt)] for dt in (torch.float32, torch.bfloat16)}
    for arm in arms:
        for _ in range(args.warmup):
            arm.step()
    sync(device)
    tps: dict[str, list[float]] = {a.name: [] for a in arms}
    for r in range(args.rounds):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                arm.step()
            sync(device)
            tps[arm.name].append(args.steps * B * T / (time.perf_counter() - t))
    for dt in peaks:
        peaks[dt].append(mm_flops(device, dt))
    if args.profile:
        for arm in arms:
            profile(arm)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    ours = next((a.model for a in arms if a.name.startswith("ours")), None) or Transformer(cfg.model)
    flops_per_token = ours.flops_per_token(T)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = {dt: statistics.median(v) for dt, v in peaks.items()}
    print(f"machine: {what}; torch.mm peak fp32 {peak[torch.float32] / 1e9:.0f}, bf16 "
          f"{peak[torch.bfloat16] / 1e9:.0f} GFLOP/s")
    print(f"shape ({cfg.name} recipe{' + ' + ' '.join(args.set) if args.set else ''}): {cfg.model.n_layer} layers, "
          f"d={cfg.model.d_model}, {cfg.model.n_head} heads / {cfg.model.n_kv_head} KV, context {T}, "
          f"vocab {cfg.model.vocab_size}, SwiGLU {mlp_hidden(cfg.model)}, batch {B}, {counts.pop():,} parameters; "
          f"{args.rounds} interleaved rounds x {args.steps} steps")
    med = {n: statistics.median(v) for n, v in tps.items()}
    for n in names:
        dt = torch.bfloat16 if "-bf16" in n else torch.float32
        mfu = med[n] * flops_per_token / peak[dt]
        print(f"  {n:17s} {med[n]:9,.0f} tokens/s  (rounds: {', '.join(f'{x:,.0f}' for x in tps[n])})  "
              f"{mfu:.2f} of the {'bf16' if dt == torch.bfloat16 else 'fp32'} matmul peak")

    def ratio(a: str, b: str) -> str:  # of the medians, and the median of the per-round ratios (drift cancels)
        per_round = statistics.median(x / y for x, y in zip(tps[a], tps[b]))
        return f"{med[a] / med[b]:.2f}x (per-round median {per_round:.2f}x)"

    modes = [c for c in ("", "-compile") if any(n.endswith(c or ("fp32", "bf16")) for n in med)]
    for c in modes:  # eager against eager, compiled against compiled
        label = " (compiled)" if c else " (eager)"
        if f"ours-bf16{c}" in med and f"ours-fp32{c}" in med:
            print(f"ours bf16 / ours fp32{label}: {ratio(f'ours-bf16{c}', f'ours-fp32{c}')}, target >= 1.7")
        peers = [n for n in med if n.startswith("peer") and n.endswith(c or ("fp32", "bf16"))]
        if f"ours-bf16{c}" in med and peers:
            best = max(peers, key=med.get)
            print(f"ours bf16 / the peer's best arm{label}, {best}: {ratio(f'ours-bf16{c}', best)}, target >= 1.5")
    print(f"peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
