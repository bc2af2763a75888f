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
