"""`scalelab compare`: two tiny runs that differ in one config key -> compare.md lists exactly that key and the
final values of metrics.jsonl; compare.png is a real PNG; every bad input is one stderr line, exit 2, and leaves
a good earlier output as it was."""

import json
import shutil
import zlib
from pathlib import Path

import pytest

from conftest import cli, contract, micro_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(run a, run b = a with train.lr=1e-3, run c = a with another tokenizer, the out directory)."""
    root = tmp_path_factory.mktemp("compare")
    a, args = micro_run(root)
    made = [a]
    for name, change in (("b", "train.lr=1e-3"), ("c", "data.vocab_size=280")):
        code, _, err = cli("train", "--quiet", "--out", root / name, *args, "--set", change)
        assert code == 0, err
        made.append(root / name)
    return (*made, root / "out")


def table(md: Path) -> list[dict[str, str]]:
    """The Markdown table of compare.md as one dict per run (header -> cell)."""
    lines = [ln for ln in md.read_text().splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "")) == {"-"}
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def last(run: Path, key: str):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r][-1][key]


def assert_png(path: Path) -> None:
    """A complete PNG: the signature, then chunks whose CRCs hold, from IHDR to IEND."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + body) == int.from_bytes(data[pos + 8 + n:pos + 12 + n], "big")
        kinds.append(kind)
        pos += 12 + n
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


def test_table_lists_exactly_the_difference_and_the_final_values(runs):
    a, b, _, out = runs
    code, stdout, err = cli("compare", a, b, "--out", out)
    assert code == 0, err
    assert stdout.strip() == str(out / "compare.md")
    rows = table(out / "compare.md")
    assert [r["run"] for r in rows] == ["run", "b"]
    config_cols = [k for k in rows[0] if k.startswith("`")]
    assert config_cols == ["`train.lr`"]  # the one key that differs, nothing else
    assert [r["`train.lr`"] for r in rows] == ["0.003", "0.001"]
    for row, run in zip(rows, (a, b)):
        for key in ("loss", "val_loss", "val_bpb"):
            assert float(row[f"final {key}"]) == pytest.approx(last(run, key), rel=1e-5)
            assert row[f"final {key}"] == f"{last(run, key):.6g}"
        assert row["step"] == "4" and int(row["tokens"]) == last(run, "tokens")
    assert "![compare](compare.png)" in (out / "compare.md").read_text()
    assert_png(out / "compare.png")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("extra", [["--metric", "loss", "--x", "seconds"], ["--metric", "val_bpb", "--x", "steps"],
                                   ["--metric", "lr"]])
def test_other_metrics_and_axes(runs, tmp_path, extra):
    a, b, _, _ = runs
    code, _, err = cli("compare", a, b, "--out", tmp_path, *extra)
    assert code == 0, err
    assert_png(tmp_path / "compare.png")
    assert f"`{extra[1]}`" in (tmp_path / "compare.md").read_text().splitlines()[0]


def test_one_run_and_other_tokenizers_in_bits_per_byte(runs, tmp_path):
    a, b, c, _ = runs
    assert cli("compare", a, "--out", tmp_path / "one")[0] == 0
    assert "identical" in (tmp_path / "one" / "compare.md").read_text()
    code, _, err = cli("compare", a, c, "--metric", "val_bpb", "--out", tmp_path / "bpb")
    assert code == 0, err
    assert [k for k in table(tmp_path / "bpb" / "compare.md")[0] if k.startswith("`")] == ["`data.vocab_size`",
                                                                                      "`model.vocab_size`"]


def test_bad_inputs_are_one_line_and_leave_the_output(runs, tmp_path):
    a, b, c, out = runs
    good = tmp_path / "good"
    assert cli("compare", a, b, "--out", good)[0] == 0
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(b, corrupt)
    with open(corrupt / "metrics.jsonl", "a") as f:
        f.write("{oops\n" + (b / "metrics.jsonl").read_text().splitlines()[-1] + "\n")
    cases = {
        "missing run": ([a, tmp_path / "nope"], "does not exist"),
        "not a run": ([a, not_a_run], "not a run directory"),
        "unknown metric": ([a, b, "--metric", "val_acc"], "val_bpb"),  # the known ones are listed
        "other tokenizer in nats": ([a, c], "--metric val_bpb"),
        "other tokenizer, train loss": ([a, c, "--metric", "loss"], "--metric val_bpb"),
        "no run": ([], "at least one run"),
        "bad axis": ([a, b, "--x", "flops"], "tokens, steps, seconds"),
        "corrupt metrics": ([a, corrupt], "not a JSON line"),
    }
    for what, (args, says) in cases.items():
        assert contract(["compare", *args, "--out", good], good, tmp_path / "empty") == 2, what
        err = cli("compare", *args, "--out", good)[2]
        assert says in err, (what, err)
