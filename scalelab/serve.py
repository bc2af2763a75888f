"""An OpenAI-compatible HTTP server over the local engine (`scalelab serve`), so any OpenAI client (optillm,
LangChain, the `openai` SDK, our own `openai` backend) can use the lab's models.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`. Supported
request fields: model, n, max_tokens (max_completion_tokens), temperature, top_p, top_k (an extension, as vLLM),
seed, stop, logprobs / top_logprobs, echo (completions; with max_tokens 0 it returns the prompt's token
logprobs, which `OpenAIBackend.score` uses), stream (server-sent events, one chunk per token per choice). A
completions `prompt` may be a batch (a list of strings or of token-id lists: prompt p's samples are choices
p × n + j, decoded together). `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info` are vLLM's, which
lm-evaluation-harness's `local-completions` model reads as its tokenizer.

Notable choices:
- Starlette + uvicorn, bound to 127.0.0.1 only. One worker thread owns the engine (`scheduler.py`) and decodes
  every request in one continuous batch: requests (any n, streamed or not) join between steps and leave when
  done, so concurrent clients share each forward. A client that goes away (mid-stream or while waiting for a
  non-streamed answer) cancels its request: it leaves the batch before the next step.
- Hostile clients: the Host header must name the loopback address the server is bound to (DNS rebinding gets
  421), a browser Origin must be local or allowed with `--allow-origin` (else 403), and a POST body must be
  JSON (`text/plain` and form bodies, which a browser sends cross-origin without a preflight, get 415).
- Bounded requests (`Limits`): max_tokens, n, prompt tokens and body bytes (counted while reading) are 4xx when
  over, never clamped. The batch holds at most `rows` sequences and `kv_mib` of KV cache (a request reserves
  n × (prompt + max_tokens) positions); requests wait for room in arrival order, and when `waiting` are
  already waiting the next gets a 429 with Retry-After.
- `model` may be omitted, "default", the served model's name, or the name it was started with; any other
  name is a 404, as OpenAI answers. Message roles are system, user and assistant ("developer" is read as
  system, as OpenAI does for older models); other roles are a 400.
- A bad request gets a 4xx JSON error in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`,
  and the server carries on; a bug gets a 500 in the same shape and the server carries on too.
- SIGTERM (or Ctrl-C) stops accepting, lets in-flight requests finish for `grace_s` seconds, cancels the rest
  and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from scalelab.backends import LocalBackend
from scalelab.engine import MAX_TOP_LOGPROBS, Collector, SamplingParams
from scalelab.errors import ScalelabError
from scalelab.scheduler import Full, Scheduler, TooLarge

log = logging.getLogger("scalelab")
HOST = "127.0.0.1"
LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "developer": "system"}


@dataclass
class Limits:
    """What one request may ask for. `None` for max_tokens / prompt_tokens means the model's context."""

    max_tokens: int | None = None
    max_n: int = 64
    prompt_tokens: int | None = None
    body_bytes: int = 1 << 20
    rows: int = 64  # sequences decoded together in one batch (a request with n samples takes n)
    kv_mib: float = 512.0  # KV cache budget for the batch, MiB: requests reserve n × (prompt + max_tokens) positions
    waiting: int = 64  # requests waiting for room in the batch; one more gets a 429
    stop_strings: int = 8
    max_prompts: int = 64  # prompts in one /v1/completions request (a list of strings or of token-id lists)
    allow_origins: list[str] = field(default_factory=list)  # besides http(s)://127.0.0.1|localhost[:port]

    def validate(self) -> None:
        for k in ("max_n", "body_bytes", "rows", "kv_mib", "waiting", "max_prompts"):
            if getattr(self, k) < 1:
                raise ScalelabError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        for k in ("max_tokens", "prompt_tokens"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ScalelabError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")


class RequestError(ScalelabError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def error_json(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    """An error response in OpenAI's shape."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


async def until_gone(request) -> None:
    """Returns once the client has disconnected (the request body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _get(body: dict, key: str, types: type | tuple, default: Any = None) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(f"'{key}' has the wrong type ({type(v).__name__})", key)
    if not isinstance(v, types):
        raise RequestError(f"'{key}' has the wrong type ({type(v).__name__})", key)
    return v


def _params(body: dict, chat: bool, limits: Limits, context: int) -> SamplingParams:
    stop = _get(body, "stop", (str, list), [])
    if isinstance(stop, str):
        stop = [stop]
    if not all(isinstance(s, str) for s in stop) or len(stop) > limits.stop_strings:
        raise RequestError(f"'stop' must be a string or a list of at most {limits.stop_strings} strings", "stop")
    if chat:
        logprobs = _get(body, "logprobs", bool, False)
        top = _get(body, "top_logprobs", int, 0)
    else:
        lp = _get(body, "logprobs", int, None)
        logprobs, top = lp is not None, lp or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}",
                           "top_logprobs" if chat else "logprobs")
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _get(body, key, int, 16 if not chat else 512)
    cap = limits.max_tokens or context
    if key not in body:
        max_tokens = min(max_tokens, cap)  # the default, not the client's ask: fit it under the cap
    if not 1 <= max_tokens <= cap:
        raise RequestError(f"'{key}' must be in [1, {cap}] on this server, got {max_tokens}", key)
    n = _get(body, "n", int, 1)
    if not 1 <= n <= limits.max_n:
        raise RequestError(f"'n' must be in [1, {limits.max_n}] on this server, got {n}", "n")
    p = SamplingParams(n=n, max_tokens=max_tokens,
                       temperature=float(_get(body, "temperature", (int, float), 1.0)),
                       top_p=float(_get(body, "top_p", (int, float), 1.0)), top_k=_get(body, "top_k", int, 0),
                       seed=_get(body, "seed", int, None), stop=[s for s in stop if s], logprobs=logprobs,
                       top_logprobs=top)
    if p.seed is not None and not -(1 << 63) <= p.seed < 1 << 64:
        raise RequestError("'seed' must fit in 64 bits", "seed")
    if p.seed is not None:
        p.seed %= 1 << 63
    try:
        p.validate()
    except ScalelabError as e:
        raise RequestError(str(e)) from None
    return p


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("each message needs a 'role' and a string 'content'", "messages")
        if m["role"] not in ROLES:
            raise RequestError(f"unknown role {m['role'][:40]!r}: use one of system, user, assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
                raise RequestError("content parts must be objects with a string 'text'", "messages")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise RequestError("each message needs a 'role' and a string 'content'", "messages")
        out.append({"role": ROLES[m["role"]], "content": content})
    return out


async def read_json(request, limits: Limits) -> dict:
    """The request body as a JSON object, at most `limits.body_bytes` (counted while reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.body_bytes:
        raise RequestError(f"request body over {limits.body_bytes} bytes", status=413)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limits.body_bytes:
            raise RequestError(f"request body over {limits.body_bytes} bytes", status=413)

    def no_constant(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(bytes(raw), parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body



class _Guard:
    """ASGI middleware: Host must be this loopback server (DNS rebinding), a browser Origin must be local or
    allowed, and a POST body must be JSON (no cross-origin 'simple' requests)."""

    def __init__(self, app, port: int | None, allow_origins: list[str]):
        self.app, self.port, self.allow = app, port, {o.rstrip("/") for o in allow_origins}

    def _host_ok(self, host: str) -> bool:
        name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if not name:  # no port
            name, port = host, ""
        if name.lower() not in LOCAL_NAMES:
            return False
        return not port or self.port is None or port == str(self.port)

    def _origin_ok(self, origin: str) -> bool:
        if "*" in self.allow or origin.rstrip("/") in self.allow:
            return True
        scheme, _, rest = origin.partition("://")
        return scheme in ("http", "https") and self._host_ok(rest.rstrip("/"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem = None
        if not self._host_ok(headers.get("host", "")):
            problem = (421, f"Host {headers.get('host', '')[:80]!r} is not this server: it answers on "
                            f"127.0.0.1{':' + str(self.port) if self.port else ''} only", "misdirected_request")
        elif "origin" in headers and not self._origin_ok(headers["origin"]):
            problem = (403, f"Origin {headers['origin'][:80]!r} is not allowed (see --allow-origin)", "forbidden")
        elif scope["method"] == "POST":
            ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if ctype != "application/json":
                problem = (415, f"the body must be JSON (Content-Type: application/json), got {ctype!r}",
                           "unsupported_media_type")
        if problem is None:
            return await self.app(scope, receive, send)
        status, message, kind = problem
        await error_json(status, message, kind=kind)(scope, receive, send)


class ScheduledBackend:
    """The server's engine as a `Backend` for work on other threads (a served search): each generation joins
    the server's continuous batch through its scheduler, sharing forwards with every other request.
    `for_request(cancel)` gives a view whose calls in flight are cancelled (and leave the batch) once `cancel`
    is set. Long prompts keep their last tokens (as the search's local backend does)."""

    def __init__(self, local: LocalBackend, sched: Scheduler, cancel: threading.Event | None = None):
        self.local, self.sched, self.cancel = local, sched, cancel
        self.name, self.price = local.name, local.price
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, set by each request that uses it

    def for_request(self, cancel: threading.Event) -> ScheduledBackend:
        view = ScheduledBackend(self.local, self.sched, cancel)
        view.loop = self.loop
        return view

    def _ids(self, prompt) -> list[int]:
        ids = self.local.prompt_ids(prompt)
        room = self.local.context - 1
        return ids if len(ids) <= room else ids[-room:]

    async def _decode(self, ids: list[int], params: SamplingParams):
        params = self.local.engine_params(params)  # as the CLI's backend runs it: text decoded once, at the end
        c = Collector(params, self.local.engine._stops(params), self.local.engine.decode)
        job = self.sched.submit_decode(ids, params, bounded=False, collector=c)  # waits, never 429
        try:
            async for _ in job.items():  # none: the worker fills `c`; this ends with the job (or raises)
                pass
        finally:
            job.cancel()
        return c.result(len(ids), job.cached_tokens)

    def generate_many(self, requests: list) -> list:
        from scalelab.backends import BackendError

        reqs = []
        for prompt, params in requests:
            params.validate()
            reqs.append((self._ids(prompt), params))

        async def all_():
            return await asyncio.gather(*(self._decode(ids, p) for ids, p in reqs), return_exceptions=True)

        results = self._wait(all_)
        out = []
        for (ids, p), g in zip(reqs, results):
            if isinstance(g, BaseException):
                out.append(g if isinstance(g, BackendError) else BackendError(str(g), status=400))
                continue
            out.append(self.local.response(g, p, len(ids)))
        return out

    def generate(self, prompt, params: SamplingParams):
        r = self.generate_many([(prompt, params)])[0]
        if isinstance(r, Exception):
            raise r
        return r

    def _wait(self, make):
        """Run the coroutine `make()` on the server's loop and wait for it here (a search thread), giving up
        when the request's client has gone (its jobs then leave the batch before the next step)."""
        from concurrent.futures import TimeoutError as Waiting

        from scalelab.backends import BackendError

        if self.loop is None:
            raise BackendError("the server's engine is not running")
        fut = asyncio.run_coroutine_threadsafe(make(), self.loop)
        while True:
            try:
                return fut.result(timeout=0.05)
            except Waiting:
                if self.cancel is not None and self.cancel.is_set():
                    fut.cancel()
                    raise BackendError("the client closed the request", status=499) from None

    def _on_engine(self, call):
        """A one-shot engine call, run by the scheduler's worker between batch steps: every forward of the
        server runs on that one thread (a second thread computing would start a second OpenMP team)."""
        async def run():
            job = self.sched.submit(call)
            try:
                return await job.result()
            finally:
                job.cancel()  # a client gone before the call ran: the worker skips it
        return self._wait(run)

    def prob_yes(self, prompt, yes: str, no: str):
        return self._on_engine(lambda: self.local.prob_yes(prompt, yes, no))

    def score(self, prompt: str, continuations: list[str]):
        return self._on_engine(lambda: self.local.score(prompt, continuations))


def create_app(backend: LocalBackend | None, limits: Limits | None = None, port: int | None = None,
               scheduler: Scheduler | None = None, search=None):
    """The ASGI app. `port` is the bound port the Host header must carry (None: any port on a loopback name).
    `search(engine_backend) -> SearchService` (`search/service.py`) adds search requests: its service then
    answers chat requests that name a method (and, with no local `backend`, every request, proxied)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse

    limits = limits or Limits()
    limits.validate()
    served = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}  # what this server's answers counted
    if backend is None:  # a proxy: the search service answers everything
        if search is None:
            raise ScalelabError("a server needs a local model or an upstream")
        service = search(None)
        return _proxy_app(service, limits, port, served)
    tok = backend.tokenizer
    model_name = backend.name
    names = {model_name, "default", getattr(backend, "spec", model_name)}
    ctx = backend.model.cfg.context
    vocab = backend.model.cfg.vocab_size
    prompt_cap = min(limits.prompt_tokens or ctx, ctx - 1)
    engine = backend.engine
    sched = scheduler or Scheduler(engine, backend.lock, max_rows=limits.rows, kv_tokens=engine.kv_budget(limits.kv_mib),
                                   max_waiting=limits.waiting)
    scheduled = ScheduledBackend(backend, sched)
    service = search(scheduled) if search is not None else None

    def check_model(body: dict) -> None:
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or model not in names):
            raise RequestError(f"model {str(model)[:80]!r} is not served here (this server has {model_name!r})",
                               "model", status=404)

    def token_str(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    def check_ids(ids: list) -> list[int]:
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool):
                raise RequestError("'prompt' must be a string or a list of token ids", "prompt")
            if not 0 <= t < vocab:
                raise RequestError(f"token id {str(t)[:30]} is outside the vocabulary (size {vocab})", "prompt")
        if len(ids) > prompt_cap:
            raise RequestError(f"the prompt has {len(ids)} tokens but this server takes at most {prompt_cap} "
                               f"(the model's context is {ctx})", "prompt")
        return list(ids)

    def prompt_ids(body: dict) -> list[tuple[list[int], str, int]]:
        """The request's prompts as (ids, text, hidden): a string, a list of token ids, or a batch (a list of
        strings or of token-id lists). `hidden` is 1 where the server put a BOS before the client's text: an echo
        leaves it out, so the echoed tokens are the prompt's own (as a client's /tokenize counts them)."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            if not (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
                raise RequestError("a batched 'prompt' is a list of strings or a list of token-id lists, not a mix",
                                   "prompt")
            if len(prompt) > limits.max_prompts:
                raise RequestError(f"'prompt' has {len(prompt)} prompts but this server takes at most "
                                   f"{limits.max_prompts} per request", "prompt")
            return [one_prompt(p) for p in prompt]
        return [one_prompt(prompt)]

    def one_prompt(prompt) -> tuple[list[int], str, int]:
        if isinstance(prompt, str):
            ids = check_ids(backend.encode(prompt))
            return ids, prompt, len(ids) - len(backend.tokens(prompt))
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = check_ids(prompt)
            return ids, tok.decode(ids), 0
        raise RequestError("'prompt' must be a string, a list of token ids, or a list of either", "prompt")

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        served["requests"] += 1
        served["prompt_tokens"] += prompt_tokens
        served["completion_tokens"] += completion_tokens
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def comp_logprobs(tokens: list[int], lps: list, tops: list | None, offset0: int = 0) -> dict:
        strs = [token_str(t) for t in tokens]
        offs, o = [], offset0
        for s in strs:
            offs.append(o)
            o += len(s)
        top = [None if t is None else top_dict(t) for t in tops] if tops else None
        return {"tokens": strs, "token_logprobs": lps, "top_logprobs": top, "text_offset": offs}

    def top_dict(top: list[tuple[int, float]]) -> dict:
        d: dict[str, float] = {}
        for i, v in top:  # likeliest first: tokens that read the same keep the likelier's logprob
            d.setdefault(token_str(i), v)
        return d

    def chat_logprobs(tokens: list[int], lps: list, tops: list | None) -> dict:
        def entry(t, lp):
            s = token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {"content": [dict(entry(t, lp), top_logprobs=[entry(i, v) for i, v in (tops[j] if tops else [])])
                            for j, (t, lp) in enumerate(zip(tokens, lps))]}

    async def collect(request: Request, job, params: SamplingParams | None, echo_logprobs: bool, top: int,
                      prompts: list[list[int]]):
        """Per prompt (decoded together, each its own `job(ids)`): (the prompt's `Score` of ids[1:] or None,
        Generation or None, {sample: the stop token it ended on}); or None once the client has gone (the jobs
        are then cancelled and leave the batch)."""
        async def one(ids: list[int]):
            plps = None
            if echo_logprobs and len(ids) > 1:
                plps = (await sched.submit(lambda: engine.score(ids[:1], [ids[1:]], top)).result())[0]
            if params is None:
                return plps, None, {}
            stops = engine._stops(params)
            c, ends = Collector(params, stops, engine.decode), {}
            async for deltas in job(ids).items():
                c.add(deltas)
                ends.update((d.index, d.token) for d in deltas if d.token is not None and d.token in stops)
            return plps, c.result(len(ids), 0), ends

        async def work():
            tasks = [asyncio.ensure_future(one(ids)) for ids in prompts]
            try:
                return await asyncio.gather(*tasks)
            finally:
                for t in tasks:  # one failed (or the client left): the others stop too
                    t.cancel()

        result = asyncio.ensure_future(work())
        watch = asyncio.ensure_future(until_gone(request))
        try:
            await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
            return result.result() if result.done() else None
        finally:
            watch.cancel()
            if not result.done():
                result.cancel()
                try:
                    await result
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone
                    pass

    def body_of(prompts, params, chat, echo, results) -> dict:
        """The answer: prompt p's samples j are choices p × n + j (as OpenAI numbers a batch's choices)."""
        choices = []
        for p, ((ids, prompt_text, hidden), (score, g, ends)) in enumerate(zip(prompts, results)):
            echoed = None
            if echo and params.logprobs:  # the prompt's own tokens: a BOS the server put first is left out
                plps = [None] + (score.token_logprobs if score is not None else [])
                ptops = [None] + ((score.top_logprobs or []) if score is not None else [])
                echoed = comp_logprobs(ids[hidden:], plps[hidden:], ptops[hidden:] if params.top_logprobs else None)
            if g is None:  # echo only: the prompt and its logprobs
                choices += [{"index": p * params.n + j, "text": prompt_text, "finish_reason": "length",
                             "logprobs": echoed} for j in range(params.n)]
                continue
            for j, c in enumerate(g.completions):
                i, toks = p * params.n + j, c.tokens
                if chat:
                    lps = c.logprobs[:len(toks)] if c.logprobs is not None else None
                    tops = c.top_logprobs[:len(toks)] if c.top_logprobs is not None else None
                    ch = {"index": i, "message": {"role": "assistant", "content": c.text},
                          "finish_reason": c.finish_reason, "logprobs": None}
                    if params.logprobs:
                        ch["logprobs"] = chat_logprobs(toks, lps or [], tops)
                else:
                    text = (prompt_text if echo else "") + c.text
                    ch = {"index": i, "text": text, "finish_reason": c.finish_reason, "logprobs": None}
                    if params.logprobs:
                        gen = toks + [ends[j]] if j in ends else toks  # the stop token too, as a stream has it
                        lps = c.logprobs[:len(gen)] if c.logprobs is not None else None
                        tops = c.top_logprobs[:len(gen)] if c.top_logprobs is not None else None
                        lp = comp_logprobs(gen, lps or [], tops, len(prompt_text) if echo else 0)
                        if echo:
                            lp = {k: (echoed[k] or []) + (lp[k] or []) for k in lp}
                            if not params.top_logprobs:
                                lp["top_logprobs"] = None
                        ch["logprobs"] = lp
                choices.append(ch)
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices,
                "usage": usage(sum(len(ids) for ids, _, _ in prompts),
                               sum(g.completion_tokens for _, g, _ in results if g is not None))}

    async def sse(job, ids: list[int], params: SamplingParams, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        completion = 0
        try:
            if chat:
                for i in range(params.n):
                    yield _chunk(rid, obj, created, model_name,
                                 [{"index": i, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None, "logprobs": None}])
            async for deltas in job.items():
                choices = []
                for d in deltas:
                    completion += d.token is not None
                    if chat:
                        ch = {"index": d.index, "delta": {"content": d.text} if d.text else {},
                              "finish_reason": d.finish_reason, "logprobs": None}
                        if params.logprobs and d.token is not None and d.logprob is not None:
                            ch["logprobs"] = chat_logprobs([d.token], [d.logprob],
                                                           [d.top_logprobs] if d.top_logprobs else None)
                    else:
                        ch = {"index": d.index, "text": d.text, "finish_reason": d.finish_reason, "logprobs": None}
                        if params.logprobs and d.token is not None:
                            ch["logprobs"] = comp_logprobs([d.token], [d.logprob],
                                                           [d.top_logprobs] if d.top_logprobs else None)
                    choices.append(ch)
                yield _chunk(rid, obj, created, model_name, choices)
            yield _chunk(rid, obj, created, model_name, [], usage=usage(len(ids), completion))
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - headers are sent: report the error in the stream and end it
            status = 400 if isinstance(e, ScalelabError) else 500
            if status == 500:
                log.exception("internal error while streaming")
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error' if status == 500 else 'invalid_request_error', 'param': None, 'code': status}})}\n\n"
        finally:
            job.cancel()

    class JobStream(StreamingResponse):
        """A stream whose job is cancelled however the response ends (done, client gone, server stopping)."""

        def __init__(self, body, job):
            super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.job = job

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancel()

    async def handle(request: Request, chat: bool):
        try:
            body = await read_json(request, limits)
            if service is not None and chat and service.claims(body):
                scheduled.loop = asyncio.get_running_loop()
                try:
                    return await service.respond(request, body, _messages(body), _get(body, "stream", bool, False))
                except ScalelabError as e:
                    return service.error_response(e)
            check_model(body)
            echo_only = not chat and body.get("echo") is True and body.get("max_tokens") == 0
            params = _params(dict(body, max_tokens=1) if echo_only else body, chat, limits, ctx)
            stream = _get(body, "stream", bool, False)
            if chat:
                prompts = [(check_ids(backend.encode(backend.chat_prompt(_messages(body)), bos=False)), "", 0)]
                echo = False
            else:
                prompts = prompt_ids(body)
                echo = _get(body, "echo", bool, False)
            if stream:
                if echo:
                    raise RequestError("echo with stream is not supported", "echo")
                if len(prompts) > 1:
                    raise RequestError("stream with several prompts is not supported", "stream")
                ids = prompts[0][0]
                job = sched.submit_decode(ids, params)
                return JobStream(sse(job, ids, params, chat), job)
            jobs = []
            params.detokenize = bool(params.stop)  # read whole: the text is decoded once, at the end

            def decode(ids):  # a batch's prompts share the continuous batch and wait in line as one request
                jobs.append(sched.submit_decode(ids, params, bounded=not jobs))
                return jobs[-1]

            try:
                done = await collect(request, decode, None if echo_only else params, echo and params.logprobs,
                                     params.top_logprobs, [ids for ids, _, _ in prompts])
            finally:
                for j in jobs:
                    j.cancel()
            if done is None:  # the client went away; nobody reads this
                return error_json(499, "client closed the request")
            return JSONResponse(body_of(prompts, params, chat, echo, done))
        except RequestError as e:
            return error_json(e.status, str(e), e.param)
        except Full as e:
            r = error_json(429, str(e), kind="rate_limit_error")
            r.headers["Retry-After"] = "1"
            return r
        except TooLarge as e:
            return error_json(400, str(e))
        except ScalelabError as e:
            return error_json(400, str(e))
        except Exception as e:  # a bug: answer 500 in OpenAI's shape and keep serving
            log.exception("internal error")
            return error_json(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


    async def health(request: Request):
        return JSONResponse({"status": "ok", "in_flight": sched.pending(), "steps": sched.steps,
                             "peak_rows": sched.peak_rows, "served": served,
                             "searches": service.stats() if service is not None else None})

    async def tokenize(request: Request):  # vLLM's tokenizer endpoints, which lm-eval's "remote" tokenizer reads
        try:
            body = await read_json(request, limits)
            check_model(body)
            text = _get(body, "prompt", str, None)
            if text is None:
                raise RequestError("'prompt' must be a string", "prompt")
            ids = backend.encode(text) if _get(body, "add_special_tokens", bool, True) else backend.tokens(text)
            return JSONResponse({"count": len(ids), "max_model_len": ctx, "tokens": ids})
        except RequestError as e:
            return error_json(e.status, str(e), e.param)

    async def detokenize(request: Request):
        try:
            body = await read_json(request, limits)
            check_model(body)
            ids = _get(body, "tokens", list, None)
            if ids is None:
                raise RequestError("'tokens' must be a list of token ids", "tokens")
            for t in ids:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                    raise RequestError(f"'tokens' must be token ids in [0, {vocab})", "tokens")
            return JSONResponse({"prompt": tok.decode(ids, skip_special_tokens=False)})
        except RequestError as e:
            return error_json(e.status, str(e), e.param)

    async def tokenizer_info(request: Request):
        def name(t):
            return tok.id_to_token(t) if t is not None else None

        return JSONResponse({"tokenizer_class": "scalelab", "model_max_length": ctx, "pad_token": None,
                             "bos_token": name(backend.bos_id) if backend.add_bos else None,
                             "eos_token": name(engine.stop_ids[0] if engine.stop_ids else None),
                             "chat_template": backend.chat_template})

    def close() -> None:
        sched.close()  # after uvicorn's graceful drain: cancel whatever is left
        if service is not None:
            service.close()

    from starlette.routing import Route

    app = _starlette(handle, [model_name, *(f"{m}:{model_name}" for m in (service.methods if service else ()))],
                     health, limits, port, close,
                     extra=[Route("/tokenize", tokenize, methods=["POST"]),
                            Route("/detokenize", detokenize, methods=["POST"]),
                            Route("/tokenizer_info", tokenizer_info, methods=["GET"])])
    app.state.scheduler = sched
    app.state.search = service
    return app


def _proxy_app(service, limits: Limits, port: int | None, served: dict):
    """A server with no model of its own: search requests run over the service's upstream, and every other
    request is forwarded to it as it came."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    async def handle(request: Request, chat: bool):
        try:
            body = await read_json(request, limits)
            if chat and service.claims(body):
                return await service.respond(request, body, _messages(body), _get(body, "stream", bool, False))
            return await service.forward(request, body, "/chat/completions" if chat else "/completions")
        except RequestError as e:
            return error_json(e.status, str(e), e.param)
        except ScalelabError as e:
            return service.error_response(e)
        except Exception as e:  # a bug: answer 500 in OpenAI's shape and keep serving
            log.exception("internal error")
            return error_json(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


    async def health(request: Request):
        return JSONResponse({"status": "ok", "upstream": service.spec, "searches": service.stats()})

    up = service.upstream_model
    app = _starlette(handle, [up, *(f"{m}:{up}" for m in service.methods)], health, limits, port, service.close)
    app.state.search = service
    return app


def _starlette(handle, model_ids: list[str], health, limits: Limits, port: int | None, close, extra: list = ()):
    """The app around the four endpoints (`handle(request, chat)` answers both completion routes; `/v1/models`
    lists `model_ids`) and `extra` routes: the guard (and CORS for allowed origins), JSON 404/405, and `close`
    after uvicorn's graceful drain."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat_completions(request):
        return await handle(request, chat=True)

    async def completions(request):
        return await handle(request, chat=False)

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": i, "object": "model", "created": 0,
                                                         "owned_by": "scalelab"} for i in model_ids]})

    async def not_found(request, exc):
        return error_json(404, f"no route {request.method} {request.url.path}", kind="not_found_error")

    async def bad_method(request, exc):
        return error_json(405, f"method {request.method} not allowed on {request.url.path}")

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]), *extra]
    middleware = [Middleware(_Guard, port=port, allow_origins=limits.allow_origins)]
    if limits.allow_origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=limits.allow_origins, allow_methods=["GET", "POST"],
                                     allow_headers=["authorization", "content-type"]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        close()

    return Starlette(routes=routes, middleware=middleware, exception_handlers={404: not_found, 405: bad_method},
                     lifespan=lifespan)


