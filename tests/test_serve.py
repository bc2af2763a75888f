"""The OpenAI-compatible server and the `openai` backend, against real servers on free 127.0.0.1 ports.

Every request loop here is bounded (a handful of requests, timeouts of seconds) and every server is stopped.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("gguf")

from scalelab import gguf as G  # noqa: E402
from scalelab.backends import LocalBackend, OpenAIBackend  # noqa: E402
from scalelab.config import ModelConfig  # noqa: E402
from scalelab.engine import SamplingParams  # noqa: E402
from scalelab.errors import ScalelabError  # noqa: E402
from scalelab.model import Transformer  # noqa: E402
from scalelab.serve import create_app  # noqa: E402
from scalelab.tokenizer import train_bpe  # noqa: E402

from conftest import ROOT, run_cli  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "Paris is the capital of France.", "<|user|>hi<|assistant|>hello"] * 20
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a thread on a free port; stops on exit."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    torch.manual_seed(0)
    tok = train_bpe(TEXTS, 300)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), context=64, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      tie_embeddings=False)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    path = tmp_path_factory.mktemp("serve") / "tiny.gguf"
    G.save_gguf(model, tok, path, chat_template=TEMPLATE)
    return path


@pytest.fixture(scope="module")
def local(tiny_gguf):
    return LocalBackend(str(tiny_gguf))


@pytest.fixture(scope="module")
def server(local):
    with ServerThread(create_app(local)) as url:
        yield url


def post(url: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_sdk_against_server(server, local):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", timeout=30, max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, n=3, max_tokens=8, temperature=1.0, seed=5,
                                       logprobs=True, top_logprobs=2)
    assert len(r.choices) == 3 and r.usage.completion_tokens > 0
    assert r.usage.prompt_tokens == len(local.encode(local.chat_prompt(msgs), bos=False))
    assert all(len(c.logprobs.content[0].top_logprobs) == 2 for c in r.choices)
    # the server's answer is the local backend's answer
    ref = local.generate(msgs, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5))
    assert [c.message.content for c in r.choices] == [c.text for c in ref.choices]
    # streaming gives the same text as the non-streaming greedy answer
    greedy = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    chunks = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy.choices[0].message.content
    c = client.completions.create(model="tiny", prompt="def add(", max_tokens=6, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == c.usage.completion_tokens
    assert client.models.list().data[0].id


def test_openai_backend_against_server(server, local):
    be = OpenAIBackend(server + "/v1", model="tiny", timeout=30, max_retries=0, concurrency=2)
    p = SamplingParams(n=4, max_tokens=6, temperature=0.9, seed=1)
    r = be.generate("The quick", p)
    ref = local.generate("The quick", p)
    assert [c.text for c in r.choices] == [c.text for c in ref.choices]
    assert (r.prompt_tokens, r.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    ch = be.generate([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=5, temperature=0, logprobs=True))
    assert len(ch.choices[0].logprobs) == ch.completion_tokens
    remote = be.score("Paris is the", [" capital", " quick brown"])
    here = local.score("Paris is the", [" capital", " quick brown"])
    for a, b in zip(remote, here):
        assert abs(a.logprob - b.logprob) < 1e-4


def test_server_bad_requests_stay_up(server):
    url = server + "/v1/chat/completions"
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [(None, b"{not json"), (dict(good, n=0), None), (dict(good, temperature=-1), None),
             (dict(good, top_p=2), None), (dict(good, max_tokens="many"), None), ({"messages": []}, None),
             ({"messages": [{"role": "user"}]}, None), ([1, 2], None), (dict(good, stop=[1]), None),
             (dict(good, messages=[{"role": "user", "content": "word " * 200}]), None)]
    for body, raw in cases:
        status, data = post(url, body, raw)
        assert 400 <= status < 500, (body, status, data)
        assert set(data["error"]) >= {"message", "type", "param", "code"} and data["error"]["message"]
    status, data = post(server + "/v1/completions", {"prompt": [10 ** 7], "max_tokens": 2})
    assert status == 400 and "vocabulary" in data["error"]["message"]
    status, data = post(server + "/v1/nope", {})
    assert status == 404 and data["error"]["type"] == "not_found_error"
    status, data = post(url, good)
    assert status == 200 and data["choices"][0]["message"]["role"] == "assistant"


def _stub(kind: str, calls: list):
    """A minimal OpenAI-like server that misbehaves in one way."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def chat(request):
        calls.append(await request.json())
        if kind == "500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if kind == "garbage":
            return PlainTextResponse("<html>not json</html>", status_code=200)
        i = len(calls)
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "stub",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": f"r{i}"},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_openai_backend_emulates_n_and_reports_errors():
    msgs = [{"role": "user", "content": "hi"}]
    calls: list = []
    with ServerThread(_stub("one", calls)) as url:
        be = OpenAIBackend(url + "/v1", model="stub", timeout=10, max_retries=0, concurrency=2)
        r = be.generate(msgs, SamplingParams(n=4, max_tokens=3, seed=10))
        assert len(r.choices) == 4 and len(calls) == 4
        assert sorted(c["seed"] for c in calls) == [10, 11, 12, 13]
        assert (r.prompt_tokens, r.completion_tokens) == (5, 8)
    for kind, msg in [("500", "answered 500"), ("garbage", "garbage|malformed")]:
        calls = []
        with ServerThread(_stub(kind, calls)) as url:
            be = OpenAIBackend(url + "/v1", model="stub", timeout=10, max_retries=1, concurrency=1)
            with pytest.raises(ScalelabError, match=msg):
                be.generate(msgs, SamplingParams(max_tokens=3))
            if kind == "500":
                assert len(calls) == 2  # one retry
    be = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", timeout=2, max_retries=0)
    with pytest.raises(ScalelabError, match="cannot reach"):
        be.generate(msgs, SamplingParams(max_tokens=3))


