"""The MCP server (`scalelab mcp`) against the SDK's real client, over stdio and streamable HTTP.

One server per transport, started as a subprocess (`python -m scalelab mcp`) and shared by the module; the
client runs in a blocking portal so the tests stay synchronous. The stdio server trains a tiny model as a job
(a few seconds), waits on it with progress notifications, reads its report, metrics and PNGs, is refused
traversals as tool arguments, resource URIs and `--set` paths, refuses a second job, and stops a long one.
Every call is bounded by a timeout; servers bind 127.0.0.1 only.
"""

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

pytest.importorskip("mcp")

import anyio  # noqa: E402
from anyio.from_thread import start_blocking_portal  # noqa: E402
from mcp import Client, MCPError, StdioServerParameters, stdio_client  # noqa: E402

from scalelab import checkpoint, config, jobs, mcp_server  # noqa: E402
from tests.conftest import ROOT, tiny_overrides  # noqa: E402

CALL_S = 150.0  # the longest a call may take: job_wait's 120 s cap plus slack on a busy machine
READ_ONLY = {"lab_info", "list_recipes", "list_runs", "run_summary", "run_metrics", "run_report", "run_image",
             "compare_runs", "sample", "horizon", "job_status", "job_wait", "job_log"}
TOOLS = READ_ONLY | {"train_start", "search_start", "reproduce_start", "sweep_start", "job_stop"}
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


class Session:
    """A connected client, called synchronously through an anyio portal; every call has a deadline."""

    def __init__(self, portal, client: Client):
        self.portal, self.client = portal, client

    def _run(self, fn, *args, timeout: float = CALL_S):
        async def bounded():
            with anyio.fail_after(timeout):
                return await fn(*args)
        return self.portal.call(bounded)

    def call(self, tool: str, progress=None, **args):
        return self._run(lambda: self.client.call_tool(tool, args, progress_callback=progress))

    def ok(self, tool: str, progress=None, **args) -> dict:
        r = self.call(tool, progress, **args)
        assert not r.is_error, r.content[0].text
        return r.structured_content

    def refused(self, tool: str, *expect: str, **args) -> str:
        r = self.call(tool, **args)
        assert r.is_error, f"{tool}({args}) was not refused: {r.structured_content}"
        text = r.content[0].text
        assert all(e in text for e in expect), text
        return text

    def read(self, uri: str):
        return self._run(lambda: self.client.read_resource(uri))

    def list(self, what: str):
        return self._run(getattr(self.client, f"list_{what}"))


def sets(corpus: Path, cache: Path, **extra) -> list[str]:
    """tiny_overrides as the `overrides` list of a tool (`k=v` strings, no `--set`)."""
    return tiny_overrides(corpus, cache, **extra)[1::2]


@pytest.fixture(scope="module")
def lab_dirs(tmp_path_factory, corpus_dir, cache_dir) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("mcp")
    d = {"runs": base / "runs", "data": base / "data", "outside": base / "outside"}
    for p in d.values():
        p.mkdir()
    return d | {"corpus": corpus_dir, "cache": cache_dir}


@pytest.fixture(scope="module")
def stdio(lab_dirs) -> Session:
    args = ["-m", "scalelab", "mcp", "--runs", str(lab_dirs["runs"])]
    for k in ("data", "corpus", "cache"):
        args += ["--allow-path", str(lab_dirs[k])]
    params = StdioServerParameters(command=sys.executable, args=args, env=ENV, cwd=str(lab_dirs["runs"].parent))
    log = lab_dirs["runs"].parent / "stdio-server.log"
    with open(log, "w") as errlog, start_blocking_portal() as portal:
        client = Client(stdio_client(params, errlog=errlog), read_timeout_seconds=CALL_S)
        connected = portal.wrap_async_context_manager(client)
        try:
            c = connected.__enter__()
        except Exception as e:  # say why: the server's stderr, not a protocol traceback
            pytest.fail(f"`scalelab mcp` did not start over stdio ({e!r}):\n{log.read_text()[-3000:]}")
        try:
            yield Session(portal, c)
        finally:
            connected.__exit__(None, None, None)


