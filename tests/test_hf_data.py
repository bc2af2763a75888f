"""Streamed corpora (`hf:`): Hugging Face `datasets` with streaming=True, on local JSON Lines / Parquet files.

The streamed token stream equals the one built from the same files loaded whole (non-streaming); ranks read
disjoint shards that together cover the data; a run killed inside a checkpoint write (one process, and two
torchrun ranks) resumes bitwise-exact; bad inputs are one DataError line (exit 2 from the CLI). Nothing is
downloaded: the Hub is offline for the whole module.
"""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before datasets is imported: no run-time downloads
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

datasets = pytest.importorskip("datasets")

from conftest import ROOT, run_cli, tiny_overrides  # noqa: E402
from test_train import DETERMINISTIC, wait_for_pause  # noqa: E402

from scalelab import checkpoint, data as datamod  # noqa: E402
from scalelab.config import DataConfig  # noqa: E402
from scalelab.errors import CheckpointError, DataError  # noqa: E402

WORDS = ("the model reads a stream of documents while tokens flow through layers and the loss falls slowly "
         "over many steps until the run ends").split()
CONTEXT, BATCH = 32, 4


def records(n: int, seed: int = 0) -> list[dict]:
    """n distinct documents of a few lines each, with an id; every 10th record's text is empty or null."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = "\n".join(f"record {i} line {j}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                         for j in range(rng.randint(1, 4)))
        if i % 10 == 7:
            text = "" if i % 20 == 7 else None
        out.append({"id": i, "text": text, "source": f"gen-{seed}"})
    return out


def write_jsonl(root: Path, recs: list[dict], n_files: int) -> Path:
    root.mkdir(parents=True)
    per = -(-len(recs) // n_files)
    for k in range(n_files):
        with open(root / f"part-{k:02d}.jsonl", "w") as f:
            for r in recs[k * per:(k + 1) * per]:
                f.write(json.dumps(r) + "\n")
    return root


def write_parquet(root: Path, recs: list[dict], n_files: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    per = -(-len(recs) // n_files)
    for k in range(n_files):
        pq.write_table(pa.Table.from_pylist(recs[k * per:(k + 1) * per]), root / f"part-{k:02d}.parquet")
    return root


def data_cfg(corpus: Path | str, cache: Path, **kw) -> DataConfig:
    spec = corpus if isinstance(corpus, str) else f"hf:{corpus}"
    return DataConfig(corpus=spec, vocab_size=kw.pop("vocab_size", 300), cache_dir=str(cache), **kw)


def score_is_val(text: str, val_fraction: float) -> bool:  # the hash rule, written out independently
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16) / 16**15 < val_fraction


def oracle_tokens(texts: list[str], tokenizer_path: Path) -> list[int]:
    """Documents tokenized one by one, each followed by end-of-text: what the stream must produce."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    eot = tok.token_to_id("<|endoftext|>")
    out = []
    for t in texts:
        out += tok.encode(t).ids + [eot]
    return out


