"""Configs: dataclasses, TOML recipes, and `--set section.key=value` overrides.

A run's config is three small dataclasses (model, data, train) plus a name. Recipes are TOML files with the
same sections; unknown sections or keys are errors, so a typo never silently falls back to a default. The
resolved config is written into the run directory as `config.toml`, and everything else reads it from there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalelab.errors import ConfigError

NORMS = ("layernorm", "rmsnorm", "dyt")
DTYPES = ("auto", "float32", "bfloat16")  # train.dtype


@dataclass
class ModelConfig:
    vocab_size: int = 4096  # set from the tokenizer when a run starts
    context: int = 256  # tokens per training sequence (the model's maximum length)
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention: n_head must be a multiple of it
    ffn_hidden: int = 0  # 0 = LLaMA's 8/3·d_model rounded up to a multiple of 64
    norm: str = "rmsnorm"  # layernorm | rmsnorm | dyt
    norm_eps: float = 1e-5
    dyt_alpha_attn: float = 0.0  # 0 = from the DyT paper's width table (see model.dyt_alpha_init)
    dyt_alpha_other: float = 0.0
    dyt_embed_scale: bool = True  # DyT-LLaMA: a learnable scalar (init √d) after the embedding
    final_norm: str = ""  # the norm before the output head; "" = model.norm (an ablation knob for DyT)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02


@dataclass
class DataConfig:
    # stdlib | path to a text file or directory | hf:<dataset>[:<config>][:<split>] | hf:/dir/of/jsonl-or-parquet
    # (hf: corpora are streamed with `datasets`, the hf extra: see scalelab/data.py)
    corpus: str = "stdlib"
    text_field: str = "text"  # hf: corpora: the field of each record that holds its document
    vocab_size: int = 4096
    val_fraction: float = 0.05
    max_bytes: int = 0  # 0 = the whole corpus; else keep documents (in hash order) up to this many bytes
    cache_dir: str = ""  # "" = $SCALELAB_CACHE or ~/.cache/scalelab
    # Train on answers only: on every line holding this marker, the tokens before it are context (no loss) and
    # the rest of the line is the answer (the marker itself is dropped); lines without it are trained on in
    # full. "" = every token. E.g. "\u001f" for `prompt␟answer` lines.
    loss_after: str = ""


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr·min_lr_ratio
    warmup_steps: int = 20
    # cosine: linear warmup, then cosine to lr·min_lr_ratio. fms: the schedule of the DyT paper's LLaMA code
    # (IBM's fms-fsdp): min(parabolic warmup over warmup_steps, cosine over the whole run to lr·min_lr_ratio)
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 50
    keep_last: int = 2
    log_every: int = 10
    seed: int = 1337
    compile: bool = False  # torch.compile the model (faster steps on CPU after a one-off compile)
    threads: int = 0  # 0 = torch's default
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda | cuda:N
    # The compute dtype: float32, or bfloat16 = bf16 autocast with fp32 master weights, gradients and AdamW
    # state (CPU and CUDA). auto = bfloat16 on CUDA, float32 on CPU (bitwise reproducible). The run's
    # config.toml records the resolved value. The deprecated `train.bf16` is read as an alias (see from_dict).
    dtype: str = "auto"
    probe_every: int = 0  # > 0: every N steps, each norm's input RMS (and DyT saturation) -> probes.jsonl
    tensorboard: bool = False  # also write metrics.jsonl's records as TensorBoard events to <run>/tb/ (extra: tb)


@dataclass
class DiffusionConfig:
    """BD3-LM (scalelab/diffusion.py). block_size = 0 trains an ordinary autoregressive model."""

    block_size: int = 0  # L′; must divide model.context. L′ = 1 is AR-like, L′ = context is MDLM
    clip_lo: float = 0.001  # β: training mask rates are drawn from U[β, ω] (§5.2); eval always uses [0.001, 1]
    clip_hi: float = 1.0  # ω
    resample: bool = True  # re-mask blocks whose masked fraction falls outside [β, ω] (the BD3 train scripts)
    clip_search: bool = True  # data-driven (β, ω): grid search minimising Var[per-block loss] at evals (§5.3)
    search_after: int = 0  # first step at which an eval also runs the search
    search_widths: str = "0.5,0.6,0.7,0.8,0.9"  # ω − β candidates (comma-separated)
    search_delta: float = 0.05  # β grid spacing
    search_batches: int = 0  # validation batches per candidate; 0 = train.eval_batches
    sample_steps: int = 0  # T denoising steps per block; 0 = L′ (first-hitting: one token per step)
    top_p: float = 0.9  # nucleus mass for sampling (the paper's 0.9)
    init_from: str = ""  # a run directory whose newest weights start this run (MDLM pre-train → fine-tune)


@dataclass
class DistributedConfig:
    """Training strategies (scalelab/distributed.py). ddp and diloco run under torchrun."""

    strategy: str = "single"  # single | ddp | diloco
    replicas: int = 0  # DiLoCo M; 0 = one replica per process. The world size must be a multiple of it
    inner_steps: int = 30  # DiLoCo H (the scaling-laws paper's default; the original paper used 500)
    outer_lr: float = 0.7  # outer SGD learning rate (Douillard et al. 2023: 0.7 is "very robust")
    outer_momentum: float = 0.9  # 0 = plain outer SGD (lr 1 and momentum 0 = parameter averaging)
    nesterov: bool = True
    link_gbps: float = 0.0  # > 0: sleep as a link of this bandwidth would for the slow (cross-replica) traffic
    link_latency_ms: float = 0.0  # per collective on the simulated link
    backend: str = "auto"  # auto (gloo for CPU tensors, NCCL for CUDA tensors) | gloo | nccl
    timeout_s: float = 300.0  # process-group formation and collective timeout
    fault_tolerance: str = "none"  # none | torchft (replica groups survive without restarts; torchft-nightly)
    lighthouse: str = ""  # torchft Lighthouse address; "" = $TORCHFT_LIGHTHOUSE


STRATEGIES = ("single", "ddp", "diloco")


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "diffusion": DiffusionConfig,
            "distributed": DistributedConfig}


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    name = f"{section}.{key}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(f)
    if isinstance(default, float):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{name} must be finite, got {value!r}")
        return f
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type")  # pragma: no cover


def from_dict(d: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, rejecting unknown sections and keys."""
    cfg = Config()
    for section, values in d.items():
        if section == "name":
            if not isinstance(values, str) or not values:
                raise ConfigError("name must be a non-empty string")
            cfg.name = values
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} (known: name, {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a table")
        if section == "train" and "bf16" in values:
            values = _bf16_alias(values)
        obj = getattr(cfg, section)
        known = {f.name for f in dataclasses.fields(obj)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown config key {section}.{key} (known: {', '.join(sorted(known))})")
            setattr(obj, key, _coerce(section, key, value, getattr(obj, key)))
    validate(cfg)
    return cfg


_bf16_warned = False


def _bf16_alias(train: dict[str, Any]) -> dict[str, Any]:
    """The deprecated `train.bf16` (to be removed in the next release) as `train.dtype`: bf16 = false is
    dtype = float32 and bf16 = true is dtype = auto (bfloat16 on CUDA, float32 on CPU: what the switch did),
    unless train.dtype is given as float32 or bfloat16, which wins. Warns once per process."""
    global _bf16_warned
    train = dict(train)
    bf16 = _coerce("train", "bf16", train.pop("bf16"), True)
    if train.get("dtype", "auto") == "auto":
        train["dtype"] = "auto" if bf16 else "float32"
    if not _bf16_warned:
        _bf16_warned = True
        logging.getLogger("scalelab").warning(
            "train.bf16 is deprecated; use train.dtype (bf16=true means dtype=auto: bfloat16 on CUDA, "
            "float32 on CPU; bf16=false means dtype=float32; an explicit train.dtype wins)")
    return train


def make_section(cls: type, section: str, values: dict[str, Any]) -> Any:
    """A dataclass section (search, sudoku, ...) from a dict, by the training config's rules: unknown keys are
    errors and values are type-checked against the defaults. Validation is the section's own."""
    obj = cls()
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {section}.{key} (known: {', '.join(sorted(known))})")
        setattr(obj, key, _coerce(section, key, value, getattr(obj, key)))
    return obj


def section_values(section: str, path: Path | None, overrides: list[str]) -> dict[str, Any]:
    """The `[section]` table of a TOML file, then `--set section.key=value` overrides on top."""
    d: dict[str, Any] = {}
    if path is not None:
        try:
            t = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except ValueError as e:  # TOMLDecodeError, UnicodeDecodeError, or int()'s limit of 4300 digits
            raise ConfigError(f"{path} is not valid TOML: {str(e).splitlines()[0]}") from None
        extra = [k for k in t if k != section]
        if extra:
            raise ConfigError(f"{path}: unknown table or key {extra[0]!r} (expected a [{section}] table)")
        if not isinstance(t.get(section, {}), dict):
            raise ConfigError(f"{path}: {section} must be a [{section}] table")
        d.update(t.get(section, {}))
    for item in overrides:
        parts, value = _parse_override(item)
        if parts[0] != section or len(parts) != 2:
            raise ConfigError(f"--set here takes {section}.KEY=VALUE, got {item!r}")
        d[parts[1]] = value
    return d


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) == 1 and parts[0] == "name":
        return parts, raw
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set key must look like section.key, got {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except ValueError:  # TOMLDecodeError (or an integer too long for int())
        value = raw  # bare strings need no quotes on the command line
    return parts, value


def recipe_names() -> list[str]:
    """The recipes shipped inside the package (`scalelab/recipes/*.toml`)."""
    from importlib import resources

    return sorted(p.name[:-5] for p in resources.files("scalelab").joinpath("recipes").iterdir()
                  if p.name.endswith(".toml"))


def recipe_path(recipe: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a shipped recipe (`tiny` or `tiny.toml`)."""
    from importlib import resources

    path = Path(recipe)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".toml") else path.name
    if path.parent == Path(".") or path.parts[:1] == ("recipes",):  # a bare name, or the old recipes/NAME.toml
        shipped = resources.files("scalelab").joinpath("recipes", f"{name}.toml")
        if shipped.is_file():
            return Path(str(shipped))
    raise ConfigError(f"recipe not found: {recipe} (a TOML file, or one of: {', '.join(recipe_names())})")


def load(recipe: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML recipe (or the defaults when None) and apply `section.key=value` overrides."""
    d: dict[str, Any] = {}
    if recipe is not None:
        path = recipe_path(recipe)
        try:
            d = tomllib.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # TOMLDecodeError, UnicodeDecodeError, or int()'s limit of 4300 digits
            raise ConfigError(f"recipe {path} is not valid TOML: {str(e).splitlines()[0]}") from None
        d.setdefault("name", path.stem)
    for item in overrides or []:
        parts, value = _parse_override(item)
        if parts == ["name"]:
            d["name"] = value
        else:
            sec = d.setdefault(parts[0], {})
            if not isinstance(sec, dict):
                raise ConfigError(f"config section {parts[0]!r} must be a table")
            sec[parts[1]] = value
    return from_dict(d)


def validate(cfg: Config) -> None:
    m, dcfg, t = cfg.model, cfg.data, cfg.train

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for name, value in [("model.context", m.context), ("model.d_model", m.d_model), ("model.n_layer", m.n_layer),
                        ("model.n_head", m.n_head), ("model.n_kv_head", m.n_kv_head),
                        ("data.vocab_size", dcfg.vocab_size), ("train.batch_size", t.batch_size),
                        ("train.grad_accum", t.grad_accum), ("train.max_steps", t.max_steps),
                        ("train.eval_every", t.eval_every), ("train.eval_batches", t.eval_batches),
                        ("train.ckpt_every", t.ckpt_every), ("train.keep_last", t.keep_last),
                        ("train.log_every", t.log_every)]:
        need(value >= 1, f"{name} must be >= 1, got {value}")
    for name in ("context", "d_model", "n_layer", "n_head", "n_kv_head", "ffn_hidden"):  # (memory runs out long before)
        need(getattr(m, name) < 2**31, f"model.{name} must be < 2^31, got {getattr(m, name)}")
    need(m.d_model % m.n_head == 0, f"model.n_head ({m.n_head}) must divide model.d_model ({m.d_model})")
    need(m.n_head % m.n_kv_head == 0, f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head})")
    need((m.d_model // m.n_head) % 2 == 0, f"head size d_model/n_head = {m.d_model // m.n_head} must be even for RoPE")
    need(m.norm in NORMS, f"model.norm must be one of {', '.join(NORMS)}, got {m.norm!r}")
    need(m.ffn_hidden >= 0, f"model.ffn_hidden must be >= 0, got {m.ffn_hidden}")
    need(m.norm_eps > 0, f"model.norm_eps must be > 0, got {m.norm_eps}")
    need(m.final_norm in ("", "layernorm", "rmsnorm", "dyt"),
         f"model.final_norm must be empty, layernorm, rmsnorm or dyt, got {m.final_norm!r}")
    need(m.dyt_alpha_attn >= 0 and m.dyt_alpha_other >= 0, "model.dyt_alpha_* must be >= 0 (0 = from the table)")
    need(m.rope_theta > 0, f"model.rope_theta must be > 0, got {m.rope_theta}")
    need(m.init_std > 0, f"model.init_std must be > 0, got {m.init_std}")
    need(2 <= dcfg.vocab_size <= 65535, f"data.vocab_size must be in [2, 65535] (tokens are uint16), got {dcfg.vocab_size}")
    need(257 <= dcfg.vocab_size, f"data.vocab_size must be >= 257 (byte-level BPE has 256 base tokens + end-of-text), got {dcfg.vocab_size}")
    need(0 < dcfg.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {dcfg.val_fraction}")
    need(dcfg.max_bytes >= 0, f"data.max_bytes must be >= 0, got {dcfg.max_bytes}")
    need(bool(dcfg.text_field.strip()), "data.text_field must name the field of a record that holds its text")
    need("".join(dcfg.loss_after.splitlines()) == dcfg.loss_after,
         f"data.loss_after marks a place within a line, so it cannot hold a line break, got {dcfg.loss_after!r}")
    need(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    need(0 <= t.warmup_steps <= t.max_steps, f"train.warmup_steps must be in [0, max_steps], got {t.warmup_steps}")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    need(t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}")
    need(t.threads >= 0, f"train.threads must be >= 0, got {t.threads}")
    need(t.schedule in ("cosine", "fms"), f"train.schedule must be cosine or fms, got {t.schedule!r}")
    need(t.probe_every >= 0, f"train.probe_every must be >= 0, got {t.probe_every}")
    need(t.dtype in DTYPES, f"train.dtype must be auto, float32 or bfloat16, got {t.dtype!r}")
    _validate_diffusion(cfg)
    _validate_distributed(cfg)
    need(t.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", t.device) is not None,
         f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")


BYTES_PER_PARAM = 16  # training in fp32: weights, gradients and AdamW's two moments, 4 bytes each


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation (MemAvailable of /proc/meminfo, else the free pages); None
    when this system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _bytes(n: int) -> str:
    """A byte count for people, of any size (a config can ask for an astronomically large model)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = min(len(units) - 1, (max(n, 1).bit_length() - 1) // 10)
    if n >= 1024 ** i * 10**6:
        return f"2^{n.bit_length() - 1} bytes"
    return f"{n / 1024 ** i:,.1f} {units[i]}"


def _count(n: int) -> str:
    if n < 10**15:
        return f"{n:,}"
    k = int(math.log10(n))
    return f"about {n / 10 ** k:.1f}e{k}"


def parse_widths(spec: str) -> list[float]:
    """diffusion.search_widths "0.5,0.6" -> [0.5, 0.6]; each in (0, 1]."""
    try:
        widths = [float(w) for w in spec.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"diffusion.search_widths must be comma-separated numbers, got {spec!r}") from None
    if not widths or not all(0 < w <= 1 for w in widths):
        raise ConfigError(f"diffusion.search_widths must be numbers in (0, 1], got {spec!r}")
    return widths


def _validate_diffusion(cfg: Config) -> None:
    d, ctx = cfg.diffusion, cfg.model.context

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(d.block_size >= 0, f"diffusion.block_size must be >= 0 (0 = autoregressive), got {d.block_size}")
    if not d.block_size:
        return
    need(not cfg.data.loss_after, "data.loss_after (answer-only loss) is for autoregressive runs; BD3-LM trains "
                                  "on every token")
    need(d.block_size <= ctx, f"diffusion.block_size ({d.block_size}) is longer than model.context ({ctx})")
    need(ctx % d.block_size == 0, f"diffusion.block_size ({d.block_size}) must divide model.context ({ctx})")
    need(0 <= d.sample_steps <= d.block_size,
         f"diffusion.sample_steps must be in [1, block_size = {d.block_size}] (0 = block_size), got {d.sample_steps}")
    need(0 < d.clip_lo <= d.clip_hi <= 1, f"need 0 < diffusion.clip_lo <= diffusion.clip_hi <= 1, "
                                          f"got [{d.clip_lo}, {d.clip_hi}]")
    need(0 < d.search_delta < 1, f"diffusion.search_delta must be in (0, 1), got {d.search_delta}")
    need(d.search_after >= 0 and d.search_batches >= 0, "diffusion.search_after and search_batches must be >= 0")
    need(0 < d.top_p <= 1, f"diffusion.top_p must be in (0, 1], got {d.top_p}")
    parse_widths(d.search_widths)


def _validate_distributed(cfg: Config) -> None:
    d = cfg.distributed

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(d.strategy in STRATEGIES, f"distributed.strategy must be single, ddp or diloco, got {d.strategy!r}")
    need(d.inner_steps >= 1, f"distributed.inner_steps (H) must be >= 1, got {d.inner_steps}")
    need(d.outer_lr > 0, f"distributed.outer_lr must be > 0, got {d.outer_lr}")
    need(0 <= d.outer_momentum < 1, f"distributed.outer_momentum must be in [0, 1), got {d.outer_momentum}")
    need(d.replicas >= 0, f"distributed.replicas must be >= 0 (0 = one per process), got {d.replicas}")
    need(d.link_gbps >= 0, f"distributed.link_gbps must be >= 0 (0 = no simulated link), got {d.link_gbps}")
    need(d.link_latency_ms >= 0, f"distributed.link_latency_ms must be >= 0, got {d.link_latency_ms}")
    need(d.backend in ("auto", "gloo", "nccl"), f"distributed.backend must be auto, gloo or nccl, got {d.backend!r}")
    need(d.timeout_s > 0, f"distributed.timeout_s must be > 0, got {d.timeout_s}")
    need(d.fault_tolerance in ("none", "torchft"),
         f"distributed.fault_tolerance must be none or torchft, got {d.fault_tolerance!r}")
    need(d.fault_tolerance == "none" or d.strategy == "diloco",
         "distributed.fault_tolerance=torchft needs distributed.strategy=diloco")
    need(d.fault_tolerance == "none" or not cfg.data.corpus.startswith("hf:"),
         "distributed.fault_tolerance=torchft does not support streamed (hf:) corpora yet")


def to_toml(cfg: Config) -> str:
    """Serialise a Config as TOML (flat tables of scalars, so a few lines of code suffice)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
        return repr(v)

    lines = [f"name = {fmt(cfg.name)}"]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for k, v in dataclasses.asdict(getattr(cfg, section)).items():
            lines.append(f"{k} = {fmt(v)}")
    return "\n".join(lines) + "\n"
