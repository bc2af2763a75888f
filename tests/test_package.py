"""scalelab is an installable package: the wheel carries its recipes, prompts and data, and a non-editable
install trains from a directory outside the checkout (recipes by name, no path into the source tree)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_overrides


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    try:  # build with the setuptools already here when there is one (no download)
        import setuptools  # noqa: F401

        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out),
                        str(ROOT)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (whl,) = out.glob("scalelab-*.whl")
    return whl


def test_wheel_holds_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {"recipes": (ROOT / "scalelab" / "recipes").glob("*.toml"),
               "prompts": (ROOT / "scalelab" / "prompts").glob("*.txt"),
               "data": (ROOT / "scalelab" / "data").glob("*.toml")}
    for folder, files in shipped.items():
        want = {f"scalelab/{folder}/{f.name}" for f in files}
        assert want and want <= names, (folder, want - names)
    for pkg in ("scalelab/search/__init__.py", "scalelab/papers/__init__.py", "scalelab/cli.py"):
        assert pkg in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]


def test_installed_package_trains_outside_the_checkout(wheel, tmp_path, corpus_dir, cache_dir):
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                        str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))  # the installed copy comes before the editable checkout
    where = subprocess.run([sys.executable, "-c", "import scalelab; print(scalelab.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    out = tmp_path / "run"
    sets = tiny_overrides(corpus_dir, cache_dir, **{"train.max_steps": 5, "train.eval_every": 5, "train.warmup_steps": 1})
    r = subprocess.run([sys.executable, "-m", "scalelab.cli", "train", "--recipe", "tiny", "--quiet", "--out", str(out),
                        *sets], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "report.md").is_file() and "val loss" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "scalelab.cli", "train", "--recipe", "nope"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "recipe not found" in bad.stderr and "tiny" in bad.stderr
