"""Weight-only quantisation for CPU inference: int8 per output channel, int4 in groups of 32.

`quantize(model, mode)` replaces every `nn.Linear` of a Transformer (the output head included) by a
`QuantLinear` and casts the rest of the model (embeddings, norms, hence the KV cache) to bfloat16. A
`QuantLinear` runs torch's weight-only CPU kernels, which are fast with bfloat16 activations and slow with
float32 ones (one row, one thread, 1536×576, this 2-core CPU: int4 78 µs, int8 85 µs, fp32 F.linear 198 µs;
int8 with fp32 activations 1.2 ms):
- int4: `aten._weight_int4pack_mm_for_cpu`, weights packed by `aten._convert_weight_to_int4pack_for_cpu`,
  one bfloat16 (scale, zero) pair per group of 32 inputs and output channel; the kernel dequantises
  w = (q - 8)·scale + zero, q ∈ [0, 15] (checked against a dequantised fp32 matmul in tests/test_quant.py).
  A GGUF Q4_0 block (w = d·(q - 8)) or Q4_1 block (w = d·q + m) is exactly such a group: scale = d,
  zero = 0 or m + 8d, up to the bfloat16 rounding of the two numbers (`QuantLinear.int4`; gguf.py).
- int8: `aten._weight_int8pack_mm`, int8 weights and one bfloat16 scale per output channel.
- Q8_0 blocks (w = d·q, q int8, one d per 32 inputs) have no exact int8-per-channel form. `QuantLinear.q8_0`
  keeps them exactly as two int4 planes, q = 16·hi + lo (hi ∈ [-8, 7] with scale 16d, lo ∈ [0, 15] with
  scale d), one int4 matmul over 2N outputs whose halves are summed in fp32. It reads the same bytes as int8
  and costs about as much (SmolLM2's Q8_0 head, one row, a loaded 2-core CPU: 10–13 ms vs 9.7–9.9 ms for int8
  per-channel, which would lose the block scales: KL vs fp32 0.0025 instead of 0.0014 on 2k tokens).
Quantisation from float weights is round-to-nearest: int4 asymmetric (each group's min..max onto 0..15),
int8 symmetric (max |w| → 127), both computed against the bfloat16-rounded scales the kernels use.

Notable choices:
- Shapes: the int4 kernel needs K % 32 == 0 and N % 16 == 0. A layer that does not fit falls back to int8
  (with a log line) rather than refusing the whole mode; int8 takes any shape.
- Tied embeddings: the table stays a bfloat16 `nn.Embedding` for the lookup, and the head becomes a separate
  quantised copy (the head is the largest matmul of a small model and the one that gains most at one row).
  With more than `TIED_ROWS` rows (batched decode, prefill) the head multiplies by that bf16 table instead:
  the kernels' cost grows with the rows, a dense bf16 matmul's hardly does (SmolLM2's head, 16 rows: 17 ms
  dense vs 57 ms as Q8_0 planes on a loaded 2-core CPU), and the table is there anyway.
- The head returns fp32 logits (its kernel sums in fp32; the Q8_0 planes are added in fp32).
- Many rows at once (prefill, scoring, more than `DENSE_ROWS[mode]` rows): the weight-only kernels cost
  about as much per row as at one row, so a call with more rows dequantises the weight to bfloat16 and runs
  one dense matmul instead (same weights, only the summation order differs). Decode of a few samples takes
  the kernels.
- CPUs without native bf16 (`NATIVE_BF16` false: AVX2, no AVX-512 BF16 or AMX) run dense bf16 matmuls ~7x
  slower than fp32, so there the many-row path dequantises to fp32 and the tied head stays on the kernel.
- Output dtype = input dtype: with a bfloat16 model everything stays bfloat16; an fp32 input is rounded to
  bfloat16 for the kernel and its result returned as fp32.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalelab.errors import ScalelabError

log = logging.getLogger("scalelab")

MODES = ("none", "int8", "int4")
GROUP = 32  # int4 inputs per (scale, zero) pair: a GGUF Q4_0 / Q4_1 / Q8_0 block
# Above this many rows per call, dequantise once and run a dense bf16 matmul (the crossover, measured on
# 1536×576 with one thread: the int8 dequantisation is one cheap pass, the int4 one unpacks nibbles).
DENSE_ROWS = {"int8": 16, "int4": 128}
TIED_ROWS = 4  # a tied head above this many rows multiplies by the bf16 embedding table it shares
# Dense bf16 matmuls are fast only where the CPU computes bf16 natively (AVX-512 BF16, AMX); elsewhere (AVX2)
# they run ~7x slower than fp32: there the dense path dequantises to fp32 (measured on an AVX2 EPYC, 1536x576,
# one thread: int4 kernel 9.9 ms, fp32 dequant + matmul 6.7 ms at 128 rows, equal at 64) and the tied head
# stays on the kernel. The same row threshold on both keeps one rule for when a prefix-cached prefill (fewer
# rows) and a full one take different kernels.
NATIVE_BF16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or
                   getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
_CHUNK = 4096  # rows packed (and checked) at a time: whole channel blocks of either width


@functools.cache
def _block_n() -> int:
    """The width of the channel blocks torch's CPU int4 packing interleaves (see `_unpack_int4`): 64 with
    AVX-512, 32 with AVX2, read off a probe weight packed here; 0 when neither layout holds (another CPU)."""
    probe = torch.randint(0, 16, (2 * 64 + 16, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 2)
    for block in (64, 32):
        if packed.numel() * 2 == probe.numel() and torch.equal(_unpack_int4(packed, *probe.shape, block),
                                                                probe.to(torch.uint8)):
            return block
    return 0


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ScalelabError(f"--quant must be one of {' | '.join(MODES)}, got {mode!r}")
    return mode


def int4_fits(n: int, k: int) -> bool:
    """Whether torch's int4 CPU kernel takes an (out=n, in=k) weight."""
    return k % GROUP == 0 and n % 16 == 0 and n > 0


