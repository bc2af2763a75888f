"""Test-time search as a service: OpenAI-compatible chat requests answered by sampling-based search with
self-verification (Zhao et al. 2025, Algorithm 1), over the server's own engine or any upstream server.

A client names a method in the model field, `<method>:<model>` (`sss:smollm2`, `consistency:default`), or
sends `"search": {...}` in the body (the `openai` SDK's `extra_body`); a plain model name is an ordinary
request. Methods (`run.METHODS`):
- `sss`: Algorithm 1: k samples, kv verifications each, tie-breaks over the shortlist;
- `best-of-n`: the top verification score, no tie-break;
- `pyes-vote`: the final answer with the largest sum of P("Yes") scores (`score` defaults to `prob`);
- `consistency`: the most common final answer; no verification.

The search is the one `scalelab search` runs (`run.Searcher`): the same calls, keys and seeds, the same
selection code. A request becomes one problem whose candidates answer the client's own messages
(`formats.ServedFormat`); verification and tie-break prompts are the `chat` style's, over the last user
message (with earlier turns quoted when there are any). Final answers for Consistency and tie-break pairing
are compared as `tasks.extract_free` reads them: '#### X', \\boxed{X}, 'answer is X', else the whole response;
numbers exactly, anything else as normalised text (lower case, no markdown emphasis, whitespace collapsed).

With a log directory, every request is a problem in `problems.jsonl` (its settings and method in `meta`),
every call a line of `transcripts.jsonl` (the format `scalelab search` writes) and every answer a line of
`served.jsonl`; `scalelab search rescore DIR` recomputes every selection from them with no model call.

Notable choices:
- A request's seed (the body's `seed`, or a random one) fixes its samples: seeds derive from the call keys
  with the request id replaced by one name, so the same question, seed and settings give the same answer.
- k × kv (+ tie-break calls) is capped (`max_calls`); beyond it a request gets a 400, as do unknown methods
  and options. `score: prob` needs logprobs: a backend that has none gets a 400 too.
- A backend failure after its retries is a 502 (504 for a timeout) in OpenAI's error shape.
- Streaming (`stream: true`) sends SSE comments while the search runs (`: keep-alive`, and
  `: scalelab.progress {json}` after each call, which SSE parsers such as the openai SDK skip), or, with
  `"search": {"progress_events": true}`, `event: scalelab.progress` events for clients that read SSE
  themselves; then the selected answer as ordinary chunks and a last chunk with `usage` and `scalelab_search`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from scalelab.backends import Backend, BackendError, Response, price_name
from scalelab.errors import ScalelabError
from scalelab.report import make_dir, write_json
from scalelab.search import cost as costmod, tasks as tasksmod
from scalelab.search.formats import make_format
from scalelab.search.run import METHODS, SearchConfig, Searcher, Transcripts, problem_settings
from scalelab.serve import error_json, until_gone

log = logging.getLogger("scalelab")

# request option -> SearchConfig field (types are checked against the field's default)
OPTIONS = {"k": "k_inf", "kv": "k_verif", "k_tie": "k_tie", "temperature": "temperature",
           "verify_temperature": "verify_temperature", "tie_temperature": "tie_temperature", "score": "score",
           "trigger": "trigger", "prelim": "prelim", "prelim_k": "prelim_k", "max_tokens": "max_tokens",
           "verify_max_tokens": "verify_max_tokens", "threshold": "threshold"}
EXTRA = ("method", "seed", "price", "verifier_price", "reference", "progress_events", "equivalence", "question")
PHASES = (*costmod.PHASES, "judge")  # `judge`: final-answer equivalence (free-form answers), when asked


class SearchRequestError(ScalelabError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class Cancelled(ScalelabError):
    """The client went away: the search stops before its next call."""


@dataclasses.dataclass
class Plan:
    """One parsed search request."""

    method: str
    cfg: SearchConfig
    messages: list[dict]
    seed: int
    model: str
    price: Any = None  # a price-table name or {"input", "output"[, "cached_input"]} ($ per 1M tokens)
    verifier_price: Any = None
    reference: str = ""
    progress_events: bool = False
    equivalence: str = "text"  # text (normalised text and exact numbers) | judge (the server's --judge merges)
    question: str = ""  # what verification and comparison quote ("": the last user message, see _question)


class Watched:
    """A backend as one request sees it: stops at the next call once the client is gone, and reports each
    call's usage."""

    def __init__(self, inner: Backend, cancel: threading.Event):
        bind = getattr(inner, "for_request", None)  # the server's engine: calls in flight cancel too
        self.inner, self.cancel = (bind(cancel) if bind else inner), cancel
        self.name, self.price = inner.name, getattr(inner, "price", "")

    def _check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("the client closed the request")

    def generate(self, prompt, params) -> Response:
        self._check()
        return self.inner.generate(prompt, params)

    def generate_many(self, requests):
        self._check()
        many = getattr(self.inner, "generate_many", None)
        if many is None:
            return [self.generate(*r) for r in requests]
        return many(requests)

    def prob_yes(self, prompt, yes, no) -> Response:
        self._check()
        return self.inner.prob_yes(prompt, yes, no)

    def score(self, prompt, continuations):
        self._check()
        return self.inner.score(prompt, continuations)


