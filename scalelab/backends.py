"""One interface over two backends: `local` (the lab's engine on a GGUF file or run directory) and `openai`
(any OpenAI-compatible server: vLLM, SGLang, llama.cpp's server, Ollama, `scalelab serve`).

Both answer `complete(prompt, params)` and `chat(messages, params)` with a `Response` (texts, finish
reasons, optional token logprobs, and the prompt/completion token counts read from the engine or from the
server's `usage`), and `score(prompt, continuations)` with log-probabilities of given continuations.

Notable choices:
- `openai` goes through the official SDK: base URL, key from `OPENAI_API_KEY` (or `--api-key-env`), a
  timeout, the SDK's retries with exponential backoff (connection errors, 408/409/429/5xx), and a semaphore
  bounding concurrent requests. When a server returns fewer than `n` choices (llama.cpp, Ollama), the rest
  are requested one at a time, concurrently, with seeds `seed + i`.
- `openai.score` asks `/v1/completions` for the prompt+continuation echoed with logprobs and max_tokens 0
  (vLLM and `scalelab serve` support it); servers that do not get a clear error.
- Every failure a user can cause (unreachable server, 4xx/5xx, garbage bodies) is a one-line ScalelabError.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from scalelab.engine import Engine, SamplingParams, Score
from scalelab.errors import ScalelabError

# A plain template for lab checkpoints, which have no chat template of their own.
PLAIN_CHAT = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}Assistant:{% endif %}")


@dataclass
class Choice:
    text: str
    finish_reason: str = "stop"
    tokens: list[int] | None = None
    logprobs: list[float] | None = None


@dataclass
class Response:
    choices: list[Choice]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    extra: dict = field(default_factory=dict)


class LocalBackend:
    """The lab's engine over a GGUF file (`smollm2` or a path) or a lab run directory."""

    def __init__(self, model: str | Path = "smollm2", dtype: str = "float32", prefix_cache: int = 8):
        import torch

        if dtype not in ("float32", "bfloat16"):
            raise ScalelabError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        path = Path(str(model))
        if path.is_dir():
            from scalelab import tokenizer as tokmod, train as trainmod

            _, net = trainmod.load_run(path)
            net = net.to(self.dtype)
            self.tokenizer = tokmod.load(path / "tokenizer.json")
            eot = tokmod.eot_id(self.tokenizer)
            self.chat_template, self.bos_id, self.add_bos, stops = PLAIN_CHAT, eot, True, [eot]
            self.name = path.name
        else:
            from scalelab import gguf

            gm = gguf.load(str(model), dtype=self.dtype)
            net, self.tokenizer = gm.model, gm.tokenizer
            self.chat_template, self.bos_id, self.add_bos = gm.chat_template or PLAIN_CHAT, gm.bos_id, gm.add_bos
            stops, self.name = gm.stop_ids, str(model) if str(model) == "smollm2" else path.stem
        self.model = net
        self.engine = Engine(net, decode=lambda ids: self.tokenizer.decode(ids), stop_ids=stops,
                             prefix_cache=prefix_cache)
        self.lock = threading.Lock()  # the engine serves one request at a time

    # ---- text ↔ tokens ------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        if not ids and self.bos_id is not None:
            ids = [self.bos_id]
        return ids

    def chat_prompt(self, messages: list[dict]) -> str:
        from scalelab.gguf import render_chat

        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                                    for m in messages):
            raise ScalelabError("messages must be a non-empty list of {role, content} with string content")
        bos = self.tokenizer.id_to_token(self.bos_id) if self.bos_id is not None else ""
        return render_chat(self.chat_template, messages, bos_token=bos or "")

    # ---- the interface ------------------------------------------------------------------------------------
    def complete(self, prompt: str, params: SamplingParams) -> Response:
        return self._run(self.encode(prompt), params)

    def chat(self, messages: list[dict], params: SamplingParams) -> Response:
        return self._run(self.encode(self.chat_prompt(messages), bos=False), params)

    def _run(self, ids: list[int], params: SamplingParams) -> Response:
        with self.lock:
            g = self.engine.generate(ids, params)
        return Response([Choice(c.text, c.finish_reason, c.tokens, c.logprobs) for c in g.completions],
                        g.prompt_tokens, g.completion_tokens, self.name, {"cached_tokens": g.cached_tokens})

    def stream_ids(self, ids: list[int], params: SamplingParams) -> Iterator:
        """Engine deltas for already-tokenized input, holding the engine for the whole stream."""
        with self.lock:
            yield from self.engine.stream(ids, params)

    def score(self, prompt: str, continuations: list[str]) -> list[Score]:
        conts = [self.tokenizer.encode(c, add_special_tokens=False).ids for c in continuations]
        with self.lock:
            return self.engine.score(self.encode(prompt), conts)


