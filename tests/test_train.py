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

from conftest import ROOT, fails, run_cli, tiny_overrides


DETERMINISTIC = ("step", "tokens", "lr", "loss", "grad_norm", "val_loss", "val_bpb")  # metrics without timings


def assert_same_final_state(want_run: Path, got_run: Path) -> None:
    """The last checkpoints hold bitwise-equal weights and optimizer state, and the metrics agree exactly."""
    want, got = (sorted((r / "checkpoints").glob("step_*"))[-1] for r in (want_run, got_run))
    assert want.name == got.name
    for name in ("model.safetensors", "optim.safetensors"):
        a, b = load_file(str(want / name)), load_file(str(got / name))
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    sa, sb = ({k: json.loads((c / "state.json").read_text())[k] for k in ("step", "tokens", "data", "rng")}
              for c in (want, got))
    assert sa == sb
    ra, rb = ([{k: r[k] for k in DETERMINISTIC if k in r} for r in map(json.loads, lines)]
              for lines in ((x / "metrics.jsonl").read_text().splitlines() for x in (want_run, got_run)))
    assert ra == rb  # no duplicated or missing lines, and the same numbers


def wait_for_pause(proc: subprocess.Popen, marker: Path, timeout: float = 60) -> int:
    """The pid that checkpoint._test_pause wrote into `marker` once `proc` sits inside a checkpoint write."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if marker.is_file() and (pid := marker.read_text()):
            return int(pid)
        assert proc.poll() is None, f"exited ({proc.returncode}) before pausing inside the checkpoint write"
        time.sleep(0.01)
    raise AssertionError("never paused inside the checkpoint write")


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
    assert_same_final_state(reference_run, out)


def test_sigkill_inside_a_checkpoint_write_resumes_bitwise_exact(reference_run, corpus_dir, cache_dir, tmp_path):
    """SIGKILL the trainer while it is inside the write of checkpoint 20 (tensors written, not yet renamed)."""
    from scalelab import checkpoint
    from scalelab.train import make_optimizer

    out, marker = tmp_path / "run", tmp_path / "paused"
    args = ["train", "--quiet", "--resume", "--out", str(out),
            *tiny_overrides(corpus_dir, cache_dir, **{"train.max_steps": 40})]
    env = dict(os.environ, PYTHONPATH=str(ROOT), SCALELAB_TEST_CKPT_PAUSE=f"tensors:20:{marker}")
    proc = subprocess.Popen([sys.executable, "-m", "scalelab.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_pause(proc, marker) == proc.pid
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpts = out / "checkpoints"
    assert [c.name for c in checkpoint.list_checkpoints(ckpts)] == ["step_0000010", "step_0000015"]
    [partial] = ckpts.glob(".tmp-step_0000020-*")  # the write the kill interrupted
    assert (partial / "optim.safetensors").is_file() and not (partial / "state.json").exists()
    cfg, model = checkpoint.load_run(out)  # the previous checkpoint still loads, whole
    assert checkpoint.load(ckpts / "step_0000015", model, make_optimizer(model, cfg.train))["step"] == 15
    (partial / "model.safetensors").write_bytes(b"\0" * 8)  # torn as well: resuming must not read it
    run_cli(*args, check=True)
    assert not any(c.name.startswith(".") for c in ckpts.iterdir())  # the partial write was cleaned up
    assert_same_final_state(reference_run, out)


REPLACE_SCRIPT = """
import sys, torch
from pathlib import Path
from scalelab import checkpoint
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 4)).sum().backward()
opt.step()
checkpoint.save(Path(sys.argv[1]), 5, model, opt, {"version": 1}, keep_last=2)
with torch.no_grad():
    model.weight.add_(1.0)