class ServedLog:
    """A log directory of served searches: `search.json` (the server's base settings, task `served`),
    `problems.jsonl`, `transcripts.jsonl` and `served.jsonl`, appended as requests come and finish."""

    def __init__(self, path: Path, base: SearchConfig):
        self.path = Path(path)
        self.check(self.path)
        cfg_path = self.path / "search.json"
        make_dir(self.path)
        write_json(cfg_path, dataclasses.asdict(base))
        self.tr = Transcripts(self.path / "transcripts.jsonl")
        self.grades = Transcripts(self.path / "judge.jsonl", ("judge",))
        self.lock = threading.Lock()

    @staticmethod
    def check(path: Path) -> None:
        """A new directory, or a served log to append to (never another search run)."""
        if path.exists() and not path.is_dir():
            raise ScalelabError(f"--log-dir {path} is a file, not a directory")
        cfg_path = path / "search.json"
        if cfg_path.is_file():
            try:
                old = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                old = None
            if not isinstance(old, dict) or old.get("task") != "served":
                raise ScalelabError(f"--log-dir {path} holds a search run that is not a served log; "
                                    "choose another directory")
        elif path.is_dir() and any(path.iterdir()):
            raise ScalelabError(f"--log-dir {path} is not empty and not a served log; choose another directory")

    def append(self, name: str, row: dict) -> None:
        line = json.dumps(row) + "\n"
        with self.lock, open(self.path / name, "a", encoding="utf-8") as f:
            f.write(line)


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _price_arg(v: object, name: str) -> Any:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict) and {"input", "output"} <= set(v) <= {"input", "output", "cached_input"} \
            and all(_number(x) and x >= 0 for x in v.values()):
        return v
    raise SearchRequestError(f"search.{name} must be a price-table name or {{\"input\": $, \"output\": $}} per 1M "
                             "tokens", f"search.{name}")


