"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically, the last N kept.

A checkpoint is a directory `checkpoints/step_NNNNNNN/` holding `model.safetensors`, `optim.safetensors`
(AdamW moments and step counts) and `state.json` (step, config, data position, RNG states, optimizer
hyper-parameters). It is written under a temporary name, fsynced and renamed into place, so a process killed
at any instant leaves either the previous checkpoints or the new one, never a half-written one. (Re-saving an
existing step moves the old directory aside as `.old-step_NNNNNNN` first; a kill between the two renames leaves
that complete old copy, which `list_checkpoints` lists in its place and the next `save` moves back.)

`read_state` validates state.json (`check_state`: every key's type and range, the step against the directory's
name, the RNG state tried) and `load` checks the optimizer groups and moments against the optimizer, so a damaged
checkpoint is one CheckpointError naming the file and key before anything (the metrics truncation on resume
included) uses it.

Test-only fault injection: `SCALELAB_TEST_CKPT_PAUSE=<phase>:<step>:<marker>` stops a save inside the write
so that a test can SIGKILL it there (see `_test_pause`; unset, it costs one environment lookup per save).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from scalelab.errors import CheckpointError, ScalelabError

STEP_DIR = re.compile(r"^step_(\d{7})$")
OLD_DIR = re.compile(r"^\.old-(step_\d{7})$")  # an existing step moved aside while it is re-saved
TEST_PAUSE_ENV = "SCALELAB_TEST_CKPT_PAUSE"


def _test_pause(phase: str, step: int) -> None:
    """TEST-ONLY hook (tests/test_train.py, tests/test_distributed.py); never set SCALELAB_TEST_CKPT_PAUSE otherwise.

    With SCALELAB_TEST_CKPT_PAUSE=<phase>:<step>:<marker>, the first process that reaches `phase` while saving
    `step` creates the file `marker` (exclusively), writes its pid into it and sleeps 60 s, so that the test can
    SIGKILL it exactly there. A process that finds the marker already there (e.g. a restarted one) goes on.
    Phases: "tensors" (model and optimizer tensors written into the temp dir; state.json, fsync and rename still
    to come) and "replace" (an existing checkpoint of the same step moved aside, the new one not moved in yet).
    """
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec:
        return
    want_phase, want_step, marker = spec.split(":", 2)
    if want_phase != phase or int(want_step) != step:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(60)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries, after renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rng_state() -> dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(s: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(s["torch"])), dtype=torch.uint8))


