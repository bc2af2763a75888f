import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scalelab.data import stdlib_files

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small real corpus: 60 standard-library modules (a few hundred KB)."""
    d = tmp_path_factory.mktemp("corpus")
    files = [f for f in stdlib_files() if f.stat().st_size > 2000][:60]
    for i, f in enumerate(files):
        shutil.copy(f, d / f"{i:03d}_{f.name}")
    return d


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_overrides(corpus_dir: Path, cache_dir: Path, **extra) -> list[str]:
    """--set arguments for a model that trains in a few seconds."""
    sets = {"data.corpus": str(corpus_dir), "data.cache_dir": str(cache_dir), "data.vocab_size": 512,
            "model.context": 32, "model.d_model": 32, "model.n_layer": 2, "model.n_head": 4, "model.n_kv_head": 2,
            "train.batch_size": 4, "train.max_steps": 30, "train.warmup_steps": 3, "train.eval_every": 10,
            "train.eval_batches": 2, "train.ckpt_every": 5, "train.log_every": 1, "train.threads": 1}
    sets.update(extra)
    out = []
    for k, v in sets.items():
        out += ["--set", f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}"]
    return out


def run_cli(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "scalelab.cli", *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"scalelab {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p


def gguf_type(value):
    """The GGUF value type a test means by a Python value (ints as llama.cpp writes them: UINT32)."""
    from gguf import GGUFValueType as T

    if isinstance(value, bool):
        return T.BOOL
    if isinstance(value, int):
        return T.UINT32 if 0 <= value < 2**32 else T.INT64
    if isinstance(value, float):
        return T.FLOAT32
    if isinstance(value, str):
        return T.STRING
    return T.ARRAY


def rewrite_gguf(src: Path, dst: Path, changes: dict | None = None, drop: tuple[str, ...] = (),
                 tensors: dict | None = None) -> Path:
    """Copy the GGUF file `src` to `dst` with metadata keys changed (`changes`: key -> value, typed by
    `gguf_type`), keys dropped, and tensors replaced (`tensors`: name -> array, or None to drop it)."""
    import gguf
    import numpy as np

    changes, tensors = changes or {}, tensors or {}
    r = gguf.GGUFReader(src)
    arch = changes.get("general.architecture", r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch if isinstance(arch, str) else "llama")
    if not isinstance(arch, str):  # replace what the writer wrote (it warns about the duplicate key)
        logging.getLogger("gguf.gguf_writer").disabled = True
        try:
            w.add_key_value("general.architecture", arch, gguf_type(arch),
                            sub_type=gguf_type(arch[0]) if isinstance(arch, list) and arch else None)
        finally:
            logging.getLogger("gguf.gguf_writer").disabled = False
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in changes:
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for key, value in changes.items():
        if key != "general.architecture":
            sub = gguf_type(value[0]) if isinstance(value, list) and value else None
            w.add_key_value(key, value, gguf_type(value), sub_type=sub)
    for t in r.tensors:
        if t.name in tensors:
            if tensors[t.name] is not None:
                w.add_tensor(t.name, np.ascontiguousarray(tensors[t.name], dtype=np.float32))
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


def micro_run(root: Path) -> tuple[Path, list[str]]:
    """Train a 4-step run in-process on a generated 0.1 MB corpus (a few seconds): (run dir, its --set args).
    It has config.toml, metrics.jsonl, data.json, tokenizer.json, report.md, loss.png and two checkpoints."""
    import random

    from scalelab import cli

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran over hills and rivers flowed to the seas".split()
    for i in range(40):
        (corpus / f"{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(30)))
    sets = {"data.corpus": str(corpus), "data.cache_dir": str(root / "cache"), "data.vocab_size": 300,
            "model.context": 16, "model.d_model": 16, "model.n_layer": 1, "model.n_head": 2, "model.n_kv_head": 1,
            "train.batch_size": 2, "train.max_steps": 4, "train.warmup_steps": 1, "train.eval_every": 2,
            "train.eval_batches": 1, "train.ckpt_every": 2, "train.log_every": 1, "train.threads": 1}
    args = [a for k, v in sets.items() for a in ("--set", f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}")]
    run = root / "run"
    try:
        cli.main(["train", "--quiet", "--out", str(run), *args])
    except SystemExit as e:  # main exits only on an error
        raise AssertionError(f"the micro run failed with exit status {e.code}") from None
    return run, args


def cli(*args) -> tuple[int, str, str]:
    """Run `scalelab ARGS` in this process (no 2 s interpreter start): (exit status, stdout, stderr)."""
    import contextlib
    import io
    import warnings

    from scalelab.cli import main

    def show(message, category, filename, lineno, file=None, line=None):  # as a fresh interpreter prints them
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    import torch

    out, err = io.StringIO(), io.StringIO()
    code = 0
    threads = torch.get_num_threads()  # `train.threads` must not leak into the rest of the suite
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("default")  # Python's default filters, not pytest's capture
        for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", quiet)
        warnings.showwarning = show
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def fails(args: list, msg: str) -> str:
    """Run `scalelab ARGS` in-process and assert a user error: exit status 2, one stderr line holding `msg`, no
    traceback. Returns the line."""
    code, _, err = cli(*args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and msg in lines[0] and "Traceback" not in err, (args, code, err)
    return lines[0]


def snapshot(*dirs: Path) -> dict[str, str]:
    """sha256 of every file under `dirs`."""
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


def contract(args: list, *watch: Path) -> int:
    """Run the CLI in-process and assert the error contract: success, or exit status 2 with exactly one non-empty
    line on stderr, no traceback, and no file under `watch` changed (none added either). Returns the status."""
    before = snapshot(*watch)
    code, _, err = cli(*args)
    assert "Traceback" not in err, err
    if code != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (code, err)
        assert len(lines) == 1, err
        assert snapshot(*watch) == before, f"a failed command changed files: {err}"
    return code
