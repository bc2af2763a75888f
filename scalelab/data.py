"""Corpora, the train/val split, token shards and a resumable batch iterator.

- The default corpus is this machine's Python standard library (`.py` sources): real text, no download.
  Any text file or directory works too. `hf:` corpora are streamed with Hugging Face `datasets` (the `hf`
  extra): see "Streamed corpora" below.
- Documents are deduplicated by content and split by the hash of their content, so the split is the same on
  every machine and never depends on file order. A single file is cut into ~16 KB pieces on line boundaries
  so that it can be split too. Files that are not UTF-8 are skipped and counted.
- A byte-level BPE is trained on the train split only; tokens (documents joined by end-of-text) are stored
  as uint16 memmaps. Everything is cached under a key of the corpus content and the data config.
- `data.loss_after` turns on answer-only training: a parallel uint8 mask marks the tokens after the marker on
  each line, and batches carry -100 (ignored by the loss) at every other target. An answer whose line starts
  before its window is not trained on either: its question is cut off, so it could only be guessed.
- The batch iterator cuts the token stream into non-overlapping windows and visits them in a seeded random
  order per epoch; its position (epoch, index) is all the state a checkpoint needs to resume it exactly.

Streamed corpora (`hf:`, read with `datasets.load_dataset(..., streaming=True)`, never whole in memory):
- `hf:<name>[:<config>][:<split>]` is a dataset on the Hugging Face Hub (split `train` by default; with one
  part after the name it is the split if it is train, validation or test, else the config; `hf:<name>::<split>`
  names a split without a config). `hf:<path>` with a path that starts with `/`, `./`, `../` or `~` is a local
  directory (searched recursively, hidden files skipped, sorted by path) or file of JSON Lines (`.jsonl`,
  `.json`, optionally `.gz`) or Parquet (`.parquet`), one kind per corpus, read as one `train` split.
  Each record's `data.text_field` (default "text") is a document; empty ones are skipped.
- A document is validation data if its content hash scores below `val_fraction` (the same rule as above), so
  the split needs no pass over the data; documents are not deduplicated. The tokenizer is trained on the
  training documents of the stream's head (its first `data.max_bytes` bytes of them, 0 = SAMPLE_BYTES); the
  validation documents in that head are the val split. `train.bin` in the cache is that head, not all of it.
- Training reads the stream in its order (no shuffle: shuffle the data beforehand), tokenizes it document by
  document (end-of-text after each) and cuts it into consecutive windows of `context + 1` tokens; at its end
  the next epoch starts the stream again. Under torchrun each data rank reads its own shard
  (`datasets.distributed.split_dataset_by_node`). A checkpoint holds every rank's position: the document the
  next window starts in (the stream's `state_dict()` just before it, and how many records came before it in
  this epoch) and the token offset into it, so resume is exact without re-reading what was consumed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from scalelab import tokenizer as tokmod
from scalelab.checkpoint import stream_position_problem
from scalelab.config import DataConfig
from scalelab.errors import CheckpointError, DataError

CACHE_VERSION = 3
PIECE_BYTES = 16384
SAMPLE_BYTES = 16 << 20  # a streamed corpus's tokenizer sample when data.max_bytes is 0
HF_SPLITS = ("train", "validation", "test")  # `hf:<name>:<x>`: x is a split if it is one of these, else a config
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet"}


@dataclass
class Corpus:
    docs: list[tuple[str, str]]  # (name, text)
    skipped_non_utf8: int = 0
    duplicates: int = 0


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _read_files(files: list[Path], base: Path) -> Corpus:
    corpus = Corpus(docs=[])
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {f}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            corpus.skipped_non_utf8 += 1
            continue
        if text.strip():
            corpus.docs.append((str(f.relative_to(base)) if f != base else f.name, text))
    return corpus


def _pieces(name: str, text: str) -> list[tuple[str, str]]:
    """Cut one long text into ~PIECE_BYTES pieces on line boundaries."""
    out, buf, size = [], [], 0
    for line in text.splitlines(keepends=True):
        buf.append(line)
        size += len(line)
        if size >= PIECE_BYTES:
            out.append((f"{name}#{len(out)}", "".join(buf)))
            buf, size = [], 0
    if buf:
        out.append((f"{name}#{len(out)}", "".join(buf)))
    return out


def read_corpus(spec: str, text_field: str = "text") -> Corpus:
    """Read the documents named by `spec` (see module docstring); an `hf:` corpus is read whole, streamed."""
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return _read_files(stdlib_files(), root)
    if spec.startswith("hf:"):
        return Corpus(docs=[(f"{spec}#{i}", t) for i, t in stream_texts(spec, text_field)])
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"corpus not found: {spec} (use 'stdlib', a text file or directory, or hf:<dataset>)")
    if path.is_file():
        corpus = _read_files([path], path)
        corpus.docs = [p for name, text in corpus.docs for p in _pieces(name, text)]
        if corpus.skipped_non_utf8:
            raise DataError(f"corpus file {path} is not UTF-8 text")
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
        corpus = _read_files(files, path)
    return corpus


@dataclass(frozen=True)
class HFSource:
    """A parsed `hf:` corpus: `load_dataset(path, config, split=split, data_files=data_files, streaming=True)`."""
    spec: str  # as written in data.corpus, for messages
    path: str  # a Hub dataset name, or json / parquet for local files
    config: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] = ()


def is_streamed(corpus: str) -> bool:
    return corpus.startswith("hf:")


def _local_format(f: Path) -> str | None:
    name = f.name.lower()
    return next((fmt for suffix, fmt in LOCAL_FORMATS.items() if name.endswith(suffix)), None)


def parse_hf(spec: str) -> HFSource:
    """`hf:<name>[:<config>][:<split>]` or `hf:<local dir or file>` (see the module docstring)."""
    rest = spec[3:]
    if rest.startswith(("/", "./", "../", "~")) or rest in (".", ".."):
        path = Path(rest).expanduser()
        if not path.exists():
            raise DataError(f"corpus {spec}: no such directory or file {path}")
        if path.is_file():
            files = [path] if _local_format(path) else []
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file() and _local_format(p)
                           and not any(s.startswith(".") for s in p.relative_to(path).parts))
        if not files:
            raise DataError(f"corpus {spec}: no JSON Lines (.jsonl, .json) or Parquet (.parquet) files in {path}")
        kinds = sorted({_local_format(f) for f in files})
        if len(kinds) > 1:
            raise DataError(f"corpus {spec} mixes JSON and Parquet files; put each kind in its own directory")
        return HFSource(spec, kinds[0], data_files=tuple(str(f) for f in files))
    parts = rest.split(":")
    if not parts[0] or len(parts) > 3 or any(not p.strip() and i != 1 for i, p in enumerate(parts)) \
            or any(p != p.strip() for p in parts):
        raise DataError(f"corpus {spec!r}: expected hf:<dataset>[:<config>][:<split>] or hf:/path/to/dir")
    if len(parts) == 3:
        return HFSource(spec, parts[0], parts[1] or None, parts[2])
    if len(parts) == 2:
        if parts[1] in HF_SPLITS:
            return HFSource(spec, parts[0], split=parts[1])
        return HFSource(spec, parts[0], parts[1] or None)
    return HFSource(spec, parts[0])


def _first_line(e: BaseException) -> str:
    """An exception's message on one line (datasets' messages span several: the choices are on the later ones)."""
    text = " ".join(str(e).split())
    return (text if len(text) <= 300 else text[:297] + "...") or type(e).__name__


def open_stream(src: HFSource, text_field: str, rank: int = 0, world: int = 1):
    """The streaming `datasets.IterableDataset` of `src` (this data rank's shard of it when world > 1)."""
    try:
        import datasets  # optional: the `hf` extra
        from datasets.distributed import split_dataset_by_node
    except ImportError:
        raise DataError(f"corpus {src.spec} needs the 'datasets' package (pip install 'scalelab[hf]')") from None
    try:
        ds = datasets.load_dataset(src.path, src.config, split=src.split,
                                   data_files=list(src.data_files) or None, streaming=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's data problem here
        what = "files" if src.data_files else "dataset"
        raise DataError(f"cannot load the {what} of corpus {src.spec}: {_first_line(e)}") from None
    if not isinstance(ds, datasets.IterableDataset):
        raise DataError(f"corpus {src.spec} did not load as one split (got {type(ds).__name__})")
    names = ds.column_names
    if names is not None and text_field not in names:
        raise DataError(f"corpus {src.spec} has no field {text_field!r} (data.text_field); its fields: "
                        f"{', '.join(names)}")
    return split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 else ds


def _text_of(example: Any, src: HFSource, text_field: str) -> str:
    if not isinstance(example, dict) or text_field not in example:
        fields = ", ".join(example) if isinstance(example, dict) else type(example).__name__
        raise DataError(f"a record of corpus {src.spec} has no field {text_field!r} (data.text_field); "
                        f"its fields: {fields}")
    text = example[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"corpus {src.spec}: field {text_field!r} holds {type(text).__name__}, not text "
                        f"(set data.text_field to a text column)")
    return text


def _next_example(it: Iterator, src: HFSource) -> Any:
    """The stream's next record, or StopIteration; a failure to read is one DataError."""
    try:
        return next(it)
    except StopIteration:
        raise
    except Exception as e:  # noqa: BLE001 - a bad file or a lost connection is the user's data problem
        raise DataError(f"reading corpus {src.spec} failed: {_first_line(e)}") from None


def stream_texts(spec: str, text_field: str) -> Iterator[tuple[int, str]]:
    """(record index, text) of every non-empty document of a streamed corpus, in its order (one pass)."""
    src = parse_hf(spec)
    it = iter(open_stream(src, text_field))
    i = 0
    while True:
        try:
            ex = _next_example(it, src)
        except StopIteration:
            return
        text = _text_of(ex, src, text_field)
        if text.strip():
            yield i, text
        i += 1


def is_val(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: its content hash's score (as in split_docs)."""
    return int(_doc_hash(text)[:15], 16) / 16**15 < val_fraction


def _stream_head(cfg: DataConfig) -> tuple[list[str], list[str], dict]:
    """A streamed corpus's tokenizer sample (training documents of its head) and val documents of that head."""
    src = parse_hf(cfg.corpus)
    cap = cfg.max_bytes or SAMPLE_BYTES
    train, val, nbytes = [], [], 0
    for _, text in stream_texts(cfg.corpus, cfg.text_field):
        if is_val(text, cfg.val_fraction):
            val.append(text)
        else:
            train.append(text)
            nbytes += len(text.encode("utf-8"))
            if nbytes >= cap:
                break
    if not train and not val:
        raise DataError(f"corpus {src.spec} is empty: no record has text in field {cfg.text_field!r}")
    if not train:
        raise DataError(f"corpus {src.spec} has no training documents (all {len(val)} fell in the val split)")
    if not val:
        raise DataError(f"corpus {src.spec}: none of the first {len(train)} documents fell in the val split "
                        f"(data.val_fraction = {cfg.val_fraction}); raise data.val_fraction or data.max_bytes")
    return train, val, {"streamed": True, "text_field": cfg.text_field}


def _doc_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def split_docs(corpus: Corpus, val_fraction: float, max_bytes: int = 0) -> tuple[list[str], list[str]]:
    """Deduplicate, optionally subsample to `max_bytes`, and split by content hash into (train, val) texts."""
    seen: dict[str, str] = {}
    for _, text in corpus.docs:
        h = _doc_hash(text)
        if h in seen:
            corpus.duplicates += 1
        else:
            seen[h] = text
    ordered = sorted(seen.items())  # hash order: deterministic and independent of file order
    if max_bytes:
        kept, total = [], 0
        for h, text in ordered:
            if total >= max_bytes:
                break
            kept.append((h, text))
            total += len(text.encode("utf-8"))
        ordered = kept
    if len(ordered) < 2:
        raise DataError("corpus is empty or too small: need at least two distinct non-empty documents")
    score = {h: int(h[:15], 16) / 16**15 for h, _ in ordered}
    val = [(h, t) for h, t in ordered if score[h] < val_fraction]
    train = [(h, t) for h, t in ordered if score[h] >= val_fraction]
    if not val:  # tiny corpora: the lowest-scoring document becomes val
        val, train = train[:1], train[1:]
    if not train:
        train, val = val[1:], val[:1]
    return [t for _, t in train], [t for _, t in val]


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("SCALELAB_CACHE", "~/.cache/scalelab")).expanduser()


@dataclass
class Prepared:
    dir: Path
    meta: dict

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.dir / f"{split}.bin", dtype=np.uint16, mode="r")

    def mask(self, split: str) -> np.ndarray | None:
        """Per token (`data.loss_after`): bit 0 set where it is trained on, bit 1 where a line starts; None without `loss_after`: every token is trained on."""
        path = self.dir / f"{split}.mask"
        return np.memmap(path, dtype=np.uint8, mode="r") if path.is_file() else None

    def bytes_per_token(self, split: str = "val") -> float:
        return self.meta[split]["bytes"] / self.meta[split]["tokens"]


def prepare(cfg: DataConfig, log=None) -> Prepared:
    """Read, split, train the tokenizer and tokenize, or reuse the cached result for the same inputs.
    A streamed corpus (`hf:`) is read only as far as its head (see the module docstring)."""
    if is_streamed(cfg.corpus):
        train, val, extra = _stream_head(cfg)
        corpus = Corpus(docs=[])
        tag = ["stream"]
    else:
        corpus = read_corpus(cfg.corpus)
        if not corpus.docs:
            skipped = corpus.skipped_non_utf8
            raise DataError(f"corpus {cfg.corpus!r} has no UTF-8 text documents"
                            + (f" ({skipped} non-UTF-8 files skipped)" if skipped else ""))
        train, val = split_docs(corpus, cfg.val_fraction, cfg.max_bytes)
        extra, tag = {}, []
    marker = cfg.loss_after
    if marker and not any(marker in t for t in train):  # a cheap scan, before minutes of tokenizer training
        raise DataError(f"no line of the corpus's training split holds the data.loss_after marker {marker!r}")
    key = hashlib.sha256(json.dumps([CACHE_VERSION, *tag, cfg.vocab_size, cfg.val_fraction, cfg.max_bytes,
                                     cfg.loss_after]).encode())
    for t in train + [""] + val:
        key.update(_doc_hash(t).encode())
    root = cache_root(cfg)
    out = root / f"data-{key.hexdigest()[:16]}"
    if (out / "meta.json").is_file():
        return Prepared(out, json.loads((out / "meta.json").read_text()))
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    except OSError as e:
        raise DataError(f"cannot write the data cache in {root}: {e.strerror}") from None
    try:
        if log:
            log(f"training a {cfg.vocab_size}-token BPE on {len(train)} documents "
                f"({sum(map(len, train)) / 1e6:.1f} MB); cached for next time")
        tok = tokmod.train_bpe([t.replace(marker, "") for t in train] if marker else train, cfg.vocab_size)
        tok.save(str(tmp / "tokenizer.json"))
        eot = tokmod.eot_id(tok)
        meta = {"corpus": cfg.corpus, "vocab_size": tok.get_vocab_size(), "skipped_non_utf8": corpus.skipped_non_utf8,
                "duplicates": corpus.duplicates, "loss_after": marker, **extra}
        for split, texts in (("train", train), ("val", val)):
            if marker:
                ids, mask, nbytes = _encode_masked(tok, texts, marker, eot)
                np.asarray(mask, dtype=np.uint8).tofile(tmp / f"{split}.mask")
                meta[split] = {"docs": len(texts), "bytes": nbytes, "tokens": int(sum(k & 1 for k in mask)), "all_tokens": len(ids)}
            else:
                ids = []
                for i in range(0, len(texts), 512):
                    for enc in tok.encode_batch(texts[i:i + 512]):
                        ids.extend(enc.ids)
                        ids.append(eot)
                meta[split] = {"docs": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts),
                               "tokens": len(ids)}
            if extra and split == "train":
                meta[split]["sample"] = True  # streamed: the tokenizer's sample, the head of the stream
            np.asarray(ids, dtype=np.uint16).tofile(tmp / f"{split}.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Prepared(out, json.loads((out / "meta.json").read_text()))


def _encode_masked(tok, texts: list[str], marker: str, eot: int) -> tuple[list[int], list[int], int]:
    """Token ids, their loss mask (bit 0: trained on; bit 1: first token of a line) and the bytes
    of the trained-on text, for `loss_after`.

    Each line is cut at its first marker; the two parts are tokenized apart, so no token straddles the cut.
    `bytes` and the mask's sum give bits per byte over the answers. End-of-text between documents: no loss.
    """
    parts: list[tuple[str, int]] = []  # (text, trained on)
    for t in texts:
        for line in t.splitlines(keepends=True):
            pre, hit, post = line.partition(marker)
            if hit:
                parts += [(pre, 2), (post, 1)]
            else:
                parts.append((line, 3))
        parts.append(("", -1))  # end of document
    ids: list[int] = []
    mask: list[int] = []
    nbytes = 0
    for i in range(0, len(parts), 4096):
        chunk = parts[i:i + 4096]
        for (text, keep), enc in zip(chunk, tok.encode_batch([p for p, _ in chunk])):
            if keep < 0:
                ids.append(eot)
                mask.append(0)
                continue
            ids.extend(enc.ids)
            mask.extend([keep] + [keep & 1] * (len(enc.ids) - 1) if enc.ids else [])
            nbytes += len(text.encode("utf-8")) if keep & 1 else 0
    return ids, mask, nbytes


class Batches:
    """Random non-overlapping windows of `context + 1` tokens, reshuffled every epoch, resumable.

    With `world > 1`, rank r takes every world-th window of the same global order, so data-parallel workers
    see disjoint data and together cover exactly what one worker with world× the batch would.
    """

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 mask: np.ndarray | None = None):
        self.tokens, self.context, self.batch_size, self.mask = tokens, context, batch_size, mask
        self.seed, self.rank, self.world = seed, rank, world
        self.n_windows = (len(tokens) - 1) // context
        if self.n_windows < 1:
            raise DataError(f"split has {len(tokens)} tokens, fewer than context+1 = {context + 1}")
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, s: dict) -> None:
        """Restore a position from `state()` (a checkpoint's `data`); anything else is a CheckpointError."""
        pos = [s.get(k) for k in ("epoch", "index")] if isinstance(s, dict) else [None]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pos):
            raise CheckpointError(f"the checkpoint's data position is corrupt: {str(s)[:60]} (state.json needs "
                                  "non-negative integers data.epoch and data.index)")
        self.epoch, self.index = pos

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x, y), both (B, T) int64, with y the next tokens of x (-100 where `mask` says no loss)."""
        picks = []
        need = self.batch_size * self.world
        while len(picks) < need:
            order = self._order(self.epoch)
            take = order[self.index:self.index + need - len(picks)]
            picks.extend(take.tolist())
            self.index += len(take)
            if self.index >= self.n_windows:
                self.epoch, self.index = self.epoch + 1, 0
        mine = picks[self.rank::self.world]
        T = self.context
        buf = np.stack([np.asarray(self.tokens[w * T: w * T + T + 1], dtype=np.int64) for w in mine])
        m = None if self.mask is None else np.stack([np.asarray(self.mask[w * T: w * T + T + 1]) for w in mine])
        return _xy(buf, m)

    def sync(self, strat: Any = None) -> None:
        """Nothing to gather: every rank's position is the same (see StreamBatches.sync)."""


