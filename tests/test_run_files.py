"""A run directory's own files, damaged: a report is never rebuilt from part of its metrics, a broken tokenizer is
one line, and writes are atomic."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from scalelab import report
from scalelab.errors import ScalelabError

from conftest import cli, micro_run, run_cli, snapshot


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    return micro_run(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="module")
def run(trained) -> Path:
    return trained[0]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def _copy(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    return dst


def test_report_refuses_garbage_metrics_and_keeps_the_good_report(run, tmp_path):
    """`scalelab report` over a metrics.jsonl with a garbage line used to drop that row and overwrite report.md."""
    d = _copy(run, tmp_path / "r")
    lines = (d / "metrics.jsonl").read_text().splitlines(keepends=True)
    for bad in ("garbage\n", '{"step": 2, "tokens": 64}\n', '["step", 2]\n',
                '{"step": "two", "tokens": 1, "loss": 1}\n'):
        (d / "metrics.jsonl").write_text(lines[0] + bad + "".join(lines[1:]))
        before = _files(d)
        p = run_cli("report", "--run", str(d), timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "metrics.jsonl:2: not a" in p.stderr
        assert _files(d) == before  # report.md, loss.png and the metrics as they were


def test_a_last_line_cut_short_is_the_usual_interrupted_run(run, tmp_path):
    d = _copy(run, tmp_path / "r")
    rows = report.read_metrics(d)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tokens": 1')  # a write in progress, or a crash
    assert report.read_metrics(d) == rows
    report.run_report(d)
    with open(d / "metrics.jsonl", "a") as f:
        f.write("\n")  # now it is a whole line, and corrupt
    with pytest.raises(ScalelabError, match=r"metrics.jsonl:\d+: not a JSON line"):
        report.run_report(d)


def test_corrupt_data_json_is_one_line(run, tmp_path):
    d = _copy(run, tmp_path / "r")
    (d / "data.json").write_text('{"corpus": "x", "train": {"docs": 1}}')
    before = _files(d)
    with pytest.raises(ScalelabError, match="data.json is corrupt"):
        report.run_report(d)
    assert _files(d) == before


@pytest.mark.parametrize("damage", ["truncate", "empty", "not json", "no end-of-text"])
def test_sample_with_a_broken_tokenizer_is_one_line(run, tmp_path, damage):
    """A truncated tokenizer.json in a run directory was a traceback from `tokenizers`."""
    from scalelab.tokenizer import train_bpe

    d = _copy(run, tmp_path / "r")
    text = (d / "tokenizer.json").read_text()
    bad = {"truncate": text[:len(text) // 2], "empty": "", "not json": "\x00garbage",
           "no end-of-text": train_bpe(["a b c"] * 10, 260).to_str().replace("<|endoftext|>", "<|eot|>")}[damage]
    (d / "tokenizer.json").write_text(bad)
    p = run_cli("sample", "--run", str(d), "--prompt", "the cat", "--max-tokens", "2", timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "tokenizer" in lines[0], p.stderr


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    report.write_text(tmp_path / "a.md", "one")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        report.write_text(tmp_path / "dir", "two")  # the rename fails: the target is a directory
    assert sorted(os.listdir(tmp_path)) == ["a.md", "dir"] and (tmp_path / "a.md").read_text() == "one"


def _set(path: str, value):
    def damage(state: dict) -> dict:
        *parents, key = path.split(".")
        d = state
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if value is KeyError:
            del d[key]
        else:
            d[key] = value
        return state
    return damage


def _swap_params(state: dict) -> dict:
    g = state["optim_param_groups"]
    g[0]["params"][:2] = g[0]["params"][1::-1]  # two parameters' AdamW moments exchanged: shapes differ
    return state


@pytest.mark.parametrize("damage", [
    pytest.param(lambda s: "{" + json.dumps(s)[:40], id="truncated"),
    pytest.param(lambda s: json.dumps(s).encode()[:-1] + b"\xff}", id="not-utf-8"),
    pytest.param(lambda s: [s], id="a-list"),
    pytest.param(_set("data.epoch", {}), id="data.epoch-not-int"),  # int({}) in data.Batches.load_state before
    pytest.param(_set("data", KeyError), id="no-data"),  # KeyError at train.py state["data"] before
    pytest.param(_set("data", [0, 0]), id="data-a-list"),
    pytest.param(_set("tokens", KeyError), id="no-tokens"),  # KeyError at train.py state["tokens"] before
    pytest.param(_set("tokens", 1.5), id="tokens-a-float"),
    pytest.param(_set("elapsed", KeyError), id="no-elapsed"),
    pytest.param(_set("elapsed", -1.0), id="elapsed-negative"),
    pytest.param(_set("elapsed", float("nan")), id="elapsed-nan"),
    pytest.param(_set("config", "x"), id="config-a-string"),
    pytest.param(_set("config.distributed", 1), id="config.distributed-an-int"),
    pytest.param(_set("rng", KeyError), id="no-rng"),  # KeyError at train.py state["rng"] before
    pytest.param(_set("rng", "AAAA"), id="rng-a-string"),
    pytest.param(_set("rng.torch", KeyError), id="no-rng.torch"),
    pytest.param(_set("rng.torch", "AAAA"), id="torch-rng-cut"),  # RuntimeError in torch.set_rng_state before
    pytest.param(_set("rng.torch", "not base64!"), id="torch-rng-not-base64"),
    pytest.param(_set("rng.torch", "A" * 6742 + "=="), id="torch-rng-invalid-state"),  # right length, all zero
    pytest.param(_set("step", KeyError), id="no-step"),
    pytest.param(_set("step", [1]), id="step-a-list"),  # TypeError in the training loop before
    pytest.param(_set("step", "4"), id="step-a-string"),
    pytest.param(_set("step", True), id="step-a-bool"),
    pytest.param(_set("step", 0), id="step-not-the-directory's"),  # truncated metrics.jsonl to nothing before
    pytest.param(_set("optim_param_groups", KeyError), id="no-optim-groups"),
    pytest.param(_set("optim_param_groups", 3), id="optim-groups-an-int"),  # TypeError in checkpoint.load before
    pytest.param(_set("optim_param_groups", [{"params": [0]}]), id="optim-groups-too-few"),
    pytest.param(_set("optim_param_groups.0.params", KeyError), id="optim-group-no-params"),
    pytest.param(_swap_params, id="optim-params-renumbered"),
    pytest.param(_set("optim_param_groups.0.lr", KeyError), id="optim-group-no-lr"),
    pytest.param(_set("optim_param_groups.0.betas", "0.9"), id="optim-betas-a-string"),
    pytest.param(_set("optim_param_groups.1.betas", [0.9, 1.5]), id="optim-betas-out-of-range"),
    pytest.param(_set("optim_param_groups.0.eps", -1), id="optim-eps-negative"),
    pytest.param(_set("optim_param_groups.0.amsgrad", True), id="optim-amsgrad-flipped"),  # KeyError in step
    pytest.param(_set("diffusion", {"clip": "x"}), id="diffusion-bad"),
])
def test_resume_with_a_damaged_state_json(trained, tmp_path, damage):
    """What the state.json fuzz (tests/test_fuzz.py) found, and its neighbours: `train --resume` over a damaged
    checkpoint state must be one line naming state.json, and exit 2, with the run directory untouched."""
    run, sets = trained
    d = _copy(run, tmp_path / "r")
    state = max((d / "checkpoints").iterdir()) / "state.json"
    out = damage(json.loads(state.read_text()))
    state.write_bytes(out if isinstance(out, bytes) else (out if isinstance(out, str) else json.dumps(out)).encode())
    before = snapshot(d)
    code, _, err = cli("train", "--resume", "--quiet", "--out", d, *sets)  # `contract`, and the message
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"checkpoint {state.parent}" in err and "state.json" in err, err
    assert snapshot(d) == before


@pytest.mark.parametrize("step", [[4], "4", 4.0, 0, 2])
def test_a_refused_resume_leaves_metrics_jsonl_as_it_was(trained, tmp_path, step):
    """A non-integer step used to make `_truncate_metrics` drop every line and rewrite metrics.jsonl empty (and a
    wrong integer one drops the lines after it): the resume is refused before the metrics are touched."""
    run, sets = trained
    d = _copy(run, tmp_path / "r")
    metrics = d / "metrics.jsonl"
    before = hashlib.sha256(metrics.read_bytes()).hexdigest()
    assert len(metrics.read_text().splitlines()) >= 4
    state = max((d / "checkpoints").iterdir()) / "state.json"
    state.write_text(json.dumps(dict(json.loads(state.read_text()), step=step)))
    code, _, err = cli("train", "--resume", "--quiet", "--out", d, *sets)
    assert code == 2 and "state.json is corrupt: step must be" in err, err
    assert hashlib.sha256(metrics.read_bytes()).hexdigest() == before


def test_resume_of_an_intact_checkpoint_keeps_the_metrics(trained, tmp_path):
    """The validation passes a good state.json; resuming the finished run leaves metrics.jsonl byte-identical."""
    run, sets = trained
    d = _copy(run, tmp_path / "r")
    before = (d / "metrics.jsonl").read_bytes()
    assert cli("train", "--resume", "--quiet", "--out", d, *sets)[0] == 0
    assert (d / "metrics.jsonl").read_bytes() == before


def test_truncate_metrics_refuses_a_step_that_is_not_an_int(tmp_path):
    from scalelab.train import _truncate_metrics

    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n{"step": 2}\n')
    for bad in ([1], "1", 1.0, True, None):
        with pytest.raises(TypeError):
            _truncate_metrics(f, bad)
    _truncate_metrics(f, 1)
    assert f.read_text() == '{"step": 1}\n'
