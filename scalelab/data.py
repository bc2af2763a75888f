"""Corpora, the train/val split, token shards and a resumable batch iterator.

- The default corpus is this machine's Python standard library (`.py` sources): real text, no download.
  Any text file or directory works too, and `hf:<name>[:<split>]` reads a Hugging Face dataset's `text`
  column when `datasets` and the data are available locally.
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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scalelab import tokenizer as tokmod
from scalelab.config import DataConfig
from scalelab.errors import CheckpointError, DataError

CACHE_VERSION = 3
PIECE_BYTES = 16384


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


def read_corpus(spec: str) -> Corpus:
    """Read the documents named by `spec` (see module docstring)."""
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return _read_files(stdlib_files(), root)
    if spec.startswith("hf:"):
        return _read_hf(spec[3:])
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


def _read_hf(name: str) -> Corpus:
    dataset, _, split = name.partition(":")
    try:
        import datasets  # optional
    except ImportError:
        raise DataError(f"corpus hf:{name} needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(dataset, split=split or "train")
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's data problem here
        raise DataError(f"cannot load HF dataset {dataset!r}: {str(e).splitlines()[0]}") from None
    if "text" not in ds.column_names:
        raise DataError(f"HF dataset {dataset!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return Corpus(docs=[(f"{dataset}/{i}", t) for i, t in enumerate(ds["text"]) if t and t.strip()])


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
    """Read, split, train the tokenizer and tokenize, or reuse the cached result for the same inputs."""
    corpus = read_corpus(cfg.corpus)
    if not corpus.docs:
        raise DataError(f"corpus {cfg.corpus!r} has no UTF-8 text documents"
                        + (f" ({corpus.skipped_non_utf8} non-UTF-8 files skipped)" if corpus.skipped_non_utf8 else ""))
    train, val = split_docs(corpus, cfg.val_fraction, cfg.max_bytes)
    marker = cfg.loss_after
    if marker and not any(marker in t for t in train):  # a cheap scan, before minutes of tokenizer training
        raise DataError(f"no line of the corpus's training split holds the data.loss_after marker {marker!r}")
    key = hashlib.sha256(json.dumps([CACHE_VERSION, cfg.vocab_size, cfg.val_fraction, cfg.max_bytes,
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
                "duplicates": corpus.duplicates, "loss_after": marker}
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
        t = torch.from_numpy(buf)
        x, y = t[:, :-1], t[:, 1:]
        if self.mask is not None:
            m = np.stack([np.asarray(self.mask[w * T: w * T + T + 1]) for w in mine])
            keep = (m[:, 1:] & 1).astype(bool)
            # targets before the window's first line start belong to a line whose question is cut off
            starts = (m & 2).astype(bool)
            first = np.where(starts.any(1), starts.argmax(1), T + 1)
            keep &= np.arange(1, T + 1)[None, :] >= first[:, None]
            y = y.masked_fill(~torch.from_numpy(keep), -100)
        return x, y


def eval_batches(tokens: np.ndarray, context: int, batch_size: int, n: int,
                 mask: np.ndarray | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `n` validation batches every time (seed 0), so evaluations are comparable across steps."""
    it = Batches(tokens, context, batch_size, seed=0, mask=mask)
    return [it.next() for _ in range(min(n, math.ceil(it.n_windows / batch_size)))]
