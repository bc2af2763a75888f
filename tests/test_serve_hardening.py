"""The server against hostile and careless clients, through its HTTP interface only (so these hold whatever
the scheduling inside: one request at a time, round robin, or continuous batching).

Disconnects at every point, SIGTERM with requests in flight, DNS rebinding, limits, bad ids, and a bounded
hypothesis fuzz of request bodies. Every server binds 127.0.0.1 and every loop is bounded in count and time.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("gguf")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from scalelab import gguf as G  # noqa: E402
from scalelab.backends import LocalBackend  # noqa: E402
from scalelab.config import ModelConfig  # noqa: E402
from scalelab.engine import SamplingParams  # noqa: E402
from scalelab.model import Transformer  # noqa: E402
from scalelab.serve import Limits, create_app  # noqa: E402

from conftest import ROOT  # noqa: E402
from test_serve import ServerThread, free_port  # noqa: E402

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
LONG = 1500  # tokens a "long" request asks for: seconds of decode, so a cancel is visible in the step count


@pytest.fixture(scope="module")
def slow_gguf(tmp_path_factory):
    """A model with no stop token (every sample runs to max_tokens), wide enough that a step takes ~ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog. " * 20] * 10,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), context=2048, d_model=128, n_layer=4, n_head=4, n_kv_head=2,
                      tie_embeddings=False)
    path = tmp_path_factory.mktemp("hard") / "slow.gguf"
    G.save_gguf(Transformer(cfg).eval(), tok, path, chat_template=TEMPLATE)
    return path


@pytest.fixture(scope="module")
def backend(slow_gguf):
    return LocalBackend(str(slow_gguf))


@pytest.fixture(scope="module")
def server(backend):
    app = create_app(backend, Limits(max_n=8, body_bytes=64 * 1024))
    with ServerThread(app) as url:
        yield url.rsplit(":", 1)[1], app.state.scheduler


