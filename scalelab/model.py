"""The lab's one Transformer. Autoregressive LMs, BD3-LM and pretrained SmolLM2 all run on it.

Notable choices:
- LLaMA-style decoder: pre-norm blocks, rotary position embeddings (HF "rotate-half" layout, applied in fp32),
  grouped-query attention, SwiGLU MLP, no biases anywhere, optional tied input/output embeddings.
- Attention is `scaled_dot_product_attention` with `enable_gqa` (no copies of KV heads). It is causal by
  default, or takes any boolean mask (True = may attend), so block diffusion can pass its own 2L mask;
  explicit `positions` let two halves of a sequence share rotary positions.
- Norm ∈ {layernorm, rmsnorm, dyt}. DyT ("Transformers without Normalization", Zhu et al. 2025) is
  γ·tanh(α·x) + β with one learnable scalar α per layer; it replaces every norm, the final one included.
  As in the paper's LLaMA code, α starts larger in attention norms than in the others, shrinking with
  width (Table 12), and a learnable scalar initialised to √d multiplies the embedding output.
- A preallocated KV cache serves generation (engine.py, diffusion.py): prefill a prompt once, then decode one
  token at a time; the cache owns its tensors (prefix, select_rows, slide, truncate).
- `sample_next` is the one token draw (temperature, top-k, top-p by rejection), for every sampler.
- Initialisation: N(0, init_std) everywhere, residual output projections scaled by 1/√(2·n_layer).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalelab import config as configmod
from scalelab.config import BYTES_PER_PARAM, Config, ModelConfig, _bytes, _count
from scalelab.errors import ConfigError

# DyT paper, Table 12 (LLaMA width sweep; depth made no difference): width -> (α0 attention, α0 other).
DYT_ALPHA_TABLE = {1024: (1.0, 1.0), 2048: (1.0, 0.5), 4096: (0.8, 0.2), 8192: (0.2, 0.05)}


def dyt_alpha_init(width: int) -> tuple[float, float]:
    """α0 for (attention, other) DyT layers at a model width.

    Piecewise-linear in log2(width) between the paper's table points and held constant outside them. The
    interpolation reproduces the paper's LLaMA-13B entry (width 5120: 0.6 / 0.15, Table 11) to within 0.01.
    Widths below 1024, which is all of our CPU models, get 1.0 / 1.0: the paper has no entry there; the
    trend says narrower models tolerate larger α0, and we do not extrapolate past the smallest entry.
    """
    widths = sorted(DYT_ALPHA_TABLE)
    if width <= widths[0]:
        return DYT_ALPHA_TABLE[widths[0]]
    if width >= widths[-1]:
        return DYT_ALPHA_TABLE[widths[-1]]
    for lo, hi in zip(widths, widths[1:]):
        if lo <= width <= hi:
            f = (math.log2(width) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            a_lo, a_hi = DYT_ALPHA_TABLE[lo], DYT_ALPHA_TABLE[hi]
            return (a_lo[0] + f * (a_hi[0] - a_lo[0]), a_lo[1] + f * (a_hi[1] - a_lo[1]))
    raise AssertionError("unreachable")


class DyT(nn.Module):
    """Dynamic Tanh: γ ⊙ tanh(α·x) + β, α a learnable scalar, γ and β per channel."""

    def __init__(self, dim: int, alpha_init: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias


def make_norm(cfg: ModelConfig, where: str) -> nn.Module:
    """A norm layer; `where` is "attn", "other" (FFN) or "final" (before the head: `final_norm` may override
    the kind), and DyT's α0 depends on it (attention vs the others)."""
    kind = (cfg.final_norm or cfg.norm) if where == "final" else cfg.norm
    if kind == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    if kind == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
    a_attn, a_other = dyt_alpha_init(cfg.d_model)
    a_attn = cfg.dyt_alpha_attn or a_attn
    a_other = cfg.dyt_alpha_other or a_other
    return DyT(cfg.d_model, a_attn if where == "attn" else a_other)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for rotary embeddings. positions: (T,) or (B, T) -> each (…, T, head_dim), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (…, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos/sin: (T, hd) or (B, T, hd)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, n_kv_head, max_len, head_dim)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        hd = cfg.d_model // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, hd)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    # ---- the cache owns its tensors: everything outside goes through these ---------------------------------
    def load_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill positions [0, T) of every row from a batch-1 (or same-batch) prefix; k, v: (n_layer, b, n_kv, T, hd)."""
        T = k.shape[3]
        if T > self.max_len:
            raise ValueError(f"KV cache overflow: {T} > {self.max_len}")
        self.k[:, :, :, :T] = k
        self.v[:, :, :, :T] = v
        self.length = T

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the filled positions: (n_layer, B, n_kv, length, hd) keys and values."""
        return self.k[:, :, :, :self.length], self.v[:, :, :, :self.length]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (e.g. the samples still decoding)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]

    def slide(self, n: int) -> None:
        """Drop the oldest n positions, shifting the rest left (a sliding window at the context limit)."""
        keep = self.length - n
        self.k[:, :, :, :keep] = self.k[:, :, :, n:self.length].clone()
        self.v[:, :, :, :keep] = self.v[:, :, :, n:self.length].clone()
        self.length = keep

    def resize(self, max_len: int, shift: int = 0) -> None:
        """Reallocate to `max_len` positions, moving every row's filled positions by `shift`: > 0 makes room on the
        left (a longer prompt joins a batch), < 0 drops leading positions no row uses (continuous batching)."""
        new_length = self.length + shift
        if not 0 <= new_length <= max_len or -shift > self.length:
            raise ValueError(f"cannot resize a KV cache of length {self.length} by {shift} into {max_len}")
        lo, dst = max(0, -shift), max(0, shift)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], max_len, old.shape[4]))
            new[:, :, :, dst:new_length] = old[:, :, :, lo:self.length]
            setattr(self, name, new)
        self.max_len, self.length = max_len, new_length

    def add_rows(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Append n rows holding one prefix k, v (n_layer, 1, n_kv, T, hd), right-aligned to end at `length`
        (positions before it are padding the attention mask hides); T ≤ length."""
        T = k.shape[3]
        if T > self.length:
            raise ValueError(f"a prefix of {T} positions does not fit before position {self.length}")
        for name, src in (("k", k), ("v", v)):  # one new tensor each, filled in place (no rows-sized temporary)
            old = getattr(self, name)
            b = old.shape[1]
            new = old.new_zeros((old.shape[0], b + n, *old.shape[2:]))
            if b:
                new[:, :b] = old
            new[:, b:, :, self.length - T:self.length] = src
            setattr(self, name, new)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (scratch keys written by a forward that must not stay)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(f"cannot truncate a KV cache of {self.max_len} positions to {length}")
        self.length = length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, n_kv, T, hd) -> all keys/values so far, (B, n_kv, length + T, hd)
        T = k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        # x: (B, T, C)
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = mask is None
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
            if mask is None and T > 1:  # chunked prefill: causal, offset by what the cache holds
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        gqa = self.n_kv_head != self.n_head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and T > 1, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def mlp_hidden(cfg: ModelConfig) -> int:
    """The SwiGLU width: model.ffn_hidden, or LLaMA's 8/3·d_model rounded up to a multiple of 64."""
    return cfg.ffn_hidden or 64 * math.ceil(8 * cfg.d_model / 3 / 64)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden(cfg)
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg, "attn")
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg, "other")
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_scale = (nn.Parameter(torch.tensor([math.sqrt(cfg.d_model)]))
                            if cfg.norm == "dyt" and cfg.dyt_embed_scale else None)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg, "final")
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("wo.weight", "w2.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, head_slice: slice | torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, V).

        positions: (T,) or (B, T); default 0..T-1, continuing from the cache's length when a cache is given.
        mask: boolean, broadcastable to (B, H, T, T_keys), True where attention is allowed; default causal.
        head_slice: only these positions go through the final norm and the output head (BD3-LM's 2L pass
        needs logits for the noisy half only): a slice, or a (B, k) index tensor of positions per row
        (BD3-LM sampling needs the k positions it unmasks); default all.
        """
        B, T = idx.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=idx.device)
        cos, sin = rope_tables(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta)
        x = self.tok_emb(idx)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        if isinstance(head_slice, slice):
            x = x[:, head_slice]
        elif head_slice is not None:
            x = x.gather(1, head_slice[..., None].expand(-1, -1, x.size(-1)))
        return self.lm_head(self.norm(x))

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_emb.weight.numel()
            if self.cfg.tie_embeddings:  # the shared matrix still does the output projection's matmul
                n += self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N for the matmuls (embedding lookup excluded, output head included)
        plus 6·n_layer·seq_len·d for causal attention scores and values (only the unmasked half counted)."""
        return 6 * self.num_params(embeddings=False) + 6 * self.cfg.n_layer * seq_len * self.cfg.d_model


class _NoRandomInit(torch.overrides.TorchFunctionMode):
    """Skip random initialisers (`nn.init.normal_`, `Tensor.uniform_`, ...): they return their tensor untouched.
    A torch-function mode is thread-local, unlike patching `torch.nn.init`, so no other thread's init is skipped."""

    NAMES = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                       "xavier_uniform_", "xavier_normal_", "orthogonal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.NAMES:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def meta_model(cfg: ModelConfig) -> Transformer:
    """`Transformer(cfg)` on the meta device, allocating nothing and running no random init, for loaders that
    assign every weight. (A random init of a meta tensor goes through torch._refs, whose first call imports
    torch._dynamo, sympy and ~870 other modules: for the GGUF loader that was ~60 MB of its resident memory.)"""
    with torch.device("meta"), _NoRandomInit():
        return Transformer(cfg)


def param_count(cfg: ModelConfig) -> int:
    """The parameters `Transformer(cfg)` would have, allocating nothing: the matrices from their shapes, the
    norms built on the meta device (a random init on meta would import half of torch)."""
    d, hd = cfg.d_model, cfg.d_model // cfg.n_head
    with torch.device("meta"):
        attn_norm, mlp_norm, final_norm = (make_norm(cfg, w) for w in ("attn", "other", "final"))

    def numel(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    block = (2 * cfg.n_head + 2 * cfg.n_kv_head) * hd * d + 3 * d * mlp_hidden(cfg) + numel(attn_norm) + numel(mlp_norm)
    embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    scale = 1 if cfg.norm == "dyt" and cfg.dyt_embed_scale else 0
    return embed + scale + numel(final_norm) + cfg.n_layer * block


def check_memory(cfg: Config) -> None:
    """Refuse, before anything is allocated, a model whose training state cannot fit: parameters (with the
    largest vocabulary the tokenizer may give) × 16 bytes against the memory available. On CUDA the weights
    are built in RAM first and the whole state must fit on the GPU. Activations come on top of this."""
    m = dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size + (1 if cfg.diffusion.block_size else 0))
    n = param_count(m)
    what = (f"the model (model.d_model={m.d_model}, model.n_layer={m.n_layer}, vocabulary up to {m.vocab_size}) "
            f"has {_count(n)} parameters")
    full = f"{BYTES_PER_PARAM} bytes/parameter for weights, gradients and AdamW moments"
    need, state = n * BYTES_PER_PARAM, full
    dev = cfg.train.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and torch.cuda.is_available():
        rank = os.environ.get("LOCAL_RANK", "0")
        index = int(dev.partition(":")[2] or (rank if rank.isdigit() else 0))
        if index < torch.cuda.device_count():
            gpu = torch.cuda.get_device_properties(index).total_memory
            if need > gpu:
                raise ConfigError(f"{what}: training needs about {_bytes(need)} ({full}), more than the "
                                  f"{_bytes(gpu)} of {dev}; make the model smaller")
        need, state = n * 4, "its fp32 weights, built on the CPU before they move to the GPU"
    have = configmod.available_memory()
    if have is not None and need > have:
        raise ConfigError(f"{what}: training needs about {_bytes(need)} of RAM ({state}), more than the "
                          f"{_bytes(have)} available; make the model smaller")


@torch.no_grad()
def norm_probe(model: Transformer, x: torch.Tensor) -> dict:
    """What every norm layer sees on one batch x: (B, T) ids. For each layer (blocks in order, then the final
    norm): the RMS of its input and, for DyT, the share of inputs where |α·x| > 2 (tanh within 4% of ±1, passing
    back < 7% of the gradient). Without a normalisation nothing bounds the residual stream; once it is large,
    DyT acts as a sign function. Returns {"layers": [{name, rms, saturated}], "final_rms", "final_saturated",
    "max_rms", "saturated"} (the last two over all layers; saturated None for LayerNorm/RMSNorm)."""
    rows: list[dict] = []
    norms = (nn.RMSNorm, nn.LayerNorm, DyT)
    hooks = [mod.register_forward_hook(lambda mod, inp, _o, name=name: rows.append(
        {"name": "final" if name == "norm" else name, "rms": float(inp[0].float().pow(2).mean().sqrt()),
         "saturated": float((mod.alpha * inp[0]).abs().gt(2).float().mean()) if isinstance(mod, DyT) else None}))
        for name, mod in model.named_modules() if isinstance(mod, norms)]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    final = rows[-1]
    sat = [r["saturated"] for r in rows if r["saturated"] is not None]
    return {"layers": rows, "final_rms": final["rms"], "final_saturated": final["saturated"],
            "max_rms": max(r["rms"] for r in rows), "saturated": sum(sat) / len(sat) if sat else None}


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over the targets that are not -100 (answer-only training);
    0 when there are none. logits: (B, T, V), targets: (B, T)."""
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def _filter(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """logits: (B, V) -> probabilities after temperature and top-k (fp32)."""
    x = logits.float() / temperature
    if top_k and top_k < x.size(-1):
        x = x.masked_fill(x < torch.topk(x, top_k, dim=-1).values[:, -1:], float("-inf"))
    return torch.softmax(x, dim=-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits: (B, V) -> the sampling distribution (B, V) after temperature, top-k and top-p (fp32)."""
    probs = _filter(logits, temperature, top_k)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return probs


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """logits: (B, V) -> next ids (B,), drawn from `sampling_probs`. temperature 0 is greedy. The one token
    draw of the lab: the engine and BD3-LM sampling both call it.

    `generator` is one generator for the whole batch, or one per row: then each row draws only from its own
    (in float64), so a row's sample does not depend on the other rows (the engine's contract: sample i of a
    request is the same whatever n it was drawn with).

    Top-p without sorting the vocabulary: draw from the unfiltered distribution p and keep a draw j when it is
    in the nucleus (the mass of ids likelier than j is ≤ top_p), else draw that row again. Accepted draws follow
    p restricted to the nucleus and renormalised, which is exactly the filtered distribution; a draw is kept
    with probability ≥ top_p, so this costs a few passes over V instead of a sort (the sort dominated sampling
    from small models on CPU).
    """
    if temperature <= 0:
        return logits.argmax(-1)
    p = _filter(logits, temperature, top_k)
    if isinstance(generator, (list, tuple)):  # a row at a time: float64 work of one row, not (B, V)
        return torch.stack([_draw(p[i].double(), top_p, g) for i, g in enumerate(generator)])
    cdf = p.cumsum(-1)
    out = torch.empty(p.size(0), dtype=torch.long, device=p.device)
    rows = torch.arange(p.size(0), device=p.device)
    while rows.numel():
        every = rows.numel() == p.size(0)  # (the first pass: no (rows, V) copies of cdf and p)
        c, pr = (cdf, p) if every else (cdf[rows], p[rows])
        u = torch.rand(rows.numel(), 1, generator=generator, device=p.device) * c[:, -1:]
        j = torch.searchsorted(c, u).clamp_(max=p.size(-1) - 1)  # (n, 1)
        if top_p >= 1.0:
            out[rows] = j.squeeze(-1)
            break
        ok = torch.where(pr > pr.gather(-1, j), pr, 0).sum(-1) <= top_p
        out[rows[ok]] = j.squeeze(-1)[ok]
        rows = rows[~ok]
    return out


def _draw(p: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One id from one row's distribution p (V,), drawing u from `generator` until the draw is in the nucleus."""
    cdf = p.cumsum(-1)
    while True:
        u = torch.rand((), generator=generator, dtype=torch.float64).to(p.device)
        j = torch.searchsorted(cdf, u[None] * cdf[-1:]).clamp_(max=p.numel() - 1)[0]
        if top_p >= 1.0 or torch.where(p > p[j], p, 0).sum() <= top_p:
            return j
