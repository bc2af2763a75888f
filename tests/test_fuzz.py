"""Fuzzing the error contract: whatever a user hands the CLI (configs and --set overrides, TOML recipes, horizon runs
and release dates, search runs, task files, GGUF files, a run's metrics.jsonl and checkpoint state.json), the
command either succeeds or exits with status 2 and exactly one non-empty line on stderr, never a traceback, and
then no file that was there before has changed.

The CLI runs in-process (`scalelab.cli.main`, ~ms a call instead of ~2 s for a subprocess). Examples are
derandomized, so a run is reproducible; examples hypothesis found once are kept as `@example`s. HTTP request
bodies are fuzzed in tests/test_serve_hardening.py.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, event, example, given, settings, strategies as st  # noqa: E402

from scalelab.model import check_memory
from scalelab import config  # noqa: E402
from scalelab.backends import Choice, Response  # noqa: E402
from scalelab.errors import ScalelabError  # noqa: E402

from conftest import contract, micro_run, rewrite_gguf  # noqa: E402


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------------------------ the contract
def outcome(args: list, *watch: Path) -> int:
    """`contract`, counting successes and refusals (pytest --hypothesis-show-statistics shows them)."""
    code = contract(args, *watch)
    event("succeeded" if code == 0 else "refused (exit 2)")
    return code


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-"))


def mutate_bytes(data: bytes, r: random.Random, region: int | None = None) -> bytes:
    """Truncate, flip, delete or insert bytes (within the first `region` bytes when given)."""
    b = bytearray(data)
    end = min(len(b), region or len(b)) or 1
    for _ in range(r.randint(1, 4)):
        op, i = r.randrange(4), r.randrange(end)
        if op == 0:
            return bytes(b[:i])
        if op == 1 and i < len(b):
            b[i] ^= 1 << r.randrange(8)
        elif op == 2:
            del b[i:i + r.randint(1, 8)]
        else:
            b[i:i] = bytes(r.randrange(256) for _ in range(r.randint(1, 4)))
    return bytes(b)


# JSON values to put where a good value was
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=6)


def mutate_json(obj, r: random.Random, new_values: list):
    """Change, drop or add one key somewhere in a JSON object (or replace the whole value)."""
    if not isinstance(obj, dict) or not obj or r.random() < 0.1:
        return new_values[0] if not isinstance(obj, dict) or r.random() < 0.5 else obj
    obj = dict(obj)
    key = r.choice(sorted(obj))
    op = r.randrange(4)
    if op == 0:
        del obj[key]
    elif op == 1 and isinstance(obj[key], dict):
        obj[key] = mutate_json(obj[key], r, new_values[1:] or [None])
    elif op == 2:
        obj["x" + key] = new_values[0]
    else:
        obj[key] = new_values[0]
    return obj


# ------------------------------------------------------------------------------------------- configs, recipes
SECTIONS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in config.SECTIONS.items()}
KEYS = st.one_of(st.sampled_from([f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]),
                 st.sampled_from(["name", "model.colour", "nosection.k", "model", ".x", "model.", "a.b.c"]))
RAW = st.one_of(st.integers(-10, 10**9).map(str),
                st.sampled_from(["0", "-1", "1e400", "nan", "inf", "1.5", "true", '""', "[1]", "{a=1}", '"dyt"']),
                st.text(max_size=10))
KV = st.tuples(KEYS, RAW).map(lambda kv: f"{kv[0]}={kv[1]}")
OVERRIDES = st.lists(st.one_of(KV, KV, KV, st.text(max_size=12)), max_size=5)


@pytest.fixture(scope="module")
def held_run(tmp_path_factory) -> Path:
    """An --out that already holds a run: a valid config stops there (exit 2) instead of training."""
    d = tmp_path_factory.mktemp("held")
    (d / "config.toml").write_text(config.to_toml(config.Config()))
    return d


@fuzz(150)
@given(overrides=OVERRIDES)
@example(overrides=["model.d_model=100000000"])  # an allocator error before
@example(overrides=["model.n_layer=1000000000"])
@example(overrides=["data.loss_after=\"a\\nb\""])
@example(overrides=["model.d_model=" + "9" * 5000])  # int()'s 4300-digit limit is a ValueError inside tomllib
@example(overrides=["model.d_model=1e300", "model.n_layer=1e300"])  # beyond int64 for torch, and for a float
@example(overrides=["train.device=cuda:x"])
def test_fuzz_overrides(held_run, overrides):
    try:
        cfg = config.load(None, overrides)
        check_memory(cfg)
    except ScalelabError as e:
        assert "\n" not in str(e).strip()
    assert contract(["train", "--out", held_run, *[a for o in overrides for a in ("--set", o)], "--strategy",
                     "single"], held_run) == 2


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    return repr(v)


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)  # (TOML cannot hold lone surrogates)
TOML_SCALARS = st.one_of(st.integers(-10, 10**6), st.floats(), st.booleans(), TEXT,
                         st.sampled_from(["dyt", "rmsnorm", "cosine", "single", "diloco", "stdlib"]))
RECIPES = st.dictionaries(st.sampled_from([*SECTIONS, "extra"]),
                          st.dictionaries(st.sampled_from([k for ks in SECTIONS.values() for k in ks] + ["bogus"]),
                                          TOML_SCALARS, max_size=4), max_size=3)


@fuzz(60)
@given(recipe=RECIPES, damage=st.integers(0, 2**32), name=st.one_of(st.none(), TEXT))
def test_fuzz_recipes(held_run, recipe, damage, name):
    lines = [f"name = {toml_value(name)}"] if name is not None else []
    for sec, values in recipe.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    text = "\n".join(lines).encode()
    if damage % 5 == 0:
        text = mutate_bytes(text, random.Random(damage))
    d = scratch()
    try:
        (d / "r.toml").write_bytes(text)
        args = ["train", "--recipe", d / "r.toml", "--out", held_run, "--strategy", "single"]
        assert contract(args, held_run, d) == 2
    finally:
        shutil.rmtree(d)


# ------------------------------------------------------------------------------------------------- horizon
MODELS = ["m1", "m2", "m3"]
RUN_ROWS = st.lists(st.tuples(st.sampled_from(MODELS), st.integers(0, 5), st.sampled_from([1, 4, 16, 64, 240]),
                              st.sampled_from([0, 1])), max_size=40)
BAD_CELL = st.one_of(st.none(), st.none(), st.none(),  # or a bad human_minutes (2) or success (3) in one row
                     st.tuples(st.integers(0, 39), st.integers(2, 3),
                               st.sampled_from([0, -1, "x", None, 0.5, 2, "true", float("nan"), 1e308])))
GOOD_DATES = st.sampled_from(["2023-01-05", "2023-06-01", "2024-02-29", "2024-11-30"])
DATES = st.dictionaries(st.sampled_from(MODELS + ["other"]),
                        GOOD_DATES | GOOD_DATES | st.sampled_from(["2024-13-45", "2023-02-30", "yesterday", "[1, 2]",
                                                                   "{a: 1}", "''", "!!binary xyz", "*b"]), max_size=4)
FLAGS = [["-b", "0"], ["-b", "1"], ["-b", "3"], ["--p", "50"], ["--p", "0.9,10"], ["-C", "3"], ["--weighting", "equal"],
         ["--weighting", "none"], ["--models", "all"], ["--after", "2023-06-01"], ["--seed", "7"]]
BAD_FLAGS = [["-b", "-1"], ["--seed", "-5"], ["--p", "150"], ["--p", "x"], ["-C", "0"], ["--weighting", "given"],
             ["--models", "m9"], ["--after", "2023-13-01"], ["--set", "horizon.level=2"],
             ["--set", "horizon.bootstrap=-3"]]


@pytest.fixture(scope="module")
def horizon_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(inputs dir with a good runs.csv and dates.yaml, a report dir holding a good report)."""
    d = tmp_path_factory.mktemp("horizon")
    rng = random.Random(0)
    rows = ["model,task_id,task_family,human_minutes,success"]
    for m, skill in zip(MODELS, (0.3, 1.0, 3.0)):
        for t, minutes in enumerate((1, 2, 4, 8, 16, 32, 64, 128)):
            p = 1 / (1 + minutes / (10 * skill))
            rows += [f"{m},t{t},f{t % 3},{minutes},{int(rng.random() < p)}" for _ in range(3)]
    (d / "runs.csv").write_text("\n".join(rows) + "\n")
    (d / "dates.yaml").write_text("date:\n  m1: 2023-01-01\n  m2: 2023-09-01\n  m3: 2024-06-01\n")
    out = d / "report"
    assert contract(["horizon", d / "runs.csv", "-r", d / "dates.yaml", "-o", out, "-b", "3"]) == 0
    return d, out


