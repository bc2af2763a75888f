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