@pytest.fixture(scope="module")
def trained(stdio, lab_dirs) -> list[tuple]:
    """A tiny training run `t1`, started as a job and waited on; returns the progress notifications."""
    job = stdio.ok("train_start", recipe="tiny", name="t1", overrides=sets(lab_dirs["corpus"], lab_dirs["cache"]))
    assert job["status"] == "running" and job["kind"] == "train" and job["pid"] > 0
    got = []

    async def progress(value, total, message):
        got.append((value, total, message))

    done = stdio.ok("job_wait", progress, job="t1", timeout=120)
    assert done["status"] == "done", done["log_tail"]
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    base, port = tmp_path_factory.mktemp("mcp-http"), free_port()
    with open(base / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scalelab", "mcp", "--http", "--port", str(port),
                                 "--runs", str(base / "runs")], env=ENV, cwd=base, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (base / "server.log").read_text()
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


# ============================================================================================= stdio
def test_tools_resources_and_annotations(stdio):
    tools = {t.name: t for t in stdio.list("tools").tools}
    assert set(tools) == TOOLS
    for name, t in tools.items():
        assert bool(t.annotations.read_only_hint) == (name in READ_ONLY), name
        assert name == "run_image" or t.output_schema, f"{name} has no structured output"
    assert tools["job_stop"].annotations.destructive_hint
    assert tools["sample"].input_schema["properties"]["n"]["maximum"] == 8
    templates = {t.uri_template for t in stdio.list("resource_templates").resource_templates}
    assert {f"scalelab://runs/{{name}}/{r}" for r in ("config", "metrics", "report", "log")} <= templates
    assert "scalelab://runs/{name}/images/{+path}" in templates
    assert "scalelab://runs" in {str(r.uri) for r in stdio.list("resources").resources}
    info = stdio.ok("lab_info")
    assert {"tiny", "small", "bd3-l4"} <= {r["name"] for r in info["recipes"]} and "dyt" in info["papers"]
    assert info["max_jobs"] == 1 and info["device"]


def test_train_job_wait_report_png_metrics(stdio, trained, lab_dirs):
    assert trained, "job_wait sent no progress notifications"
    steps = [v for v, _, _ in trained]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[-1] == 30
    assert trained[-1][1] == 30 and "loss" in trained[-1][2]
    job = json.loads((lab_dirs["runs"] / "t1" / "job.json").read_text())
    assert job["pid"] > 0 and job["proc_start"] and job["returncode"] == 0 and "-m" in job["argv"]
    assert "val loss" in (lab_dirs["runs"] / "t1" / "job.log").read_text()

    report = stdio.ok("run_report", run="t1")
    assert report["text"].startswith("# Run") and "final val loss" in report["text"]
    img = stdio.call("run_image", run="t1", path="loss.png")
    assert not img.is_error and img.content[0].type == "image" and img.content[0].mime_type == "image/png"
    assert base64.b64decode(img.content[0].data)[:4] == b"\x89PNG"
    blob = stdio.read("scalelab://runs/t1/images/loss.png").contents[0]
    assert blob.mime_type == "image/png" and base64.b64decode(blob.blob)[:4] == b"\x89PNG"

    metrics = json.loads(stdio.read("scalelab://runs/t1/metrics").contents[0].text)
    assert metrics["train_rows"] == 30 and metrics["train"][-1]["step"] == 30 and "val_loss" in metrics["eval"][-1]
    thin = stdio.ok("run_metrics", run="t1", keys=["loss"], max_points=5)
    assert len(thin["train"]) == 5 and set(thin["train"][0]) == {"step", "loss"} and thin["train"][-1]["step"] == 30
    assert "[train]" in stdio.read("scalelab://runs/t1/config").contents[0].text
    assert "# Run" in stdio.read("scalelab://runs/t1/report").contents[0].text
    runs = {r["name"]: r for r in json.loads(stdio.read("scalelab://runs").contents[0].text)["runs"]}
    assert runs["t1"]["status"] == "done" and runs["t1"]["step"] == 30 and runs["t1"]["kind"] == "train"
    summary = stdio.ok("run_summary", run="t1")
    assert "loss.png" in summary["images"] and summary["checkpoints"] and summary["config"]["model"]["d_model"] == 32

    samples = stdio.ok("sample", run_or_model="t1", prompt="def ", n=2, max_tokens=8, seed=0)
    assert len(samples["samples"]) == 2 and all(s["text"].startswith("def ") for s in samples["samples"])


