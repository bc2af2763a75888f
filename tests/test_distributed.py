"""Strategies: DiLoCo's oracles (AdamW, parameter averaging, Nesterov, bytes), DDP, real kills, bad inputs.

Every multi-process test launches real torchrun jobs (gloo, 127.0.0.1, one thread per process) under a
timeout, on a ~47k-parameter model so that the whole file stays around two minutes on two cores.
"""

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, fails, run_cli, tiny_overrides
from test_train import DETERMINISTIC, wait_for_pause

STEPS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", COLUMNS="400")


def torchrun_cmd(nproc: int, args: list[str], restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts",
            str(restarts), "-m", "scalelab.cli", *args]


def torchrun(nproc: int, args: list[str], timeout: float = 120, restarts: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, args, restarts), capture_output=True, text=True, timeout=timeout,
                          env=env())


def sets(corpus_dir, cache_dir, **extra) -> list[str]:
    base = {"train.max_steps": STEPS, "train.eval_every": 6, "train.ckpt_every": 6, "distributed.timeout_s": 30}
    return tiny_overrides(corpus_dir, cache_dir, **{**base, **extra})


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(str(last / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_ok(nproc: int, out: Path, args: list[str], **kw) -> subprocess.CompletedProcess:
    p = torchrun(nproc, ["train", "--quiet", "--out", str(out), *args], **kw)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def single(corpus_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    run_cli("train", "--quiet", "--out", str(out), *sets(corpus_dir, cache_dir), check=True)
    return out


@pytest.fixture(scope="module")
def diloco2(corpus_dir, cache_dir, tmp_path_factory):
    """M=2 processes, H=3, outer SGD lr 1 without momentum: parameter averaging every 3 steps."""
    out = tmp_path_factory.mktemp("diloco2") / "run"
    train_ok(2, out, ["--strategy", "diloco", *sets(corpus_dir, cache_dir, **{
        "distributed.inner_steps": 3, "distributed.outer_lr": 1.0, "distributed.outer_momentum": 0.0})])
    return out


# ------------------------------------------------------------------------------------------------ oracles
def test_nesterov_outer_step_matches_hand_computation():
    from scalelab.config import DistributedConfig
    from scalelab.distributed import make_outer_optimizer, nesterov_outer_step

    theta = torch.tensor([1.0, -2.0, 0.5])
    p = theta.clone().requires_grad_(False)
    opt = make_outer_optimizer([p], DistributedConfig())  # lr 0.7, momentum 0.9, Nesterov
    lr, mu = 0.7, 0.9
    deltas = [torch.tensor([0.1, 0.2, -0.3]), torch.tensor([0.05, -0.1, 0.0]), torch.tensor([-0.2, 0.3, 0.1])]
    want, buf = theta.clone(), None
    for d in deltas:  # b ← μ·b + Δ (b₁ = Δ₁); θ ← θ − η·(Δ + μ·b)
        buf = d.clone() if buf is None else mu * buf + d
        want = want - lr * (d + mu * buf)
        nesterov_outer_step([p], [d.clone()], opt)
        assert torch.allclose(p, want, atol=1e-7), (p, want)
    # The notes' anchors: a constant outer gradient 1 moves 1.33, then 1.897, then 2.4073 (×1.33 overshoot first).
    q = torch.zeros(1)
    opt = make_outer_optimizer([q], DistributedConfig())
    moves = []
    for _ in range(3):
        before = q.clone()
        nesterov_outer_step([q], [torch.ones(1)], opt)
        moves.append((before - q).item())
    assert moves == pytest.approx([1.33, 1.897, 2.4073], abs=1e-5)
    # Sign: Δ = θ_global − θ_local, so outer SGD lr 1 without momentum lands exactly on the local weights.
    g, local = torch.tensor([1.0]), torch.tensor([0.25])
    opt = make_outer_optimizer([g], DistributedConfig(outer_lr=1.0, outer_momentum=0.0))
    nesterov_outer_step([g], [g - local], opt)
    assert g.item() == 0.25


def test_m1_h1_outer_lr1_reproduces_adamw(single, corpus_dir, cache_dir, tmp_path):
    out = tmp_path / "m1"
    train_ok(1, out, ["--strategy", "diloco", *sets(corpus_dir, cache_dir, **{
        "distributed.inner_steps": 1, "distributed.outer_lr": 1.0, "distributed.outer_momentum": 0.0})])
    assert max_diff(weights(single), weights(out)) < 1e-6
    assert rows(out)[-1]["val_loss"] == pytest.approx(rows(single)[-1]["val_loss"], abs=1e-5)


def reference_parameter_averaging(cfg, M: int, H: int) -> dict[str, torch.Tensor]:
    """M AdamW replicas on their B/M shards, parameters averaged every H steps: written from the paper, not the code."""
    from scalelab import data as datamod
    from scalelab.model import loss_fn
    from scalelab.train import build_model, lr_at, make_optimizer

    t = cfg.train
    prepared = datamod.prepare(cfg.data)
    models = [build_model(cfg, prepared.meta["vocab_size"]) for _ in range(M)]
    opts = [make_optimizer(m, t) for m in models]
    data = [datamod.Batches(prepared.tokens("train"), cfg.model.context, t.batch_size // M, t.seed, m, M)
            for m in range(M)]
    for step in range(t.max_steps):
        for model, opt, batches in zip(models, opts, data):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, t)
            x, y = batches.next()
            loss_fn(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if (step + 1) % H == 0 or step + 1 == t.max_steps:
            with torch.no_grad():
                for ps in zip(*(m.parameters() for m in models)):
                    avg = torch.stack(ps).mean(0)
                    for p in ps:
                        p.copy_(avg)
    return {k: v.detach().clone() for k, v in models[0].state_dict().items()}


def test_outer_lr1_without_momentum_is_parameter_averaging(diloco2, single, corpus_dir, cache_dir):
    from scalelab import config as configmod

    torch.set_num_threads(1)
    cfg = configmod.load(None, sets(corpus_dir, cache_dir)[1::2])
    want = reference_parameter_averaging(cfg, M=2, H=3)
    got = weights(diloco2)
    want = {k: want[k] for k in got}  # the tied lm_head is stored once
    assert max_diff(want, got) < 1e-5
    # and it is really DiLoCo, not single training: the replicas moved apart between syncs
    assert max_diff(weights(single), got) > 1e-3


def test_bytes_counted_equal_parameter_bytes_times_syncs(diloco2, single, corpus_dir, cache_dir, tmp_path):
    n_params = sum(v.numel() for v in weights(single).values())
    pbytes = 4 * n_params
    last = [r for r in rows(diloco2) if "loss" in r][-1]
    syncs = STEPS // 3
    assert last["comm_calls"]["outer"] == syncs
    assert last["comm_by_kind"]["outer"] == pbytes * syncs == last["comm_bytes_total"]
    assert last["comm_wire_bytes_total"] == 2 * pbytes * (2 - 1) // 2 * syncs  # ring all-reduce, M = 2
    per_step = [r["comm_bytes"] for r in rows(diloco2) if "loss" in r]  # log_every = 1: bytes of each step
    assert per_step == [pbytes if (i + 1) % 3 == 0 else 0 for i in range(STEPS)]
    # DDP: one gradient all-reduce of every parameter per step; the simulated link charges its wire bytes.
    out = tmp_path / "ddp"
    gbps = 0.05
    train_ok(2, out, ["--strategy", "ddp", *sets(corpus_dir, cache_dir, **{"distributed.link_gbps": gbps})])
    last = [r for r in rows(out) if "loss" in r][-1]
    assert last["comm_by_kind"]["grad"] == pbytes * STEPS == last["comm_bytes_total"]
    assert last["link_s_total"] == pytest.approx(STEPS * pbytes * 8 / (gbps * 1e9), rel=1e-5)
    assert max_diff(weights(single), weights(out)) < 1e-5  # DDP = single training on the same global batch


def test_replica_of_two_processes_matches_replica_of_one(diloco2, single, corpus_dir, cache_dir, tmp_path):
    """M=2 replicas of R=2 processes each (DDP inside a replica) = M=2 replicas of one process."""
    out = tmp_path / "r2"
    train_ok(4, out, ["--strategy", "diloco", *sets(corpus_dir, cache_dir, **{
        "distributed.replicas": 2, "distributed.inner_steps": 3, "distributed.outer_lr": 1.0,
        "distributed.outer_momentum": 0.0})], timeout=180)
    assert max_diff(weights(diloco2), weights(out)) < 1e-5
    last = [r for r in rows(out) if "loss" in r][-1]
    pbytes = 4 * sum(v.numel() for v in weights(single).values())
    assert last["comm_by_kind"]["outer"] == pbytes * (STEPS // 3)  # each rank all-reduces the full Δ across replicas
    assert last["comm_calls"]["grad"] == STEPS  # the DDP all-reduce inside the replica, every step


# ------------------------------------------------------------------------------------------------- faults
def worker_pids(agent: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the torchrun agent's worker processes."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent.pid:
                continue
            envs = dict(x.split("=", 1) for x in (d / "environ").read_bytes().decode().split("\0") if "=" in x)
            out[int(envs["RANK"])] = int(d.name)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return out


FAULT_STEPS, FAULT_H = 48, 4


@pytest.fixture(scope="module")
def fault_ref(corpus_dir, cache_dir, tmp_path_factory):
    """The config of the kill tests (M=2, H=4, a checkpoint at every outer step) and its fault-free run."""
    cfg = sets(corpus_dir, cache_dir, **{"train.max_steps": FAULT_STEPS, "train.ckpt_every": FAULT_H,
                                         "train.eval_every": 24, "train.log_every": 1,
                                         "distributed.inner_steps": FAULT_H, "distributed.link_latency_ms": 40.0})
    ref = tmp_path_factory.mktemp("fault_ref") / "run"
    train_ok(2, ref, ["--strategy", "diloco", *cfg], timeout=180)
    return cfg, ref


def assert_bitwise_same_run(want: Path, got: Path) -> None:
    """Same final global weights, outer optimizer state and inner AdamW states, bit for bit, and the same metrics."""
    a, b = (sorted((r / "checkpoints").glob("step_*"))[-1] for r in (want, got))
    step = a.name
    assert b.name == step
    inner = sorted((want / "checkpoints" / "inner").glob(f"{step}-*"))
    files = [a / "model.safetensors", a / "optim.safetensors", *inner]
    assert len(files) == 4  # and one inner state per replica
    for f in files:
        x, y = load_file(str(f)), load_file(str(got / f.relative_to(want)))
        assert x.keys() == y.keys(), f.name
        for k in x:
            assert torch.equal(x[k], y[k]), (f.name, k)
    assert [{k: r[k] for k in DETERMINISTIC if k in r} for r in rows(want)] == \
        [{k: r[k] for k in DETERMINISTIC if k in r} for r in rows(got)]


def test_sigkill_of_a_worker_resumes_from_the_last_outer_step(fault_ref, tmp_path):
    """Kill one worker mid-run (SIGKILL); torchrun restarts the job, which resumes from the last outer step."""
    (cfg, ref), steps, H = fault_ref, FAULT_STEPS, FAULT_H
    out = tmp_path / "killed"
    cmd = torchrun_cmd(2, ["train", "--quiet", "--resume", "--out", str(out), "--strategy", "diloco", *cfg], restarts=2)
    agent = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and agent.poll() is None:
            done = [r["step"] for r in rows(out) if "loss" in r] if (out / "metrics.jsonl").is_file() else []
            if done and done[-1] >= 21:
                pids = worker_pids(agent)
                if 1 in pids:
                    os.kill(pids[1], signal.SIGKILL)  # a non-writer worker, in the middle of a round
                    killed_at = done[-1]
                    break
            time.sleep(0.01)
        _, err = agent.communicate(timeout=150)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert killed_at is not None, "the run finished before it could be killed"
    assert agent.returncode == 0, err[-3000:]
    assert "exitcode: -9" in err  # the SIGKILL, seen by torchrun, which restarted the workers
    train_rows = [r for r in rows(out) if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))  # the lost steps were redone, once
    resumed = [int(m) for m in re.findall(r"resuming .* from step (\d+)", err)]
    assert resumed and resumed[0] % H == 0 and killed_at - resumed[0] <= H + 1
    # CPU and gloo are deterministic: the resumed run ends on the very state of the fault-free one, bit for bit
    assert_bitwise_same_run(ref, out)


def test_sigkill_inside_an_outer_step_checkpoint_write_resumes_bitwise_exact(fault_ref, tmp_path):
    """SIGKILL rank 0 while it is inside the write of the step-24 global checkpoint (the inner states of step 24
    are already on disk, the global one is not renamed yet); a new torchrun --resume ends on the very same state."""
    from scalelab import checkpoint
    from scalelab.distributed import make_outer_optimizer

    cfg, ref = fault_ref
    out, marker = tmp_path / "killed", tmp_path / "paused"
    args = ["train", "--quiet", "--resume", "--out", str(out), "--strategy", "diloco", *cfg]
    agent = subprocess.Popen(torchrun_cmd(2, args), env=dict(env(), SCALELAB_TEST_CKPT_PAUSE=f"tensors:24:{marker}"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for_pause(agent, marker)
        assert worker_pids(agent).get(0) == pid  # the writer
        os.kill(pid, signal.SIGKILL)
        _, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0 and "exitcode: -9" in err, err[-3000:]
    ckpts = out / "checkpoints"
    assert [c.name for c in checkpoint.list_checkpoints(ckpts)] == ["step_0000016", "step_0000020"]
    [partial] = ckpts.glob(".tmp-step_0000024-*")
    assert not (partial / "state.json").exists()
    assert sorted(f.name for f in (ckpts / "inner").glob("step_0000024-*")) == [  # ahead of the global state
        "step_0000024-replica0.safetensors", "step_0000024-replica1.safetensors"]
    # the previous outer step still loads: global model, outer SGD state, both inner AdamW states
    run_cfg, model = checkpoint.load_run(out)
    outer = make_outer_optimizer(list(model.parameters()), run_cfg.distributed)
    assert checkpoint.load(ckpts / "step_0000020", model, outer)["step"] == 20
    for m in (0, 1):
        assert load_file(str(ckpts / "inner" / f"step_0000020-replica{m}.safetensors"))
    (partial / "model.safetensors").write_bytes(b"\0" * 8)  # torn as well: resuming must not read it
    p = torchrun(2, args, timeout=150)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.findall(r"resuming .* from step (\d+)", p.stderr) == ["20", "20"]  # both ranks, the same outer step
    assert not any(c.name.startswith(".") for c in ckpts.iterdir())  # the partial write was cleaned up
    assert_bitwise_same_run(ref, out)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_distributed_inputs_exit_2_with_one_line(corpus_dir, cache_dir, tmp_path):
    base = sets(corpus_dir, cache_dir)
    for extra, msg in [(["--strategy", "diloco"], "needs torchrun"),
                       (["--strategy", "ddp"], "needs torchrun"),
                       (["--strategy", "diloco", "--set", "distributed.inner_steps=0"], "inner_steps (H) must be >= 1"),
                       (["--strategy", "diloco", "--set", "distributed.outer_lr=0"], "outer_lr must be > 0"),
                       (["--strategy", "fedavg"], "distributed.strategy must be")]:
        fails(["train", "--quiet", "--out", tmp_path / "o", *base, *extra], msg)


def test_world_not_divisible_into_replicas_fails_fast_on_every_rank(diloco2, corpus_dir, cache_dir, tmp_path):
    t0 = time.time()
    p = torchrun(2, ["train", "--quiet", "--out", str(tmp_path / "o"), "--strategy", "diloco",
                     *sets(corpus_dir, cache_dir, **{"distributed.replicas": 3})], timeout=60)
    assert p.returncode != 0 and time.time() - t0 < 60
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert errors == ["error: world size 2 is not divisible into distributed.replicas=3 replicas"]
    assert "exitcode  : 2" in p.stderr  # each worker's own status
    # an existing run: rank 0 says so once, the other rank exits with it
    run = tmp_path / "exists"
    run.mkdir()
    (run / "config.toml").write_text("name = 'x'\n")
    p = torchrun(2, ["train", "--quiet", "--out", str(run), "--strategy", "ddp", *sets(corpus_dir, cache_dir)],
                 timeout=60)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode != 0 and len(errors) == 1 and "already holds a run" in errors[0], p.stderr[-2000:]
    # a DiLoCo checkpoint (global model + outer SGD state) resumed as DDP
    import shutil

    run = tmp_path / "dl"
    shutil.copytree(diloco2, run)
    p = torchrun(2, ["train", "--quiet", "--resume", "--out", str(run), "--strategy", "ddp",
                     *sets(corpus_dir, cache_dir, **{"train.max_steps": STEPS + 3})], timeout=60)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert errors == [f"error: checkpoint {run}/checkpoints/step_{STEPS:07d} was written by strategy diloco; "
                      "resume it with --strategy diloco"], p.stderr[-2000:]


def test_a_node_that_cannot_join_times_out_with_one_line(corpus_dir, cache_dir, tmp_path):
    """Rank 0 of a 2-process static launch whose rank 1 never comes: exit 2 after distributed.timeout_s."""
    e = dict(env(), RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "scalelab.cli", "train", "--quiet", "--out", str(tmp_path / "o"),
                        "--strategy", "ddp", *sets(corpus_dir, cache_dir, **{"distributed.timeout_s": 3})],
                       capture_output=True, text=True, timeout=60, env=e)
    assert p.returncode == 2 and time.time() - t0 < 45
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not join" in lines[0], p.stderr


# ------------------------------------------------------------------------------------------------- torchft
def test_torchft_replica_group_killed_others_continue_and_it_heals(corpus_dir, cache_dir, tmp_path):
    """Lighthouse + 2 replica groups (one torchrun job each); SIGKILL group 1: group 0 goes on alone, group 1 is
    restarted by its torchrun, heals from group 0 and rejoins; both finish. Everything on 127.0.0.1."""
    pytest.importorskip("torchft")
    lighthouse = Path(sys.executable).parent / "torchft_lighthouse"
    if not lighthouse.exists():
        pytest.skip("torchft_lighthouse not installed")
    # Long enough for group 1's restart (a few seconds) while group 0 runs alone (~15 ms per step here).
    steps, H = 1500, 8
    cfg = sets(corpus_dir, cache_dir, **{"train.max_steps": steps, "train.ckpt_every": 300, "train.eval_every": 750,
                                         "train.log_every": 4, "distributed.inner_steps": H,
                                         "distributed.link_latency_ms": 40.0,
                                         "distributed.timeout_s": 10, "distributed.fault_tolerance": "torchft"})
    lh_port = free_port()
    procs = [subprocess.Popen([str(lighthouse), "--bind", f"127.0.0.1:{lh_port}", "--min_replicas", "1",
                               "--join_timeout_ms", "3000", "--quorum_tick_ms", "50", "--heartbeat_timeout_ms", "1500"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    logs = [tmp_path / "g0.log", tmp_path / "g1.log"]
    try:
        for m in (0, 1):
            e = dict(env(), REPLICA_GROUP_ID=str(m), NUM_REPLICA_GROUPS="2",
                     TORCHFT_LIGHTHOUSE=f"http://127.0.0.1:{lh_port}")
            cmd = torchrun_cmd(1, ["train", "--quiet", "--out", str(tmp_path / "run"), "--strategy", "diloco", *cfg],
                               restarts=1 if m else 0)
            procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=open(logs[m], "w")))
        g0, g1 = procs[1], procs[2]
        metrics = tmp_path / "run" / "metrics.jsonl"
        killed_at, deadline = None, time.time() + 150
        while time.time() < deadline and g0.poll() is None:
            done = [r for r in rows(tmp_path / "run") if "participants" in r] if metrics.is_file() else []
            if done and done[-1]["participants"] == 2 and done[-1]["step"] >= 32:
                pid = worker_pids(g1).get(0)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed_at = done[-1]["step"]
                    break
            time.sleep(0.02)
        assert killed_at is not None, "group 1 never joined before the run ended"
        assert g0.wait(timeout=180) == 0, logs[0].read_text()[-3000:]
        assert g1.wait(timeout=120) == 0, logs[1].read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    train_rows = [r for r in rows(tmp_path / "run") if "participants" in r]
    after = [r for r in train_rows if r["step"] > killed_at]
    assert after[-1]["step"] == steps
    alone = [r["step"] for r in after if r["participants"] == 1]
    rejoined = [r["step"] for r in after if r["participants"] == 2 and alone and r["step"] > alone[0]]
    assert alone, "group 0 never went on alone"  # the quorum shrank to the survivor
    assert rejoined, "group 1 never rejoined"  # and grew back after the restarted group healed
    healed = [int(x) for x in re.findall(r"healed from a peer at step (\d+)", logs[1].read_text())]
    assert healed and max(healed) > killed_at and max(healed) % H == 0
    assert after[-1]["dropped"] <= 2  # at most the round in flight when the group died (and its retry)
    final = [r for r in rows(tmp_path / "run") if "val_loss" in r][-1]
    assert final["step"] == steps and final["val_loss"] < 6.0  # it kept learning (a fresh model is at ~6.2)
