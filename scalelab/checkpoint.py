"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically, the last N kept.

A checkpoint is a directory `checkpoints/step_NNNNNNN/` holding `model.safetensors`, `optim.safetensors`
(AdamW moments and step counts) and `state.json` (step, config, data position, RNG states, optimizer
hyper-parameters). It is written under a temporary name, fsynced and renamed into place, so a process killed
at any instant leaves either the previous checkpoints or the new one, never a half-written one. (Re-saving an
existing step moves the old directory aside as `.old-step_NNNNNNN` first; a kill between the two renames leaves
that complete old copy, which `list_checkpoints` lists in its place and the next `save` moves back.)

Test-only fault injection: `SCALELAB_TEST_CKPT_PAUSE=<phase>:<step>:<marker>` stops a save inside the write
so that a test can SIGKILL it there (see `_test_pause`; unset, it costs one environment lookup per save).
"""

from __future__ import annotations

import base64
import json
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


def _fsync_dir(path: Path) -> None:
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
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step after a resume: swap the old one out first
            old = ckpt_root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            _test_pause("replace", step)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_root)
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


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: state.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: state.json is not valid JSON") from None


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
        osd: dict[str, Any] = {"state": {}, "param_groups": state["optim_param_groups"]}
        for key, value in tensors.items():
            i, name = key.split(".", 1)
            osd["state"].setdefault(int(i), {})[name] = value
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