@fuzz(30)
@given(rows=RUN_ROWS, bad=BAD_CELL, dates=DATES, fmt=st.sampled_from(["csv", "jsonl"]),
       damage=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 2**32)),
       flags=st.lists(st.sampled_from(FLAGS * 3 + BAD_FLAGS), max_size=2))
@example(rows=[], bad=None, dates={"m1": "2024-13-45"}, fmt="csv", damage=None, flags=[])  # PyYAML's ValueError
@example(rows=[], bad=None, dates={}, fmt="csv", damage=None, flags=[["-b", "-1"]])  # silently no CIs before
@example(rows=[], bad=None, dates={}, fmt="csv", damage=None, flags=[["--seed", "-5"]])  # numpy's ValueError before
def test_fuzz_horizon(horizon_dirs, rows, bad, dates, fmt, damage, flags):
    inputs, out = horizon_dirs
    d = scratch()
    try:
        if rows:
            recs = [[m, f"t{t}", f"f{t % 2}", minutes, ok] for m, t, minutes, ok in rows]
            if bad is not None:
                recs[bad[0] % len(recs)][bad[1] + 1] = bad[2]
            runs = d / f"runs.{fmt}"
            if fmt == "csv":
                text = "model,task_id,task_family,human_minutes,success\n" + "".join(
                    ",".join("" if v is None else str(v) for v in r) + "\n" for r in recs)
            else:
                keys = ("alias", "task_id", "task_family", "human_minutes", "score_binarized")
                text = "".join(json.dumps(dict(zip(keys, r))) + "\n" for r in recs)
            data = text.encode()
        else:
            runs, data = d / "runs.csv", (inputs / "runs.csv").read_bytes()
        if damage is not None:
            data = mutate_bytes(data, random.Random(damage))
        runs.write_bytes(data)
        (d / "dates.yaml").write_text("date:\n" + "".join(f"  {m}: {v}\n" for m, v in dates.items())
                                      if dates else (inputs / "dates.yaml").read_text())
        outcome(["horizon", runs, "-r", d / "dates.yaml", "-o", out, "-b", "2", *[a for f in flags for a in f]], out, d)
    finally:
        shutil.rmtree(d)