def windows(stream: list[int], n: int) -> np.ndarray:
    """The first n consecutive (context + 1)-token windows of `stream` repeated epoch after epoch."""
    reps = -(-(n * CONTEXT + 1) // len(stream)) + 1
    s = np.asarray(stream * reps, dtype=np.int64)
    return np.stack([s[i * CONTEXT: i * CONTEXT + CONTEXT + 1] for i in range(n)])


def served(it, n_batches: int) -> np.ndarray:
    rows = []
    for _ in range(n_batches):
        x, y = it.next()
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows.append(torch.cat([x, y[:, -1:]], 1).numpy())
    return np.concatenate(rows) if rows else np.empty((0, CONTEXT + 1), np.int64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    recs = records(90)
    return {"records": recs, "jsonl": write_jsonl(root / "jsonl", recs, 3),
            "parquet": write_parquet(root / "pq", recs, 3),
            "run": write_jsonl(root / "run", recs[:45], 2),  # ~2.7k training tokens: an epoch is ~21 steps
            "cache": root / "cache", "hf_cache": root / "hf-cache", "root": root}


def in_memory_texts(files: list[Path], kind: str, cache: Path) -> list[str]:
    """The documents of `files` in order, from the non-streaming (Arrow, loaded whole) dataset."""
    ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=str(cache))
    assert not isinstance(ds, datasets.IterableDataset)
    return [t for t in ds["text"] if t and t.strip()]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_streamed_token_stream_equals_the_non_streamed_one(corpus, kind):
    """Same documents, same order, same tokens, epoch after epoch; the val split is the hash rule's."""
    cfg = data_cfg(corpus[kind], corpus["cache"])
    prepared = datamod.prepare(cfg)
    assert prepared.meta["streamed"] and prepared.meta["train"]["sample"]
    files = sorted(corpus[kind].iterdir())
    texts = in_memory_texts(files, "json" if kind == "jsonl" else "parquet", corpus["hf_cache"])
    assert len(texts) == 81  # 90 records, 9 of them empty or null
    assert texts == [r["text"] for r in corpus["records"] if r["text"]]  # the files' order
    train = [t for t in texts if not score_is_val(t, cfg.val_fraction)]
    val = [t for t in texts if score_is_val(t, cfg.val_fraction)]
    assert val and len(train) > 60
    assert prepared.tokens("val").tolist() == oracle_tokens(val, prepared.tokenizer_path)
    stream = oracle_tokens(train, prepared.tokenizer_path)
    it = datamod.train_batches(prepared, cfg, CONTEXT, BATCH, seed=0)
    n_batches = 2 * len(stream) // (CONTEXT * BATCH) + 3  # two epochs and a bit
    assert np.array_equal(served(it, n_batches), windows(stream, n_batches * BATCH))
    assert it.position()["epoch"] == 2


def test_jsonl_and_parquet_of_the_same_records_share_one_cache_entry(corpus):
    a = datamod.prepare(data_cfg(corpus["jsonl"], corpus["cache"]))
    b = datamod.prepare(data_cfg(corpus["parquet"], corpus["cache"]))
    assert a.dir == b.dir  # keyed by content: the same documents, the same tokenizer and val tokens


def test_resume_from_any_position_is_exact(corpus):
    """state() after k batches, loaded into a fresh iterator (through JSON), serves the rest identically."""
    cfg = data_cfg(corpus["jsonl"], corpus["cache"])
    prepared = datamod.prepare(cfg)
    ref = served(datamod.train_batches(prepared, cfg, CONTEXT, BATCH, 0), 60)
    for k in (0, 1, 17, 29, 44):  # 29 batches: past the end of the first epoch
        it = datamod.train_batches(prepared, cfg, CONTEXT, BATCH, 0)
        served(it, k)
        state = json.loads(json.dumps(it.state()))
        checkpoint.check_state({"step": 0, "data": state}, Path("step_0000000"))
        again = datamod.train_batches(prepared, cfg, CONTEXT, BATCH, 0)
        again.load_state(state)
        assert np.array_equal(served(again, 60 - k), ref[k * BATCH:]), k


@pytest.mark.parametrize("n_files", [3, 2])  # 3 files over 2 ranks: by record; 2 files: one file per rank
def test_two_ranks_read_disjoint_shards_that_cover_the_data(corpus, tmp_path, n_files):
    recs = corpus["records"]
    root = write_jsonl(tmp_path / "d", recs, n_files) if n_files != 3 else corpus["jsonl"]
    src = datamod.parse_hf(f"hf:{root}")
    shards = [[r["id"] for r in datamod.open_stream(src, "text", rank, 2)] for rank in (0, 1)]
    assert all(shards) and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == [r["id"] for r in recs]
    # each rank's token stream is its shard's training documents, tokenized
    cfg = data_cfg(root, corpus["cache"])
    prepared = datamod.prepare(cfg)
    by_id = {r["id"]: r["text"] for r in recs}
    for rank in (0, 1):
        texts = [by_id[i] for i in shards[rank] if by_id[i] and not score_is_val(by_id[i], cfg.val_fraction)]
        it = datamod.train_batches(prepared, cfg, CONTEXT, BATCH // 2, 0, rank, 2)
        assert np.array_equal(served(it, 20), windows(oracle_tokens(texts, prepared.tokenizer_path), 40)), rank
        with pytest.raises(RuntimeError, match="sync"):  # several ranks: the position needs the gather first
            it.state()


def test_loss_after_masks_streamed_targets(corpus, tmp_path):
    recs = [{"text": f"q{i} {' '.join(WORDS[i % 7:i % 7 + 3])}\u001fanswer {i}\nplain line {i}"} for i in range(60)]
    root = write_jsonl(tmp_path / "qa", recs, 1)
    cfg = data_cfg(root, corpus["cache"], loss_after="\u001f")
    prepared = datamod.prepare(cfg)
    it = datamod.train_batches(prepared, cfg, CONTEXT, BATCH, 0)
    x, y = it.next()
    assert (y == -100).any() and (y != -100).any()
    # the same masking as the cached (memmap) path, over the same token stream
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(prepared.tokenizer_path))
    texts = [r["text"] for r in recs if not score_is_val(r["text"], cfg.val_fraction)]
    ids, mask, _ = datamod._encode_masked(tok, texts, "\u001f", tok.token_to_id("<|endoftext|>"))
    ref = datamod.Batches(np.asarray(ids, np.uint16), CONTEXT, BATCH, 0, mask=np.asarray(mask, np.uint8))
    T = CONTEXT
    for b in range(BATCH):
        w = b  # stream window b = memmap window b
        want = ref.tokens[w * T + 1: w * T + T + 1].astype(np.int64)
        m = ref.mask[w * T: w * T + T + 1]
        starts = np.flatnonzero(m & 2)
        first = starts[0] if len(starts) else T + 1
        keep = (m[1:] & 1).astype(bool) & (np.arange(1, T + 1) >= first)
        assert torch.equal(y[b], torch.from_numpy(np.where(keep, want, -100))), b


def test_hub_name_config_and_split(corpus, tmp_path, monkeypatch):
    """hf:<name>[:<config>][:<split>] goes to load_dataset as name, config, split; datasets' own errors for an
    unknown config or split become one DataError line. (A local no-code dataset repo stands in for the Hub:
    datasets resolves a name that is a local directory there, so nothing is downloaded.)"""
    repo = tmp_path / "fakeds"
    recs = records(40, seed=1)
    write_jsonl(repo / "a", recs[:20], 1)
    write_jsonl(repo / "b", recs[20:], 1)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: a\n  data_files:\n"
                                    "  - split: train\n    path: a/part-00.jsonl\n"
                                    "  - split: test\n    path: a/part-00.jsonl\n"
                                    "- config_name: b\n  data_files:\n"
                                    "  - split: train\n    path: b/part-00.jsonl\n---\n")
    monkeypatch.chdir(tmp_path)
    assert datamod.parse_hf("hf:fakeds:a:test") == datamod.HFSource("hf:fakeds:a:test", "fakeds", "a", "test")
    assert datamod.parse_hf("hf:fakeds:b").config == "b" and datamod.parse_hf("hf:fakeds:test").split == "test"
    assert datamod.parse_hf("hf:fakeds::dev") == datamod.HFSource("hf:fakeds::dev", "fakeds", None, "dev")
    got = [t for _, t in datamod.stream_texts("hf:fakeds:b", "text")]
    assert got == [r["text"] for r in recs[20:] if r["text"]]
    got = [t for _, t in datamod.stream_texts("hf:fakeds:a:test", "text")]
    assert got == [r["text"] for r in recs[:20] if r["text"]]
    for spec, msg in [("hf:fakeds:zzz:train", "BuilderConfig 'zzz' not found. Available: ['a', 'b']"),
                      ("hf:fakeds:b:test", "Bad split: test. Available splits: ['train']"),
                      ("hf:fakeds", "Please pick one among the available configs: ['a', 'b']"),
                      ("hf:no-such-user/no-such-dataset-xyz", "Couldn't reach 'no-such-user/no-such-dataset-xyz'")]:
        with pytest.raises(DataError) as e:
            datamod.prepare(data_cfg(spec, corpus["cache"]))
        assert msg in str(e.value) and "\n" not in str(e.value), spec