def _xy(buf: np.ndarray, m: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of (B, T + 1) windows and their loss masks (`data.loss_after`; None: every target counts)."""
    t = torch.from_numpy(buf)
    x, y = t[:, :-1], t[:, 1:]
    if m is not None:
        T = buf.shape[1] - 1
        keep = (m[:, 1:] & 1).astype(bool)
        # targets before the window's first line start belong to a line whose question is cut off
        starts = (m & 2).astype(bool)
        first = np.where(starts.any(1), starts.argmax(1), T + 1)
        keep &= np.arange(1, T + 1)[None, :] >= first[:, None]
        y = y.masked_fill(~torch.from_numpy(keep), -100)
    return x, y


class StreamBatches:
    """Consecutive windows of `context + 1` tokens of a streamed corpus (`hf:`), this data rank's shard, resumable.

    The token stream is the training documents (not val, not empty) of the stream in its order, each tokenized
    and followed by end-of-text; window i is tokens [i·T, i·T + T] (neighbours share one token, as in Batches).
    At the end of the stream the next epoch starts it again, the leftover tokens carrying over.
    """

    CHUNK = 64  # records read (and tokenized as a batch) at a time

    def __init__(self, cfg: DataConfig, tokenizer_path: Path, context: int, batch_size: int, rank: int = 0,
                 world: int = 1):
        from tokenizers import Tokenizer

        self.src, self.field = parse_hf(cfg.corpus), cfg.text_field
        self.val_fraction, self.marker = cfg.val_fraction, cfg.loss_after
        self.context, self.batch_size, self.rank, self.world = context, batch_size, rank, world
        self.tok = Tokenizer.from_file(str(tokenizer_path))
        self.eot = tokmod.eot_id(self.tok)
        self.ds = open_stream(self.src, self.field, rank, world)
        self._start = self.ds.state_dict()  # the stream's state before its first record: each epoch's start
        self.epoch, self.docs = 0, 0  # the reader: its epoch and the records it has read in it
        self._kept = 0  # training documents the reader found in this epoch
        self._it: Iterator | None = None
        # read, not yet consumed documents: [epoch, records before it, stream state before it, ids, mask]
        self._buf: deque[list] = deque()
        self._off, self._have = 0, 0  # tokens of _buf[0] consumed; tokens in _buf
        self._served, self._synced = 0, None  # batches served; (batches, every rank's position) from sync

    def _reader_state(self) -> dict | None:
        return self.ds.state_dict() if self.docs else None

    def _fill(self) -> None:
        """Read up to CHUNK records into the buffer (starting the next epoch at the end of the stream)."""
        texts, where = [], []
        while len(texts) < self.CHUNK:
            if self._it is None:
                self._it = iter(self.ds)
            before = self._reader_state()
            try:
                ex = _next_example(self._it, self.src)
            except StopIteration:
                if not self._kept:
                    shard = f" (data rank {self.rank} of {self.world})" if self.world > 1 else ""
                    raise DataError(f"corpus {self.src.spec} has no training documents in its stream{shard}") from None
                self.epoch, self.docs, self._kept, self._it = self.epoch + 1, 0, 0, None
                self.ds.load_state_dict(self._start)
                if texts:
                    break
                continue
            text = _text_of(ex, self.src, self.field)
            if text.strip() and not is_val(text, self.val_fraction):
                texts.append(text)
                where.append((self.epoch, self.docs, before))
                self._kept += 1
            self.docs += 1
        if self.marker:
            encoded = []
            for text in texts:
                ids, mask, _ = _encode_masked(self.tok, [text], self.marker, self.eot)
                encoded.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)))
        else:
            encoded = [(np.asarray(enc.ids + [self.eot], dtype=np.int64), None) for enc in self.tok.encode_batch(texts)]
        for (epoch, docs, before), (ids, mask) in zip(where, encoded):
            self._buf.append([epoch, docs, before, ids, mask])
            self._have += len(ids)

    def _window(self) -> tuple[np.ndarray, np.ndarray | None]:
        T = self.context
        while self._have - self._off < T + 1:
            self._fill()
        ids, masks, need, off = [], [], T + 1, self._off
        for doc in self._buf:
            part = doc[3][off:off + need]
            ids.append(part)
            if doc[4] is not None:
                masks.append(doc[4][off:off + need])
            need, off = need - len(part), 0
            if not need:
                break
        self._off += T
        while self._buf and self._off >= len(self._buf[0][3]):
            done = self._buf.popleft()
            self._off -= len(done[3])
            self._have -= len(done[3])
        return np.concatenate(ids), (np.concatenate(masks) if masks else None)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (batch_size, T) int64, as Batches.next."""
        wins = [self._window() for _ in range(self.batch_size)]
        self._served += 1
        m = np.stack([w[1] for w in wins]) if self.marker else None
        return _xy(np.stack([w[0] for w in wins]), m)

    def position(self) -> dict:
        """This rank's position: the document the next window starts in and the tokens of it consumed."""
        if not self._buf:
            self._fill()  # the next window's document (reading ahead changes nothing that is served)
        epoch, docs, before = self._buf[0][:3]
        return {"epoch": epoch, "docs": docs, "offset": self._off, "hf": before}

    def sync(self, strat: Any = None) -> None:
        """Gather every data rank's position (on every rank, before a checkpoint that rank 0 writes)."""
        mine = (self.rank, self.position())
        if self.world == 1:
            self._synced = (self._served, [mine[1]])
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise DataError("a streamed corpus read by several data ranks needs their process group "
                            "(torchrun with distributed.strategy ddp or diloco)")
        group = getattr(strat, "control_group", None)
        got: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(got, mine, group=group)
        ranks = dict(got)
        self._synced = (self._served, [ranks[r] for r in range(self.world)])

    def state(self) -> dict:
        """Every data rank's position ({"ranks": [...]}, by data rank), for a checkpoint's `data`."""
        if self.world == 1:
            return {"ranks": [self.position()]}
        if self._synced is None or self._synced[0] != self._served:
            raise RuntimeError("StreamBatches.state() needs sync() on every rank at this position first")
        return {"ranks": self._synced[1]}

    def load_state(self, s: dict) -> None:
        """Restore this rank's position from `state()`; anything else is a CheckpointError."""
        ranks = s.get("ranks") if isinstance(s, dict) else None
        if not isinstance(ranks, list):
            raise CheckpointError(f"the checkpoint's data position is not a streamed corpus's: {str(s)[:60]} "
                                  "(state.json needs data.ranks)")
        if len(ranks) != self.world:
            raise CheckpointError(f"the checkpoint was saved by {len(ranks)} data rank(s); resume it with the "
                                  f"same number, not {self.world}")
        pos = ranks[self.rank]
        if why := stream_position_problem(pos):
            raise CheckpointError(f"the checkpoint's data position is corrupt: data.ranks[{self.rank}]{why}")
        self.epoch, self.docs, self._kept, self._it = pos["epoch"], pos["docs"], 0, None
        self._buf.clear()
        self._off = self._have = 0
        try:
            self.ds.load_state_dict(pos["hf"] if pos["hf"] is not None else self._start)
        except Exception as e:  # noqa: BLE001 - datasets rejects a state that is not its own
            raise CheckpointError(f"the checkpoint's data position does not fit corpus {self.src.spec}: "
                                  f"data.ranks[{self.rank}].hf ({_first_line(e)})") from None
        try:
            self._fill()
        except DataError as e:  # datasets reads a state only when iterating
            raise CheckpointError(f"the checkpoint's data position does not fit corpus {self.src.spec}: "
                                  f"data.ranks[{self.rank}] ({e})") from None
        if not self._buf or self._buf[0][1] != pos["docs"] or pos["offset"] >= len(self._buf[0][3]):
            raise CheckpointError(f"the checkpoint's data position does not fit corpus {self.src.spec}: "
                                  f"data.ranks[{self.rank}] (the corpus changed since it was saved?)")
        self._off = pos["offset"]


def train_batches(prepared: Prepared, cfg: DataConfig, context: int, batch_size: int, seed: int, rank: int = 0,
                  world: int = 1) -> Batches | StreamBatches:
    """The training batch iterator: random windows of the cached tokens, or a streamed corpus's windows."""
    if prepared.meta.get("streamed"):
        return StreamBatches(cfg, prepared.tokenizer_path, context, batch_size, rank, world)
    return Batches(prepared.tokens("train"), context, batch_size, seed, rank, world, mask=prepared.mask("train"))


def eval_batches(tokens: np.ndarray, context: int, batch_size: int, n: int,
                 mask: np.ndarray | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `n` validation batches every time (seed 0), so evaluations are comparable across steps."""
    it = Batches(tokens, context, batch_size, seed=0, mask=mask)
    return [it.next() for _ in range(min(n, math.ceil(it.n_windows / batch_size)))]
