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
    detokenize: bool = True  # text deltas every step; False: tokens only, the text decoded once at the end

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
        need(self.detokenize or not self.stop, "stop strings need per-step text: detokenize must be true")


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
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, the k likeliest (id, logprob) there


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
        hd = self.cfg.d_model // self.cfg.n_head
        self.position_bytes = 2 * self.cfg.n_layer * self.cfg.n_kv_head * hd * self.dtype.itemsize  # K and V, 1 token
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
        logits = self.model(x, cache=cache, head_slice=slice(-1, None))[:, -1]  # the head on the last position only
        self.prefix.put(prompt, *cache.prefix())
        return cache, logits, reused

    def kv_positions(self, prompt_len: int, params: SamplingParams) -> int:
        """The KV positions a request can need at most: n rows of prompt + new tokens (what budgets reserve)."""
        new = params.max_tokens if params.slide else min(params.max_tokens, self.cfg.context - prompt_len)
        return params.n * (prompt_len + new)

    def kv_budget(self, mib: float) -> int:
        """How many KV positions `mib` MiB of cache holds."""
        return int(mib * 2 ** 20 // self.position_bytes)

    # ---- sampling ------------------------------------------------------------------------------------------
    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[list[Delta]]:
        """Sample `params.n` continuations of `prompt`, yielding each step's new tokens (and text deltas): a
        batch of this one request."""
        batch = Batch(self)
        req = batch.add(prompt, params)
        self.last_cached_tokens = req.cached
        while not req.done:
            yield batch.step()[req]

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        """All `params.n` completions of `prompt` (see `stream`)."""
        c = Collector(params, self._stops(params), self.decode)
        for deltas in self.stream(prompt, params):
            c.add(deltas)
        return c.result(len(prompt), self.last_cached_tokens)

    def _stops(self, params: SamplingParams) -> set[int]:
        return set(self.stop_ids) | set(params.stop_ids)

    # ---- scoring -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompt: Sequence[int], continuations: Sequence[Sequence[int]],
              top_logprobs: int = 0) -> list[Score]:
        """log P(c | prompt) for each continuation c, with the prompt's KV prefilled once and shared. With
        `top_logprobs` k, also each position's k likeliest tokens (what an echoed prompt's logprobs report)."""
        self._check_prompt(prompt)
        if not (isinstance(top_logprobs, int) and 0 <= top_logprobs <= MAX_TOP_LOGPROBS):
            raise ScalelabError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs!r}")
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
            top = None
            if top_logprobs:
                tv, ti = logp[b, :len(c)].topk(top_logprobs, dim=-1)
                top = [list(zip(i, v)) for i, v in zip(ti.tolist(), tv.tolist())]
            out.append(Score(sum(tl), tl, top))
        return out


class Collector:
    """Gathers one request's deltas into its `Generation` (the non-streaming answer). A request that ran
    without per-step text (`detokenize=False`) gets each completion's text from `decode` at the end."""

    def __init__(self, params: SamplingParams, stops: set[int], decode: Callable[[list[int]], str] | None = None):
        self.stops = stops
        self.decode = decode if not params.detokenize else None
        self.comps = [Completion(logprobs=[] if params.logprobs else None,
                                 top_logprobs=[] if params.top_logprobs else None) for _ in range(params.n)]
        self.used = 0

    def add(self, deltas: list[Delta]) -> None:
        for d in deltas:
            c = self.comps[d.index]
            self.used += d.token is not None
            if d.token is not None and d.token not in self.stops:
                c.tokens.append(d.token)
            if c.logprobs is not None and d.logprob is not None:
                c.logprobs.append(d.logprob)
            if c.top_logprobs is not None and d.top_logprobs is not None:
                c.top_logprobs.append(d.top_logprobs)
            c.text += d.text
            if d.finish_reason:
                c.finish_reason = d.finish_reason

    def result(self, prompt_tokens: int, cached: int) -> Generation:
        if self.decode is not None:
            for c in self.comps:
                c.text = self.decode(c.tokens)
        return Generation(self.comps, prompt_tokens=prompt_tokens, completion_tokens=self.used, cached_tokens=cached)


@dataclass(eq=False)
class Request:
    """One request's state inside a `Batch`."""

    prompt: list[int]
    params: SamplingParams
    gens: list[torch.Generator]
    stops: set[int]
    max_new: int
    cached: int
    out: list[list[int]]
    shown: list[int]
    step: int = 0
    done: bool = False

    @property
    def kv_tokens(self) -> int:
        """The KV positions this request can need at most: n rows of prompt + new tokens."""
        return self.params.n * (len(self.prompt) + self.max_new)


