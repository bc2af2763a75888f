"""Trainer: exact resume after a real SIGKILL, and every bad input ending in one line + exit 2."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli, tiny_overrides


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(str(last / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(corpus_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run_cli("train", "--quiet", "--out", str(out), *tiny_overrides(corpus_dir, cache_dir, **{"train.max_steps": 40}),
            check=True)
    return out


def test_run_directory_contents(reference_run):
    for name in ("config.toml", "metrics.jsonl", "report.md", "loss.png", "tokenizer.json", "data.json"):
        assert (reference_run / name).is_file(), name
    rows = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it learns
    assert all(r["val_bpb"] > 0 for r in evals)
    assert len(list((reference_run / "checkpoints").glob("step_*"))) == 2  # keep_last


def test_resume_after_sigkill_is_bitwise_exact(reference_run, corpus_dir, cache_dir, tmp_path):
    """Kill a real training process at random moments (twice), resume, and compare final weights bitwise."""
    out = tmp_path / "run"
    args = ["train", "--quiet", "--resume", "--out", str(out),
            *tiny_overrides(corpus_dir, cache_dir, **{"train.max_steps": 40})]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(1234)
    kills = 0
    for target in (rng.randint(6, 17), rng.randint(21, 34)):
        proc = subprocess.Popen([sys.executable, "-m", "scalelab.cli", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()
                     if x.endswith("}")] if metrics.exists() else []
            if steps and max(steps) >= target:
                time.sleep(rng.random() * 0.05)  # land anywhere in the next step, checkpoint writes included
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait(timeout=30)
    assert kills == 2, "the training finished before it could be killed"
    p = run_cli(*args, check=True)
    assert not any(c.name.startswith(".tmp") for c in (out / "checkpoints").iterdir())  # partial writes cleaned
    assert "val loss" in p.stdout
    want, got = final_weights(reference_run), final_weights(out)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))  # no duplicated or missing lines


def test_existing_run_is_not_overwritten(reference_run, corpus_dir, cache_dir):
    before = (reference_run / "report.md").read_text()
    ck = sorted((reference_run / "checkpoints").glob("step_*"))
    p = run_cli("train", "--quiet", "--out", str(reference_run), *tiny_overrides(corpus_dir, cache_dir))
    assert p.returncode == 2 and "already holds a run" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert (reference_run / "report.md").read_text() == before
    assert sorted((reference_run / "checkpoints").glob("step_*")) == ck


def test_resume_with_different_model_config(reference_run, corpus_dir, cache_dir, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    p = run_cli("train", "--quiet", "--resume", "--out", str(run),
                *tiny_overrides(corpus_dir, cache_dir, **{"model.d_model": 64}))
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: cannot resume {run} with a different model config (changed: model.d_model)"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete_state"])
def test_corrupt_checkpoint(reference_run, corpus_dir, cache_dir, tmp_path, damage):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    f = last / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garbage":
        f.write_bytes(b"\x00" * 64)
    else:
        (last / "state.json").unlink()
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for cmd in (["train", "--quiet", "--resume", "--out", str(run), *tiny_overrides(corpus_dir, cache_dir)],
                ["sample", "--run", str(run), "--prompt", "x"] if damage != "delete_state" else None):
        if cmd is None:
            continue
        p = run_cli(*cmd)
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "checkpoint" in p.stderr and "Traceback" not in p.stderr
    assert snapshot == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}  # nothing rewritten


def test_bad_inputs_exit_2_with_one_line(corpus_dir, cache_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    bad_recipe = tmp_path / "bad.toml"
    bad_recipe.write_text("[model]\nwidth = 3\n")
    cases = [
        (["--set", f'data.corpus="{tmp_path / "missing"}"'], "corpus not found"),
        (["--set", f'data.corpus="{empty}"'], "no UTF-8 text"),
        (["--set", "train.lr=-0.1"], "train.lr must be > 0"),
        (["--set", "model.n_head=3"], "must divide model.d_model"),
        (["--set", "train.bogus=1"], "unknown config key"),
        (["--recipe", str(bad_recipe)], "unknown config key model.width"),
        (["--recipe", str(tmp_path / "nope.toml")], "recipe not found"),
        (["--set", "model.context=100000"], "fewer than context+1"),
    ]
    for extra, msg in cases:
        p = run_cli("train", "--quiet", "--out", str(tmp_path / "o"), *tiny_overrides(corpus_dir, cache_dir), *extra)
        assert p.returncode == 2, (extra, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (extra, p.stderr)
    if os.geteuid() != 0:  # root writes anywhere; a file in the way fails for everyone
        p = run_cli("train", "--quiet", "--out", str(ro / "x"), *tiny_overrides(corpus_dir, cache_dir))
        assert p.returncode == 2 and "cannot write" in p.stderr
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    p = run_cli("train", "--quiet", "--out", str(blocker / "run"), *tiny_overrides(corpus_dir, cache_dir))
    assert p.returncode == 2 and "cannot write to output directory" in p.stderr
    p = run_cli("train", "--no-such-flag")
    assert p.returncode == 2 and p.stderr.startswith("error: No such option")


def test_sample_and_report(reference_run):
    p = run_cli("sample", "--run", str(reference_run), "--prompt", "def ", "-n", "2", "--max-tokens", "20", check=True)
    assert p.stdout.count("--- sample") == 2 and p.stdout.count("def ") >= 2
    again = run_cli("sample", "--run", str(reference_run), "--prompt", "def ", "-n", "2", "--max-tokens", "20")
    assert again.stdout == p.stdout  # seeded
    for bad in (["--temperature", "-1"], ["--top-p", "0"], ["-n", "0"]):
        q = run_cli("sample", "--run", str(reference_run), *bad)
        assert q.returncode == 2 and len(q.stderr.strip().splitlines()) == 1
    p = run_cli("report", "--run", str(reference_run), check=True)
    text = (reference_run / "report.md").read_text()
    assert "final val loss" in text and "bits/byte" in text and "![loss](loss.png)" in text
