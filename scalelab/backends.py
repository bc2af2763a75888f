"""One backend protocol for every model source: a lab run, a GGUF file (the embedded `smollm2` too), or any
OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, Ollama, `scalelab serve`).

Everything above the engine that needs a model (`serve`, `search`, the Sudoku model's sampling rounds, the
search judge, the `sample` and `chat` commands) talks to a `Backend`:
- `generate(prompt, params) -> Response`: `params.n` samples of a prompt with stops and a seed; a prompt is raw
  text or a list of chat messages (rendered with the model's chat template, or `PLAIN_CHAT` for lab runs).
- `prob_yes(prompt, yes, no) -> Response`: P(yes) / (P(yes) + P(no)) for the next token(s) after a prompt, as
  the verification score of SSS reads it (`Response.p_yes`).
- `score(prompt, continuations) -> list[Score]`: log P(continuation | prompt).
Every `Response` carries token usage: prompt tokens as billed (once per call), prompt tokens served from a
prefix cache, the naive prompt cost (n × prompt, no prefix sharing) and completion tokens, overall and per
sample. One spec names a backend (`make_backend`): `smollm2`, `FILE.gguf`, `RUN_DIR` or
`openai:<url>#<model>` (`local:X` and `run:DIR` are accepted as aliases: older search runs recorded them).
One error type, `BackendError`, is raised for everything a user or a server can cause.

Notable choices:
- `openai` goes through the official SDK: base URL, key from `OPENAI_API_KEY`, a timeout, the SDK's retries
  with exponential backoff (connection errors, 408/409/429/5xx), and a semaphore bounding concurrent requests.
  When a server returns fewer than `n` choices (llama.cpp, Ollama), the rest are requested one at a time,
  concurrently, with seeds `seed + i`. Per-sample token counts are not reported by servers: the completion
  total is shared evenly.
- `openai.score` asks `/v1/completions` for the prompt+continuation echoed with logprobs and max_tokens 0
  (vLLM and `scalelab serve` support it); `openai.prob_yes` reads the top-20 logprobs of one greedy token.
- The local backend serves one request at a time (`lock`). Its answers are read whole, so the engine decodes
  a completion's text once at the end, not every row at every step (for a small model that decoding costs
  more than the model), unless stop strings need the text. Two options exist for search, which calls it
  millions of times on small models: `truncate` keeps the last tokens of a prompt longer than the context
  (a degenerate candidate can make a verification conversation overflow a small model) instead of failing,
  and `stop_as_ids` matches stop strings that are one token each as token ids, so that they need no text
  either (a longer token that merely contains the stop string then does not stop).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from scalelab.engine import Engine, SamplingParams, Score
from scalelab.errors import ScalelabError

# A plain template for lab checkpoints, which have no chat template of their own.
PLAIN_CHAT = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}Assistant:{% endif %}")
SPEC_HELP = "smollm2 | FILE.gguf | RUN_DIR | openai:<url>#<model>"
Prompt = str | list[dict]  # raw text, or chat messages


class BackendError(ScalelabError):
    """A model backend that failed (after retries) or cannot do what was asked. `status` is what a proxy
    answers for it: 504 when the server timed out, 502 when it failed or could not be reached."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


@dataclass
class Choice:
    text: str
    finish_reason: str = "stop"
    tokens: list[int] | None = None  # token ids (local backends)
    logprobs: list[float] | None = None
    n_tokens: int = 0  # completion tokens of this sample, a sampled stop token included


@dataclass
class Response:
    choices: list[Choice]
    prompt_tokens: int = 0  # as billed: the prompt once per call
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from a prefix cache
    naive_prompt_tokens: int = 0  # every sample's prompt prefilled from scratch (n × prompt)
    model: str = ""
    p_yes: float | None = None  # prob_yes only


class Backend(Protocol):
    """What the lab needs from a model."""

    name: str
    price: str  # the price-table entry its tokens are billed at (search/cost.py)

    def generate(self, prompt: Prompt, params: SamplingParams) -> Response: ...

    def prob_yes(self, prompt: Prompt, yes: str, no: str) -> Response: ...

    def score(self, prompt: str, continuations: list[str]) -> list[Score]: ...