def request(port, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None,
            timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request on a fresh connection."""
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json"} if data is not None else {}
        h.update(headers or {})
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        text = r.read()
        try:
            payload = json.loads(text) if text else {}
        except json.JSONDecodeError:
            payload = {"raw": text.decode(errors="replace")}
        return r.status, payload, {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


def health(port) -> dict:
    return request(port, "GET", "/health", timeout=10)[1]


def wait_idle(port, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while (h := health(port))["in_flight"]:
        assert time.time() < deadline, f"the engine is still busy {timeout} s later: {h}"
        time.sleep(0.02)
    return h


def chat(max_tokens=LONG, **kw) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "temperature": 1.0, **kw}


def open_post(port, path: str, body: dict) -> socket.socket:
    """Send a POST on a raw socket and return it unread (the caller reads some, then hangs up)."""
    s = socket.create_connection(("127.0.0.1", int(port)), timeout=30)
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def hang_up(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, as a crash
    s.close()


@pytest.mark.parametrize("stream, n", [(True, 2), (False, 1), (False, 3)])
def test_a_client_that_hangs_up_frees_the_engine(server, stream, n):
    """The measured wedge: a streaming client (n=2) closed after 3 chunks left every later request hanging.
    Now the request is cancelled: the engine stops within a few steps, and the next request is answered."""
    port, sched = server
    wait_idle(port)
    before = sched.steps
    s = open_post(port, "/v1/chat/completions", chat(n=n, stream=stream, seed=1))
    if stream:
        got = b""
        while got.count(b"data: ") < 3:
            chunk = s.recv(4096)
            assert chunk, "the server closed the stream early"
            got += chunk
    else:  # wait until it is decoding
        deadline = time.time() + 20
        while sched.steps - before < 20:
            assert time.time() < deadline, "the request never started"
            time.sleep(0.005)
    hang_up(s)
    wait_idle(port)
    used = sched.steps - before
    assert used < LONG // 2, f"the abandoned request ran {used} of {LONG} steps"
    time.sleep(0.2)
    assert sched.steps - before == used, "the engine kept stepping after the client left"
    status, body, _ = request(port, "POST", "/v1/chat/completions", chat(max_tokens=5, n=2, seed=3), timeout=30)
    assert status == 200 and len(body["choices"]) == 2 and body["usage"]["completion_tokens"] == 10


def test_hang_up_while_queued_and_concurrent_clients_all_progress(server, backend):
    """Four concurrent requests are answered exactly as alone (per-sample seeds), one that hangs up while
    others run is dropped, and nothing is left in flight."""
    port, sched = server
    wait_idle(port)
    bodies = [{"prompt": "the quick", "max_tokens": 40, "n": 2, "temperature": 1.0, "seed": i} for i in range(4)]
    results = [None] * 4

    def go(i):
        results[i] = request(port, "POST", "/v1/completions", bodies[i], timeout=60)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    quitter = open_post(port, "/v1/completions", {"prompt": "the", "max_tokens": LONG, "stream": True})
    hang_up(quitter)
    for t in threads:
        t.join(timeout=60)
    wait_idle(port)
    for i, (status, body, _) in enumerate(results):
        assert status == 200, body
        ref = backend.generate("the quick", SamplingParams(n=2, max_tokens=40, temperature=1.0, seed=i))
        assert [c["text"] for c in body["choices"]] == [c.text for c in ref.choices]


def test_dns_rebinding_and_cross_origin_requests_are_refused(server, slow_gguf):
    port, _ = server
    body = chat(max_tokens=2)
    status, data, _ = request(port, "POST", "/v1/chat/completions", body, headers={"Host": "evil.example"})
    assert status == 421 and "Host" in data["error"]["message"]
    status, _, _ = request(port, "GET", "/v1/models", headers={"Host": f"evil.example:{port}"})
    assert status == 421
    status, data, _ = request(port, "POST", "/v1/chat/completions", body, headers={"Origin": "http://evil.example"})
    assert status == 403 and "--allow-origin" in data["error"]["message"]
    status, data, _ = request(port, "POST", "/v1/chat/completions", raw=json.dumps(body).encode(),
                              headers={"Content-Type": "text/plain"})
    assert status == 415
    for ctype in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert request(port, "POST", "/v1/completions", raw=b"{}", headers={"Content-Type": ctype})[0] == 415
    ok = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
    assert request(port, "POST", "/v1/chat/completions", body, headers=ok)[0] == 200
    # an allowed origin gets CORS headers, and its preflight is answered
    app = create_app(LocalBackend(str(slow_gguf)), Limits(allow_origins=["http://localhost:3000"]))
    with ServerThread(app) as url:
        p2 = url.rsplit(":", 1)[1]
        origin = {"Origin": "http://localhost:3000"}
        status, _, h = request(p2, "POST", "/v1/chat/completions", body, headers=origin)
        assert status == 200 and h["access-control-allow-origin"] == "http://localhost:3000"
        status, _, h = request(p2, "OPTIONS", "/v1/chat/completions", headers={
            **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        assert status == 200 and "POST" in h["access-control-allow-methods"]
        assert request(p2, "POST", "/v1/chat/completions", body, headers={"Origin": "http://evil.example"})[0] == 403


def test_limits_names_roles_and_ids_get_4xx(server):
    port, _ = server
    url = "/v1/completions"
    cases = [
        ({"prompt": [-1], "max_tokens": 2}, 400, "vocabulary"),
        ({"prompt": [2 ** 70], "max_tokens": 2}, 400, "vocabulary"),
        ({"prompt": [], "max_tokens": 2}, 400, "prompt"),
        ({"prompt": [True], "max_tokens": 2}, 400, "prompt"),
        ({"prompt": "x", "max_tokens": 10 ** 9}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2, "n": 10 ** 6}, 400, "'n'"),
        ({"prompt": "x", "max_tokens": 2, "model": "gpt-4o"}, 404, "not served"),
        ({"prompt": "x", "max_tokens": 2, "seed": 2 ** 80}, 400, "seed"),
        ({"prompt": "x", "max_tokens": 2, "logprobs": 99}, 400, "logprobs"),
        ({"prompt": "x " * 3000, "max_tokens": 2}, 400, "context"),
    ]
    for body, code, words in cases:
        status, data, _ = request(port, "POST", url, body)
        assert status == code and words in data["error"]["message"], (body, status, data)
    status, data, _ = request(port, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2})
    assert status == 400 and "role" in data["error"]["message"]
    for model in (None, "default", "slow"):
        body = {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
                "max_tokens": 2, **({"model": model} if model else {})}
        assert request(port, "POST", "/v1/chat/completions", body)[0] == 200, model
    for raw in (b'{"prompt": "x", "temperature": NaN}', b"[" * 5000 + b"]" * 5000, b"\xff\xfe"):
        status, data, _ = request(port, "POST", url, raw=raw)
        assert status == 400 and "JSON" in data["error"]["message"], raw[:20]


def test_body_size_is_enforced_while_reading(server):
    port, _ = server
    big = json.dumps({"prompt": "x" * (70 * 1024)}).encode()
    assert request(port, "POST", "/v1/completions", raw=big)[0] == 413  # Content-Length says so up front
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
    try:  # chunked: no length up front, so the server counts as it reads and stops early
        c.putrequest("POST", "/v1/completions")
        c.putheader("Content-Type", "application/json")
        c.putheader("Transfer-Encoding", "chunked")
        c.endheaders()
        for i in range(0, len(big), 8192):
            part = big[i:i + 8192]
            try:
                c.send(b"%x\r\n%s\r\n" % (len(part), part))
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            c.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = c.getresponse()
        assert r.status == 413 and "body over" in json.loads(r.read())["error"]["message"]
    finally:
        c.close()
    assert request(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


def _serve(gguf, port: int, log, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "scalelab.cli", "serve", "--model", str(gguf), "--port", str(port),
                             *extra], env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, log.read_text()
        assert time.time() < deadline, "server did not come up"
        try:
            health(port)
            return proc
        except OSError:
            time.sleep(0.2)


def test_sigterm_drains_in_flight_requests_then_exits(slow_gguf, tmp_path):
    port = free_port()
    proc = _serve(slow_gguf, port, tmp_path / "a.log", "--grace", "60")
    try:
        out = {}

        def ask(key, body):
            out[key] = request(port, "POST", "/v1/completions", body, timeout=60)

        short = threading.Thread(target=ask, args=("short", {"prompt": "the", "max_tokens": 40, "seed": 0}))
        short.start()
        deadline = time.time() + 30
        while health(port)["steps"] < 5:
            assert time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        short.join(timeout=90)
        assert out["short"][0] == 200 and out["short"][1]["usage"]["completion_tokens"] == 40  # drained
        t0 = time.time()
        proc.wait(timeout=30)
        # uvicorn re-raises the signal once drained: the exit status is that of SIGTERM, as systemd expects
        assert proc.returncode in (0, -signal.SIGTERM) and time.time() - t0 < 10  # at once, not after the grace
    finally:
        if proc.poll() is None:
            proc.kill()
    # a request longer than the grace period is cut off, and the process still exits promptly
    port = free_port()
    proc = _serve(slow_gguf, port, tmp_path / "b.log", "--grace", "1")
    try:
        s = open_post(port, "/v1/completions", {"prompt": "the", "max_tokens": 2000, "stream": True})
        assert s.recv(4096)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.time() - t0 < 10
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_serve_options_exit_2(slow_gguf):
    from conftest import run_cli

    for args, words in [(["--max-n", "0"], "max-n"), (["--max-prompts", "0"], "max-prompts"),
                        (["--grace", "-1"], "grace"), (["--port", "0"], "port"), (["--quant", "int3"], "quant")]:
        p = run_cli("serve", "--model", str(slow_gguf), *args, timeout=120)
        assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# ---- fuzz: any body gets a 200 or a 4xx JSON error, never a 500 ------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)
FIELDS = {"model": st.sampled_from(["slow", "default", "x"]) | JSON, "n": st.integers(-2, 10) | JSON,
          "max_tokens": st.integers(-2, 12) | JSON, "temperature": st.floats(-1, 3) | JSON,
          "top_p": st.floats(-0.5, 1.5) | JSON, "top_k": st.integers(-2, 400) | JSON,
          "seed": st.integers(-2 ** 64, 2 ** 64) | JSON, "stop": st.lists(st.text(max_size=4), max_size=10) | JSON,
          "logprobs": st.booleans() | st.integers(-1, 30) | JSON, "top_logprobs": st.integers(-1, 30) | JSON,
          "stream": st.booleans() | JSON, "echo": st.booleans() | JSON,
          "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 400), max_size=8) | JSON,
          "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"])
                                                      | JSON, "content": st.text(max_size=20) | JSON}),
                               max_size=3) | JSON}
BODIES = st.fixed_dictionaries({}, optional=FIELDS)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=BODIES, chat=st.booleans())
def test_fuzz_request_bodies_never_500(server, body, chat):
    port, _ = server
    if isinstance(body.get("max_tokens"), int):  # keep each example fast
        body["max_tokens"] = min(body["max_tokens"], 12)
    else:
        body["max_tokens"] = 4
    status, data, _ = request(port, "POST", "/v1/chat/completions" if chat else "/v1/completions", body, timeout=30)
    assert status == 200 or 400 <= status < 500, (body, status, data)
    if status != 200:
        assert data["error"]["message"] and data["error"]["type"], data


def test_continuous_batching_shares_steps_and_a_full_server_answers_429(slow_gguf):
    """Concurrent requests decode in one batch (peak rows > any single request's n, in fewer steps than run one
    after another); past the rows and the waiting line the next request gets 429 with Retry-After; a request
    that could never fit gets a 400 at once."""
    app = create_app(LocalBackend(str(slow_gguf)), Limits(rows=4, waiting=1, kv_mib=12))  # 6144 KV positions
    sched = app.state.scheduler
    with ServerThread(app) as url:
        port = url.rsplit(":", 1)[1]
        results = []

        def go(seed):
            results.append(request(port, "POST", "/v1/completions", {"prompt": "the quick", "max_tokens": 60,
                                                                     "n": 2, "seed": seed}, timeout=120))

        threads = [threading.Thread(target=go, args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [r[0] for r in results] == [200, 200]
        assert sched.peak_rows == 4 and sched.steps < 2 * 60, (sched.peak_rows, sched.steps)
        # fill the batch (2 × n=2), then the one waiting place; the next is refused
        hogs = [open_post(port, "/v1/completions", {"prompt": "the", "max_tokens": LONG, "n": 2, "stream": True})
                for _ in range(2)]
        deadline = time.time() + 30
        while len(sched.batch) < 2:
            assert time.time() < deadline, [h.recv(4096) for h in hogs]
            time.sleep(0.01)
        waiter = open_post(port, "/v1/completions", {"prompt": "the", "max_tokens": 4})
        while not sched.waiting:
            assert time.time() < deadline
            time.sleep(0.01)
        status, data, headers = request(port, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 4})
        assert status == 429 and headers.get("retry-after") == "1" and "busy" in data["error"]["message"]
        status, data, _ = request(port, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 4, "n": 5})
        assert status == 400 and "at once" in data["error"]["message"]
        status, data, _ = request(port, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 2000, "n": 4})
        assert status == 400 and "KV positions" in data["error"]["message"]
        for s in hogs:
            hang_up(s)
        waiter.settimeout(60)
        assert b"200 OK" in waiter.recv(4096)  # it got its turn once the hogs left
        waiter.close()
        wait_idle(port)