class OpenAIBackend:
    """Any OpenAI-compatible server through the `openai` SDK."""

    def __init__(self, base_url: str, model: str = "default", api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 3, concurrency: int = 8):
        try:
            import openai
        except ImportError:
            raise ScalelabError("the openai backend needs the openai package: pip install 'scalelab[openai]'") from None
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ScalelabError("need concurrency >= 1, max_retries >= 0 and timeout > 0")
        self.openai = openai
        self.base_url, self.model, self.name = base_url, model, model
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
            except o.APIConnectionError as e:  # includes timeouts, after the SDK's retries
                raise ScalelabError(f"cannot reach the server at {self.base_url}: {e}") from None
            except o.APIStatusError as e:
                msg = e.message if isinstance(e.message, str) else str(e)
                raise ScalelabError(f"server {self.base_url} answered {e.status_code}: {msg.splitlines()[0][:300]}") from None
            except o.APIResponseValidationError as e:
                raise ScalelabError(f"server {self.base_url} returned a malformed response: {e}") from None
            except (ValueError, TypeError, KeyError) as e:  # a body that is not JSON or not the expected shape
                raise ScalelabError(f"server {self.base_url} returned garbage: {type(e).__name__}: {e}") from None

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
            raise ScalelabError(f"server {self.base_url} returned no choices")
        prompt_tokens = getattr(usage[0], "prompt_tokens", 0) or 0
        completion = sum(getattr(u, "completion_tokens", 0) or 0 for u in usage)
        return Response(choices[:n], prompt_tokens, completion, getattr(first, "model", self.model) or self.model)

    def complete(self, prompt: str, params: SamplingParams) -> Response:
        kw = self._kwargs(params)
        if params.logprobs or params.top_logprobs:
            kw["logprobs"] = max(1, params.top_logprobs)

        def parse(r):
            try:
                return [Choice(c.text, c.finish_reason or "stop", None,
                               list(c.logprobs.token_logprobs) if c.logprobs and c.logprobs.token_logprobs else None)
                        for c in r.choices]
            except (AttributeError, TypeError) as e:
                raise ScalelabError(f"server {self.base_url} returned a malformed completion: {e}") from None

        return self._collect(self.client.completions.create, dict(kw, prompt=prompt), params.n, parse)

    def chat(self, messages: list[dict], params: SamplingParams) -> Response:
        kw = self._kwargs(params)
        if params.logprobs or params.top_logprobs:
            kw["logprobs"] = True
            if params.top_logprobs:
                kw["top_logprobs"] = params.top_logprobs

        def parse(r):
            try:
                return [Choice(c.message.content or "", c.finish_reason or "stop", None,
                               [t.logprob for t in c.logprobs.content] if c.logprobs and c.logprobs.content else None)
                        for c in r.choices]
            except (AttributeError, TypeError) as e:
                raise ScalelabError(f"server {self.base_url} returned a malformed chat completion: {e}") from None

        return self._collect(self.client.chat.completions.create, dict(kw, messages=messages), params.n, parse)

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
                raise ScalelabError(f"server {self.base_url} does not return echoed prompt logprobs, which "
                                    "scoring needs") from None
            out.append(Score(sum(lps), lps))
        return out


def make_backend(model: str | None = None, base_url: str | None = None, **kw):
    """`base_url` given → OpenAIBackend (model names the server's model); else LocalBackend(model)."""
    if base_url:
        return OpenAIBackend(base_url, model or "default", **kw)
    return LocalBackend(model or "smollm2", **kw)