def test_cli_serve_and_generate(tiny_gguf):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "scalelab.cli", "serve", "--model", str(tiny_gguf), "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "server did not come up"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        p = run_cli("generate", "--base-url", f"http://127.0.0.1:{port}/v1", "--prompt", "hi", "-n", "2",
                    "--max-tokens", "4", timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.count("--- sample") == 2
        taken = run_cli("serve", "--model", str(tiny_gguf), "--port", str(port), timeout=120)
        assert taken.returncode == 2 and "cannot listen" in taken.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    p = run_cli("generate", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--prompt", "hi", timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "cannot reach" in p.stderr
    p = run_cli("generate", "--model", str(tiny_gguf), "--prompt", "hi", "--temperature", "-1", timeout=120)
    assert p.returncode == 2 and "temperature" in p.stderr


def test_completions_batched_prompts(local):
    """OpenAI's batched `prompt`: a list of strings or of token-id lists, each prompt its own n choices
    (index = prompt × n + sample), decoded together in the continuous batch, usage summed; a mix, an empty list
    or more prompts than the server takes is a 400 in OpenAI's shape."""
    from scalelab.serve import Limits

    app = create_app(local, Limits(max_prompts=3))
    with ServerThread(app) as url:
        url += "/v1/completions"
        prompts = ["Paris is the", "The quick", "def add("]
        base = {"max_tokens": 5, "temperature": 0, "logprobs": 1}
        status, data = post(url, dict(base, prompt=prompts, n=2))
        assert status == 200, data
        assert [c["index"] for c in data["choices"]] == list(range(6))
        singles = []
        for p in prompts:
            s, one = post(url, dict(base, prompt=p))
            assert s == 200 and len(one["choices"]) == 1
            singles.append(one)
        for i, c in enumerate(data["choices"]):
            ref = singles[i // 2]["choices"][0]
            assert (c["text"], c["finish_reason"]) == (ref["text"], ref["finish_reason"])
            assert c["logprobs"]["tokens"] == ref["logprobs"]["tokens"]
            assert max(abs(a - b) for a, b in zip(c["logprobs"]["token_logprobs"],
                                                  ref["logprobs"]["token_logprobs"])) < 1e-4
        assert data["usage"]["prompt_tokens"] == sum(o["usage"]["prompt_tokens"] for o in singles)
        assert data["usage"]["completion_tokens"] == 2 * sum(o["usage"]["completion_tokens"] for o in singles)
        assert app.state.scheduler.peak_rows >= 2 * len(prompts) - 1  # the prompts shared batch steps
        # token-id lists are prompts too; echo with max_tokens 0 gives each prompt's logprobs and top logprobs
        ids = [local.encode(p) for p in prompts[:2]]
        status, toks = post(url, dict(base, prompt=ids))
        assert status == 200 and [c["text"] for c in toks["choices"]] == [c["text"] for c in data["choices"][::2][:2]]
        status, echo = post(url, {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 2})
        assert status == 200 and [c["index"] for c in echo["choices"]] == [0, 1]
        for c, p, pids in zip(echo["choices"], prompts, ids):
            lp = c["logprobs"]
            assert c["text"] == p and len(lp["tokens"]) == len(pids) and lp["top_logprobs"][0] is None
            ref = local.engine.score(pids[:1], [pids[1:]], top_logprobs=2)[0]
            for tl, top, want, want_top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:],
                                               ref.token_logprobs, ref.top_logprobs):
                assert abs(tl - want) < 1e-4 and 1 <= len(top) <= 2
                assert abs(max(top.values()) - want_top[0][1]) < 1e-4
        for bad in [["a", [1, 2]], [], ["a"] * 4, [[1], []], [["a"]], [[1], [True]], ["a", None]]:
            status, err = post(url, {"prompt": bad, "max_tokens": 2})
            assert status == 400, (bad, status, err)
            assert set(err["error"]) >= {"message", "type", "param", "code"} and err["error"]["param"] == "prompt"
        status, err = post(url, {"prompt": prompts[:2], "max_tokens": 2, "stream": True})
        assert status == 400 and err["error"]["param"] == "stream"