def test_traversal_refused_and_server_keeps_serving(stdio, lab_dirs, trained):
    runs, data, outside = lab_dirs["runs"], lab_dirs["data"], lab_dirs["outside"]
    (outside / "secret.csv").write_text("model,task_id,task_family,human_minutes,success\n")
    (runs / "escape").symlink_to(outside, target_is_directory=True)
    (data / "link.csv").symlink_to(outside / "secret.csv")
    (data / "corpus-link").symlink_to(outside, target_is_directory=True)

    # run names: a path, a parent, a symlink that leaves the runs root
    stdio.refused("run_summary", "not allowed", run="../outside")
    stdio.refused("run_report", "not allowed", run="..")
    stdio.refused("run_summary", "outside the runs root", run="escape")
    stdio.refused("run_image", "not a PNG inside", run="t1", path="../../outside/x.png")
    # file arguments: absolute, ../, a symlink out of an allowed root
    for f in ("/etc/passwd", f"{data}/../outside/secret.csv", str(data / "link.csv")):
        stdio.refused("horizon", "outside the allowed roots", "--allow-path", runs_file=f)
    # paths inside --set overrides (and the recipe): refused before any job starts
    base = sets(lab_dirs["corpus"], lab_dirs["cache"])
    for bad in ('data.corpus="/etc"', f'data.corpus="{lab_dirs["corpus"]}/../../.."', 'data.cache_dir="/tmp/x"',
                f'data.corpus="{data / "corpus-link"}"', 'diffusion.init_from="/"'):
        stdio.refused("train_start", "outside the allowed roots", name="bad", overrides=[*base, bad])
    stdio.refused("train_start", "outside the allowed roots", name="bad", recipe="/etc/hosts")
    stdio.refused("sweep_start", "outside the allowed roots", name="bad", overrides=['data.corpus="/"'])
    stdio.refused("search_start", "outside the allowed roots", name="bad", tasks="/etc/x.jsonl")
    stdio.refused("search_start", "loopback", name="bad", backend="openai:http://example.com/v1#m")
    stdio.refused("reproduce_start", "cpu", name="bad", papers=["dyt"], device="tpu")
    if not torch.cuda.is_available():
        stdio.refused("reproduce_start", "no CUDA device", name="bad", papers=["dyt"], device="cuda")
    assert not (runs / "bad").exists()
    # resources: the SDK's template checks and ours
    for uri in ("scalelab://runs/..%2F..%2Fetc/config", "scalelab://runs/t1/images/..%2F..%2Foutside%2Fx.png",
                "scalelab://runs/escape/config"):
        with pytest.raises(MCPError):
            stdio.read(uri)
    # backends and caps
    stdio.refused("sample", "loopback", run_or_model="openai:http://10.1.2.3:8000/v1#m", prompt="hi")
    stdio.refused("sample", "less than or equal to 8", run_or_model="t1", prompt="hi", n=9)
    stdio.refused("sample", "outside the allowed roots", run_or_model="/etc", prompt="hi")
    stdio.refused("train_start", "cap", name="big", overrides=[*base, "train.max_steps=100001"])
    # ... and the next call is answered
    assert stdio.ok("list_runs")["runs"]


def test_horizon_on_a_file_inside_a_root(stdio, lab_dirs):
    rows = ["model,task_id,task_family,human_minutes,success"]
    for i, minutes in enumerate([1, 2, 4, 8, 16, 32, 64, 128]):
        rows += [f"m,t{i},f{i % 3},{minutes},{int(minutes < 20 or j == 0)}" for j in range(3)]
    (lab_dirs["data"] / "runs.csv").write_text("\n".join(rows) + "\n")
    h = stdio.ok("horizon", runs_file=str(lab_dirs["data"] / "runs.csv"), bootstrap=20)
    (m,) = h["models"]
    assert m["model"] == "m" and m["status"] == "ok" and 1 < m["horizons_min"]["p50"] < 128