# -------------------------------------------------------------------------------------------------- search
class Noisy:
    """A search backend double for the Sudoku prompt format: random grids, verdicts and winners from the seed."""

    name, price, logprobs = "noisy", "local", True
    GRIDS = ["1234/3412/2143/4321", "1243/3412/2134/4321", "1234/3412/2143/4312"]

    def generate(self, prompt, params):
        r = random.Random(params.seed)
        kind = prompt.strip()[-1]
        outs = [Choice(r.choice(self.GRIDS) if kind == "S" else ("r+ " + r.choice("YN")) if kind == "V"
                       else ("d " + r.choice("AB")), n_tokens=4) for _ in range(params.n)]
        return Response(outs, len(prompt), 4 * params.n, 0, params.n * len(prompt))

    def prob_yes(self, prompt, yes, no):
        return Response([], len(prompt), 0, p_yes=random.Random(prompt).random())


@pytest.fixture(scope="module")
def search_run(tmp_path_factory) -> Path:
    from scalelab import search

    d = tmp_path_factory.mktemp("search") / "run"
    cfg = search.SearchConfig(backend="noisy", task="sudoku", n_problems=3, prompts="sudoku", k_inf=4, k_verif=2,
                              k_tie=2, seeds=2, max_tokens=20, verify_max_tokens=20)
    b = Noisy()
    search.run_search(cfg, d, gen=b, ver=b)
    assert contract(["search", "rescore", d]) == 0
    return d