def test_bad_inputs_are_one_data_error(corpus, tmp_path, monkeypatch):
    cache = corpus["cache"]
    empty = write_jsonl(tmp_path / "empty", [{"text": ""}, {"text": "  \n"}, {"text": None}], 1)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("plain text")
    mixed = write_jsonl(tmp_path / "mixed", corpus["records"][:5], 1)
    shutil.copy(next(corpus["parquet"].iterdir()), mixed / "x.parquet")
    broken = write_jsonl(tmp_path / "broken", corpus["records"][:5], 1)
    (broken / "part-01.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n')
    cases = [
        (data_cfg(tmp_path / "nope", cache), "no such directory or file"),
        (data_cfg(empty, cache), "is empty: no record has text in field 'text'"),
        (data_cfg(corpus["jsonl"], cache, text_field="body"),
         "has no field 'body' (data.text_field); its fields: id, text, source"),
        (data_cfg(corpus["jsonl"], cache, text_field="id"), "field 'id' holds int, not text"),
        (data_cfg(tmp_path / "notes", cache), "no JSON Lines (.jsonl, .json) or Parquet (.parquet) files"),
        (data_cfg(mixed, cache), "mixes JSON and Parquet files"),
        (data_cfg(broken, cache), "corpus hf:"),
        (data_cfg("hf:a:b:c:d", cache), "expected hf:<dataset>[:<config>][:<split>]"),
    ]
    for cfg, msg in cases:
        with pytest.raises(DataError) as e:
            datamod.prepare(cfg)
        assert msg in str(e.value) and "\n" not in str(e.value), (cfg.corpus, str(e.value))
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match=r"needs the 'datasets' package \(pip install 'scalelab\[hf\]'\)"):
        datamod.prepare(data_cfg(corpus["jsonl"], cache))