def generate_many(backend: Backend, requests: list[tuple[Prompt, SamplingParams]]) -> list[Response | BackendError]:
    """`backend.generate` for each request, batched when the backend can (local: one continuous batch;
    openai: concurrent requests); the answers are the same as one by one. Each entry is the Response or the
    `BackendError` of that request, so the caller keeps whatever finished before a failure."""
    many = getattr(backend, "generate_many", None)
    if many is not None:
        return many(requests)
    out: list[Response | BackendError] = []
    for p, s in requests:
        try:
            out.append(backend.generate(p, s))
        except BackendError as e:
            out.append(e)
            break
    return out


def _check_messages(messages: list) -> None:
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                                for m in messages):
        raise BackendError("messages must be a non-empty list of {role, content} with string content")


# =========================================================================================== local
class LocalBackend:
    """The lab's engine over a GGUF file (`smollm2` or a path) or a lab run directory."""

    def __init__(self, model: str | Path = "smollm2", dtype: str = "float32", prefix_cache: int = 8,
                 truncate: bool = False, stop_as_ids: bool = False, quant: str = "auto"):
        import torch

        from scalelab import quant as quantmod

        if dtype not in ("float32", "bfloat16"):
            raise BackendError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        if quant not in ("auto", *quantmod.MODES):
            raise BackendError(f"--quant must be auto, {', '.join(quantmod.MODES)}; got {quant!r}")
        # dtype is for --quant none; the int8/int4 kernels compute in bfloat16 (the rest of the model with them)
        self.dtype = getattr(torch, dtype)
        self.truncate, self.stop_as_ids, self.price = truncate, stop_as_ids, "local"
        path = Path(str(model))
        if path.is_dir():
            from scalelab import checkpoint, tokenizer as tokmod

            self.run_cfg, net = checkpoint.load_run(path)
            self.quant = "none" if quant == "auto" else quant  # a run's weights are float: quantised on request
            if self.quant != "none" and self.run_cfg.diffusion.block_size:
                raise BackendError(f"--quant {self.quant} is not supported for BD3-LM runs ({path}): use --quant none")
            net = quantmod.quantize(net, self.quant) if self.quant != "none" else net.to(self.dtype)
            self.tokenizer = tokmod.load(path / "tokenizer.json")
            eot = tokmod.eot_id(self.tokenizer)
            # A run's documents are separated by end-of-text: every prompt starts a new document.
            self.chat_template, self.bos_id, self.add_bos, stops = PLAIN_CHAT, eot, True, [eot]
            self.name = path.name
        else:
            from scalelab import gguf

            self.run_cfg = None
            gm = gguf.load(str(model), dtype=self.dtype, quant=quant)
            self.quant = gm.quant
            net, self.tokenizer = gm.model, gm.tokenizer
            self.chat_template, self.bos_id, self.add_bos = gm.chat_template or PLAIN_CHAT, gm.bos_id, gm.add_bos
            stops, self.name = gm.stop_ids, str(model) if str(model) == "smollm2" else path.stem
        self.model = net
        self.engine = Engine(net, decode=lambda ids: self.tokenizer.decode(ids), stop_ids=stops,
                             prefix_cache=prefix_cache)
        self.lock = threading.RLock()  # the engine serves one request at a time (re-entered by a server's
        # scheduler, which holds it around each call it runs)

    @property
    def context(self) -> int:
        return self.model.cfg.context

    # ---- text ↔ tokens ------------------------------------------------------------------------------------
    def tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self.tokens(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        if not ids and self.bos_id is not None:
            ids = [self.bos_id]
        return ids

    def chat_prompt(self, messages: list[dict]) -> str:
        """The one chat encoder: the model's template (GGUF) or PLAIN_CHAT (lab runs)."""
        from scalelab.gguf import render_chat

        _check_messages(messages)
        bos = self.tokenizer.id_to_token(self.bos_id) if self.bos_id is not None else ""
        return render_chat(self.chat_template, messages, bos_token=bos or "")

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of raw text (BOS added where the model wants one) or of chat messages (templated)."""
        if isinstance(prompt, list):
            return self.encode(self.chat_prompt(prompt), bos=False)
        if not isinstance(prompt, str):
            raise BackendError(f"a prompt is text or a list of chat messages, got {type(prompt).__name__}")
        return self.encode(prompt)

    def _fit(self, ids: list[int], reserve: int) -> list[int]:
        room = self.context - reserve
        return ids if not self.truncate or len(ids) <= room else ids[-room:]

    def engine_params(self, params: SamplingParams) -> SamplingParams:
        """`params` as the engine runs a request whose text is only read at the end: no per-step text
        (`detokenize=False`, the text decoded once), which needs stop strings matched as ids. Without stop
        strings that is exact; with them only under `stop_as_ids`, and only when each is one token."""
        if not params.stop:
            return replace(params, detokenize=False)
        ids = [self.tokens(s) for s in params.stop]
        if not self.stop_as_ids or any(len(t) != 1 for t in ids):
            return params
        return replace(params, stop=(), stop_ids=[*params.stop_ids, *(t[0] for t in ids)], detokenize=False)

    def response(self, g, params: SamplingParams, prompt_len: int) -> Response:
        choices = [Choice(c.text, c.finish_reason, c.tokens, c.logprobs, len(c.tokens) + (c.finish_reason == "stop"))
                   for c in g.completions]
        return Response(choices, g.prompt_tokens, g.completion_tokens, g.cached_tokens, params.n * prompt_len,
                        self.name)

    # ---- the protocol -------------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: SamplingParams) -> Response:
        params.validate()
        ids = self._fit(self.prompt_ids(prompt), 1)
        run = self.engine_params(params)
        with self.lock:
            g = self.engine.generate(ids, run)
        return self.response(g, params, len(ids))

    def prob_yes(self, prompt: Prompt, yes: str, no: str) -> Response:
        cy, cn = self.tokens(yes), self.tokens(no)
        ids = self._fit(self.prompt_ids(prompt), max(len(cy), len(cn)))
        with self.lock:
            before = self.engine.prompt_tokens
            sy, sn = self.engine.score(ids, [cy, cn])  # one forward over both continuations, prompt KV shared
            used = self.engine.prompt_tokens - before
        m = max(sy.logprob, sn.logprob)
        p = math.exp(sy.logprob - m) / (math.exp(sy.logprob - m) + math.exp(sn.logprob - m))
        return Response([], used, 0, 0, used, self.name, p_yes=p)

    def score(self, prompt: str, continuations: list[str]) -> list[Score]:
        conts = [self.tokens(c) for c in continuations]
        with self.lock:
            return self.engine.score(self.encode(prompt), conts)

    def generate_many(self, requests: list[tuple[Prompt, SamplingParams]], max_rows: int = 64,
                      kv_mib: float = 1024.0) -> list[Response | BackendError]:
        """Many generations decoded together in one continuous batch (a search problem's verifications, a
        round's tie-breaks): each Response is what `generate` gives for that request alone (per-sample seeds),
        at most `max_rows` sequences and `kv_mib` of KV cache at once, the rest joining as rows free up. (The
        engine cannot fail one request of a batch alone: a bad request is an error for the whole call.)"""
        from scalelab.engine import Batch, Collector

        reqs = []
        for prompt, params in requests:
            params.validate()
            reqs.append((self._fit(self.prompt_ids(prompt), 1), self.engine_params(params)))
        engine = self.engine
        budget = engine.kv_budget(kv_mib)
        need = [engine.kv_positions(len(ids), p) for ids, p in reqs]
        out: list[Response | None] = [None] * len(reqs)
        collectors = [Collector(p, engine._stops(p), engine.decode) for _, p in reqs]
        with self.lock:
            batch, live, nxt = Batch(engine), {}, 0
            while nxt < len(reqs) or live:
                while nxt < len(reqs) and batch.fits(reqs[nxt][1].n, need[nxt], max_rows, budget):
                    live[batch.add(*reqs[nxt])] = nxt
                    nxt += 1
                for req, deltas in batch.step().items():
                    i = live[req]
                    collectors[i].add(deltas)
                    if req.done:
                        del live[req]
                        ids, p = reqs[i]
                        out[i] = self.response(collectors[i].result(len(ids), req.cached), p, len(ids))
        return out

    def stream_ids(self, ids: list[int], params: SamplingParams) -> Iterator:
        """Engine deltas for already-tokenized input, holding the engine for the whole stream."""
        with self.lock:
            yield from self.engine.stream(ids, params)


# =========================================================================================== openai
class OpenAIBackend:
    """Any OpenAI-compatible server through the `openai` SDK: chat messages go to /v1/chat/completions, raw
    text to /v1/completions."""

    def __init__(self, base_url: str, model: str = "default", api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 3, concurrency: int = 8, price: str = ""):
        try:
            import openai
        except ImportError:
            raise BackendError("the openai backend needs the openai package: pip install 'scalelab[serve]'") from None
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise BackendError("need concurrency >= 1, max_retries >= 0 and timeout > 0")
        self.openai = openai
        self.base_url, self.model, self.price = base_url, model, price or model
        self.name = f"{model}@{base_url}"
        self.max_retries, self.timeout = max_retries, timeout
        # A local server needs no key; the SDK insists on one, so a placeholder stands in.
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none",
                                    timeout=timeout, max_retries=max_retries)
        self.slots = threading.Semaphore(concurrency)
        self.concurrency = concurrency

    def _call(self, fn, **kw):
        o = self.openai
        with self.slots:
            try:
                return fn(**kw)
            except o.APITimeoutError:
                raise BackendError(f"the server at {self.base_url} timed out (after {self.max_retries + 1} "
                                   f"attempts)", status=504) from None
            except o.APIConnectionError as e:  # after the SDK's retries
                raise BackendError(f"cannot reach the server at {self.base_url} (failed after "
                                   f"{self.max_retries + 1} attempts): {e}") from None
            except o.APIStatusError as e:
                msg = e.message if isinstance(e.message, str) else str(e)
                tries = f" (failed after {self.max_retries + 1} attempts)" if e.status_code >= 500 or \
                    e.status_code in (408, 409, 429) else ""
                raise BackendError(f"server {self.base_url} answered {e.status_code}{tries}: "
                                   f"{msg.splitlines()[0][:300]}") from None
            except o.APIResponseValidationError as e:
                raise BackendError(f"server {self.base_url} returned a malformed response: {e}") from None
            except (ValueError, TypeError, KeyError) as e:  # a body that is not JSON or not the expected shape
                raise BackendError(f"server {self.base_url} returned garbage: {type(e).__name__}: {e}") from None

    def _kwargs(self, params: SamplingParams) -> dict:
        params.validate()
        kw = dict(model=self.model, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p)
        if params.seed is not None:
            kw["seed"] = params.seed
        if params.stop:
            kw["stop"] = list(params.stop)
        if params.top_k:
            kw["extra_body"] = {"top_k": params.top_k}
        return kw

    @staticmethod
    def _cached(usage) -> int:
        details = getattr(usage, "prompt_tokens_details", None)
        return int(getattr(details, "cached_tokens", 0) or 0) if details is not None else 0

    def _collect(self, fn, kw: dict, n: int, parse) -> Response:
        first = self._call(fn, n=n, **kw)
        choices, usage = parse(first), [getattr(first, "usage", None)]
        missing = n - len(choices)
        if missing > 0:  # the server ignored n: emulate it with single requests
            def one(i: int):
                kw_i = dict(kw)
                if "seed" in kw_i:
                    kw_i["seed"] = kw["seed"] + i
                return self._call(fn, n=1, **kw_i)

            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                rest = list(pool.map(one, range(len(choices), n)))
            for r in rest:
                choices += parse(r)
                usage.append(getattr(r, "usage", None))
        if not choices:
            raise BackendError(f"server {self.base_url} returned no choices")
        choices = choices[:n]
        prompt_tokens = getattr(usage[0], "prompt_tokens", 0) or 0
        completion = sum(getattr(u, "completion_tokens", 0) or 0 for u in usage)
        for c in choices:  # per-sample counts are not reported: share the total evenly
            c.n_tokens = completion // len(choices)
        return Response(choices, prompt_tokens, completion, self._cached(usage[0]), n * prompt_tokens,
                        getattr(first, "model", self.model) or self.model)

    def generate(self, prompt: Prompt, params: SamplingParams) -> Response:
        kw = self._kwargs(params)
        if isinstance(prompt, list):
            _check_messages(prompt)
            if params.logprobs or params.top_logprobs:
                kw["logprobs"] = True
                if params.top_logprobs:
                    kw["top_logprobs"] = params.top_logprobs

            def parse(r):
                try:
                    return [Choice(c.message.content or "", c.finish_reason or "stop", None,
                                   [t.logprob for t in c.logprobs.content] if c.logprobs and c.logprobs.content
                                   else None) for c in r.choices]
                except (AttributeError, TypeError) as e:
                    raise BackendError(f"server {self.base_url} returned a malformed chat completion: {e}") from None

            return self._collect(self.client.chat.completions.create, dict(kw, messages=prompt), params.n, parse)
        if params.logprobs or params.top_logprobs:
            kw["logprobs"] = max(1, params.top_logprobs)

        def parse(r):
            try:
                return [Choice(c.text, c.finish_reason or "stop", None,
                               list(c.logprobs.token_logprobs) if c.logprobs and c.logprobs.token_logprobs else None)
                        for c in r.choices]
            except (AttributeError, TypeError) as e:
                raise BackendError(f"server {self.base_url} returned a malformed completion: {e}") from None

        return self._collect(self.client.completions.create, dict(kw, prompt=prompt), params.n, parse)

    def generate_many(self, requests: list[tuple[Prompt, SamplingParams]]) -> list[Response | BackendError]:
        """Many generations at once: `concurrency` requests in flight, so a batching server decodes them
        together. Each entry is the Response or the BackendError of that request."""
        def one(r):
            try:
                return self.generate(*r)
            except BackendError as e:
                return e

        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(one, requests))

    def prob_yes(self, prompt: Prompt, yes: str, no: str) -> Response:
        """P(yes) among {yes, no} from the top-20 logprobs of one greedy token."""
        if isinstance(prompt, list):
            r = self._call(self.client.chat.completions.create, model=self.model, messages=prompt, max_tokens=1,
                           temperature=0, logprobs=True, top_logprobs=20)
        else:
            r = self._call(self.client.completions.create, model=self.model, prompt=prompt, max_tokens=1,
                           temperature=0, logprobs=20)
        try:
            lp = r.choices[0].logprobs
            if getattr(lp, "content", None) is not None:
                top = {t.token: t.logprob for t in lp.content[0].top_logprobs}
            else:
                top = dict(lp.top_logprobs[0])
        except (AttributeError, TypeError, IndexError, KeyError):
            raise BackendError(f"backend {self.name} returned no logprobs: use --score verdict") from None
        py = sum(math.exp(v) for k, v in top.items() if k.strip().lower() == yes.strip().lower())
        pn = sum(math.exp(v) for k, v in top.items() if k.strip().lower() == no.strip().lower())
        u = getattr(r, "usage", None)
        pt, ct = getattr(u, "prompt_tokens", 0) or 0, getattr(u, "completion_tokens", 0) or 0
        return Response([], pt, ct, self._cached(u), pt, self.model, p_yes=py / (py + pn) if py + pn > 0 else 0.5)

    def score(self, prompt: str, continuations: list[str]) -> list[Score]:
        """log P(c | prompt) via echoed prompt logprobs (`echo=True, max_tokens=0, logprobs=0`)."""
        base = self._call(self.client.completions.create, model=self.model, prompt=prompt, max_tokens=0,
                          echo=True, logprobs=0)
        out = []
        for c in continuations:
            r = self._call(self.client.completions.create, model=self.model, prompt=prompt + c, max_tokens=0,
                           echo=True, logprobs=0)
            try:
                n0 = len(base.choices[0].logprobs.token_logprobs)
                lps = [x for x in r.choices[0].logprobs.token_logprobs[n0:]]
            except (AttributeError, TypeError, IndexError):
                raise BackendError(f"server {self.base_url} does not return echoed prompt logprobs, which "
                                   "scoring needs") from None
            out.append(Score(sum(lps), lps))
        return out


# =========================================================================================== specs
def is_remote(spec: str) -> bool:
    return spec.startswith("openai:")


def is_run(spec: str) -> bool:
    """A lab run (raw-text prompts in the run's own formats), as opposed to a GGUF chat model or a server."""
    return spec.startswith("run:") or (not is_remote(spec) and (Path(_local_path(spec)) / "config.toml").is_file())


def _local_path(spec: str) -> str:
    for prefix in ("local:", "run:"):
        if spec.startswith(prefix):
            return spec[len(prefix):]
    return spec


def canonical_spec(spec: str) -> str:
    """A spec without the `local:`/`run:` alias prefixes (so old and new spellings compare equal)."""
    return spec if is_remote(spec) else _local_path(spec)


def price_name(spec: str) -> str:
    """The price-table entry of a spec: `local` for models run here, the model name for a server."""
    return spec.split("#")[-1] if is_remote(spec) else "local"


def make_backend(spec: str, *, retries: int = 3, timeout: float = 600.0, dtype: str = "float32",
                 truncate: bool = False, stop_as_ids: bool = False, quant: str = "auto") -> Backend:
    """`smollm2`, `FILE.gguf`, `RUN_DIR` or `openai:<url>#<model>` (`local:`/`run:` prefixes: aliases).
    quant: auto | none | int8 | int4 for local models (`LocalBackend`); a server quantises its own."""
    if not isinstance(spec, str) or not spec:
        raise BackendError(f"a backend spec is needed: {SPEC_HELP}")
    if quant not in ("auto", "none", "int8", "int4"):
        raise BackendError(f"--quant must be auto, none, int8 or int4; got {quant!r}")
    if is_remote(spec) and quant not in ("auto", "none"):
        raise BackendError(f"--quant {quant} is for local models; {spec} is a server")
    if is_remote(spec):
        rest = spec[len("openai:"):]
        if "#" not in rest:
            raise BackendError(f"backend {spec} needs a model name: openai:<url>#<model>")
        url, model = rest.split("#", 1)
        if not url.rstrip("/").endswith("/v1"):
            url = url.rstrip("/") + "/v1"
        return OpenAIBackend(url, model, timeout=timeout, max_retries=retries)
    path = _local_path(spec)
    p = Path(path)
    if path != "smollm2" and not p.is_dir() and not (p.is_file() and p.suffix == ".gguf"):
        from scalelab import gguf

        if path not in gguf.DEFAULT_MODELS:
            raise BackendError(f"unknown backend {spec!r}: use {SPEC_HELP}")
    return LocalBackend(path, dtype=dtype, truncate=truncate, stop_as_ids=stop_as_ids, quant=quant)


# =========================================================================================== one sample command
@dataclass
class Samples:
    samples: list[tuple[str, str]]  # (text, finish reason); raw prompts are included in the text
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens, where the backend counts them


def sample(spec: str, prompt: str, n: int = 1, max_tokens: int | None = None, temperature: float | None = None,
           top_p: float | None = None, top_k: int = 0, seed: int = 0, stop: list[str] | tuple = (),
           chat: bool | None = None, dtype: str = "float32", mode: str = "auto", steps: int | None = None,
           quant: str = "auto") -> Samples:
    """What `scalelab sample` does for any model: BD3-LM runs sample block by block (diffusion.bd3_generate);
    everything else goes through its Backend. Defaults depend on the model: lab runs continue raw text at
    T 0.8 / top-p 0.95 (BD3: T 1.0, diffusion.top_p); chat models and servers answer a chat turn at T 0.7."""
    if mode not in ("auto", "ar", "bd3"):
        raise BackendError(f"--mode must be auto, ar or bd3, got {mode!r}")
    run_dir = Path(_local_path(spec)) if not is_remote(spec) else None
    block = 0
    if run_dir is not None and (run_dir / "config.toml").is_file():
        from scalelab import config as configmod

        rcfg = configmod.load(run_dir / "config.toml")
        block = rcfg.diffusion.block_size
        if mode == "ar" and block:
            raise BackendError(f"run {run_dir} is a BD3-LM run (block size {block}); sample it with --mode bd3 or auto")
        if mode == "bd3" and not block:
            raise BackendError(f"run {run_dir} is an autoregressive run; sample it with --mode ar or auto")
        if block:
            if quant not in ("auto", "none"):
                raise BackendError(f"--quant {quant} is not supported for BD3-LM runs ({run_dir}): use --quant none")
            t = 1.0 if temperature is None else temperature
            return _sample_bd3(run_dir, rcfg, prompt, n, 200 if max_tokens is None else max_tokens, t,
                               rcfg.diffusion.top_p if top_p is None else top_p, top_k, seed, steps)
        defaults, chat = (200, 0.8, 0.95), bool(chat)
    else:
        if mode == "bd3":
            raise BackendError(f"{spec} is not a BD3-LM run; --mode bd3 is for BD3-LM runs")
        defaults, chat = (128, 0.7, 1.0), chat is None or chat
    if steps is not None:
        raise BackendError("--steps is for BD3-LM runs only")
    params = SamplingParams(n=n, max_tokens=defaults[0] if max_tokens is None else max_tokens,
                            temperature=defaults[1] if temperature is None else temperature,
                            top_p=defaults[2] if top_p is None else top_p, top_k=top_k, seed=seed, stop=list(stop))
    params.validate()
    backend = make_backend(spec, dtype=dtype, timeout=60.0, quant=quant)
    r = backend.generate([{"role": "user", "content": prompt}] if chat else prompt, params)
    return Samples([(c.text if chat else prompt + c.text, c.finish_reason) for c in r.choices],
                   (r.prompt_tokens, r.completion_tokens))


def _sample_bd3(run_dir: Path, cfg, prompt: str, n: int, max_tokens: int, temperature: float, top_p: float,
                top_k: int, seed: int, steps: int | None) -> Samples:
    import torch

    from scalelab import checkpoint, tokenizer as tokmod
    from scalelab.diffusion import bd3_generate

    block = cfg.diffusion.block_size
    if n < 1 or max_tokens < 1:
        raise BackendError("-n and --max-tokens must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise BackendError("need --temperature >= 0 and 0 < --top-p <= 1")
    if steps is not None and not 1 <= steps <= block:
        raise BackendError(f"--steps must be in [1, block size = {block}], got {steps}")
    if top_k:
        raise BackendError("--top-k is not supported for BD3-LM runs (the paper samples with top-p)")
    _, model = checkpoint.load_run(run_dir)
    tok = tokmod.load(run_dir / "tokenizer.json")
    eot = tokmod.eot_id(tok)
    ids = tok.encode(prompt).ids or [eot]  # an empty prompt starts a new document
    t_steps = cfg.diffusion.sample_steps if steps is None else steps
    out = bd3_generate(model, torch.tensor([ids] * n), max_tokens, block, t_steps, temperature, top_p, seed=seed,
                       stop_id=eot)
    samples = []
    for i in range(n):
        new = out[i, len(ids):].tolist()
        finish = "stop" if eot in new else "length"
        samples.append((prompt + tok.decode(new[:new.index(eot)] if eot in new else new), finish))
    return Samples(samples)