class SearchService:
    """Parses, runs and answers search requests. `gen` is the generator (the server's engine as a backend, or
    an upstream); `ver` the verifier (None: the generator verifies itself)."""

    def __init__(self, gen: Backend, spec: str, ver: Backend | None = None, ver_spec: str = "",
                 base: SearchConfig | None = None, max_calls: int = 1024, max_searches: int = 8,
                 log_dir: Path | None = None, prices_file: str = "", keepalive_s: float = 5.0,
                 names: set[str] | None = None, logprobs: bool = True, judge: Backend | None = None,
                 judge_spec: str = ""):
        self.check(ver, ver_spec, max_calls, max_searches, log_dir, prices_file)
        self.gen, self.ver, self.spec, self.ver_spec = gen, ver, spec, ver_spec
        self.judge = gen if judge_spec == "same" else judge
        self.judge_spec = judge_spec
        self.base = dataclasses.replace(base or SearchConfig(), backend=spec, verifier=ver_spec or "same",
                                        task="served", prompts="served", n_problems=1, judge="",
                                        prices_file=prices_file)
        self.base.validate()
        self.max_calls, self.keepalive_s, self.logprobs = max_calls, keepalive_s, logprobs
        self.prices = costmod.load_prices(prices_file or None)
        self.names = set(names or ()) | {"default", getattr(gen, "name", spec), self.upstream_model}
        self.log = ServedLog(log_dir, self.base) if log_dir is not None else None
        self.pool = ThreadPoolExecutor(max_workers=max_searches, thread_name_prefix="scalelab-search")
        self.max_searches = max_searches
        self.running = 0
        self.count_lock = threading.Lock()
        self.served = 0

    methods = METHODS

    @staticmethod
    def check(ver: Backend | None = None, ver_spec: str = "", max_calls: int = 1024, max_searches: int = 8,
              log_dir: Path | None = None, prices_file: str = "") -> None:
        """The server's search settings, checked before anything loads (one clear error each)."""
        if max_calls < 1 or max_searches < 1:
            raise ScalelabError("--max-search-calls and --max-searches must be >= 1")
        costmod.load_prices(prices_file or None)
        if log_dir is not None:
            ServedLog.check(Path(log_dir))

    @property
    def upstream_model(self) -> str:
        return getattr(self.gen, "model", getattr(self.gen, "name", self.spec))

    def stats(self) -> dict:
        return {"running": self.running, "served": self.served, "max": self.max_searches}

    @staticmethod
    def error_response(e: BaseException):
        return error_response(e)

    async def forward(self, request, body: dict, path: str):
        """A plain request, forwarded as it came to the upstream (a proxy without a model of its own): its
        answer, or its stream, passes through; a failure to reach it is a 502 (a timeout a 504)."""
        try:  # the HTTP client the openai SDK is built on (httpx2 in openai >= 3, httpx before)
            import httpx2 as httpx
        except ImportError:
            import httpx
        from starlette.responses import Response, StreamingResponse

        base = getattr(self.gen, "base_url", None)
        if base is None:
            raise SearchRequestError("this server only answers search requests", status=404)
        model = body.get("model")
        if model is not None and model not in self.names:
            raise SearchRequestError(f"model {str(model)[:80]!r} is not served here (the upstream serves "
                                     f"{self.upstream_model!r})", "model", status=404)
        body = dict(body, model=self.upstream_model)
        headers = {"Content-Type": "application/json"}
        key = getattr(getattr(self.gen, "client", None), "api_key", None)
        if key and key != "none":
            headers["Authorization"] = f"Bearer {key}"
        wait = float(getattr(self.gen, "timeout", 600.0))
        client = httpx.AsyncClient(timeout=httpx.Timeout(wait, connect=min(wait, 10.0)))
        try:
            req = client.build_request("POST", str(base).rstrip("/") + path, json=body, headers=headers)
            r = await client.send(req, stream=True)
        except httpx.TimeoutException:
            await client.aclose()
            raise BackendError(f"the upstream {base} timed out", status=504) from None
        except httpx.HTTPError as e:
            await client.aclose()
            raise BackendError(f"cannot reach the upstream {base}: {e}") from None
        ctype = r.headers.get("content-type", "application/json")
        if not ctype.startswith("text/event-stream"):
            try:
                content = await r.aread()
            finally:
                await r.aclose()
                await client.aclose()
            return Response(content, status_code=r.status_code, media_type=ctype.split(";")[0])

        async def passthrough():
            try:
                async for chunk in r.aiter_raw():
                    yield chunk
            finally:
                await r.aclose()
                await client.aclose()

        return StreamingResponse(passthrough(), status_code=r.status_code, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # ---- parsing ------------------------------------------------------------------------------------------
    @staticmethod
    def split_model(model: object) -> tuple[str | None, object]:
        """`sss:smollm2` -> ("sss", "smollm2"); a name without a method prefix -> (None, name)."""
        if isinstance(model, str):
            head, sep, rest = model.partition(":")
            if sep and head in METHODS:
                return head, rest
        return None, model

    def claims(self, body: dict) -> bool:
        return self.split_model(body.get("model"))[0] is not None or "search" in body

    def parse(self, body: dict, messages: list[dict]) -> Plan:
        method, model = self.split_model(body.get("model"))
        opts = body.get("search", {})
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise SearchRequestError("'search' must be an object of search options", "search")
        unknown = sorted(set(opts) - set(OPTIONS) - set(EXTRA))
        if unknown:
            raise SearchRequestError(f"unknown search option {unknown[0][:40]!r}: use {', '.join([*OPTIONS, *EXTRA])}",
                                     f"search.{unknown[0][:40]}")
        asked = opts.get("method")
        if asked is not None:
            if not isinstance(asked, str) or asked not in METHODS:
                raise SearchRequestError(f"unknown search method {str(asked)[:40]!r}: use {', '.join(METHODS)}",
                                         "search.method")
            if method is not None and method != asked:
                raise SearchRequestError(f"the model names method {method!r} but search.method is {asked!r}",
                                         "search.method")
            method = asked
        method = method or "sss"
        if model is not None and model not in self.names:
            raise SearchRequestError(f"model {str(model)[:80]!r} is not served here (search over "
                                     f"{', '.join(sorted(self.names))})", "model", status=404)
        values = {}
        for k, field in OPTIONS.items():
            if k not in opts or opts[k] is None:
                continue
            v, default = opts[k], getattr(self.base, field)
            ok = isinstance(v, bool) if isinstance(default, bool) else \
                (isinstance(v, int) and not isinstance(v, bool)) if isinstance(default, int) else \
                _number(v) if isinstance(default, float) else isinstance(v, type(default))
            if not ok:
                raise SearchRequestError(f"search.{k} has the wrong type ({type(v).__name__})", f"search.{k}")
            values[field] = float(v) if isinstance(default, float) else v
        # the request's own fields, where the search has no option of the same name
        if "temperature" not in opts and _number(body.get("temperature")):
            values["temperature"] = float(body["temperature"])
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if "max_tokens" not in opts and isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
            values["max_tokens"] = body[key]
        if method == "pyes-vote" and "score" not in opts:
            values["score"] = "prob"
        try:
            cfg = dataclasses.replace(self.base, **values)
            cfg.validate()
        except ScalelabError as e:
            raise SearchRequestError(f"bad search options: {e}", "search") from None
        if body.get("n", 1) not in (1, None):
            raise SearchRequestError("'n' must be 1 for a search request (k sets the number of samples)", "n")
        verify = 0 if method == "consistency" else cfg.k_inf * cfg.k_verif
        if cfg.k_inf + verify > self.max_calls:
            raise SearchRequestError(f"k + k × kv = {cfg.k_inf + verify} samples is more than this server allows "
                                     f"per search ({self.max_calls}; see --max-search-calls)", "search.k")
        if cfg.score == "prob" and method != "consistency" and not self.logprobs:
            raise SearchRequestError("score 'prob' needs logprobs, which this server's upstream does not return: "
                                     "use score 'verdict'", "search.score")
        seed = opts.get("seed", body.get("seed"))
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
            raise SearchRequestError("'seed' must be an integer", "seed")
        reference = opts.get("reference", "")
        if not isinstance(reference, str):
            raise SearchRequestError("search.reference must be a string (the expected final answer)",
                                     "search.reference")
        equivalence = opts.get("equivalence", "judge" if self.judge is not None else "text")
        if equivalence not in ("text", "judge"):
            raise SearchRequestError("search.equivalence must be 'text' or 'judge'", "search.equivalence")
        if equivalence == "judge" and self.judge is None:
            raise SearchRequestError("search.equivalence 'judge' needs a server started with --judge",
                                     "search.equivalence")
        question = opts.get("question", "")
        if not isinstance(question, str):
            raise SearchRequestError("search.question must be a string (the question verification quotes)",
                                     "search.question")
        pe = opts.get("progress_events", False)
        if not isinstance(pe, bool):
            raise SearchRequestError("search.progress_events must be true or false", "search.progress_events")
        cfg.seed = (seed if seed is not None else secrets.randbits(62)) % (1 << 63)
        return Plan(method, cfg, messages, cfg.seed, f"{method}:{model if model is not None else 'default'}",
                    _price_arg(opts.get("price"), "price"), _price_arg(opts.get("verifier_price"), "verifier_price"),
                    reference, pe, equivalence, question)

    # ---- running ------------------------------------------------------------------------------------------
    def _price(self, arg: Any, default: str) -> tuple[str, costmod.Price | None]:
        if isinstance(arg, dict):
            return "request", costmod.Price("request", float(arg["input"]), float(arg["output"]),
                                            float(arg["cached_input"]) if "cached_input" in arg else None)
        name = arg or default
        return name, self.prices.get(name)

    def run(self, plan: Plan, cancel: threading.Event, on_call: Callable[[dict], None] | None = None) -> dict:
        """The search, on the calling thread: the `scalelab_search` object plus the selected text."""
        t0 = time.perf_counter()
        tid = f"srv-{uuid.uuid4().hex[:16]}"
        question = plan.question or _question(plan.messages)
        meta = {"messages": plan.messages, "method": plan.method, "backend": self.spec,
                "search": {f: getattr(plan.cfg, f) for f in (*OPTIONS.values(), "seed")}, "seed_name": "served",
                "equiv": plan.equivalence}
        problem = tasksmod.Problem(tid, question, plan.reference, "free", meta)
        gen = Watched(self.gen, cancel)
        ver = Watched(self.ver, cancel) if self.ver is not None else gen
        tr = self.log.tr if self.log else Transcripts(None)
        grades = self.log.grades if self.log else Transcripts(None, ("judge",))
        if self.log:
            self.log.append("problems.jsonl", dataclasses.asdict(problem))
        records: list[dict] = []
        judge = None if self.judge is None else gen if self.judge is self.gen else Watched(self.judge, cancel)
        s = Searcher(plan.cfg, None, tasksmod.Task("served", [problem]), gen, ver, make_format("served"), judge,
                     tr=tr, grades=grades, method=plan.method)
        s.seed_names[tid] = "served"

        def record(rec: dict) -> None:
            records.append(rec)
            if on_call:
                on_call(rec)

        s.on_call = record
        cfg, method = problem_settings(plan.cfg, problem)
        assert cfg == plan.cfg and method == plan.method  # what a rescore will read back
        rec = s.run_problem(problem)
        seconds = time.perf_counter() - t0
        phases = {ph: {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "seconds": 0.0}
                  for ph in PHASES}
        for r in records:
            p = phases[r["phase"]]
            p["calls"] += 1
            p["prompt_tokens"] += r["usage"]["prompt"]
            p["completion_tokens"] += r["usage"]["completion"]
            p["cached_tokens"] += r["usage"]["cached"]
            p["seconds"] = round(p["seconds"] + r["seconds"], 4)
        gname, gprice = self._price(plan.price, plan.cfg.price or price_name(self.spec))
        if self.ver_spec:  # another model verifies: its own price
            vname, vprice = self._price(plan.verifier_price, plan.cfg.verifier_price or price_name(self.ver_spec))
        else:  # the generator verifies itself: the generator's price unless the request names another
            vname, vprice = (gname, gprice) if plan.verifier_price is None else self._price(plan.verifier_price, "")
        cost = None
        if gprice is not None and vprice is not None:
            led = costmod.Ledger()
            for ph, u in phases.items():
                if ph == "judge":
                    continue  # priced below, at the judge's rate
                led.record(tid, ph, u["prompt_tokens"], u["completion_tokens"], u["cached_tokens"], u["calls"])
            cost = led.dollars(gprice, vprice)
            jname = price_name(self.judge_spec) if self.judge_spec not in ("", "same") else gname
            jprice = self.prices.get(jname) if jname != "request" else gprice
            j = phases["judge"]
            cost["judge"] = jprice.dollars(j["prompt_tokens"], j["completion_tokens"], j["cached_tokens"]) \
                if jprice is not None else 0.0
            cost["total"] += cost["judge"]
            cost = {k: round(v, 8) for k, v in cost.items()}
        scores = rec.scores()
        ties = [{"a": i, "b": j, "votes_a": va, "votes_b": vb} for (i, j), (va, vb) in sorted(rec.tie_votes.items())]
        gen_rec = tr.get(f"gen:{tid}") or {"outputs": []}
        finishes = [o.get("finish", "stop") for o in gen_rec["outputs"]]
        ext = {
            "id": tid, "method": plan.method, "seed": plan.seed,
            "settings": {k: getattr(plan.cfg, f) for k, f in OPTIONS.items()},
            "candidates": [{"index": i, "text": rec.responses[i], "answer": rec.answers[i], "key": rec.keys[i],
                            "verifications": rec.verdicts[i], "score": scores[i] if rec.verdicts[i] else None,
                            "dropped": rec.dropped[i], "finish_reason": finishes[i] if i < len(finishes) else "stop"}
                           for i in range(len(rec.responses))],
            "shortlist": rec.played, "tiebreaks": ties, "selected": rec.pick,
            "tokens": {ph: {k: v for k, v in u.items() if k != "seconds"} for ph, u in phases.items()},
            "seconds": {**{ph: u["seconds"] for ph, u in phases.items()}, "total": round(seconds, 4)},
            "equivalence": plan.equivalence,
            "price": {"generate": gname, "verify": vname}, "cost_usd": cost,
            "logged": str(self.log.path) if self.log else None,
        }
        if plan.reference:
            ext["correct"] = bool(rec.correct[rec.pick]) if rec.responses else False
        if self.log:
            self.log.append("served.jsonl", {"id": tid, "method": plan.method, "selected": rec.pick,
                                             "answer": rec.answers[rec.pick] if rec.responses else None,
                                             "tokens": ext["tokens"], "seconds": ext["seconds"],
                                             "cost_usd": cost, "time": time.time()})
        self.served += 1
        return ext

    def completion(self, plan: Plan, ext: dict) -> dict:
        """The chat completion whose message is the selected candidate."""
        c = ext["candidates"][ext["selected"]] if ext["candidates"] else {"text": "", "finish_reason": "stop"}
        return {"id": f"chatcmpl-{ext['id']}", "object": "chat.completion", "created": int(time.time()),
                "model": plan.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c["text"]},
                             "finish_reason": c["finish_reason"], "logprobs": None}],
                "usage": usage(ext), "scalelab_search": ext}

    # ---- HTTP ---------------------------------------------------------------------------------------------
    async def respond(self, request, body: dict, messages: list[dict], stream: bool):
        """A starlette response for a search request (errors in OpenAI's shape)."""
        from starlette.responses import JSONResponse, StreamingResponse

        plan = self.parse(body, messages)
        with self.count_lock:
            if self.running >= self.max_searches:
                raise SearchRequestError(f"the server is running {self.max_searches} searches: retry later",
                                         status=429)
            self.running += 1
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_call(rec: dict) -> None:
            ev = {"phase": rec["phase"], "call": rec["key"].split(":")[0],
                  "completion_tokens": rec["usage"]["completion"]}
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:
                pass

        def work() -> dict:
            try:
                return self.run(plan, cancel, on_call if stream else None)
            finally:
                with self.count_lock:
                    self.running -= 1

        fut = asyncio.wrap_future(self.pool.submit(work))
        if not stream:
            watch = asyncio.ensure_future(until_gone(request))
            try:
                await asyncio.wait({fut, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not fut.done():
                    cancel.set()
                    return error_json(499, "client closed the request")
                return JSONResponse(self.completion(plan, fut.result()))
            finally:
                watch.cancel()
                if not fut.done():
                    cancel.set()

        async def sse():
            rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            calls = 0
            try:
                while not fut.done():
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({fut, getter}, timeout=self.keepalive_s, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        if not fut.done():
                            yield ": keep-alive\n\n"
                        continue
                    calls += 1
                    ev = dict(getter.result(), calls=calls)
                    yield (f"event: scalelab.progress\ndata: {json.dumps(ev)}\n\n" if plan.progress_events
                           else f": scalelab.progress {json.dumps(ev)}\n\n")
                ext = fut.result()
                c = ext["candidates"][ext["selected"]] if ext["candidates"] else {"text": "", "finish_reason": "stop"}
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": plan.model}
                yield _sse(dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None, "logprobs": None}]))
                if c["text"]:
                    yield _sse(dict(base, choices=[{"index": 0, "delta": {"content": c["text"]},
                                                     "finish_reason": None, "logprobs": None}]))
                yield _sse(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": c["finish_reason"],
                                                 "logprobs": None}]))
                yield _sse(dict(base, choices=[], usage=usage(ext), scalelab_search=ext))
                yield "data: [DONE]\n\n"
            except Exception as e:  # noqa: BLE001 - the headers are sent: the error goes in the stream
                status, message, kind = error_of(e)
                yield _sse({"error": {"message": message, "type": kind, "param": None, "code": status}})
            finally:
                cancel.set()  # a finished search ignores it; one still running stops at its next call

        class Stream(StreamingResponse):
            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    cancel.set()

        return Stream(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def usage(ext: dict) -> dict:
    t = ext["tokens"].values()
    p, c, cached = (sum(u[k] for u in t) for k in ("prompt_tokens", "completion_tokens", "cached_tokens"))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


def error_of(e: BaseException) -> tuple[int, str, str]:
    """(status, message, OpenAI error type) for an exception out of a search."""
    if isinstance(e, SearchRequestError):
        return e.status, str(e), "rate_limit_error" if e.status == 429 else "invalid_request_error"
    if isinstance(e, Cancelled):
        return 499, str(e), "invalid_request_error"
    if isinstance(e, BackendError):
        if "no logprobs" in str(e):
            return 400, str(e), "invalid_request_error"
        return getattr(e, "status", 502), f"the upstream failed: {e}", "upstream_error"
    if isinstance(e, ScalelabError):
        return 400, str(e), "invalid_request_error"
    log.error("internal error in a search", exc_info=e)
    return 500, f"internal error: {type(e).__name__}: {e}", "server_error"


def error_response(e: BaseException):
    status, message, kind = error_of(e)
    r = error_json(status, message, getattr(e, "param", None), kind)
    if status == 429:
        r.headers["Retry-After"] = "1"
    return r


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _question(messages: list[dict]) -> str:
    """What verification and comparison are asked about: the last user message, with the conversation before
    it quoted when there is one."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    before = [f"{m['role'].capitalize()}: {m['content']}" for m in messages[:last]]
    q = messages[last]["content"] if messages else ""
    return q if not before else "\n".join(before) + f"\n\nUser: {q}"


# =========================================================================================== rescore
def rescore(run_dir: Path) -> dict:
    """Recompute every selection of a served log from its transcripts (no model call), check them against
    what was served, and summarise the traffic: per method, requests, tokens and dollars per request, and for
    requests that carried a reference answer, Table 1's accuracies from the same samples."""
    import numpy as np

    from scalelab.search.analyse import usage_by_phase
    from scalelab.search.run import replay
    from scalelab.search.select import expected_pick_accuracy, vote_accuracy

    run_dir = Path(run_dir)
    cfg, task, recs, tr = replay(run_dir)
    served = {}
    path = run_dir / "served.jsonl"
    if path.is_file():
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                served[row["id"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                if line.strip():
                    raise ScalelabError(f"{path}:{no}: not a served-answer record") from None
    by_id = {r.problem.id: r for r in recs}
    mismatches = [pid for pid, row in served.items() if pid in by_id and by_id[pid].pick != row.get("selected")]
    methods: dict[str, dict] = {}
    for r in recs:
        _, method = problem_settings(cfg, r.problem)
        m = methods.setdefault(method, {"requests": 0, "answered": 0, "tokens": 0, "usd": 0.0, "priced": 0,
                                        "referenced": 0, "selected": [], "pass1": [], "passk": [], "cons": [],
                                        "verif": []})
        m["requests"] += 1
        row = served.get(r.problem.id)
        if row is not None:
            m["answered"] += 1
            m["tokens"] += sum(u["prompt_tokens"] + u["completion_tokens"] for u in row["tokens"].values())
            if row.get("cost_usd"):
                m["usd"] += row["cost_usd"]["total"]
                m["priced"] += 1
        if r.problem.answer:
            corr = np.array(r.correct, dtype=float)
            m["referenced"] += 1
            m["selected"].append(float(r.correct[r.pick]))
            m["pass1"].append(float(corr.mean()))
            m["passk"].append(float(corr.max()))
            m["cons"].append(vote_accuracy(r.keys, corr))
            sc = np.array(r.scores()) if any(r.verdicts) else np.zeros(len(r.responses))
            m["verif"].append(expected_pick_accuracy(sc, corr))
    out = {"requests": len(task.problems), "replayed": len(recs), "answered": len(served),
           "selections_checked": sum(pid in by_id for pid in served), "selections_differ": mismatches,
           "usage": usage_by_phase(tr), "methods": {}}
    for name, m in methods.items():
        row = {k: m[k] for k in ("requests", "answered", "referenced")}
        row["tokens_per_request"] = m["tokens"] / m["answered"] if m["answered"] else None
        row["usd_per_request"] = m["usd"] / m["priced"] if m["priced"] else None
        for k, label in (("selected", "selected"), ("pass1", "Pass@1"), ("passk", "Pass@k"), ("cons", "Consistency@k"),
                         ("verif", "Verification@k (no tie-break)")):
            row[label] = float(np.mean(m[k])) if m[k] else None
        out["methods"][name] = row
    write_json(run_dir / "served-metrics.json", out)
    lines = [f"# Served searches: {run_dir}", "",
             f"{out['requests']} requests logged; {out['answered']} answered; {out['replayed']} replayed from "
             f"transcripts.jsonl with no model call; {out['selections_checked'] - len(mismatches)} of "
             f"{out['selections_checked']} selections reproduced.", "",
             "| method | requests | with a reference | selected correct | Pass@1 | Pass@k | Consistency@k | "
             "Verification@k (no tie-break) | tokens / request | $ / request |", "|---" * 10 + "|"]

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}%"

    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    for name, r in out["methods"].items():
        lines.append(f"| {name} | {r['requests']} | {r['referenced']} | {pct(r['selected'])} | {pct(r['Pass@1'])} | "
                     f"{pct(r['Pass@k'])} | {pct(r['Consistency@k'])} | {pct(r['Verification@k (no tie-break)'])} | "
                     f"{num(r['tokens_per_request'], '.0f')} | {num(r['usd_per_request'], '.6f')} |")
    lines += ["", "Accuracy columns count only requests that sent `search.reference` (the expected final answer); "
              "answers are compared as free-form answers (`tasks.free_key`).", "",
              "| phase | calls | prompt tokens | cached | completion tokens |", "|---|---|---|---|---|"]
    for ph, u in out["usage"].items():
        lines.append(f"| {ph} | {u['calls']} | {u['prompt']} | {u['cached']} | {u['completion']} |")
    from scalelab.report import write_text

    write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    return out

