"""Byte-level BPE tokenizer, trained with HF `tokenizers`.

GPT-2 style: text is mapped to bytes first, so every string round-trips and nothing is ever unknown. Id 0 is
the end-of-text token that separates documents. The tokenizer is saved as the standard `tokenizer.json`, so
any HF-compatible tool can read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from scalelab.errors import ScalelabError

EOT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (256 bytes + EOT + merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_batched(texts), trainer=trainer)
    return tok


def _batched(texts: Iterable[str], n: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def load(path: str | Path) -> Tokenizer:
    """A saved `tokenizer.json`; a missing, truncated or foreign file is one ScalelabError."""
    path = Path(path)
    if not path.is_file():
        raise ScalelabError(f"{path} is missing: a run directory needs the tokenizer.json it was trained with")
    try:
        return Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ScalelabError(f"{path} is corrupt: not UTF-8 text") from None
    except Exception as e:  # tokenizers raises a bare Exception for JSON it cannot read
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ScalelabError(f"{path} is corrupt or truncated: {why}") from None


def eot_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOT)
    if i is None:
        raise ScalelabError(f"the tokenizer has no end-of-text token {EOT!r}: not a tokenizer scalelab trained")
    return i
