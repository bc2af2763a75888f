"""An OpenAI-compatible HTTP server over the local engine (`scalelab serve`), so any OpenAI client (optillm,
LangChain, the `openai` SDK, our own `openai` backend) can use the lab's models.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`. Supported
request fields: n, max_tokens (max_completion_tokens), temperature, top_p, top_k (an extension, as vLLM),
seed, stop, logprobs / top_logprobs, echo (completions; with max_tokens 0 it returns the prompt's token
logprobs, which `OpenAIBackend.score` uses), stream (server-sent events, one chunk per token per choice).

Notable choices:
- Starlette + uvicorn, bound to 127.0.0.1 only. The engine is not thread-safe, so requests run one at a time
  in a worker thread (the event loop stays free to answer /health and reject bad requests meanwhile).
- A bad request gets a 4xx JSON error in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`,
  and the server carries on; a bug gets a 500 in the same shape and the server carries on too.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from scalelab.backends import LocalBackend
from scalelab.engine import SamplingParams
from scalelab.errors import ScalelabError

log = logging.getLogger("scalelab")
HOST = "127.0.0.1"


class RequestError(ScalelabError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def _get(body: dict, key: str, types: type | tuple, default: Any = None) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(f"'{key}' has the wrong type ({type(v).__name__})", key)
    if not isinstance(v, types):
        raise RequestError(f"'{key}' has the wrong type ({type(v).__name__})", key)
    return v


def _params(body: dict, chat: bool) -> SamplingParams:
    stop = _get(body, "stop", (str, list), [])
    if isinstance(stop, str):
        stop = [stop]
    if not all(isinstance(s, str) for s in stop) or len(stop) > 8:
        raise RequestError("'stop' must be a string or a list of at most 8 strings", "stop")
    if chat:
        logprobs = _get(body, "logprobs", bool, False)
        top = _get(body, "top_logprobs", int, 0)
    else:
        lp = _get(body, "logprobs", int, None)
        logprobs, top = lp is not None, lp or 0
    max_tokens = _get(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                      int, 16 if not chat else 512)
    p = SamplingParams(n=_get(body, "n", int, 1), max_tokens=max_tokens,
                       temperature=float(_get(body, "temperature", (int, float), 1.0)),
                       top_p=float(_get(body, "top_p", (int, float), 1.0)), top_k=_get(body, "top_k", int, 0),
                       seed=_get(body, "seed", int, None), stop=[s for s in stop if s], logprobs=logprobs,
                       top_logprobs=top)
    try:
        p.validate()
    except ScalelabError as e:
        raise RequestError(str(e)) from None
    return p


def create_app(backend: LocalBackend, max_body: int = 1 << 20):
    from starlette.applications import Starlette
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    tok = backend.tokenizer
    model_name = backend.name

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > max_body:
            raise RequestError(f"request body over {max_body} bytes", status=413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def token_str(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    def prompt_ids(body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return backend.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise RequestError("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")

    def check_len(ids: list[int], params: SamplingParams) -> None:
        ctx = backend.model.cfg.context
        if len(ids) >= ctx:
            raise RequestError(f"the prompt has {len(ids)} tokens but the model's context is {ctx}", "prompt")

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def comp_logprobs(tokens: list[int], lps: list, tops: list | None, offset0: int = 0) -> dict:
        strs = [token_str(t) for t in tokens]
        offs, o = [], offset0
        for s in strs:
            offs.append(o)
            o += len(s)
        top = [{token_str(i): v for i, v in t} for t in tops] if tops else None
        return {"tokens": strs, "token_logprobs": lps, "top_logprobs": top, "text_offset": offs}

    def chat_logprobs(tokens: list[int], lps: list, tops: list | None) -> dict:
        def entry(t, lp):
            s = token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {"content": [dict(entry(t, lp), top_logprobs=[entry(i, v) for i, v in (tops[j] if tops else [])])
                            for j, (t, lp) in enumerate(zip(tokens, lps))]}

    def run(ids: list[int], params: SamplingParams, chat: bool, echo: bool, prompt_text: str) -> dict:
        g_prompt_lps = None
        if echo and params.logprobs and len(ids) > 1:
            with backend.lock:
                g_prompt_lps = backend.engine.score(ids[:1], [ids[1:]])[0].token_logprobs
        with backend.lock:
            g = backend.engine.generate(ids, params)
        choices = []
        for i, c in enumerate(g.completions):
            toks = c.tokens
            lps = c.logprobs[:len(toks)] if c.logprobs is not None else None
            tops = c.top_logprobs[:len(toks)] if c.top_logprobs is not None else None
            if chat:
                ch = {"index": i, "message": {"role": "assistant", "content": c.text},
                      "finish_reason": c.finish_reason, "logprobs": None}
                if params.logprobs:
                    ch["logprobs"] = chat_logprobs(toks, lps or [], tops)
            else:
                text = (prompt_text if echo else "") + c.text
                ch = {"index": i, "text": text, "finish_reason": c.finish_reason, "logprobs": None}
                if params.logprobs:
                    lp = comp_logprobs(toks, lps or [], tops, len(prompt_text) if echo else 0)
                    if echo:
                        plp = comp_logprobs(ids, [None] + (g_prompt_lps or []), None)
                        lp = {k: (plp[k] or []) + (lp[k] or []) if k != "top_logprobs" else lp[k] for k in lp}
                    ch["logprobs"] = lp
            choices.append(ch)
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": usage(g.prompt_tokens, g.completion_tokens)}

    def echo_only(ids: list[int], prompt_text: str, want_logprobs: bool) -> dict:
        lps = None
        if want_logprobs and len(ids) > 1:
            with backend.lock:
                lps = backend.engine.score(ids[:1], [ids[1:]])[0].token_logprobs
        ch = {"index": 0, "text": prompt_text, "finish_reason": "length",
              "logprobs": comp_logprobs(ids, [None] + (lps or []), None) if want_logprobs else None}
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [ch], "usage": usage(len(ids), 0)}

    def sse(ids: list[int], params: SamplingParams, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        completion = 0
        if chat:
            for i in range(params.n):
                yield _chunk(rid, obj, created, model_name, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                              "finish_reason": None, "logprobs": None}])
        for deltas in backend.stream_ids(ids, params):
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

    async def handle(request: Request, chat: bool):
        try:
            body = await read_json(request)
            echo_only_request = not chat and body.get("echo") is True and body.get("max_tokens") == 0
            params = _params(dict(body, max_tokens=1) if echo_only_request else body, chat)
            stream = _get(body, "stream", bool, False)
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise RequestError("'messages' must be a non-empty list", "messages")
                for m in messages:
                    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                        raise RequestError("each message needs a 'role' and a string 'content'", "messages")
                    if isinstance(m.get("content"), list):  # content parts: keep the text ones
                        m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
                    if not isinstance(m.get("content"), str):
                        raise RequestError("each message needs a 'role' and a string 'content'", "messages")
                ids = backend.encode(backend.chat_prompt(messages), bos=False)
                echo, text = False, ""
            else:
                ids = prompt_ids(body)
                echo = _get(body, "echo", bool, False)
                text = body["prompt"] if isinstance(body.get("prompt"), str) else tok.decode(ids)
                if echo_only_request:
                    check_len(ids, params)
                    return JSONResponse(await run_in_threadpool(echo_only, ids, text, params.logprobs))
            check_len(ids, params)
            bad = [t for t in ids if not 0 <= t < backend.model.cfg.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary", "prompt")
            if stream:
                if echo:
                    raise RequestError("echo with stream is not supported", "echo")
                return StreamingResponse(iterate_in_threadpool(sse(ids, params, chat)), media_type="text/event-stream")
            return JSONResponse(await run_in_threadpool(run, ids, params, chat, echo, text))
        except RequestError as e:
            return _error(e.status, str(e), e.param)
        except ScalelabError as e:
            return _error(400, str(e))
        except Exception as e:  # a bug: answer 500 in OpenAI's shape and keep serving
            log.exception("internal error")
            return _error(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")

    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    async def completions(request: Request):
        return await handle(request, chat=False)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "scalelab"}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    async def not_found(request: Request, exc):
        return _error(404, f"no route {request.method} {request.url.path}", kind="not_found_error")

    async def bad_method(request: Request, exc):
        return _error(405, f"method {request.method} not allowed on {request.url.path}")

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})


def _chunk(rid: str, obj: str, created: int, model: str, choices: list, usage: dict | None = None) -> str:
    d = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if usage is not None:
        d["usage"] = usage
    return f"data: {json.dumps(d)}\n\n"


def serve(model: str, port: int = 8000, dtype: str = "float32", log_level: str = "info") -> None:
    """Load a model and serve it on 127.0.0.1:port until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ScalelabError("serving needs starlette and uvicorn: pip install 'scalelab[serve]'") from None
    if not 0 < port < 65536:
        raise ScalelabError(f"port must be in 1..65535, got {port}")
    import socket

    with socket.socket() as s:  # fail with one line before loading the model when the port is taken
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise ScalelabError(f"cannot listen on {HOST}:{port}: {e.strerror}") from None
    backend = LocalBackend(model, dtype=dtype)
    app = create_app(backend)
    uvicorn.run(app, host=HOST, port=port, log_level=log_level)
