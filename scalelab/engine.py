"""The inference engine: batched sampling with a KV cache, prefix sharing, logprobs and continuation scores.

The engine knows nothing about tokenization: prompts and completions are token-id lists. (It may be given a
`decode` callback, only to find stop strings and to stream text deltas safely.)

Notable choices:
- One prompt, n samples: the prompt is prefilled once (batch 1); its keys/values are then copied into the n
  rows of the decode cache, so n samples cost one prefill plus n-row decode steps that read the weights once
  per step (decode on CPU is memory-bound, so 16 rows cost little more than 1).
- A small LRU prefix cache keeps the prompt KV of recent requests; a later prompt that starts with a cached
  one (the same question sampled again, a longer chat, a verifier prompt after the solution) prefills only
  the new tokens.
- Every sample has its own random generator: sample i of a request with seed s uses `sample_seed(s, i)`
  (`sample_seed(s, 0) == s`), so it is the same sample whatever n it was drawn with, and equals drawing it
  alone. Finished rows are dropped from the batch, so they cost nothing afterwards.
- Tokens are drawn by `model.sample_next`, the lab's one token draw, with one generator per sample. With
  `slide`, generation goes past the context: when the cache is full it is rebuilt from each row's last
  context/2 tokens (used for long fixed-length samples, e.g. the BD3-LM report's AR baseline); servers stop at
  the context instead ("length").
- Logprobs are the model's own: log-softmax of the raw logits, before temperature, top-k and top-p (as vLLM
  reports them), so they can be compared across sampling settings.
- `score` returns log P(continuation | prompt) with one forward over all continuations (right-padded), which
  is what reading P("Yes") in verification needs.
- Token accounting: every call reports prompt tokens (and how many came from the prefix cache) and
  completion tokens (a sampled stop token counts, as servers count it).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from scalelab.errors import ScalelabError
from scalelab.model import KVCache, Transformer, sample_next

MAX_TOP_LOGPROBS = 20
_GOLDEN = 0x9E3779B97F4A7C15


def sample_seed(seed: int, i: int) -> int:
    """The seed of sample i in a request with `seed` (a Weyl sequence: distinct for every i, and i=0 → seed)."""
    return (seed + i * _GOLDEN) % (1 << 63)


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = fresh entropy
    stop: Sequence[str] = ()  # stop strings (need the engine's decode callback)
    stop_ids: Sequence[int] = ()  # extra stop tokens, besides the engine's own (EOS)
    logprobs: bool = False
    top_logprobs: int = 0
    slide: bool = False  # past the context, go on from the last context/2 tokens (a sliding window)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ScalelabError(msg)

        need(isinstance(self.n, int) and 1 <= self.n <= 1024, f"n must be an integer in [1, 1024], got {self.n!r}")
        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        need(isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be a number >= 0, got {self.temperature!r}")
        need(isinstance(self.top_p, int | float) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        need(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        need(isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        need(all(isinstance(i, int) for i in self.stop_ids), "stop_ids must be integers")
        need(isinstance(self.slide, bool), "slide must be true or false")


@dataclass
class Delta:
    """One new token of one sample, as `Engine.stream` yields it."""

    index: int  # which sample
    token: int | None  # None on a final delta that only carries held-back text or the finish reason
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    text: str = ""  # new text safe to show (only with a decode callback)
    finish_reason: str | None = None  # "stop" | "length" on the sample's last delta


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    text: str = ""
    finish_reason: str = "length"


@dataclass
class Generation:
    completions: list[Completion]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass
class Score:
    logprob: float  # log P(continuation | prompt), natural log
    token_logprobs: list[float]


class PrefixCache:
    """LRU map from prompt token tuples to their KV: each entry (n_layer, 1, n_kv, T, hd) keys and values."""

    def __init__(self, entries: int = 8):
        self.entries = entries
        self.store: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def lookup(self, prompt: Sequence[int]) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """The longest usable cached prefix of `prompt`: (length, k, v). At least one token is left to feed."""
        best, best_key = 0, None
        for key in self.store:
            n = min(len(key), len(prompt) - 1)
            if n <= best:
                continue
            common = 0
            while common < n and key[common] == prompt[common]:
                common += 1
            if common > best:
                best, best_key = common, key
        if best_key is None:
            return 0, None, None
        self.store.move_to_end(best_key)
        k, v = self.store[best_key]
        return best, k[:, :, :, :best], v[:, :, :, :best]

    def put(self, prompt: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        if self.entries <= 0:
            return
        key = tuple(prompt)
        for old in [o for o in self.store if len(o) <= len(key) and key[:len(o)] == o]:
            del self.store[old]  # the new entry covers every entry that is its prefix
        self.store[key] = (k, v)
        while len(self.store) > self.entries:
            self.store.popitem(last=False)


def _safe_text_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be shown now: hold back an incomplete UTF-8 character and any tail that could
    still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


class Engine:
    """Sampling and scoring over one model. Not thread-safe: callers serialise requests (the server does)."""

    def __init__(self, model: Transformer, decode: Callable[[list[int]], str] | None = None,
                 stop_ids: Sequence[int] = (), prefix_cache: int = 8):
        self.model = model.eval()
        self.cfg = model.cfg
        self.decode = decode
        self.stop_ids = list(stop_ids)
        self.prefix = PrefixCache(prefix_cache)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.prompt_tokens = 0  # totals over the engine's life
        self.completion_tokens = 0

    # ---- prefill -------------------------------------------------------------------------------------------
    def _check_prompt(self, prompt: Sequence[int]) -> None:
        if not prompt:
            raise ScalelabError("the prompt is empty: give at least one token")
        if len(prompt) >= self.cfg.context:
            raise ScalelabError(f"the prompt has {len(prompt)} tokens but the model's context is "
                                f"{self.cfg.context}: shorten it")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ScalelabError(f"token id {bad[0]} is outside the vocabulary (size {self.cfg.vocab_size})")

    def _prefill(self, prompt: Sequence[int]) -> tuple[KVCache, torch.Tensor, int]:
        """KV for the whole prompt (batch 1, exactly len(prompt) long) and the last position's logits (1, V)."""
        reused, k, v = self.prefix.lookup(prompt)
        cache = KVCache(self.cfg, 1, len(prompt), dtype=self.dtype, device=self.device)
        if reused:
            cache.load_prefix(k, v)
        x = torch.tensor([list(prompt[reused:])], device=self.device)
        logits = self.model(x, cache=cache)[:, -1]
        self.prefix.put(prompt, *cache.prefix())
        return cache, logits, reused

    # ---- sampling ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[list[Delta]]:
        """Sample `params.n` continuations of `prompt`, yielding each step's new tokens (and text deltas)."""
        params.validate()
        self._check_prompt(prompt)
        if params.stop and self.decode is None:
            raise ScalelabError("stop strings need an engine with a decode callback (give stop ids instead)")
        n, P, ctx = params.n, len(prompt), self.cfg.context
        max_new = params.max_tokens if params.slide else min(params.max_tokens, ctx - P)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(n)]
        stops = set(self.stop_ids) | set(params.stop_ids)
        want_top = params.top_logprobs
        pre, logits, cached = self._prefill(prompt)
        self.last_cached_tokens = cached
        self.prompt_tokens += P
        cache = KVCache(self.cfg, n, ctx if params.slide else P + max_new, dtype=self.dtype, device=self.device)
        cache.load_prefix(*pre.prefix())
        logits = logits.expand(n, -1)
        rows = list(range(n))  # sample index of each live batch row
        out: list[list[int]] = [[] for _ in range(n)]
        shown = [0] * n  # characters of text already yielded
        for step in range(max_new):
            nxt = sample_next(logits, params.temperature, params.top_k, params.top_p, [gens[r] for r in rows])
            lp = top = None
            if params.logprobs or want_top:
                logp = torch.log_softmax(logits.float(), dim=-1)
                lp = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
                if want_top:
                    tv, ti = logp.topk(want_top, dim=-1)
                    top = [list(zip(ti[j].tolist(), tv[j].tolist())) for j in range(len(rows))]
            deltas, keep = [], []
            ids = nxt.tolist()
            self.completion_tokens += len(ids)
            for j, (r, t) in enumerate(zip(rows, ids)):
                d = Delta(r, t, lp[j] if lp else None, top[j] if top else None)
                finish = None
                if t in stops:
                    finish = "stop"
                else:
                    out[r].append(t)
                if finish is None and step == max_new - 1:
                    finish = "length"
                if self.decode is not None:
                    text = self.decode(out[r])
                    if t not in stops:
                        hits = [i for i in (text.find(s, max(0, shown[r] - len(s) + 1)) for s in params.stop) if i >= 0]
                        if hits:
                            text, finish = text[:min(hits)], "stop"
                    end = len(text) if finish else _safe_text_end(text, params.stop)
                    d.text, shown[r] = text[shown[r]:end], max(shown[r], end)
                d.finish_reason = finish
                deltas.append(d)
                if finish is None:
                    keep.append(j)
            yield deltas
            if not keep:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch
                idx = torch.tensor(keep, device=self.device)
                cache.select_rows(idx)
                rows = [rows[j] for j in keep]
                nxt = nxt[idx]
            if cache.length >= cache.max_len:  # slide: rebuild from each row's last context/2 tokens
                window = torch.tensor([(list(prompt) + out[r])[-(ctx // 2):] for r in rows], device=self.device)
                cache = KVCache(self.cfg, len(rows), ctx, dtype=self.dtype, device=self.device)
                logits = self.model(window, cache=cache)[:, -1]
            else:
                logits = self.model(nxt[:, None], cache=cache)[:, -1]

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        """All `params.n` completions of `prompt` (see `stream`)."""
        *_, g = self.generate_steps(prompt, params)
        return g

    def generate_steps(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[Generation | None]:
        """`generate` one decode step at a time (for a scheduler that interleaves requests): yields None after
        each step, then the Generation. Its counts are its own, whatever ran in between."""
        comps = [Completion(logprobs=[] if params.logprobs else None,
                            top_logprobs=[] if params.top_logprobs else None) for _ in range(params.n)]
        stops = self._stops(params)
        used, cached = 0, 0
        for step, deltas in enumerate(self.stream(prompt, params)):
            if step == 0:
                cached = self.last_cached_tokens  # set by this stream's prefill, before its first yield
            for d in deltas:
                c = comps[d.index]
                used += d.token is not None
                if d.token is not None and d.token not in stops:
                    c.tokens.append(d.token)
                if c.logprobs is not None and d.logprob is not None:
                    c.logprobs.append(d.logprob)
                if c.top_logprobs is not None and d.top_logprobs is not None:
                    c.top_logprobs.append(d.top_logprobs)
                c.text += d.text
                if d.finish_reason:
                    c.finish_reason = d.finish_reason
            yield None
        yield Generation(comps, prompt_tokens=len(prompt), completion_tokens=used, cached_tokens=cached)

    def _stops(self, params: SamplingParams) -> set[int]:
        return set(self.stop_ids) | set(params.stop_ids)

    # ---- scoring -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompt: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[Score]:
        """log P(c | prompt) for each continuation c, with the prompt's KV prefilled once and shared."""
        self._check_prompt(prompt)
        if not continuations or any(len(c) == 0 for c in continuations):
            raise ScalelabError("give at least one continuation, each at least one token long")
        P, L = len(prompt), max(len(c) for c in continuations)
        if P + L > self.cfg.context:
            raise ScalelabError(f"prompt + continuation is {P + L} tokens but the model's context is "
                                f"{self.cfg.context}")
        for c in continuations:
            self._check_prompt(c)
        B = len(continuations)
        # Feed prompt[-1] + c[:-1]: output j is the distribution of c[j]. The KV for prompt[:-1] is shared.
        cache = KVCache(self.cfg, B, P + L, dtype=self.dtype, device=self.device)
        if P > 1:
            pre, _, _ = self._prefill(prompt[:-1])
            cache.load_prefix(*pre.prefix())
        pad = [[prompt[-1], *c[:-1]] + [0] * (L - len(c)) for c in continuations]  # right padding: ignored
        logp = torch.log_softmax(self.model(torch.tensor(pad, device=self.device), cache=cache).float(), dim=-1)
        self.prompt_tokens += P + sum(len(c) for c in continuations)
        out = []
        for b, c in enumerate(continuations):
            tl = logp[b, torch.arange(len(c)), torch.tensor(list(c))].tolist()
            out.append(Score(sum(tl), tl))
        return out
