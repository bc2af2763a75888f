import math

import numpy as np
import pytest
import torch

from scalelab.model import check_memory
from scalelab import config, data, tokenizer
from scalelab.config import DataConfig
from scalelab.errors import ConfigError, DataError


def test_split_is_deterministic_and_order_independent(corpus_dir):
    c = data.read_corpus(str(corpus_dir))
    tr1, va1 = data.split_docs(c, 0.1)
    c2 = data.read_corpus(str(corpus_dir))
    c2.docs.reverse()
    tr2, va2 = data.split_docs(c2, 0.1)
    assert sorted(tr1) == sorted(tr2) and sorted(va1) == sorted(va2)
    assert va1 and tr1 and not set(tr1) & set(va1)


def test_duplicates_and_non_utf8_are_counted(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta\n" * 50)
    (tmp_path / "b.txt").write_text("alpha beta\n" * 50)  # duplicate of a
    (tmp_path / "c.txt").write_text("gamma delta\n" * 50)
    (tmp_path / "bad.bin").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3\x28")
    c = data.read_corpus(str(tmp_path))
    assert c.skipped_non_utf8 == 1
    train, val = data.split_docs(c, 0.5)
    assert c.duplicates == 1 and len(train) + len(val) == 2


def test_single_file_is_cut_into_pieces(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("".join(f"line {i} of a long text\n" for i in range(20000)))
    c = data.read_corpus(str(f))
    assert len(c.docs) > 20
    assert "".join(t for _, t in c.docs) == f.read_text()


def test_empty_and_missing_corpus(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.prepare(DataConfig(corpus=str(tmp_path / "nope"), cache_dir=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no UTF-8 text"):
        data.prepare(DataConfig(corpus=str(tmp_path / "empty"), cache_dir=str(tmp_path)))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.txt").write_text("just one document")
    with pytest.raises(DataError, match="too small"):
        data.prepare(DataConfig(corpus=str(tmp_path / "one"), cache_dir=str(tmp_path)))


def test_prepare_caches_and_tokens_round_trip(corpus_dir, cache_dir):
    cfg = DataConfig(corpus=str(corpus_dir), vocab_size=512, cache_dir=str(cache_dir))
    p = data.prepare(cfg)
    assert p.meta["vocab_size"] == 512
    assert data.prepare(cfg).dir == p.dir  # cached
    tok = tokenizer.load(p.tokenizer_path)
    ids = p.tokens("val")
    assert ids.dtype == np.uint16 and len(ids) == p.meta["val"]["tokens"]
    eot = tokenizer.eot_id(tok)
    first_doc = ids[: int(np.argmax(ids == eot))].tolist()
    text = tok.decode(first_doc)
    assert len(text.encode()) > 100
    assert tok.encode(text).ids == first_doc  # byte-level BPE round-trips
    # bits per byte: total nats over the split divided by its bytes, in bits
    assert p.bytes_per_token("val") == pytest.approx(p.meta["val"]["bytes"] / p.meta["val"]["tokens"])


def test_answer_only_mask_marks_exactly_the_answers(tmp_path):
    """Oracle: the answers written into the file, recovered from the supervised tokens of every document."""
    rng = np.random.default_rng(0)
    lines, answers = [], []
    for i in range(2500):  # > 2 pieces of 16 KB, so both splits get documents
        q, a = f"Q{rng.integers(10**6)}+{i} S", f"{rng.integers(10**4)} Y"
        lines.append(f"{q}\x1f{a}")
        answers.append(a + "\n")
    lines.append("a plain line, trained on in full")
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(corpus=str(tmp_path / "c.txt"), vocab_size=257, val_fraction=0.3, cache_dir=str(tmp_path),
                     loss_after="\x1f")
    p = data.prepare(cfg)
    tok = tokenizer.load(p.tokenizer_path)
    got = []
    for split in ("train", "val"):
        ids, m = np.asarray(p.tokens(split)), (np.asarray(p.mask(split)) & 1).astype(bool)
        assert len(ids) == len(m) and p.meta[split]["tokens"] == m.sum()
        text = tok.decode(ids.tolist(), skip_special_tokens=False)
        assert "\x1f" not in text  # the marker is dropped
        # supervised runs, cut at newlines, are the answers (and the plain line)
        runs, cur = [], []
        for t, keep in zip(ids.tolist(), m.tolist()):
            if keep:
                cur.append(t)
            elif cur:
                runs.append(tok.decode(cur)); cur = []
        got += [r for run in runs for r in run.splitlines(keepends=True)]
    assert sorted(got) == sorted(answers + ["a plain line, trained on in full\n"])
    x, y = data.Batches(p.tokens("train"), 32, 4, seed=0, mask=p.mask("train")).next()
    assert ((y == -100) | (y >= 0)).all() and (y == -100).any() and (y != -100).any()
    # brute force: a target is trained on iff its token is an answer token and its line starts inside the window
    mask, T = np.asarray(p.mask("train")), 32
    it = data.Batches(p.tokens("train"), T, 4, seed=0, mask=p.mask("train"))
    for _ in range(20):
        windows = [int(w) for w in it._order(it.epoch)[it.index:it.index + 4]]
        _, y = it.next()
        for row, w in enumerate(windows):
            for i in range(T):
                t = w * T + i + 1
                start = max(s for s in range(t + 1) if mask[s] & 2)
                assert (y[row, i] != -100) == bool(mask[t] & 1 and start >= w * T)
    logits = torch.randn(4, 32, 257)
    from scalelab.model import loss_fn
    keep = y != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    assert torch.allclose(loss_fn(logits, y), ref, atol=1e-6)
    with pytest.raises(DataError, match="loss_after"):
        (tmp_path / "d.txt").write_text("".join(f"no marker on line {i}\n" for i in range(3000)))
        data.prepare(DataConfig(corpus=str(tmp_path / "d.txt"), vocab_size=257, cache_dir=str(tmp_path),
                                loss_after="\x1f"))


def test_batches_resume_exactly_and_cover_windows():
    toks = np.arange(1000, dtype=np.uint16)
    a = data.Batches(toks, context=10, batch_size=7, seed=3)
    seen = []
    for _ in range(5):
        x, y = a.next()
        assert (y[:, :-1] == x[:, 1:]).all()
        seen += (x[:, 0] // 10).tolist()
    st = a.state()
    nxt = [a.next()[0] for _ in range(20)]  # crosses an epoch boundary (99 windows)
    b = data.Batches(toks, context=10, batch_size=7, seed=3)
    b.load_state(st)
    for want in nxt:
        assert (b.next()[0] == want).all()
    assert len(set(seen)) == len(seen)  # no window twice within an epoch


def test_batches_ranks_partition_the_global_batch():
    toks = np.arange(5000, dtype=np.uint16)
    one = data.Batches(toks, 16, 8, seed=1).next()[0]
    parts = [data.Batches(toks, 16, 4, seed=1, rank=r, world=2).next()[0] for r in range(2)]
    assert sorted(map(tuple, one.tolist())) == sorted(map(tuple, parts[0].tolist() + parts[1].tolist()))


def test_config_overrides_and_unknown_keys(tmp_path):
    cfg = config.load(None, ["train.lr=0.01", "model.norm=dyt", "name=x", "train.compile=true"])
    assert cfg.train.lr == 0.01 and cfg.model.norm == "dyt" and cfg.name == "x" and cfg.train.compile is True
    for bad, msg in [("train.lrr=1", "unknown config key train.lrr"), ("optim.lr=1", "unknown config section"),
                     ("train.lr=-1", "train.lr must be > 0"), ("model.n_head=5", "must divide model.d_model"),
                     ("model.n_kv_head=3", "must divide model.n_head"), ("train.max_steps=1.5", "integer"),
                     ("model.norm=batchnorm", "model.norm must be one of"), ("lr", "key=value"),
                     ("data.vocab_size=70000", "uint16")]:
        with pytest.raises(ConfigError, match=msg):
            config.load(None, [bad])
    r = tmp_path / "r.toml"
    r.write_text("[train]\nlr = 0.5\nbogus = 1\n")
    with pytest.raises(ConfigError, match="train.bogus"):
        config.load(r)
    r.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(r)


def test_config_toml_round_trip(tmp_path):
    cfg = config.load(None, ["model.norm=dyt", 'data.corpus="/a b/c"', "train.lr=1e-4"])
    p = tmp_path / "c.toml"
    p.write_text(config.to_toml(cfg))
    assert config.load(p) == cfg


def test_recipes_are_valid():
    from conftest import ROOT

    recipes = sorted((ROOT / "scalelab" / "recipes").glob("*.toml"))
    assert recipes and config.recipe_names() == [r.stem for r in recipes]
    for r in recipes:
        assert config.load(r).name == config.load(r.stem).name == r.stem  # by path and by name


def test_lr_schedule():
    from scalelab.train import lr_at

    t = config.TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, t) == pytest.approx(0.1)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(10, 110))
    assert math.isclose(lr_at(10, t), 1.0)


def test_hf_corpus_without_datasets_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="needs the 'datasets' package"):
        data.read_corpus("hf:wikitext")


def test_fms_schedule_of_the_dyt_code():
    """The DyT LLaMA code's schedule (fms-fsdp): min(1 − (1 − s/W)², 0.1 + 0.45·(1 + cos(π·s/N))), by hand."""
    from scalelab.config import TrainConfig
    from scalelab.train import lr_at

    t = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1, schedule="fms")
    assert lr_at(0, t) == 0.0
    assert lr_at(5, t) == pytest.approx(1 - 0.5 ** 2)  # parabolic warmup: 0.75 at half-way
    assert lr_at(10, t) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.1)))  # the cosine is the lower
    assert lr_at(50, t) == pytest.approx(0.55)
    assert lr_at(100, t) == pytest.approx(0.1) and lr_at(200, t) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="train.schedule"):
        config.load(None, ["train.schedule=linear"])