def _unpack_int4(packed: torch.Tensor, n: int, k: int, block: int | None = None) -> torch.Tensor:
    """The (n, k) nibbles of a `_convert_weight_to_int4pack_for_cpu` result, uint8 in [0, 15].

    The layout (torch 2.x, B = 64 with AVX-512, 32 with AVX2: `_block_n`): for each full block of B output
    channels and each input k, B/2 bytes whose low nibbles are channels 0..B/2-1 of the block and high nibbles
    the rest; then the r = N mod B channels left, for each k r/2 bytes, channel 2j in the low nibble of byte j
    and 2j + 1 in the high one. It is torch-internal, so `QuantLinear.int4` checks it on the layer's own
    weight and, where it does not hold, dequantises through the kernel instead (`QuantLinear.dequantize`)."""
    block = block or _block_n() or 64
    full = n // block * block
    flat = packed.reshape(-1)
    p = flat[:full * k // 2].view(n // block, k, block // 2)
    head = torch.cat([p & 15, p >> 4], dim=2).transpose(1, 2).reshape(full, k)
    if full == n:
        return head
    t = flat[full * k // 2:].view(k, (n - full) // 2)
    tail = torch.stack([t & 15, t >> 4], dim=2).reshape(k, n - full).t()
    return torch.cat([head, tail])


class QuantLinear(nn.Module):
    """A bias-free linear layer with int4 (group 32) or int8 (per output channel) weights, computing in bf16."""

    def __init__(self, in_features: int, out_features: int, mode: str, planes: int = 1):
        super().__init__()
        if mode not in ("int8", "int4"):
            raise ScalelabError(f"QuantLinear mode must be int8 or int4, got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.planes = planes  # int4 only: 2 = the rows hold [hi; lo] planes of int8 values, summed (`q8_0`)
        self.dense_ok = mode == "int8"
        self.out_dtype: torch.dtype | None = None  # None: the input's dtype (the head sets float32)
        self.tied: torch.Tensor | None = None  # a tied head's bf16 embedding table (`quantize`), not a buffer

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def int4(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> QuantLinear:
        """From nibbles q (N, K) in [0, 15] and per-group scale, zero (N, K/32): w = (q - 8)·scale + zero."""
        n, k = q.shape
        if not int4_fits(n, k) or scale.shape != (n, k // GROUP) or zero.shape != scale.shape:
            raise ScalelabError(f"int4 needs an (N, K) weight with K % {GROUP} == 0 and N % 16 == 0 and "
                                f"(N, K/{GROUP}) scales; got {tuple(q.shape)} and {tuple(scale.shape)}")
        self = cls(k, n, "int4")
        self._pack(q, scale, zero)
        return self

    def _pack(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, planes: tuple = (None,)) -> None:
        """Pack the nibbles of q (N, K), one plane per function in `planes` (None: q itself), the planes stacked
        on the rows, `_CHUNK` rows at a time: the int32 copy the packing op wants stays small (SmolLM2's head:
        2 × 49152 rows). Pieces are whole 64-channel blocks, whose packed bytes are contiguous and in order
        (`_unpack_int4`), which the check confirms piece by piece."""
        n, k = q.shape

        def nibbles(f, rows: torch.Tensor) -> torch.Tensor:
            return (rows if f is None else f(rows)).to(torch.int32).contiguous()

        def pack(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(x, 2)

        pieces = [(f, a) for f in planes for a in range(0, n, _CHUNK)] if _block_n() and n % _block_n() == 0 else []
        ok, packed = False, None
        if pieces:  # packed and checked piece by piece into one buffer: no list of pieces beside their copy
            packed = torch.empty(len(planes) * n, k // 2, dtype=torch.uint8)  # the op's (N, K/2) layout
            flat, at, ok = packed.view(-1), 0, True
            for f, a in pieces:
                rows = min(n, a + _CHUNK) - a
                x = nibbles(f, q[a:a + rows])
                p = pack(x).reshape(-1)
                ok = p.numel() == rows * k // 2 and torch.equal(_unpack_int4(p, rows, k), x.to(torch.uint8))
                if not ok:
                    break
                flat[at:at + p.numel()] = p
                at += p.numel()
        if not ok:  # one piece (rows not in whole blocks, or a layout other than the assumed one)
            whole = torch.cat([nibbles(f, q) for f in planes])
            packed = pack(whole)
            ok = packed.numel() * 2 == whole.numel() and torch.equal(_unpack_int4(packed, *whole.shape),
                                                                     whole.to(torch.uint8))
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/32, N, 2)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", sz)
        self.dense_ok = ok

    @classmethod
    def q8_0(cls, q: torch.Tensor, d: torch.Tensor) -> QuantLinear:
        """Exactly (up to bf16 rounding of d) w = d·q from int8 q (N, K) and per-block d (N, K/32), as two int4
        planes: q = 16·hi + lo, lo = q mod 16 ∈ [0, 15], hi = q >> 4 ∈ [-8, 7]."""
        n, k = q.shape
        if not int4_fits(n, k) or d.shape != (n, k // GROUP):
            raise ScalelabError(f"q8_0 needs an (N, K) weight with K % {GROUP} == 0 and N % 16 == 0 and "
                                f"(N, K/{GROUP}) scales; got {tuple(q.shape)} and {tuple(d.shape)}")
        self = cls(k, n, "int4", planes=2)
        d = d.float()
        # hi plane: nibble hi + 8 (hi = q >> 4, an arithmetic shift), (nibble - 8)·16d + 0;
        # lo plane: nibble lo = q & 15, (nibble - 8)·d + 8d; hi·16 + lo == q
        self._pack(q.to(torch.int8), torch.cat([16 * d, d]), torch.cat([torch.zeros_like(d), 8 * d]),
                   planes=(lambda c: (c >> 4) + 8, lambda c: c & 15))
        return self

    @classmethod
    def int8(cls, q: torch.Tensor, scale: torch.Tensor) -> QuantLinear:
        """From int8 q (N, K) and per-channel scale (N,): w = q·scale."""
        n, k = q.shape
        self = cls(k, n, "int8")
        self.register_buffer("qweight", q.to(torch.int8).contiguous())
        self.register_buffer("scales", scale.to(torch.bfloat16).contiguous())
        return self

    @classmethod
    def quantize(cls, weight: torch.Tensor, mode: str) -> QuantLinear:
        """Round-to-nearest from a float (N, K) weight. int4 falls back to int8 for shapes its kernel rejects."""
        w = weight.detach().float()
        n, k = w.shape
        if mode == "int4" and not int4_fits(n, k):
            log.info("int4 needs in %% %d == 0 and out %% 16 == 0: a (%d, %d) layer is quantised to int8",
                     GROUP, n, k)
            mode = "int8"
        if mode == "int8":
            return cls.int8(*rtn_int8(w))
        return cls.int4(*rtn_int4(w))

    # ---- use -----------------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The (N, K) weight the kernel multiplies by (an int4 layout `_unpack_int4` cannot read: through the
        kernel, rounded to bf16)."""
        n, k = self.out_features, self.in_features
        if self.mode == "int8":
            return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]
        if not self.dense_ok:  # a packed layout `_unpack_int4` does not know: the kernel times the identity
            eye = torch.eye(k, dtype=torch.bfloat16)
            w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, self.scales_and_zeros).t().float()
            return (w[:n] + w[n:] if self.planes == 2 else w).to(dtype)
        rows = n * self.planes
        sz = self.scales_and_zeros  # (K/32, rows, 2) bf16
        scale = sz[..., 0].t().contiguous()[..., None]  # (rows, K/32, 1)
        offset = (sz[..., 1].float() - 8 * sz[..., 0].float()).t().contiguous()[..., None]
        q = _unpack_int4(self.packed, rows, k).view(rows, k // GROUP, GROUP)
        w = q.float().mul_(scale.float()).add_(offset).view(rows, k)  # in place, fp32: one rounding at the end
        return (w[:n] + w[n:] if self.planes == 2 else w).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, out = x.shape, self.out_dtype or x.dtype
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.bfloat16 or not x2.is_contiguous():  # (decode calls this ~200 times a step)
            x2 = x2.to(torch.bfloat16).contiguous()
        if self.tied is not None and x2.shape[0] > TIED_ROWS and NATIVE_BF16:
            y = F.linear(x2, self.tied)
        elif x2.shape[0] > DENSE_ROWS[self.mode] and self.dense_ok:
            y = F.linear(x2, self.dequantize()) if NATIVE_BF16 else F.linear(x2.float(), self.dequantize(torch.float32))
        elif self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scales_and_zeros)
            if self.planes == 2:
                y = y[:, :self.out_features].float() + y[:, self.out_features:].float()
        y = y.view(*shape[:-1], self.out_features)
        return y if y.dtype == out else y.to(out)

    def nbytes(self) -> int:
        """Bytes of weights (and their scales) one full pass reads."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        kind = "q8_0 as two int4 planes" if self.planes == 2 else self.mode
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def rtn_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest in groups of 32: (q uint8 (N, K), scale, zero (N, K/32)), bf16-exact."""
    n, k = w.shape
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).to(torch.bfloat16).float()  # the numbers the kernel will hold
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[..., None] > 0, (g - zero[..., None]) / safe[..., None] + 8, torch.full_like(g, 8.0))
    return q.round().clamp(0, 15).to(torch.uint8).view(n, k), scale, zero


def rtn_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest per output channel: (q int8 (N, K), scale (N,)), bf16-exact scale."""
    scale = (w.float().abs().amax(1) / 127).to(torch.bfloat16).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w.float() / safe[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def quantize(model: nn.Module, mode: str, dtype: torch.dtype = torch.bfloat16,
             layers: dict[str, QuantLinear] | None = None) -> nn.Module:
    """Replace every nn.Linear of `model` by a QuantLinear (RTN from its weights, or `layers[name]` where given,
    e.g. GGUF blocks mapped exactly) and cast the rest to `dtype`. Tied embeddings: the table stays (in
    `dtype`) for the lookup and the head gets its own quantised copy. `none` returns the model unchanged."""
    check_mode(mode)
    if mode == "none":
        return model
    layers = layers or {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ScalelabError("quantize: only bias-free linear layers are supported")
                full = f"{parent_name}.{name}" if parent_name else name
                setattr(parent, name, layers.get(full) or QuantLinear.quantize(child.weight, mode))
    model.to(dtype)
    finish_head(model)
    return model


def finish_head(model: nn.Module) -> None:
    """The quantised head returns fp32 logits; a tied one also gets the (bf16) embedding table it shares, for
    calls with many rows (`TIED_ROWS`: from ~5 rows one dense bf16 matmul beats the kernels, no extra memory)."""
    head, emb = getattr(model, "lm_head", None), getattr(model, "tok_emb", None)
    if isinstance(head, QuantLinear):
        head.out_dtype = torch.float32
        tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
        if tied and emb is not None and emb.weight.dtype == torch.bfloat16 and \
                emb.weight.shape == (head.out_features, head.in_features):
            head.tied = emb.weight.detach()  # a plain tensor sharing the storage: not a parameter of the head


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every matmul (quantised or not, a tied head once) and the norms;
    not the embedding table (a lookup reads one row)."""
    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.nbytes()
        elif not isinstance(m, nn.Embedding):
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel() * p.element_size()
    return total
