"""The report card's runner: runs are trained through the CLI, finished ones are reused, a failing run is one
clear error; DyT's section logic on the runs it would read."""

import pytest

from scalelab import config
from scalelab.errors import ScalelabError
from scalelab.papers.section import Options, train_runs
from tests.conftest import tiny_overrides


def _cfg(corpus_dir, cache_dir, name, **extra):
    sets = tiny_overrides(corpus_dir, cache_dir, **{"train.max_steps": 6, "train.eval_every": 3,
                                                    "train.warmup_steps": 1, "train.probe_every": 3, **extra})
    cfg = config.load(None, [s for s in sets if s != "--set"])
    cfg.name = name
    return cfg


def test_runner_trains_reuses_and_reports_failures(corpus_dir, cache_dir, tmp_path):
    jobs = [(_cfg(corpus_dir, cache_dir, n, **{"model.norm": norm}), tmp_path / n)
            for n, norm in (("a", "rmsnorm"), ("b", "dyt"))]
    first = train_runs(jobs, Options(parallel=2))
    assert [r["step"] for r in first] == [6, 6] and all("val_loss" in r for r in first)
    assert (tmp_path / "a.toml").is_file() and (tmp_path / "b" / "probes.jsonl").is_file()
    stamp = (tmp_path / "a" / "metrics.jsonl").stat().st_mtime_ns
    again = train_runs(jobs, Options())
    assert again == first and (tmp_path / "a" / "metrics.jsonl").stat().st_mtime_ns == stamp  # reused, not rerun
    bad = _cfg(corpus_dir, cache_dir, "c", **{"data.corpus": str(tmp_path / "missing")})
    with pytest.raises(ScalelabError) as e:
        train_runs([(bad, tmp_path / "c")], Options())
    assert "\n" not in str(e.value) and "missing" in str(e.value)


def test_runs_in_this_process_equal_a_fresh_process(corpus_dir, cache_dir, tmp_path):
    """One run at a time trains in the card's own process: its numbers equal `scalelab train` in a fresh
    process, bit for bit, also after another run trained in this process; torch's threads and the caller's
    config are left as they were, and the log goes to the run's train.log."""
    import json

    import torch

    def cfg(name, norm):
        return _cfg(corpus_dir, cache_dir, name, **{"model.norm": norm, "train.threads": 1})

    def curve(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in rows]

    threads = torch.get_num_threads()
    fresh = train_runs([(cfg("b", "dyt"), tmp_path / "fresh" / "b")], Options(parallel=2))  # a process of its own
    jobs = [(cfg("a", "rmsnorm"), tmp_path / "here" / "a"), (cfg("b", "dyt"), tmp_path / "here" / "b")]
    before = config.to_toml(jobs[1][0])
    here = train_runs(jobs, Options())
    assert curve(tmp_path / "here" / "b") == curve(tmp_path / "fresh" / "b") and here[1]["val_loss"] == fresh[0]["val_loss"]
    assert torch.get_num_threads() == threads and config.to_toml(jobs[1][0]) == before
    log = (tmp_path / "here" / "b" / "train.log").read_text()
    assert "val loss" in log and (tmp_path / "here" / "b" / "report.md").is_file()


# ------------------------------------------------------------------------------------ --device cuda sizing
def test_gpu_sizes_scale_every_training_section_up_and_keep_quick_mode():
    """`--device cuda` in full mode: every section's runs go to the GPU at larger sizes that still satisfy the
    protocol (≥ 300 DiLoCo outer steps, the paper's H); quick mode keeps its sizes and only moves the runs;
    the CPU card pins its runs to the CPU (train.device "auto" would take a GPU when one is there)."""
    from scalelab.papers import bd3lm, diloco, dyt
    from scalelab.papers.sudoku_model import SVConfig, trainer_config
    from scalelab.scaling import param_count
    from pathlib import Path

    def params(c):
        c.model.vocab_size = c.data.vocab_size
        return param_count(c)

    cpu, gpu, qgpu = (dyt.dyt_config("dyt", 0, q, device=d) for q, d in ((False, "cpu"), (False, "cuda"), (True, "cuda")))
    assert (cpu.train.device, gpu.train.device, qgpu.train.device) == ("cpu", "cuda", "cuda")
    assert gpu.model.d_model == 512 and params(gpu) > 10 * params(cpu)
    assert gpu.train.max_steps * gpu.train.batch_size * gpu.model.context > 20 * (
        cpu.train.max_steps * cpu.train.batch_size * cpu.model.context)
    assert (qgpu.model.d_model, qgpu.train.max_steps) == (dyt.dyt_config("dyt", 0, True).model.d_model, 100)

    z = diloco.sizes(False, "cuda")
    assert z["H"] == 30 and z["steps"] // z["H"] >= 300 and z["steps"] % z["H"] == 0
    m4 = diloco.diloco_config("diloco", 4, 0, False, 1e-3, 0.6, device="cuda")
    # one GPU holds all four replicas: every rank on cuda:0, gloo (NCCL refuses two ranks on one device)
    assert (m4.train.device, m4.distributed.backend, m4.distributed.replicas) == ("cuda:0", "gloo", 4)
    assert m4.train.batch_size % 4 == 0 and m4.model.d_model == 256
    assert diloco.diloco_config("ddp", 1, 0, False, 1e-3).train.device == "cpu"
    assert diloco.sizes(True, "cuda") == diloco.sizes(True)

    b_cpu, b_gpu = bd3lm.bd3_config("l4", 4, False), bd3lm.bd3_config("l4", 4, False, device="cuda")
    assert b_gpu.model.context == 256 and params(b_gpu) > 5 * params(b_cpu)
    assert bd3lm.bd3_config("mdlm", 256, False, device="cuda").diffusion.clip_search is False  # MDLM: plain schedule
    assert bd3lm.bd3_config("x", 4, True, device="cuda").model.context == 64

    sv = trainer_config(SVConfig(), Path("c.txt"), Path("cache"), 10, "x", device="cuda")
    assert sv.train.device == "cuda" and trainer_config(SVConfig(), Path("c.txt"), Path("cache"), 10, "x").train.device == "cpu"


def test_reproduce_device_errors_are_one_line(tmp_path):
    import torch

    from tests.conftest import run_cli

    p = run_cli("reproduce", "horizon", "--device", "tpu", "--out", str(tmp_path / "a"))
    assert p.returncode == 2 and "--device must be cpu or cuda" in p.stderr and "Traceback" not in p.stderr
    if not torch.cuda.is_available():
        p = run_cli("reproduce", "dyt", "--device", "cuda", "--out", str(tmp_path / "b"))
        assert p.returncode == 2 and "sees no CUDA device" in p.stderr and "Traceback" not in p.stderr
        assert not (tmp_path / "b").exists()  # refused before anything was written