def test_cli_bad_corpus_is_one_line_exit_2(corpus, tmp_path):
    for corpus_spec, msg in [(f"hf:{tmp_path / 'missing'}", "no such directory or file"),
                             ("hf:no-such-user/no-such-dataset-xyz", "Couldn't reach")]:
        p = run_cli("train", "--quiet", "--out", str(tmp_path / "run"),
                    *tiny_overrides(corpus_spec, corpus["cache"]))
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and msg in p.stderr, p.stderr


def test_corrupt_stream_positions_are_checkpoint_errors(corpus):
    good = {"epoch": 0, "docs": 3, "offset": 5, "hf": {"x": 1}}
    path = Path("step_0000001")
    checkpoint.check_state({"step": 1, "data": {"ranks": [good]}}, path)
    for data, key in [({"ranks": []}, "data.ranks"), ({"ranks": [dict(good, docs=-1)]}, "data.ranks[0].docs"),
                      ({"ranks": [dict(good, hf=None)]}, "data.ranks[0].hf"), ({"ranks": [7]}, "data.ranks[0]"),
                      ({"ranks": [{k: v for k, v in good.items() if k != "offset"}]}, "data.ranks[0].offset")]:
        with pytest.raises(CheckpointError, match=re.escape(f"corrupt: {key} ")):
            checkpoint.check_state({"step": 1, "data": data}, path)
    cfg = data_cfg(corpus["jsonl"], corpus["cache"])
    it = datamod.train_batches(datamod.prepare(cfg), cfg, CONTEXT, BATCH, 0)
    for bad, msg in [({"epoch": 0, "index": 3}, "not a streamed corpus's"), ({"ranks": [good, good]}, "2 data rank"),
                     ({"ranks": [dict(good, hf={"bogus": 1})]}, "does not fit corpus"),
                     ({"ranks": [dict(good, docs=0, hf=None, offset=10**6)]}, "does not fit corpus")]:
        with pytest.raises(CheckpointError, match=msg):
            it.load_state(bad)