def test_absent_loss_after_marker_is_refused_before_the_tokenizer(tmp_path, monkeypatch):
    """`data.loss_after=QQQ` on a corpus without it used to train the whole BPE first (minutes) before saying so."""
    def no_training(*a, **k):
        raise AssertionError("the tokenizer was trained before the marker was checked")

    monkeypatch.setattr(tokenizer, "train_bpe", no_training)
    (tmp_path / "d.txt").write_text("".join(f"no marker on line {i}\n" for i in range(3000)))
    with pytest.raises(DataError, match="data.loss_after marker 'QQQ'"):
        data.prepare(DataConfig(corpus=str(tmp_path / "d.txt"), vocab_size=257, cache_dir=str(tmp_path),
                                loss_after="QQQ"))
    with pytest.raises(ConfigError, match="cannot hold a line break"):  # could never be found within a line
        config.load(None, ['data.loss_after="a\\nb"'])


def test_param_count_is_exact_without_allocating():
    from dataclasses import replace

    from scalelab.model import Transformer, param_count

    base = config.ModelConfig(vocab_size=300, context=16, d_model=32, n_layer=3, n_head=4, n_kv_head=2)
    for kw in [{}, {"tie_embeddings": False}, {"norm": "dyt"}, {"norm": "dyt", "dyt_embed_scale": False,
               "final_norm": "rmsnorm"}, {"norm": "layernorm", "ffn_hidden": 100, "n_kv_head": 4}]:
        cfg = replace(base, **kw)
        assert param_count(cfg) == Transformer(cfg).num_params(), kw
    assert param_count(replace(base, d_model=10**8, n_layer=10**6)) > 10**22  # instant: nothing is built