def save(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".tmp-step_*"):  # left by a process killed mid-write (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    for old in ckpt_root.glob(".old-step_*"):  # left by a kill between the two renames of a re-save
        m = OLD_DIR.match(old.name)
        if m and not (ckpt_root / m.group(1)).exists():
            os.replace(old, ckpt_root / m.group(1))  # the only copy of that step: put it back
        else:
            shutil.rmtree(old, ignore_errors=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:07d}-", dir=ckpt_root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        meta = dict(state, step=step)
        if optimizer is not None:
            osd = optimizer.state_dict()
            tensors = {f"{i}.{k}": v.detach().contiguous() for i, s in osd["state"].items() for k, v in s.items()}
            save_file(tensors, str(tmp / "optim.safetensors"))
            meta["optim_param_groups"] = osd["param_groups"]
        _test_pause("tensors", step)
        (tmp / "state.json").write_text(json.dumps(meta))
        for f in tmp.iterdir():
            _fsync_file(f)
        fsync_path(tmp)
        if final.exists():  # re-saving a step after a resume: swap the old one out first
            old = ckpt_root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            _test_pause("replace", step)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first: every `step_N`, and a `.old-step_N` whose `step_N` is missing (a kill
    between the two renames of a re-save of step N; it is the complete previous copy of step N)."""
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.iterdir() if p.is_dir()]
    found = {p.name: p for p in dirs if STEP_DIR.match(p.name)}
    for p in dirs:
        if m := OLD_DIR.match(p.name):
            found.setdefault(m.group(1), p)
    return [found[k] for k in sorted(found)]


def latest(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


# Keys `train --resume` reads from a checkpoint's state.json besides `step` (and `optim_param_groups`, which
# `load` requires whenever it restores an optimizer).
RESUME_KEYS = ("config", "data", "rng", "tokens", "elapsed")
_MISSING = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, float) and math.isfinite(v)


def _show(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class _Corrupt:
    """Raises the CheckpointError for one bad key of one state.json."""

    def __init__(self, f: Path):
        self.f = f

    def __call__(self, key: str, why: str, value: Any = _MISSING) -> None:
        got = "" if value is _MISSING else f" (got {_show(value)})"
        raise CheckpointError(f"checkpoint {self.f} is corrupt: {key} {why}{got}")


def _check_torch_rng(b64: Any, bad: _Corrupt) -> None:
    """A base64 CPU generator state that torch accepts (tried, then the current state is put back)."""
    if not isinstance(b64, str):
        bad("rng.torch", "must be a base64 string", b64)
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError:
        bad("rng.torch", "is not valid base64", b64)
    current = torch.get_rng_state()
    if len(raw) != len(current):
        bad("rng.torch", f"must decode to a {len(current)}-byte torch generator state, not {len(raw)} bytes")
    try:
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    except (RuntimeError, ValueError) as e:
        bad("rng.torch", f"is not a torch generator state ({str(e).splitlines()[0]})")
    finally:
        torch.set_rng_state(current)


def stream_position_problem(pos: Any) -> str:
    """What is wrong with a streamed corpus's data position (data.StreamBatches.position), as "<.key> <why>",
    or "" when it is valid: integers epoch, docs, offset >= 0, and hf (the stream's state_dict before the
    document) an object, or null at the start of an epoch (docs = 0)."""
    if not isinstance(pos, dict):
        return " must be an object with integers epoch, docs, offset and hf (null or an object)"
    for k in ("epoch", "docs", "offset"):
        if not (_is_int(pos.get(k)) and pos[k] >= 0):
            return f".{k} must be a non-negative integer"
    if "hf" not in pos or not (pos["hf"] is None or isinstance(pos["hf"], dict)):
        return ".hf must be null or the stream's state object"
    if pos["docs"] and pos["hf"] is None:
        return ".hf must be the stream's state object when docs > 0"
    return ""


def check_state(state: Any, path: Path, need: tuple[str, ...] = ()) -> None:
    """Validate a checkpoint's parsed state.json: the type and range of every key it has that scalelab reads,
    `step` always and each of `need` (e.g. RESUME_KEYS) required. Raises CheckpointError naming file and key."""
    bad = _Corrupt(path / "state.json")
    if not isinstance(state, dict):
        bad("the file", "must hold a JSON object", state)
    for key in ("step", *need):
        if key not in state:
            bad(key, "is missing")
    for key in ("step", "tokens"):
        if key in state and not (_is_int(state[key]) and state[key] >= 0):
            bad(key, "must be a non-negative integer", state[key])
    m = STEP_DIR.match(path.name) or OLD_DIR.match(path.name)  # step_NNNNNNN, or .old-step_NNNNNNN
    if m and state["step"] != int(m.group(1)[-7:]):  # a wrong step would truncate good metrics on resume
        bad("step", f"must be {int(m.group(1)[-7:])}, the step in the checkpoint's name", state["step"])
    if "elapsed" in state and not (_is_number(state["elapsed"]) and state["elapsed"] >= 0):
        bad("elapsed", "must be a finite number >= 0", state["elapsed"])
    if "config" in state:
        cfg = state["config"]
        if not isinstance(cfg, dict):
            bad("config", "must be an object", cfg)
        if "distributed" in cfg:  # distributed.check_strategy reads config.distributed.strategy
            dist = cfg["distributed"]
            if not isinstance(dist, dict):
                bad("config.distributed", "must be an object", dist)
            if "strategy" in dist and not isinstance(dist["strategy"], str):
                bad("config.distributed.strategy", "must be a string", dist["strategy"])
    if "data" in state:  # data.Batches.load_state, or data.StreamBatches.load_state (a streamed corpus)
        data = state["data"]
        if not isinstance(data, dict):
            bad("data", "must be an object with integers epoch and index", data)
        if "ranks" in data:
            ranks = data["ranks"]
            if not (isinstance(ranks, list) and ranks):
                bad("data.ranks", "must be a non-empty list of positions, one per data rank", ranks)
            for i, pos in enumerate(ranks):
                if why := stream_position_problem(pos):
                    bad(f"data.ranks[{i}]{why.split(' ', 1)[0]}", why.split(" ", 1)[1], pos)
        else:
            for k in ("epoch", "index"):
                if not (_is_int(data.get(k)) and data[k] >= 0):
                    bad(f"data.{k}", "must be a non-negative integer", data.get(k))
    if "rng" in state:  # set_rng_state
        rng = state["rng"]
        if not isinstance(rng, dict):
            bad("rng", "must be an object", rng)
        if "torch" not in rng:
            bad("rng.torch", "is missing")
        _check_torch_rng(rng["torch"], bad)
    if state.get("diffusion") is not None:  # diffusion.BD3Objective.load_state
        clip = state["diffusion"].get("clip") if isinstance(state["diffusion"], dict) else None
        if not (isinstance(clip, list) and len(clip) == 2 and all(_is_number(c) for c in clip)):
            bad("diffusion", 'must be {"clip": [low, high]} with two finite numbers', state["diffusion"])
    if "optim_param_groups" in state:  # the structure here; `load` checks it against the optimizer
        groups = state["optim_param_groups"]
        if not (isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups)):
            bad("optim_param_groups", "must be a non-empty list of objects", groups)
        ids = []
        for i, g in enumerate(groups):
            params = g.get("params")
            if not (isinstance(params, list) and all(_is_int(p) for p in params)):
                bad(f"optim_param_groups[{i}].params", "must be a list of integers", params)
            ids += params
        if ids != list(range(len(ids))):
            bad("optim_param_groups", f"must number the parameters 0..{len(ids) - 1} in order, as torch saves them")


def read_state(path: Path, need: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint's state.json, validated by `check_state` (with the keys in `need` required)."""
    f = path / "state.json"
    try:
        state = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: state.json is missing") from None
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, an int over 4300 digits, nesting
        raise CheckpointError(f"checkpoint {path} is corrupt: state.json is not valid JSON") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {f}: {e.strerror}") from None
    check_state(state, path, need)
    return state