# ----------------------------------------------------------------------------------- real runs, real kills
def assert_same_final_state(want_run: Path, got_run: Path) -> None:
    """test_train's check for a streamed corpus: bitwise-equal weights and AdamW state, the same step, tokens,
    RNG and data position (epoch, docs, offset of every rank), the same metrics. The stream's own state_dict
    (`hf`) is compared by what it resumes to, not as JSON: datasets records its read-ahead in it, which
    differs between a resumed reader and one that ran through."""
    from safetensors.torch import load_file

    want, got = (sorted((r / "checkpoints").glob("step_*"))[-1] for r in (want_run, got_run))
    assert want.name == got.name
    for name in ("model.safetensors", "optim.safetensors"):
        a, b = load_file(str(want / name)), load_file(str(got / name))
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    sa, sb = (json.loads((c / "state.json").read_text()) for c in (want, got))
    for k in ("step", "tokens", "rng"):
        assert sa[k] == sb[k], k
    strip = [[{k: v for k, v in pos.items() if k != "hf"} for pos in s["data"]["ranks"]] for s in (sa, sb)]
    assert strip[0] == strip[1]
    cfg = DataConfig(**{k: v for k, v in sa["config"]["data"].items()})
    prepared = datamod.prepare(cfg)
    for rank in range(len(strip[0])):
        its = [datamod.train_batches(prepared, cfg, sa["config"]["model"]["context"], 2, 0, rank, len(strip[0]))
               for _ in (sa, sb)]
        for it, s in zip(its, (sa, sb)):
            it.load_state(s["data"])
        assert np.array_equal(served(its[0], 20), served(its[1], 20)), rank
    ra, rb = ([{k: r[k] for k in DETERMINISTIC if k in r} for r in map(json.loads, lines)]
              for lines in ((x / "metrics.jsonl").read_text().splitlines() for x in (want_run, got_run)))
    assert ra == rb  # no duplicated or missing lines, and the same numbers


def run_env(corpus) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(corpus["root"] / "hf-home"), OMP_NUM_THREADS="1")


def run_args(corpus, out: Path, **extra) -> list[str]:
    sets = {"train.max_steps": 30, "data.vocab_size": 300, **extra}
    return ["train", "--quiet", "--resume", "--out", str(out),
            *tiny_overrides(f"hf:{corpus['run']}", corpus["cache"], **sets)]


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("hfref") / "run"
    p = subprocess.run([sys.executable, "-m", "scalelab.cli", *run_args(corpus, out)], env=run_env(corpus),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return out


def test_resume_after_sigkill_inside_a_checkpoint_write_is_bitwise(corpus, reference_run, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "scalelab.cli", *run_args(corpus, out)],
                            env=dict(run_env(corpus), SCALELAB_TEST_CKPT_PAUSE=f"tensors:20:{marker}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_pause(proc, marker, timeout=120) == proc.pid
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [c.name for c in checkpoint.list_checkpoints(out / "checkpoints")] == ["step_0000010", "step_0000015"]
    resumed_at = json.loads((out / "checkpoints" / "step_0000015" / "state.json").read_text())["data"]["ranks"][0]
    p = subprocess.run([sys.executable, "-m", "scalelab.cli", *run_args(corpus, out)], env=run_env(corpus),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert_same_final_state(reference_run, out)
    last = json.loads((out / "checkpoints" / "step_0000030" / "state.json").read_text())["data"]["ranks"][0]
    assert resumed_at["epoch"] == 0 < last["epoch"]  # the resumed part crossed the end of the stream
    assert json.loads((out / "data.json").read_text())["streamed"] is True


def test_two_torchrun_ranks_resume_bitwise(corpus, tmp_path):
    """DDP on 2 ranks: each reads its shard; the checkpoint holds both positions; resuming from step 6 ends on
    the same state as the uninterrupted run."""
    from test_distributed import torchrun

    def ddp(out: Path):
        p = torchrun(2, [*run_args(corpus, out, **{"train.max_steps": 12, "train.ckpt_every": 6,
                                                     "train.eval_every": 6, "distributed.timeout_s": 60}),
                         "--strategy", "ddp"], timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]

    ref, out = tmp_path / "ref", tmp_path / "run"
    ddp(ref)
    state = json.loads((ref / "checkpoints" / "step_0000006" / "state.json").read_text())
    r0, r1 = state["data"]["ranks"]
    assert r0 != r1  # two shards, two positions
    shutil.copytree(ref, out)
    shutil.rmtree(out / "checkpoints" / "step_0000012")
    ddp(out)
    assert_same_final_state(ref, out)
