"""`scalelab export`: a lab run → a Hugging Face Llama directory or a llama.cpp GGUF file.

The lab's Transformer is a Llama (pre-norm RMSNorm blocks, rotate-half RoPE, grouped-query attention, SwiGLU,
no biases, optionally tied embeddings), so a run of that shape exports without any change to its numbers:

- `hf`: a directory with `config.json` (`LlamaForCausalLM`: widths, heads, KV heads, RoPE theta, RMSNorm eps,
  tied embeddings, context), `model.safetensors` (HF parameter names; our RoPE is HF's rotate-half layout, so
  Q and K are not permuted) and the tokenizer (`tokenizer.json` with a post-processor that starts every text
  with the run's end-of-text token, as the lab's own backends do, plus `tokenizer_config.json` naming it BOS,
  EOS and the chat template). transformers, vLLM and lm-evaluation-harness load it offline. Writing it needs no
  transformers: the files are written directly.
- `gguf`: one Llama GGUF file (`gguf.save_gguf`: Q/K rows permuted to llama.cpp's interleaved RoPE), F32, F16
  or Q8_0, with the end-of-text token as BOS/EOS and add_bos set.

A run HF Llama cannot express (DyT or LayerNorm, a BD3-LM / block-diffusion run) is refused with one
`ScalelabError` saying why, before anything is written. The output is written into a temporary sibling of
`--out` and renamed into place, so a failure never leaves a half-written export, nor touches an existing one;
an existing non-empty `--out` is replaced only with `force` (the old copy is moved aside first and deleted
once the new one is in place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from scalelab.checkpoint import fsync_path
from scalelab.errors import ScalelabError

FORMATS = ("hf", "gguf")
DTYPES = {"hf": ("f32", "f16", "bf16"), "gguf": ("f32", "f16", "q8_0")}
_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_HF_DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# The lab's prompt format for a run (backends.PLAIN_CHAT), starting a new document with end-of-text as raw
# prompts do, so that `vllm serve` and llama.cpp's server can answer chat requests too.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")

# our parameter name → HF Llama's ({i}: the block index)
HF_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.attn.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.mlp.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def check_llama(cfg, run: Path | str = "the run") -> None:
    """Refuse (ScalelabError) a run config whose model is not a plain Llama: the one line says what and why."""
    m = cfg.model
    why = "HF Llama and llama.cpp's llama architecture have RMSNorm only"
    names = {"dyt": "DyT, dynamic tanh", "layernorm": "LayerNorm"}
    if cfg.diffusion.block_size:
        raise ScalelabError(f"cannot export {run}: it is a BD3-LM block-diffusion model (diffusion.block_size="
                            f"{cfg.diffusion.block_size}), which HF Llama and llama.cpp cannot run (they decode "
                            "left to right, one token at a time)")
    for key, kind in (("norm", m.norm), ("final_norm", m.final_norm or "rmsnorm")):
        if kind != "rmsnorm":
            raise ScalelabError(f"cannot export {run}: it uses model.{key}={kind} ({names.get(kind, kind)}); {why}")


def hf_config(mcfg, bos_id: int | None, dtype: str = "f32") -> dict:
    """config.json of a `LlamaForCausalLM` equal to the lab model `mcfg` (a ModelConfig). RoPE theta is written
    both as transformers 5 (`rope_parameters`) and as earlier readers (`rope_theta`: transformers 4, vLLM) expect."""
    from scalelab.model import mlp_hidden

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": mcfg.vocab_size,
        "hidden_size": mcfg.d_model,
        "intermediate_size": mlp_hidden(mcfg),
        "num_hidden_layers": mcfg.n_layer,
        "num_attention_heads": mcfg.n_head,
        "num_key_value_heads": mcfg.n_kv_head,
        "head_dim": mcfg.d_model // mcfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": mcfg.context,
        "rms_norm_eps": mcfg.norm_eps,
        "rope_theta": mcfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": mcfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": bool(mcfg.tie_embeddings),
        "bos_token_id": bos_id,
        "eos_token_id": bos_id,
        "pad_token_id": None,
        "initializer_range": mcfg.init_std,
        "use_cache": True,
        "torch_dtype": _HF_DTYPE_NAMES[dtype],
        "dtype": _HF_DTYPE_NAMES[dtype],
    }


def hf_state_dict(model, dtype: str = "f32") -> dict[str, torch.Tensor]:
    """The model's weights under HF Llama's names (a tied head is stored once, as the embedding)."""
    names = {}
    for ours, theirs in HF_NAMES.items():
        for i in range(model.cfg.n_layer) if "{i}" in ours else [None]:
            names[ours.format(i=i)] = theirs.format(i=i)
    out = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        if name not in names:  # (check_llama refuses every model with other parameters)
            raise ScalelabError(f"cannot export parameter {name!r}: it has no HF Llama counterpart")
        out[names[name]] = p.detach().to("cpu", _TORCH_DTYPES[dtype]).contiguous()
    return out


def hf_tokenizer(tokenizer, out: Path, context: int) -> None:
    """tokenizer.json (with end-of-text prepended to every text, when the tokenizer has one),
    tokenizer_config.json and special_tokens_map.json, as `PreTrainedTokenizerFast.save_pretrained` lays them."""
    from tokenizers import Tokenizer, processors

    from scalelab.tokenizer import EOT

    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's tokenizer keeps its post-processor
    eot = tok.token_to_id(EOT)
    if eot is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1",
                                                           special_tokens=[(EOT, eot)])
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOT, "eos_token": EOT} if eot is not None else {}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE if eot is not None else CHAT_TEMPLATE.removeprefix("{{ bos_token }}"),
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_hf(model, tokenizer, out: Path, dtype: str = "f32") -> None:
    """Write the HF Llama directory's files into the (existing, empty) directory `out`."""
    from safetensors.torch import save_file

    from scalelab.tokenizer import EOT

    bos = tokenizer.token_to_id(EOT)
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, bos, dtype), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": bos, "pad_token_id": bos}, indent=2) + "\n")
    save_file(hf_state_dict(model, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_tokenizer(tokenizer, out, model.cfg.context)


def write_gguf(model, tokenizer, path: Path, dtype: str = "f32", name: str = "scalelab") -> None:
    """Write the GGUF file `path` (via gguf.save_gguf) with end-of-text as BOS and EOS."""
    from scalelab import gguf
    from scalelab.tokenizer import EOT

    eot = tokenizer.token_to_id(EOT)
    gguf.save_gguf(model, tokenizer, path, chat_template=CHAT_TEMPLATE if eot is not None else None, name=name,
                   dtype=dtype, bos_id=eot, eos_id=eot, add_bos=eot is not None)


def _check_out(out: Path, force: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir() and not out.is_file()):
        raise ScalelabError(f"--out {out} exists and is not a plain file or directory: choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ScalelabError(f"--out {out} exists and is not empty: pass --force to replace it")
    if out.is_file() and not force:
        raise ScalelabError(f"--out {out} exists: pass --force to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise ScalelabError(f"cannot write --out {out}: {out.parent} is not a directory")


def _atomic(out: Path, write: Callable[[Path], None], is_file: bool) -> None:
    """Run write(tmp) on a temporary sibling of `out` (a directory, or a file path when `is_file`), then rename
    it into place, moving an existing `out` aside first and deleting it once the new one is there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        target = tmp / out.name if is_file else tmp
        write(target)
        mask = os.umask(0)
        os.umask(mask)
        if not is_file:  # mkdtemp's 0700 (and the 0600 some writers use) → what a plain mkdir / open would give
            os.chmod(tmp, 0o777 & ~mask)
        for f in ([target] if is_file else [p for p in tmp.rglob("*") if p.is_file()]):
            os.chmod(f, 0o666 & ~mask)
            fsync_path(f)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / out.name
            os.replace(out, old)
        os.replace(target, out)
        fsync_path(out.parent)
    except BaseException:
        if old is not None and not out.exists():  # the new copy did not arrive: put the old one back
            os.replace(old, out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (after a file export, the empty temp directory)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)


def export(run: Path | str, fmt: str, out: Path | str, dtype: str = "f32", force: bool = False) -> Path:
    """Export the newest checkpoint of `run` as `fmt` (hf | gguf) into `out` and return the path written.

    hf: `out` is a directory. gguf: `out` is the file when it ends in `.gguf`, else a directory that gets
    `model.gguf`. dtype: hf f32 | f16 | bf16, gguf f32 | f16 | q8_0. Every user error is a ScalelabError,
    raised before anything is written."""
    from scalelab import checkpoint, config as configmod, tokenizer as tokmod

    run, out = Path(run), Path(out)
    if fmt not in FORMATS:
        raise ScalelabError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    if dtype not in DTYPES[fmt]:
        raise ScalelabError(f"--dtype {dtype} is not available for --format {fmt} "
                            f"(choose one of {', '.join(DTYPES[fmt])})")
    if not run.exists():
        raise ScalelabError(f"no such run directory: {run}")
    if not run.is_dir() or not (run / "config.toml").is_file():
        raise ScalelabError(f"{run} is not a run directory (no config.toml)")
    check_llama(configmod.load(run / "config.toml"), run)  # before the weights are read
    where, home = out.resolve(), run.resolve()
    if where == home or where in home.parents:
        raise ScalelabError(f"--out {out} would replace the run {run} itself: choose another path")
    as_file = fmt == "gguf" and out.suffix == ".gguf"
    _check_out(out, force)
    if as_file and out.is_dir():
        raise ScalelabError(f"--out {out} is a directory: a .gguf path must name a file")
    if not as_file and out.is_file():
        raise ScalelabError(f"--out {out} is a file: {fmt} export writes a directory")
    cfg, model = checkpoint.load_run(run)
    tok = tokmod.load(run / "tokenizer.json")
    if tok.get_vocab_size() > cfg.model.vocab_size:
        raise ScalelabError(f"{run}/tokenizer.json has {tok.get_vocab_size()} tokens but the model only "
                            f"{cfg.model.vocab_size} embedding rows: not the tokenizer this run was trained with")
    if fmt == "hf":
        _atomic(out, lambda d: write_hf(model, tok, d, dtype), is_file=False)
        return out
    name = cfg.name if cfg.name != "run" else run.name
    if as_file:
        _atomic(out, lambda f: write_gguf(model, tok, f, dtype, name), is_file=True)
        return out
    _atomic(out, lambda d: write_gguf(model, tok, d / "model.gguf", dtype, name), is_file=False)
    return out / "model.gguf"