def test_model_too_large_is_refused_before_allocation(monkeypatch):
    cfg = config.load(None, ["model.d_model=100000000"])  # validates: 4 heads of size 2.5e7
    with pytest.raises(ConfigError, match=r"has about 4\.4e17 parameters: training needs about 6\.1 EiB of RAM"):
        check_memory(cfg)
    small = config.load(None, ["model.d_model=32", "data.vocab_size=300", "train.device=cpu"])
    from dataclasses import replace

    from scalelab.model import param_count

    need = param_count(replace(small.model, vocab_size=300)) * config.BYTES_PER_PARAM  # vocab: data.vocab_size
    monkeypatch.setattr(config, "available_memory", lambda: need)
    check_memory(small)  # exactly fits
    monkeypatch.setattr(config, "available_memory", lambda: need - 1)
    with pytest.raises(ConfigError, match="more than the .* available; make the model smaller"):
        check_memory(small)
    monkeypatch.setattr(config, "available_memory", lambda: None)  # a system that does not say: no check
    check_memory(cfg)


def test_cli_model_too_large_one_line_before_any_work(tmp_path):
    from conftest import run_cli

    p = run_cli("train", "--set", "model.d_model=100000000", "--set", f'data.corpus="{tmp_path / "none"}"',
                "--out", str(tmp_path / "r"), timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "EiB of RAM" in lines[0] and "model.d_model=100000000" in lines[0]
    assert not (tmp_path / "r").exists()  # (and the missing corpus was never read)


def test_model_too_large_for_the_gpu(monkeypatch):
    """On CUDA the training state must fit the GPU, and only the fp32 weights are built in RAM first."""
    from types import SimpleNamespace

    from scalelab.model import param_count

    cfg = config.load(None, ["model.d_model=512", "model.n_layer=8", "data.vocab_size=4096", "train.device=cuda:1"])
    n = param_count(cfg.model)  # (its vocab_size is the default 4096, = data.vocab_size)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpus = {0: 10**15, 1: n * config.BYTES_PER_PARAM - 1}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=gpus[i]))
    monkeypatch.setattr(config, "available_memory", lambda: n * 4)
    with pytest.raises(ConfigError, match=r"more than the .* of cuda:1; make the model smaller"):
        check_memory(cfg)
    gpus[1] += 1
    check_memory(cfg)  # fits the GPU exactly, and RAM holds the fp32 weights
    monkeypatch.setattr(config, "available_memory", lambda: n * 4 - 1)
    with pytest.raises(ConfigError, match=r"of RAM \(its fp32 weights, built on the CPU"):
        check_memory(cfg)