def test_completions_logprobs_keep_a_stop_token(tiny_gguf):
    """A sample that ends on a stop token reports that token's logprob too (as a stream does, and as usage
    counts it), so echo + max_tokens 1 (lm-eval's loglikelihood request) always ends with one generated entry."""
    be = LocalBackend(str(tiny_gguf))
    ids = be.encode("Paris is the")
    first = be.engine.generate(ids, SamplingParams(max_tokens=1, temperature=0)).completions[0].tokens[0]
    be.engine.stop_ids = [*be.engine.stop_ids, first]  # the greedy next token now ends the sample
    with ServerThread(create_app(be)) as url:
        status, d = post(url + "/v1/completions", {"prompt": ids, "max_tokens": 3, "temperature": 0, "logprobs": 1})
        c = d["choices"][0]
        assert status == 200 and c["finish_reason"] == "stop" and c["text"] == ""
        assert len(c["logprobs"]["token_logprobs"]) == d["usage"]["completion_tokens"] == 1
        status, d = post(url + "/v1/completions", {"prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                                                   "echo": True})
        lp = d["choices"][0]["logprobs"]
        assert status == 200 and len(lp["tokens"]) == len(ids) + 1 and len(lp["top_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())


def test_every_forward_of_the_server_runs_on_its_engine_thread(tmp_path):
    """Decode steps, a served search's P(Yes) scoring and echoed prompt logprobs all run on the scheduler's
    worker: a second thread computing would start a second OpenMP team (measured on 2 cores: a batched decode
    1.6x slower), and it is what the server's engine lock exists for."""
    from scalelab.scheduler import release_openmp
    from scalelab.search.service import SearchService

    torch.manual_seed(0)
    tok = train_bpe(TEXTS, 300)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), context=2048, d_model=32, n_layer=1, n_head=2, n_kv_head=1)
    G.save_gguf(Transformer(cfg).eval(), tok, tmp_path / "long.gguf", chat_template=TEMPLATE)  # room for search prompts
    be = LocalBackend(str(tmp_path / "long.gguf"))
    threads = set()
    be.model.register_forward_pre_hook(lambda m, a: threads.add(threading.current_thread().name))
    app = create_app(be, search=lambda eb: SearchService(eb, "tiny", names={"tiny", eb.name}))
    with ServerThread(app) as url:
        opts = {"k": 2, "kv": 1, "max_tokens": 4, "verify_max_tokens": 4, "seed": 1}  # pyes-vote: score = prob
        status, d = post(url + "/v1/chat/completions", {"model": "pyes-vote:tiny", "search": opts,
                                                        "messages": [{"role": "user", "content": "2+2?"}]})
        assert status == 200, d
        assert d["scalelab_search"]["tokens"]["verify"]["calls"] >= 2
        status, d = post(url + "/v1/completions", {"prompt": "Paris is", "max_tokens": 2, "echo": True, "logprobs": 1})
        assert status == 200, d
    assert threads == {"scalelab-engine"}
    if sys.platform.startswith("linux"):
        with open("/proc/self/maps") as f:
            gomp = any("/libgomp" in line for line in f)
        assert release_openmp() == gomp  # torch's own libgomp: the creating thread's team can be freed
