"""TensorBoard events (train.tensorboard=true, `scalelab report --tensorboard`) read back with TensorBoard's own
EventAccumulator equal metrics.jsonl: live, after a resume, for a back-fill, and for a DiLoCo run (rank 0 only).
Without the tensorboard package, asking for it is one error line naming the extra; not asking imports nothing."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli, contract, micro_run

TRAIN = ("tokens", "lr", "loss", "grad_norm", "step_time", "tok_per_s", "flops_per_s", "elapsed")  # and "step"
EVAL = ("val_loss", "val_bpb")  # and "step", "tokens"
TB = ["--set", "train.tensorboard=true"]


@pytest.fixture(scope="module")
def accumulator():
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(a run trained without TensorBoard, one trained with it, their --set args)."""
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("tb")
    plain, args = micro_run(root)
    live = root / "live"
    code, _, err = cli("train", "--quiet", "--out", live, *args, *TB)
    assert code == 0, err
    return plain, live, args


def events(accumulator, tb: Path) -> dict[str, list[tuple[int, float]]]:
    acc = accumulator(str(tb), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected(run: Path, names: tuple[str, ...] | None = None) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tag -> [(step, value)]: `names` of the single-process trainer, or every number of every
    record (nested dicts as key/subkey), eval lines without their `tokens` (the train line at that step has it)."""
    want: dict[str, list] = {}
    for r in rows(run):
        is_eval = "val_loss" in r
        if names is not None:
            fields = {k: r[k] for k in (EVAL if is_eval else TRAIN)}
            assert set(r) == {"step", *(("tokens",) if is_eval else ()), *fields}  # the trainer's own fields
        else:
            fields = {}
            for k, v in r.items():
                if isinstance(v, dict):
                    fields.update({f"{k}/{k2}": v2 for k2, v2 in v.items()})
                elif k != "step" and not (is_eval and k == "tokens"):
                    fields[k] = v
        for k, v in fields.items():
            want.setdefault(k, []).append((r["step"], v))
    return want


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)  # the same names, nothing more
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # each step once, in order
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-30), tag


def event_files(run: Path) -> list[Path]:
    return sorted(p for p in (run / "tb").iterdir() if "tfevents" in p.name)


def test_live_run_events_equal_metrics(runs, accumulator):
    _, live, _ = runs
    assert len(event_files(live)) == 1
    got = events(accumulator, live / "tb")
    assert_same(got, expected(live, TRAIN))
    assert {"loss", "val_loss", "val_bpb", "lr", "grad_norm", "tok_per_s"} <= set(got)
    assert len(got["loss"]) == 4 and len(got["val_loss"]) == 2  # log_every 1, eval_every 2, 4 steps


def test_resumed_run_drops_the_lost_events(runs, accumulator, tmp_path):
    """Resumed from step 2, metrics.jsonl is cut back to step 2 and steps 3-4 are logged again; TensorBoard's
    view of tb/ (two event files) holds each step once, as metrics.jsonl does."""
    _, live, args = runs
    run = tmp_path / "run"
    shutil.copytree(live, run)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    code, _, err = cli("train", "--quiet", "--out", run, *args, *TB, "--resume")
    assert code == 0, err
    assert len(event_files(run)) == 2
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2, 3, 4]
    assert_same(events(accumulator, run / "tb"), expected(run, TRAIN))


def test_backfill_equals_metrics_and_replaces_earlier_events(runs, accumulator, tmp_path):
    plain, live, _ = runs
    run = tmp_path / "old"
    shutil.copytree(plain, run)
    assert not (run / "tb").exists()
    code, out, err = cli("report", "--run", run, "--tensorboard")
    assert code == 0, err
    assert out.split() == [str(run / "report.md"), str(run / "tb")]
    assert_same(events(accumulator, run / "tb"), expected(run, TRAIN))
    first = event_files(run)
    assert len(first) == 1 and first[0].name.endswith(".backfill")
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary left behind
    # again: the new back-fill replaces the old one (not a second copy of every point)
    assert cli("report", "--run", run, "--tensorboard")[0] == 0
    assert len(event_files(run)) == 1 and event_files(run) != first
    assert_same(events(accumulator, run / "tb"), expected(run, TRAIN))
    # over a run that logged live: the back-fill holds the same records and replaces the live file
    run2 = tmp_path / "live"
    shutil.copytree(live, run2)
    assert cli("report", "--run", run2, "--tensorboard")[0] == 0
    assert [p.name.endswith(".backfill") for p in event_files(run2)] == [True]
    assert_same(events(accumulator, run2 / "tb"), expected(run2, TRAIN))


def test_backfill_of_a_corrupt_metrics_file_changes_nothing(runs, tmp_path):
    _, live, _ = runs
    run = tmp_path / "bad"
    shutil.copytree(live, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    assert contract(["report", "--run", run, "--tensorboard"], run) == 2  # one line, tb/ and the rest untouched


def test_diloco_logs_bytes_and_outer_steps_from_rank0(runs, accumulator, tmp_path):
    from test_distributed import torchrun

    _, _, args = runs
    run = tmp_path / "diloco"
    p = torchrun(2, ["train", "--quiet", "--out", str(run), *args, *TB, "--set", "distributed.strategy=diloco",
                     "--set", "distributed.inner_steps=2", "--set", "distributed.timeout_s=60"], timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(event_files(run)) == 1  # rank 0 only
    got = events(accumulator, run / "tb")
    assert_same(got, expected(run))
    last = [r for r in rows(run) if "loss" in r][-1]
    assert got["comm_bytes_total"][-1] == (4, pytest.approx(last["comm_bytes_total"], rel=1e-6))
    assert got["comm_calls/outer"][-1] == (4, 2)  # outer steps: one every 2 inner steps
    assert {"comm_bytes", "comm_wire_bytes_total", "comm_by_kind/outer"} <= set(got)


@pytest.fixture
def no_tensorboard(monkeypatch):
    """This process as it is without the tensorboard package."""
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)


def test_without_tensorboard_one_line_names_the_extra(no_tensorboard, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    out = root / "run"
    code, _, err = cli("train", "--quiet", "--out", out, "--set", "train.tensorboard=true",
                       "--set", "train.max_steps=1", "--set", "train.warmup_steps=0")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "pip install 'scalelab[tb]'" in err and "train.tensorboard" in err
    assert not out.exists()  # it failed before any work
    run = root / "old"
    run.mkdir()
    (run / "config.toml").write_text("")
    (run / "metrics.jsonl").write_text("")
    assert contract(["report", "--run", run, "--tensorboard"], root) == 2
    assert "pip install 'scalelab[tb]'" in cli("report", "--run", run, "--tensorboard")[2]


def test_tensorboard_off_imports_nothing_of_it(tmp_path):
    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]\n"
            "from pathlib import Path\nfrom conftest import micro_run\n"
            f"run, _ = micro_run(Path({str(tmp_path)!r}))\n"
            "assert not (run / 'tb').exists()\n"
            "bad = [m for m in sys.modules if m.startswith('tensorboard') or m.startswith('torch.utils.tensorboard')]\n"
            "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