SEARCH_FILES = ["search.json", "problems.jsonl", "transcripts.jsonl"]


@fuzz(30)
@given(name=st.sampled_from(SEARCH_FILES), line=st.integers(0, 100), values=st.lists(JSON, min_size=2, max_size=2),
       damage=st.integers(0, 2**32), trigger=st.sampled_from([None, "s31", "nope"]))
@example(name="search.json", line=0, values=[0, 0], damage=3, trigger=None)  # a corrupt search.json: traceback before
@example(name="problems.jsonl", line=0, values=[0, 0], damage=1, trigger=None)
def test_fuzz_search_rescore(search_run, name, line, values, damage, trigger):
    d = scratch() / "run"
    try:
        shutil.copytree(search_run, d)
        path, r = d / name, random.Random(damage)
        if damage % 2:  # bytes
            path.write_bytes(mutate_bytes(path.read_bytes(), r))
        elif name == "search.json":  # one setting changed
            path.write_text(json.dumps(mutate_json(json.loads(path.read_text()), r, values)))
        else:  # one JSON record changed
            lines = path.read_text().splitlines()
            i = line % len(lines)
            lines[i] = json.dumps(mutate_json(json.loads(lines[i]), r, values))
            path.write_text("\n".join(lines) + "\n")
        outcome(["search", "rescore", d, *(["--trigger", trigger] if trigger else [])], d)
    finally:
        shutil.rmtree(d.parent)


TASK_VALUES = st.sampled_from(["What is 2+2?", "#### 4", "\\boxed{4}", "4", "so \\boxed{x^2", "\\fbox{1}", ""]) | JSON
TASK_KEYS = st.sampled_from(["question", "problem", "answer", "solution", "id", "x"])
TASK_ROWS = st.lists(st.dictionaries(TASK_KEYS, TASK_VALUES, max_size=4) | JSON, max_size=6)


@fuzz(100)
@given(rows=TASK_ROWS, damage=st.integers(0, 2**32), style=st.sampled_from(["auto", "gsm8k", "math"]))
def test_fuzz_task_jsonl(rows, damage, style):
    from scalelab.search import tasks

    data = "".join(json.dumps(x) + "\n" for x in rows).encode()
    if damage % 3 == 0:
        data = mutate_bytes(data, random.Random(damage))
    d = scratch()
    try:
        (d / "t.jsonl").write_bytes(data)
        try:
            problems = tasks.load_jsonl(d / "t.jsonl", style)
        except ScalelabError as e:
            assert "\n" not in str(e)
        else:
            assert problems and all(isinstance(p.question, str) and isinstance(p.answer, str) for p in problems)
    finally:
        shutil.rmtree(d)


# ---------------------------------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory) -> Path:
    import torch

    from scalelab import gguf as G
    from scalelab.model import Transformer
    from scalelab.tokenizer import train_bpe

    pytest.importorskip("gguf")
    torch.manual_seed(0)
    tok = train_bpe(["hello world, the cat sat on the mat 123"] * 20, 270)
    cfg = config.ModelConfig(vocab_size=tok.get_vocab_size(), context=32, d_model=8, n_layer=2, n_head=2, n_kv_head=1,
                             tie_embeddings=False)
    path = tmp_path_factory.mktemp("gguf") / "base.gguf"
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    G.save_gguf(Transformer(cfg).eval(), tok, path, chat_template=template)
    assert contract(["sample", "--model", path, "--prompt", "hi", "--max-tokens", "2", "--temperature", "0"]) == 0
    return path


def sample_gguf(path: Path) -> int:
    return outcome(["sample", "--model", path, "--prompt", "the cat", "--max-tokens", "2", "--temperature", "0"],
                    path.parent)