def test_second_job_refused_then_stop(stdio, lab_dirs, trained):
    runs = lab_dirs["runs"]
    stdio.ok("train_start", name="long", overrides=sets(lab_dirs["corpus"], lab_dirs["cache"],
                                                        **{"train.max_steps": 100000}))
    deadline = time.monotonic() + 90
    try:
        while (st := stdio.ok("job_status", job="long"))["step"] is None or st["step"] < 6:
            assert st["status"] == "running" and time.monotonic() < deadline, st
            time.sleep(0.3)
    except BaseException:  # never leave a 100,000-step job behind
        pid = jobs.Job.read(runs / "long").pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        raise
    assert st["total"] == 100000 and st["eta_s"] > 0

    stdio.refused("train_start", "already running", "'long'", "--max-jobs", name="second",
                  overrides=sets(lab_dirs["corpus"], lab_dirs["cache"]))
    stdio.refused("reproduce_start", "already running", papers=["dyt"], name="second")
    assert not (runs / "second").exists()

    pid = st["pid"]
    stopped = stdio.ok("job_stop", job="long")
    assert stopped["status"] == "stopped" and stopped["returncode"] is not None
    assert stdio.ok("job_log", job="long", tail=5)["text"]
    assert jobs.proc_start(pid) is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    run = runs / "long"
    assert (run / "config.toml").is_file() and (run / "metrics.jsonl").is_file()
    ck = checkpoint.latest(run / "checkpoints")
    assert ck is not None and checkpoint.read_state(ck)["step"] >= 5
    stdio.refused("job_stop", "not running", job="long")
    cmp = stdio.ok("compare_runs", runs=["t1", "long"], metric="loss")
    assert [r["name"] for r in cmp["runs"]] == ["t1", "long"] and cmp["best"] in ("t1", "long")
    assert cmp["config_diff"]["train.max_steps"] == {"t1": 30, "long": 100000}

    # a job.json whose pid is alive but is another process (here: this test) is never signalled
    (runs / "fake").mkdir()
    argv = [sys.executable, "-m", "scalelab", "train", "--out", str(runs / "fake")]
    jobs.Job("fake", "train", argv, str(runs / "fake"), os.getpid(), "1", time.time()).write()
    stdio.refused("job_stop", "not running", "nothing was signalled", job="fake")
    real = jobs.proc_start(os.getpid())
    jobs.Job("fake", "train", argv, str(runs / "fake"), os.getpid(), real, time.time()).write()
    stdio.refused("job_stop", "not running", job="fake")  # the right start time, but not a scalelab job's command
    assert stdio.ok("job_status", job="fake")["status"] == "exited"


# ============================================================================================= HTTP
def test_http_client_and_rebinding_protection(http_server, lab_dirs):
    url = f"http://127.0.0.1:{http_server}/mcp"
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(
            Client(url, read_timeout_seconds=60)) as client:
        s = Session(portal, client)
        assert {t.name for t in s.list("tools").tools} == TOOLS
        assert s.ok("list_runs")["runs"] == []
        s.refused("run_summary", "not allowed", run="../x")
        assert json.loads(s.read("scalelab://runs").contents[0].text)["runs"] == []

    def post(headers: dict[str, str]) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", http_server, timeout=10)
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
        conn.putrequest("POST", "/mcp", skip_host=True)
        for k, v in {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                     "Content-Length": str(len(body)), **headers}.items():
            conn.putheader(k, v)
        conn.endheaders(body.encode())
        status = conn.getresponse().status
        conn.close()
        return status

    assert post({"Host": "evil.example.com"}) == 421
    assert post({"Host": f"evil.example.com:{http_server}"}) == 421
    assert post({"Host": f"127.0.0.1:{http_server}", "Origin": "http://evil.example.com"}) == 403
    assert post({"Host": f"127.0.0.1:{http_server}"}) not in (421, 403)


def test_non_loopback_host_needs_allow_remote():
    p = subprocess.run([sys.executable, "-m", "scalelab", "mcp", "--http", "--host", "0.0.0.0"], env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--allow-remote" in p.stderr and "unauthenticated" in p.stderr and not p.stdout


# ============================================================================================= no server
def test_every_string_config_key_is_classified():
    """A new path-valued config key must join mcp_server.PATH_KEYS (or say it is not a path)."""
    from scalelab.search import SearchConfig

    sections = [*((n, c) for n, c in config.SECTIONS.items()), ("search", SearchConfig)]
    keys = {f"{n}.{f.name}" for n, c in sections for f in fields(c) if isinstance(f.default, str)}
    known = set(mcp_server.PATH_KEYS) | set(mcp_server.SPEC_KEYS) | set(mcp_server.NOT_PATH_KEYS)
    assert keys - known == set(), "classify these keys in scalelab/mcp_server.py"
    assert known - keys == set(), "these keys no longer exist"