def _chunk(rid: str, obj: str, created: int, model: str, choices: list, usage: dict | None = None) -> str:
    d = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if usage is not None:
        d["usage"] = usage
    return f"data: {json.dumps(d)}\n\n"


def serve(model: str | None, port: int = 8000, dtype: str = "float32", log_level: str = "info",
          limits: Limits | None = None, grace_s: float = 10.0, quant: str = "auto", search=None) -> None:
    """Load a model and serve it on 127.0.0.1:port until SIGTERM / Ctrl-C (in-flight requests get `grace_s`).
    `model=None`: no model of its own, a proxy for `search`'s upstream (see `create_app`)."""
    try:
        import uvicorn
    except ImportError:
        raise ScalelabError("serving needs starlette and uvicorn: pip install 'scalelab[serve]'") from None
    if not 0 < port < 65536:
        raise ScalelabError(f"port must be in 1..65535, got {port}")
    if grace_s < 0:
        raise ScalelabError(f"--grace must be >= 0 seconds, got {grace_s}")
    limits = limits or Limits()
    limits.validate()
    import socket

    with socket.socket() as s:  # fail with one line before loading the model when the port is taken
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise ScalelabError(f"cannot listen on {HOST}:{port}: {e.strerror}") from None
    backend = None
    if model is not None:
        backend = LocalBackend(model, dtype=dtype, quant=quant)
        backend.spec = str(model)
    app = create_app(backend, limits, port=port, search=search)
    uvicorn.run(app, host=HOST, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s)
