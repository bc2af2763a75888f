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