def _check_param_groups(saved: list[dict], optimizer: torch.optim.Optimizer, bad: _Corrupt) -> None:
    """`saved` (structure checked by check_state) fits `optimizer`: as many groups and parameters, and every
    hyper-parameter the optimizer uses with a usable value. A flag (a bool or None now) may be absent (torch
    fills in its default) but must otherwise equal the optimizer's own (amsgrad, capturable, differentiable ...
    change which state the step needs); a number must be finite and >= 0, `betas` in [0, 1)."""
    current = optimizer.param_groups
    if len(saved) != len(current):
        bad("optim_param_groups", f"has {len(saved)} parameter group(s); this optimizer has {len(current)}")
    for i, (s, c) in enumerate(zip(saved, current)):
        where = f"optim_param_groups[{i}]"
        if len(s["params"]) != len(c["params"]):
            bad(f"{where}.params", f"has {len(s['params'])} parameters; this model's group has {len(c['params'])}")
        for key, mine in c.items():
            if key == "params":
                continue
            value = s.get(key, _MISSING)
            if mine is None or isinstance(mine, bool):
                if value is not _MISSING and value != mine:
                    bad(f"{where}.{key}", f"must be {json.dumps(mine)}, as this optimizer has it", value)
            elif value is _MISSING:
                bad(f"{where}.{key}", "is missing")
            elif isinstance(mine, (tuple, list)):
                lo, hi = (0.0, 1.0) if key == "betas" else (0.0, math.inf)
                if not (isinstance(value, list) and len(value) == len(mine)
                        and all(_is_number(v) and lo <= v < hi for v in value)):
                    bad(f"{where}.{key}", f"must be a list of {len(mine)} numbers in [{lo}, {hi})", value)
            elif isinstance(mine, (int, float, torch.Tensor)):
                if not (_is_number(value) and value >= 0):
                    bad(f"{where}.{key}", "must be a finite number >= 0", value)
            elif value != mine:
                bad(f"{where}.{key}", f"must be {_show(mine)}, as this optimizer has it", value)


def _optimizer_state(f: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """optim.safetensors' `<param id>.<name>` tensors as a state_dict()["state"], each fitting its parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        i, _, name = key.partition(".")
        if not (i.isascii() and i.isdigit() and int(i) < len(params) and name):
            raise CheckpointError(f"checkpoint {f} is corrupt: unexpected tensor {key!r}")
        if value.dim() and value.shape != params[int(i)].shape:
            raise CheckpointError(f"checkpoint {f} does not fit this model: {key} has shape {list(value.shape)}, "
                                  f"the parameter {list(params[int(i)].shape)}")
        out.setdefault(int(i), {})[name] = value
    return out


def load_weights(path: Path, model: torch.nn.Module) -> None:
    f = path / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: model.safetensors is missing")
    try:
        missing, unexpected = load_model(model, str(f), strict=False)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {f} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {f} does not fit this model: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {f} does not fit this model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore weights (and optimizer state) from a checkpoint directory; return its state.json."""
    state = read_state(path)
    load_weights(path, model)
    if optimizer is not None:
        f = path / "optim.safetensors"
        try:
            tensors = load_file(str(f))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is incomplete: optim.safetensors is missing") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {f} is corrupt or truncated ({str(e).splitlines()[0]})") from None
        if "optim_param_groups" not in state:
            raise CheckpointError(f"checkpoint {path / 'state.json'} is corrupt: optim_param_groups is missing")
        _check_param_groups(state["optim_param_groups"], optimizer, _Corrupt(path / "state.json"))
        osd = {"state": _optimizer_state(f, tensors, optimizer), "param_groups": state["optim_param_groups"]}
        try:
            optimizer.load_state_dict(osd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"optimizer state in {path} does not fit this model: {e}") from None
    return state


def load_run(run_dir: Path):
    """The config and the newest weights of a run, in eval mode (its tokenizer is `run_dir/tokenizer.json`).

    Reading a run needs only the config and the model: inference never imports the trainer."""
    from scalelab import config as configmod
    from scalelab.model import Transformer

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise ScalelabError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = configmod.load(cfg_path)
    ck = latest(run_dir / "checkpoints")
    if ck is None:
        raise ScalelabError(f"run {run_dir} has no checkpoint yet")
    model = Transformer(cfg.model)
    load_weights(ck, model)
    model.eval()
    return cfg, model