class Batch:
    """Continuous batching over one engine: requests join between steps and leave when done, and each step is
    one forward over every live row of every request.

    Rows share one KV cache of common length L. A row's positions are right-aligned: a request that joins
    with a P-token prompt fills columns [L - P, L) (its own positions 0..P-1), the columns before are padding
    that a key mask hides, and each row's new token gets its own RoPE position. With one request (or rows that
    all started together) there is no padding, no mask and no position tensor: the forward is exactly the
    single-request one. Leading columns no row uses are dropped when the cache fills, and it grows on demand.

    A step: forward the tokens sampled last step (one (rows, 1) forward), merge requests that joined since
    (their prefill logits are ready), then sample every row with its own request's settings and generator and
    hand out each request's deltas. A finished or removed request's rows leave before the next forward.
    """

    def __init__(self, engine: Engine):
        self.e = engine
        self.cache: KVCache | None = None
        self.rows: list[tuple[Request, int]] = []  # (request, sample index) of each cache row
        self.start: list[int] = []  # each row's first column (the columns before it are padding)
        self.logits: torch.Tensor | None = None  # (rows, V): the next-token logits of rows without a pending token
        self.pending: torch.Tensor | None = None  # (rows,): tokens sampled last step, not yet fed
        self.joining: list[tuple[Request, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.requests: list[Request] = []

    @property
    def kv_tokens(self) -> int:
        """KV positions reserved by the live and joining requests (what a budget is checked against)."""
        return sum(r.kv_tokens for r in self.requests) + sum(j[0].kv_tokens for j in self.joining)

    @property
    def live_rows(self) -> int:
        return len(self.rows) + sum(j[0].params.n for j in self.joining)

    def __len__(self) -> int:
        return len(self.requests) + len(self.joining)

    def fits(self, n: int, kv: int, max_rows: int, kv_budget: int) -> bool:
        """Whether a request of n rows reserving kv positions may join now (an empty batch takes anything)."""
        return not len(self) or (self.live_rows + n <= max_rows and self.kv_tokens + kv <= kv_budget)

    @torch.inference_mode()
    def add(self, prompt: Sequence[int], params: SamplingParams) -> Request:
        """Prefill `prompt` now; its rows join the batch at the next step."""
        e = self.e
        params.validate()
        e._check_prompt(prompt)
        if params.stop and e.decode is None:
            raise ScalelabError("stop strings need an engine with a decode callback (give stop ids instead)")
        if params.slide and len(self):
            raise ScalelabError("a sliding-window request runs alone, not in a shared batch")
        n, P, ctx = params.n, len(prompt), e.cfg.context
        max_new = params.max_tokens if params.slide else min(params.max_tokens, ctx - P)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(n)]
        pre, logits, cached = e._prefill(prompt)
        e.prompt_tokens += P
        req = Request(list(prompt), params, gens, set(e.stop_ids) | set(params.stop_ids), max_new, cached,
                      [[] for _ in range(n)], [0] * n)
        k, v = pre.prefix()
        self.joining.append((req, k, v, logits))
        return req

    def remove(self, req: Request) -> None:
        """Drop a request now (its client went away): its rows leave before the next forward."""
        req.done = True
        self.joining = [j for j in self.joining if j[0] is not req]
        self._keep([j for j, (r, _) in enumerate(self.rows) if r is not req])
        self.requests = [r for r in self.requests if r is not req]

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.cache, self.rows, self.start, self.logits, self.pending = None, [], [], None, None
            return
        idx = torch.tensor(keep, device=self.e.device)
        self.cache.select_rows(idx)
        self.rows = [self.rows[j] for j in keep]
        self.start = [self.start[j] for j in keep]
        self.pending = self.pending[idx] if self.pending is not None else None
        self.logits = self.logits[idx] if self.logits is not None else None

    def _forward(self) -> None:
        """Feed every row's pending token: one (rows, 1) forward."""
        e, c = self.e, self.cache
        ctx = e.cfg.context
        if c.length >= c.max_len:
            lo = min(self.start)
            slide = len(self.requests) == 1 and self.requests[0].params.slide
            if slide and lo == 0:  # rebuild from each row's last context/2 tokens
                req = self.requests[0]
                window = torch.tensor([(req.prompt + req.out[i])[-(ctx // 2):] for _, i in self.rows], device=e.device)
                self.cache = KVCache(e.cfg, len(self.rows), ctx, dtype=e.dtype, device=e.device)
                self.logits, self.pending = e.model(window, cache=self.cache)[:, -1], None
                return
            c.resize(max(c.length - lo + 1, min(2 * c.max_len, ctx)), -lo)  # drop unused columns, grow
            self.start = [s - lo for s in self.start]
        positions = mask = None
        if any(self.start):
            st = torch.tensor(self.start, device=e.device)
            positions = (c.length - st)[:, None]
            mask = (torch.arange(c.length + 1, device=e.device) >= st[:, None])[:, None, None, :]
        self.logits = e.model(self.pending[:, None], positions=positions, mask=mask, cache=c)[:, -1]
        self.pending = None

    def _merge(self) -> None:
        """Rows of the requests that joined since the last step enter the cache, right-aligned."""
        e = self.e
        for req, k, v, logits in self.joining:
            n, P = req.params.n, len(req.prompt)
            if self.cache is None:
                cap = e.cfg.context if req.params.slide else P + req.max_new
                self.cache = KVCache(e.cfg, 0, cap, dtype=e.dtype, device=e.device)
                self.cache.length = P
            c = self.cache
            shift = max(0, P - c.length)  # a longer prompt: make room on the left
            if shift or c.max_len < c.length + shift + 1:
                c.resize(max(c.max_len + shift, c.length + shift + 1), shift)
                self.start = [s + shift for s in self.start]
            c.add_rows(k, v, n)
            self.start += [c.length - P] * n
            self.rows += [(req, i) for i in range(n)]
            rows_logits = logits.expand(n, -1)
            self.logits = rows_logits if self.logits is None else torch.cat([self.logits, rows_logits])
            self.requests.append(req)
        self.joining = []

    @torch.inference_mode()
    def step(self) -> dict[Request, list[Delta]]:
        """One step: every live request's deltas (a request is done when all its samples have finished)."""
        if self.pending is not None and self.rows:
            self._forward()
        self._merge()
        out: dict[Request, list[Delta]] = {}
        if not self.rows:
            return out
        e = self.e
        sampled = torch.empty(len(self.rows), dtype=torch.long, device=e.device)
        finished: set[int] = set()
        for req in self.requests:
            idx = [j for j, (r, _) in enumerate(self.rows) if r is req]
            out[req] = self._sample(req, idx, sampled, finished)
            req.step += 1
            if all(j in finished for j in idx):
                req.done = True
        self.pending = sampled
        self.logits = None
        self._keep([j for j in range(len(self.rows)) if j not in finished])
        self.requests = [r for r in self.requests if not r.done]
        return out

    def _sample(self, req: Request, idx: list[int], sampled: torch.Tensor, finished: set[int]) -> list[Delta]:
        p, e = req.params, self.e
        it = torch.tensor(idx, device=e.device)
        logits = self.logits if len(idx) == len(self.rows) else self.logits[it]
        samples = [self.rows[j][1] for j in idx]
        nxt = sample_next(logits, p.temperature, p.top_k, p.top_p, [req.gens[i] for i in samples])
        sampled[it] = nxt
        lp = top = None
        if p.logprobs or p.top_logprobs:
            logp = torch.log_softmax(logits.float(), dim=-1)
            lp = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
            if p.top_logprobs:
                tv, ti = logp.topk(p.top_logprobs, dim=-1)
                top = [list(zip(ti[j].tolist(), tv[j].tolist())) for j in range(len(idx))]
        ids = nxt.tolist()
        e.completion_tokens += len(ids)
        deltas = []
        for j, (row, r, t) in enumerate(zip(idx, samples, ids)):
            d = Delta(r, t, lp[j] if lp else None, top[j] if top else None)
            finish = None
            if t in req.stops:
                finish = "stop"
            else:
                req.out[r].append(t)
            if finish is None and req.step == req.max_new - 1:
                finish = "length"
            if e.decode is not None and p.detokenize:
                text = e.decode(req.out[r])
                if t not in req.stops:
                    hits = [i for i in (text.find(s, max(0, req.shown[r] - len(s) + 1)) for s in p.stop) if i >= 0]
                    if hits:
                        text, finish = text[:min(hits)], "stop"
                end = len(text) if finish else _safe_text_end(text, p.stop)
                d.text, req.shown[r] = text[req.shown[r]:end], max(req.shown[r], end)
            d.finish_reason = finish
            deltas.append(d)
            if finish is not None:
                finished.add(row)
        return deltas