checkpoint.save(Path(sys.argv[1]), 5, model, opt, {"version": 2}, keep_last=2)  # re-save: pauses inside
"""


def test_sigkill_between_the_renames_of_a_resave_keeps_the_step(tmp_path):
    """Re-saving step 5 moves the old step_5 aside, then moves the new one in: a kill in between loses neither."""
    from scalelab import checkpoint

    root, marker = tmp_path / "checkpoints", tmp_path / "paused"
    env = dict(os.environ, PYTHONPATH=str(ROOT), SCALELAB_TEST_CKPT_PAUSE=f"replace:5:{marker}")
    proc = subprocess.Popen([sys.executable, "-c", REPLACE_SCRIPT, str(root)], env=env)
    try:
        wait_for_pause(proc, marker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (root / "step_0000005").exists()  # really killed between the two renames
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    [ck] = checkpoint.list_checkpoints(root)
    assert checkpoint.latest(root) == ck and checkpoint.load(ck, model, opt)["version"] == 1  # the complete old copy
    old_weight = model.weight.detach().clone()
    checkpoint.save(root, 6, model, opt, {"version": 3}, keep_last=5)  # the next save puts step 5 back
    assert sorted(c.name for c in root.iterdir()) == ["step_0000005", "step_0000006"]
    assert checkpoint.load(root / "step_0000005", model, opt)["version"] == 1
    assert torch.equal(model.weight, old_weight)


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


def test_bad_inputs_exit_2_with_one_line(corpus_dir, cache_dir, reference_run, tmp_path):  # its run warms the BPE cache
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
    for extra, msg in cases:  # in-process (no interpreter start per case); the last case runs as a real process
        fails(["train", "--quiet", "--out", tmp_path / "o", *tiny_overrides(corpus_dir, cache_dir), *extra], msg)
    if os.geteuid() != 0:  # root writes anywhere; a file in the way fails for everyone
        fails(["train", "--quiet", "--out", ro / "x", *tiny_overrides(corpus_dir, cache_dir)], "cannot write")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fails(["train", "--quiet", "--out", blocker / "run", *tiny_overrides(corpus_dir, cache_dir)],
          "cannot write to output directory")
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


# ------------------------------------------------------------------------------------------- train.dtype
@pytest.fixture(scope="module")
def bf16_run(corpus_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "run"
    run_cli("train", "--quiet", "--out", str(out),
            *tiny_overrides(corpus_dir, cache_dir, **{"train.dtype": "bfloat16"}), check=True)
    return out


def test_bf16_cpu_training_learns_with_fp32_master_weights(bf16_run, reference_run):
    assert 'dtype = "bfloat16"' in (bf16_run / "config.toml").read_text()  # the resolved dtype is recorded
    assert 'dtype = "float32"' in (reference_run / "config.toml").read_text()  # auto on CPU
    rows = [json.loads(line) for line in (bf16_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(train) == 30 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert train[-1]["loss"] < train[0]["loss"] - 0.5 and evals == sorted(evals, reverse=True)  # it learns
    # Autocast really ran: the same weights and batch at step 1 give a slightly different loss than fp32.
    fp32_first = json.loads((reference_run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert train[0]["loss"] != fp32_first and abs(train[0]["loss"] - fp32_first) < 0.05
    ck = sorted((bf16_run / "checkpoints").glob("step_*"))[-1]
    for name in ("model.safetensors", "optim.safetensors"):  # fp32 master weights and AdamW moments
        tensors = load_file(str(ck / name))
        assert {t.dtype for k, t in tensors.items() if t.is_floating_point()} == {torch.float32}, name


def test_bf16_resume_is_bitwise_exact(bf16_run, corpus_dir, cache_dir, tmp_path):
    """A bf16 run resumed from its step-25 checkpoint (the step-30 one lost) ends bitwise-equal to the
    uninterrupted run: CPU autocast is deterministic and the state it needs is all in the checkpoint."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(bf16_run, out)
    shutil.rmtree(out / "checkpoints" / "step_0000030")
    run_cli("train", "--quiet", "--resume", "--out", str(out),
            *tiny_overrides(corpus_dir, cache_dir, **{"train.dtype": "bfloat16"}), check=True)
    assert_same_final_state(bf16_run, out)


def test_train_dtype_validation_and_the_bf16_alias(corpus_dir, cache_dir, tmp_path, caplog):
    from scalelab import config
    from scalelab.errors import ConfigError
    from scalelab.train import resolve_dtype

    assert config.load("tiny").train.dtype == "auto" and "bf16" not in config.to_toml(config.load("tiny"))
    assert [resolve_dtype("auto", torch.device(d)) for d in ("cpu", "cuda")] == ["float32", "bfloat16"]
    config._bf16_warned = False
    with caplog.at_level("WARNING", logger="scalelab"):
        assert config.load("tiny", ["train.bf16=false"]).train.dtype == "float32"
        assert config.load("tiny", ["train.bf16=true"]).train.dtype == "auto"  # bf16 on CUDA, fp32 on CPU
        assert config.load("tiny", ["train.bf16=false", "train.dtype=bfloat16"]).train.dtype == "bfloat16"
    assert sum("train.bf16 is deprecated" in r.getMessage() for r in caplog.records) == 1  # once
    with pytest.raises(ConfigError, match="train.bf16 must be true or false"):
        config.load("tiny", ["train.bf16=maybe"])
    p = run_cli("train", "--quiet", "--out", str(tmp_path / "o"), *tiny_overrides(corpus_dir, cache_dir),
                "--set", "train.dtype=float16")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "train.dtype must be auto, float32 or bfloat16, got 'float16'" in lines[0]
    assert not (tmp_path / "o").exists()