@fuzz(40)
@given(seed=st.integers(0, 2**32))
def test_fuzz_gguf_bytes(base_gguf, seed):
    import gguf

    header = gguf.GGUFReader(base_gguf).data_offset  # the metadata and tensor infos; after it, only weights
    d = scratch()
    try:
        (d / "m.gguf").write_bytes(mutate_bytes(base_gguf.read_bytes(), random.Random(seed), region=header))
        sample_gguf(d / "m.gguf")
    finally:
        shutil.rmtree(d)


GGUF_KEYS = ["general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
             "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
             "llama.rope.dimension_count", "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
             "llama.vocab_size", "llama.rope.scaling.type", "llama.rope.scaling.factor", "tokenizer.ggml.model",
             "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template",
             "tokenizer.ggml.add_bos_token"]
GGUF_VALUES = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 16, 100, 269, 270]),
                        st.floats(-1e6, 1e6) | st.sampled_from([float("nan"), float("inf")]), st.booleans(),
                        st.text(max_size=6) | st.sampled_from(["llama", "gpt2", "smollm", "linear", "{{ x"]),
                        st.lists(st.integers(0, 5), min_size=1, max_size=3), st.lists(st.text(max_size=3), min_size=1,
                                                                                      max_size=3))


@fuzz(40)
@given(changes=st.dictionaries(st.sampled_from(GGUF_KEYS), GGUF_VALUES, max_size=3),
       drop=st.lists(st.sampled_from(GGUF_KEYS), max_size=2))
@example(changes={"llama.attention.head_count": 0}, drop=[])  # a ZeroDivisionError before
@example(changes={"llama.block_count": 3}, drop=[])
@example(changes={"llama.feed_forward_length": 7}, drop=[])
def test_fuzz_gguf_metadata(base_gguf, changes, drop):
    d = scratch()
    try:
        rewrite_gguf(base_gguf, d / "m.gguf", changes, tuple(k for k in drop if k not in changes))
        sample_gguf(d / "m.gguf")
    finally:
        shutil.rmtree(d)


# --------------------------------------------------------------------------------------- a training run's files
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    return micro_run(tmp_path_factory.mktemp("micro"))


@fuzz(30)
@given(line=st.integers(0, 100), values=st.lists(JSON, min_size=2, max_size=2), damage=st.integers(0, 2**32),
       extra=st.sampled_from(["", "\n", "garbage\n", '{"step": 9, "tok', "[]\n", "\n\n"]))
@example(line=1, values=["x", "x"], damage=3, extra="garbage\n")  # dropped rows and overwrote report.md before
def test_fuzz_metrics_report(trained, line, values, damage, extra):
    d = scratch() / "run"
    try:
        shutil.copytree(trained[0], d)
        path, r = d / "metrics.jsonl", random.Random(damage)
        if damage % 3 == 0:
            path.write_bytes(mutate_bytes(path.read_bytes(), r))
        elif damage % 3 == 1:
            lines = path.read_text().splitlines()
            i = line % len(lines)
            lines[i] = json.dumps(mutate_json(json.loads(lines[i]), r, values))
            path.write_text("\n".join(lines) + "\n")
        with open(path, "a") as f:
            f.write(extra)
        outcome(["report", "--run", d], d)
    finally:
        shutil.rmtree(d.parent)


@settings(parent=fuzz(8))
@given(values=st.lists(JSON, min_size=2, max_size=2), damage=st.integers(0, 2**32))
def test_fuzz_checkpoint_state(trained, values, damage):
    run, sets = trained
    d = scratch() / "run"
    try:
        shutil.copytree(run, d)
        state = max((d / "checkpoints").iterdir()) / "state.json"
        r = random.Random(damage)
        if damage % 3 == 0:
            state.write_bytes(mutate_bytes(state.read_bytes(), r))
        else:
            state.write_text(json.dumps(mutate_json(json.loads(state.read_text()), r, values)))
        outcome(["train", "--resume", "--quiet", "--out", d, *sets], d)
    finally:
        shutil.rmtree(d.parent)
