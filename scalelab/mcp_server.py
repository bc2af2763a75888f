"""The lab as an MCP server (`scalelab mcp`): any agent lists, reads, samples and compares runs, and starts,
watches and stops training, search, reproduction and sweep jobs.

Built on the official MCP Python SDK (`mcp`, the optional extra `.[mcp]`): `MCPServer` holds the tools and
resources, its stdio transport is the default and its streamable-HTTP app serves `/mcp` under uvicorn. The
server is thin, like the CLI: every tool calls the library (config, report, backends, horizon, papers) or
`scalelab.jobs`, which starts each job as `python -m scalelab ...` and finds it again from `job.json`.

Notable choices:
- stdout is the protocol on stdio. The SDK points fd 1 at stderr while it serves, the lab logs to stderr,
  and jobs write to `runs/<name>/job.log`, so nothing else can reach the wire.
- HTTP binds 127.0.0.1 and keeps the SDK's DNS-rebinding protection on: requests whose Host or Origin is not
  the bound address (or localhost) are refused. It is unauthenticated, so a non-loopback `--host` needs
  `--allow-remote` and logs a warning.
- Files are confined. A run is named by `[A-Za-z0-9._-]{1,64}` and must resolve inside the runs root. Every
  file argument, and every path-valued config key (`PATH_KEYS`, checked after the recipe and all `--set`
  overrides are applied, so a recipe file cannot smuggle one in), must resolve (`Path.resolve`, symlinks
  followed) inside an allowed root: the runs root, the shipped recipes and each `--allow-path`. The checked
  absolute path is what the job receives. OpenAI-compatible backends and remote corpora (`hf:`) must be
  loopback unless `--allow-remote-backends`.
- Caps bound the work one call can ask for (`LIMITS`, and `--max-steps` for training). At most `--max-jobs`
  jobs (default 1) run at once; another start gets a tool error naming the running ones.
- Errors a caller can cause (`ScalelabError`, refusals, OS errors on their files) come back as MCP tool
  errors (`isError`) or resource errors with a message to act on; the server keeps serving. Anything else
  is a bug: the SDK logs its traceback to stderr and returns a generic error.
- Tool outputs are pydantic models, so the SDK publishes an output schema and returns structured content
  beside the JSON text. `run_report` rebuilds a training run's derived `report.md`/`loss.png` when they are
  missing or older than its metrics; it is annotated read-only because it changes nothing else.
"""

import functools
import inspect
import ipaddress
import json
import logging
import math
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from scalelab import __version__, config as configmod, jobs as jobsmod
from scalelab.errors import ScalelabError
from scalelab.report import make_dir

try:
    import anyio
    from mcp.server.mcpserver import Context, Image, MCPServer
    from mcp.server.mcpserver.exceptions import ResourceError, ToolError
    from mcp.server.transport_security import TransportSecuritySettings
    from mcp.types import ToolAnnotations
    from pydantic import BaseModel, Field
except ImportError as e:  # pragma: no cover
    raise ScalelabError(f"the MCP server needs the mcp extra: pip install -e '.[mcp]' ({e})") from None

log = logging.getLogger("scalelab")

RUN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
LIMITS = {"samples": 8, "max_tokens": 512, "prompt_chars": 16384, "metric_points": 2000, "log_lines": 2000,
          "text_bytes": 256 * 1024, "log_bytes": 64 * 1024, "image_bytes": 10 * 1024 * 1024, "runs_listed": 1000,
          "wait_s": 120, "compare_runs": 16, "overrides": 64, "search_problems": 1000, "search_k": 64,
          "search_kv": 32, "search_max_tokens": 2048, "bootstrap": 2000, "sweep_points": 8}
# Every str-valued config key is a path, a backend spec or address, or neither; tests/test_mcp.py checks that
# this classification covers every field of config.SECTIONS and SearchConfig, so a new path key is not missed.
PATH_KEYS = ("data.corpus", "data.cache_dir", "diffusion.init_from", "search.task", "search.prices_file")
SPEC_KEYS = ("search.backend", "search.verifier", "search.judge", "distributed.lighthouse")
NOT_PATH_KEYS = ("model.norm", "model.final_norm", "data.loss_after", "data.text_field", "train.device", "train.dtype", "train.schedule",
                 "diffusion.search_widths", "distributed.strategy", "distributed.backend",
                 "distributed.fault_tolerance", "search.prompts", "search.score", "search.trigger", "search.price", "search.quant",
                 "search.verifier_price")
POLL_S = 0.5


class Refused(ScalelabError):
    """A request the server's safety rules do not allow."""


# ============================================================================================= outputs
class RecipeInfo(BaseModel):
    name: str
    summary: str
    text: str


class LabInfo(BaseModel):
    version: str
    python: str
    torch: str
    device: str
    recipes: list[RecipeInfo]
    models: dict[str, bool] = Field(description="embedded model names -> installed")
    papers: list[str]
    runs_root: str
    allowed_roots: list[str]
    max_jobs: int
    max_steps: int
    running_jobs: list[str]
    remote_backends: bool
    limits: dict[str, int]


class RunInfo(BaseModel):
    name: str
    kind: str = Field(description="train | search | sweep | reproduce | horizon | unknown")
    status: str = Field(description="running | done | failed | stopped | exited | incomplete | unknown")
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    modified: str = ""


class RunList(BaseModel):
    runs_root: str
    runs: list[RunInfo]
    truncated: bool = False


class JobInfo(BaseModel):
    name: str
    kind: str
    status: str = Field(description="running | done | failed | stopped | exited (ended unobserved)")
    pid: int
    started_at: str
    elapsed_s: float
    returncode: int | None = None
    argv: list[str]
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    eta_s: float | None = None
    log: str
    log_tail: str = ""


class RunSummary(RunInfo):
    path: str
    files: list[str]
    images: list[str]
    checkpoints: list[str]
    config: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = Field(None, description="a search run's metrics.json")
    job: JobInfo | None = None
    resources: list[str]


class Metrics(BaseModel):
    run: str
    keys: list[str]
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    train_rows: int
    eval_rows: int


class Text(BaseModel):
    run: str
    path: str
    text: str
    truncated: bool = False


class CompareRow(BaseModel):
    name: str
    kind: str
    status: str
    final: float | None = None
    best: float | None = None
    step: int | None = None
    tokens: int | None = None


class Comparison(BaseModel):
    metric: str
    runs: list[CompareRow]
    best: str | None = Field(None, description="the run with the best final value")
    better: Literal["lower", "higher"] = Field("lower", description="losses: lower; search accuracies: higher")
    config_diff: dict[str, dict[str, Any]] = Field(description="config keys whose values differ: key -> run -> value")


class Sample(BaseModel):
    text: str
    finish: str


class Samples(BaseModel):
    model: str
    samples: list[Sample]
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    truncated: bool = False


class HorizonModel(BaseModel):
    model: str
    status: str
    n_runs: int
    horizons_min: dict[str, float | None] = Field(description="p50, p80, ... -> minutes (None: outside the tasks)")
    ci_min: dict[str, list[float | None]]
    reading: dict[str, str]


class HorizonTrend(BaseModel):
    p: str
    doubling_days: float | None
    ci_days: list[float | None]
    r2: float | None
    models: list[str]


class Horizons(BaseModel):
    source: str
    models: list[HorizonModel]
    trends: list[HorizonTrend]
    notes: list[str]
    settings: dict[str, Any]


# ============================================================================================= the lab
@dataclass
class Options:
    """What `scalelab mcp` is told: where runs live, which extra paths and remote backends are allowed."""

    runs_root: Path = Path("runs")
    allow_paths: list[Path] = field(default_factory=list)
    allow_remote_backends: bool = False
    max_jobs: int = 1
    max_steps: int = 100_000


def _num(x: Any) -> float | None:
    """A JSON-safe float: NaN and infinities become None."""
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _clip(text: str, limit: int) -> tuple[str, bool]:
    """The last `limit` bytes of a text (logs and reports are read from the end), and whether it was cut."""
    data = text.encode()
    return (text, False) if len(data) <= limit else (data[-limit:].decode(errors="ignore"), True)


def _accuracy_key(acc: dict[str, Any], metric: str) -> str | None:
    """A search run's accuracy key for `metric`: exact, or ignoring case and the `@k` (Verification ->
    Verification@16)."""
    if metric in acc:
        return metric
    m = metric.lower()
    return next((k for k in acc if k.lower() == m or k.lower().split("@")[0] == m.split("@")[0]), None)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


class Lab:
    """The tools and resources, as plain typed methods; `build_server` registers them with the SDK."""

    def __init__(self, opts: Options):
        from importlib import resources

        self.opts = opts
        self.runs_root = make_dir(Path(opts.runs_root)).resolve()
        self.recipes_root = Path(str(resources.files("scalelab").joinpath("recipes"))).resolve()
        self.roots = [self.runs_root, self.recipes_root, *(Path(p).resolve() for p in opts.allow_paths)]
        self.jobs = jobsmod.Jobs(self.runs_root, opts.max_jobs)
        self.report_lock = threading.Lock()  # matplotlib's pyplot state is process-global

    # ---- safety ------------------------------------------------------------------------------------------
    def run_dir(self, name: str, exist: bool = True) -> Path:
        """The directory of run `name`, which must be a plain name that resolves inside the runs root."""
        if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", ".."):
            raise Refused(f"run name {name!r} is not allowed: use 1-64 characters from A-Z a-z 0-9 . _ - "
                          "(a name, not a path)")
        path = (self.runs_root / name).resolve()
        if not path.is_relative_to(self.runs_root) or path == self.runs_root:
            raise Refused(f"run {name!r} resolves to {path}, outside the runs root {self.runs_root} (a symlink?)")
        if exist and not path.is_dir():
            known = ", ".join(sorted(p.name for p in self.runs_root.iterdir() if p.is_dir())[:20]) or "none"
            raise ScalelabError(f"no run named {name!r} in {self.runs_root} (runs: {known})")
        return path

    def allowed_path(self, value: str, what: str) -> Path:
        """`value` (absolute, or relative to the server's directory) resolved, if it lies inside an allowed root."""
        if not isinstance(value, str) or not value or "\0" in value:
            raise Refused(f"{what} must be a non-empty path")
        path = Path(value)
        path = (path if path.is_absolute() else self.jobs.cwd / path).resolve()
        if not any(path.is_relative_to(root) for root in self.roots):
            raise Refused(f"{what} {value!r} resolves to {path}, outside the allowed roots "
                          f"({', '.join(map(str, self.roots))}); the server's --allow-path DIR widens them")
        return path

    def check_url(self, url: str, what: str) -> None:
        if self.opts.allow_remote_backends:
            return
        host = urlsplit(url if "//" in url else f"//{url}").hostname
        if not _is_loopback(host):
            raise Refused(f"{what} {url!r} is not a loopback address; this server only reaches models and data on "
                          "this machine unless it runs with --allow-remote-backends")

    def backend_spec(self, spec: str, what: str = "model") -> str:
        """A backend spec the server allows: an embedded model, a run name, a path inside the roots, or a
        loopback OpenAI-compatible server. Run names and paths come back as checked absolute paths."""
        from scalelab import gguf

        if not isinstance(spec, str) or not spec.strip():
            raise ScalelabError(f"{what} is empty: use smollm2, a run name, a .gguf file or openai:<url>#<model>")
        if spec in gguf.DEFAULT_MODELS:
            return spec
        if spec.startswith("openai:"):
            self.check_url(spec[len("openai:"):].split("#", 1)[0], what)
            return spec
        bare = spec.split(":", 1)[1] if spec.startswith(("local:", "run:")) else spec
        if RUN_NAME.fullmatch(bare) and bare not in (".", "..") and (self.runs_root / bare).exists():
            return str(self.run_dir(bare))
        return str(self.allowed_path(bare, what))

    def checked_config(self, recipe: str | None, overrides: list[str]) -> tuple[configmod.Config, list[str], list[str]]:
        """Load a training config as the job will, check its paths; (config, recipe args, pinned overrides)."""
        if len(overrides) > LIMITS["overrides"]:
            raise Refused(f"at most {LIMITS['overrides']} overrides")
        recipe_args: list[str] = []
        if recipe:
            if recipe in configmod.recipe_names():
                recipe_args = ["--recipe", recipe]
            else:
                path = self.allowed_path(recipe, "recipe")
                if not path.is_file():
                    raise ScalelabError(f"recipe not found: {recipe} (a TOML file, or one of: "
                                        f"{', '.join(configmod.recipe_names())})")
                recipe_args = ["--recipe", str(path)]
        cfg = configmod.load(recipe_args[1] if recipe_args else None, overrides)
        pinned = []
        corpus = cfg.data.corpus
        if corpus.startswith("hf:"):
            if not self.opts.allow_remote_backends:
                raise Refused(f"data.corpus {corpus!r} downloads from the Hugging Face Hub; this server only reads "
                              "data on this machine unless it runs with --allow-remote-backends")
        elif corpus != "stdlib":
            pinned.append(("data.corpus", self.allowed_path(corpus, "data.corpus")))
        if cfg.data.cache_dir:
            pinned.append(("data.cache_dir", self.allowed_path(cfg.data.cache_dir, "data.cache_dir")))
        if src := cfg.diffusion.init_from:
            named = RUN_NAME.fullmatch(src) and (self.runs_root / src).is_dir()
            pinned.append(("diffusion.init_from", self.run_dir(src) if named else
                           self.allowed_path(src, "diffusion.init_from")))
        if cfg.distributed.lighthouse:
            self.check_url(cfg.distributed.lighthouse, "distributed.lighthouse")
        if cfg.train.max_steps > self.opts.max_steps:
            raise Refused(f"train.max_steps {cfg.train.max_steps} is above this server's cap of {self.opts.max_steps} "
                          "(--max-steps)")
        # The job gets the checked absolute paths (its cwd is the server's, but a pinned path leaves no doubt).
        raw = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k, _ in pinned}
        return cfg, recipe_args, [f"{k}={json.dumps(str(v))}" for k, v in pinned if str(v) != raw[k]]

    # ---- reading runs ------------------------------------------------------------------------------------
    def _kind(self, d: Path, job: jobsmod.Job | None) -> str:
        if job is not None:
            return job.kind
        for marker, kind in (("config.toml", "train"), ("search.json", "search"), ("sweep.json", "sweep"),
                             ("horizons.csv", "horizon")):
            if (d / marker).is_file():
                return kind
        return "reproduce" if (d / "report.md").is_file() else "unknown"

    def _job_status(self, job: jobsmod.Job) -> str:
        if job.stopped:
            return "stopped"
        if job.returncode is None:
            return "running" if jobsmod.alive(job) else "exited"
        return "done" if job.returncode == 0 else "failed"

    def _info(self, d: Path) -> RunInfo:
        job = self.jobs.job(d)
        kind = self._kind(d, job)
        p = jobsmod.progress(d)
        if job is not None:
            status = self._job_status(job)
        elif kind == "train":
            status = "done" if p["step"] is not None and p["total"] and p["step"] >= p["total"] else "incomplete"
        elif kind == "search":
            status = "done" if (d / "metrics.json").is_file() else "incomplete"
        else:
            status = "done" if (d / "report.md").is_file() else "unknown"
        return RunInfo(name=d.name, kind=kind, status=status, step=p["step"], total=p["total"], loss=_num(p["loss"]),
                       val_loss=_num(p["val_loss"]), modified=_iso(d.stat().st_mtime))

    def lab_info(self) -> LabInfo:
        """The lab: version, device, recipes, embedded models, reproducible papers, roots, limits and jobs."""
        import torch

        from scalelab import gguf
        from scalelab.papers import PAPERS

        models = {}
        for name in gguf.DEFAULT_MODELS:
            try:
                models[name] = gguf.default_path(name).is_file()
            except ScalelabError:
                models[name] = False
        device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
        return LabInfo(version=__version__, python=sys.version.split()[0], torch=torch.__version__, device=device,
                       recipes=self.list_recipes(), models=models, papers=list(PAPERS),
                       runs_root=str(self.runs_root), allowed_roots=[str(r) for r in self.roots],
                       max_jobs=self.opts.max_jobs, max_steps=self.opts.max_steps,
                       running_jobs=[j.name for j in self.jobs.running()],
                       remote_backends=self.opts.allow_remote_backends, limits=LIMITS)

    def list_recipes(self) -> list[RecipeInfo]:
        """The shipped training recipes (TOML), with a one-line summary each; use them as train_start(recipe=...)."""
        out = []
        for name in configmod.recipe_names():
            cfg = configmod.load(name)
            m = cfg.model
            summary = (f"{m.n_layer} layers, d={m.d_model}, context {m.context}, norm {m.norm}; {cfg.train.max_steps} "
                       f"steps × {cfg.train.batch_size} seq; corpus {cfg.data.corpus}"
                       + (f"; BD3-LM block {cfg.diffusion.block_size}" if cfg.diffusion.block_size else ""))
            out.append(RecipeInfo(name=name, summary=summary, text=configmod.recipe_path(name).read_text()[:8192]))
        return out

    def list_runs(self) -> RunList:
        """Every run under the runs root: name, kind, status, step/total, last train loss and val loss."""
        dirs = sorted((d for d in self.runs_root.iterdir() if d.is_dir() and RUN_NAME.fullmatch(d.name)),
                      key=lambda d: d.stat().st_mtime, reverse=True)
        cap = LIMITS["runs_listed"]
        return RunList(runs_root=str(self.runs_root), runs=[self._info(d) for d in dirs[:cap]],
                       truncated=len(dirs) > cap)

    def run_summary(self, run: str) -> RunSummary:
        """One run in full: status, progress, files, images, checkpoints, its config (training runs) or
        metrics (search runs), its job, and the resource URIs to read it by."""
        from scalelab import checkpoint

        d = self.run_dir(run)
        info = self._info(d)
        job = self.jobs.job(d)
        cfg = configmod.load(d / "config.toml").to_dict() if (d / "config.toml").is_file() else None
        metrics = None
        if (d / "metrics.json").is_file():
            try:
                metrics = json.loads((d / "metrics.json").read_text())
            except json.JSONDecodeError:
                pass
            if isinstance(metrics, dict):  # the headline numbers; per-problem records and curves stay in the file
                metrics = {k: v for k, v in metrics.items() if k not in ("config", "per_problem", "curves")}
        images = self._images(d)
        base = f"scalelab://runs/{run}"
        return RunSummary(**info.model_dump(), path=str(d), files=sorted(p.name for p in d.iterdir())[:200],
                          images=images, checkpoints=[p.name for p in checkpoint.list_checkpoints(d / "checkpoints")],
                          config=cfg, metrics=metrics, job=self._job_info(d, 0) if job else None,
                          resources=[f"{base}/{r}" for r in ("config", "metrics", "report", "log")]
                          + [f"{base}/images/{i}" for i in images])

    def _images(self, d: Path) -> list[str]:
        found = []
        for p in sorted(d.rglob("*.png")):
            rel = p.relative_to(d)
            if not any(part.startswith(".") for part in rel.parts) and "checkpoints" not in rel.parts:
                found.append(rel.as_posix())
            if len(found) >= 100:
                break
        return found

    def run_metrics(self, run: str,
                    keys: Annotated[list[str] | None, Field(
                        description="columns to return (default: step, tokens, loss, val_loss, val_bpb, lr); step is "
                                    "always included")] = None,
                    max_points: Annotated[int, Field(ge=2, le=LIMITS["metric_points"])] = 200) -> Metrics:
        """A training run's metrics.jsonl as train and eval rows, evenly thinned to at most max_points each
        (the last row is always kept)."""
        from scalelab import report

        d = self.run_dir(run)
        train, evals = report.read_metrics(d)
        want = ["step", *[k for k in (keys or ["tokens", "loss", "val_loss", "val_bpb", "lr"]) if k != "step"]]

        def thin(rows: list[dict]) -> list[dict]:
            if len(rows) > max_points:
                idx = sorted({round(i * (len(rows) - 1) / (max_points - 1)) for i in range(max_points)})
                rows = [rows[i] for i in idx]
            out = [{k: (_num(r[k]) if isinstance(r[k], float) else r[k]) for k in want if k in r} for r in rows]
            return [r for r in out if len(r) > 1]

        return Metrics(run=run, keys=want, train=thin(train), eval=thin(evals), train_rows=len(train),
                       eval_rows=len(evals))

    def run_report(self, run: str) -> Text:
        """A run's report.md (Markdown; images are the run's PNGs, see run_image). A training run's report and
        loss.png are rebuilt from its files first when missing or older than its metrics."""
        from scalelab import report

        d = self.run_dir(run)
        path, metrics = d / "report.md", d / "metrics.jsonl"
        stale = not path.is_file() or (metrics.is_file() and metrics.stat().st_mtime > path.stat().st_mtime)
        if (d / "config.toml").is_file() and stale:
            with self.report_lock:
                report.run_report(d)
        if not path.is_file():
            raise ScalelabError(f"run {run!r} has no report.md yet (a job writes it when it finishes)")
        text, cut = _clip(path.read_text(errors="replace"), LIMITS["text_bytes"])
        return Text(run=run, path=str(path), text=text, truncated=cut)

    def run_image(self, run: str, path: Annotated[str, Field(description="a PNG of the run, relative to it, as "
                                                                   "run_summary lists them")] = "loss.png") -> Image:
        """One of a run's PNG figures (loss curves, report-card plots), as image content."""
        return Image(data=self._png(run, path), format="png")

    def _png(self, run: str, rel: str) -> bytes:
        d = self.run_dir(run)
        p = (d / rel).resolve()
        if not p.is_relative_to(d) or p.suffix.lower() != ".png":
            raise Refused(f"{rel!r} is not a PNG inside run {run!r}")
        if not p.is_file():
            raise ScalelabError(f"run {run!r} has no {rel} (its PNGs: {', '.join(self._images(d)) or 'none'})")
        if p.stat().st_size > LIMITS["image_bytes"]:
            raise Refused(f"{rel} is larger than {LIMITS['image_bytes']} bytes")
        return p.read_bytes()

    def compare_runs(self, runs: Annotated[list[str], Field(min_length=1, max_length=LIMITS["compare_runs"])],
                     metric: Annotated[str, Field(
                         description="a metrics.jsonl column (val_loss, val_bpb, loss, ...) or, for search runs, an "
                                     "accuracy of metrics.json (Pass@1, Consistency, Verification, ...: the @k may be "
                                     "left out)")] = "val_loss"
                     ) -> Comparison:
        """Runs side by side on one metric (final and best value, lower is better for losses), with the config
        keys whose values differ between them."""
        from scalelab import report

        rows, configs, higher = [], {}, False
        for name in runs:
            d = self.run_dir(name)
            info = self._info(d)
            row = CompareRow(name=name, kind=info.kind, status=info.status)
            if (d / "metrics.jsonl").is_file():
                train, evals = report.read_metrics(d)
                series = evals if evals and metric in evals[-1] else train
                have = [r for r in series if _num(r.get(metric)) is not None]
                if have:
                    row.final, row.best = _num(have[-1][metric]), min(_num(r[metric]) for r in have)
                    row.step, row.tokens = have[-1].get("step"), have[-1].get("tokens")
            elif (d / "metrics.json").is_file():  # a search run: accuracies, where higher is better
                acc = json.loads((d / "metrics.json").read_text()).get("accuracy", {})
                key = _accuracy_key(acc, metric)
                row.final = row.best = _num(acc.get(key)) if key else None
                higher = higher or key is not None
            rows.append(row)
            if (d / "config.toml").is_file():
                cfg = configmod.load(d / "config.toml").to_dict()
                configs[name] = {f"{s}.{k}": v for s, sec in cfg.items() if isinstance(sec, dict)
                                 for k, v in sec.items()}
        keys = sorted({k for c in configs.values() for k in c})
        diff = {k: {n: c.get(k) for n, c in configs.items()} for k in keys
                if len({json.dumps(c.get(k)) for c in configs.values()}) > 1}
        finals = [r for r in rows if r.final is not None]
        best = (max if higher else min)(finals, key=lambda r: r.final).name if finals else None
        return Comparison(metric=metric, runs=rows, best=best, better="higher" if higher else "lower",
                          config_diff=diff)

    def sample(self, run_or_model: Annotated[str, Field(description="a run name, smollm2, a .gguf file inside the "
                                                        "allowed roots, or openai:<loopback url>#<model>")],
               prompt: Annotated[str, Field(max_length=LIMITS["prompt_chars"])],
               n: Annotated[int, Field(ge=1, le=LIMITS["samples"])] = 1,
               max_tokens: Annotated[int, Field(ge=1, le=LIMITS["max_tokens"])] = 64,
               seed: int = 0,
               temperature: Annotated[float | None, Field(ge=0, le=5)] = None,
               top_p: Annotated[float | None, Field(gt=0, le=1)] = None,
               chat: Annotated[bool | None, Field(
                   description="wrap the prompt in the chat template (default: chat for GGUF models and servers, "
                               "raw text for runs)")] = None) -> Samples:
        """n samples of a prompt from a lab run or a model (raw continuations for runs, chat replies for chat
        models); sample i uses seed engine.sample_seed(seed, i)."""
        from scalelab import backends

        spec = self.backend_spec(run_or_model)
        r = backends.sample(spec, prompt, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, chat=chat)
        budget, out = LIMITS["text_bytes"] // n, []
        for text, finish in r.samples:
            out.append(Sample(text=text.encode()[:budget].decode(errors="ignore"), finish=finish))
        cut = any(len(text.encode()) > budget for text, _ in r.samples)
        usage = r.usage or (None, None)
        return Samples(model=run_or_model, samples=out, prompt_tokens=usage[0], completion_tokens=usage[1],
                       truncated=cut)

    def horizon(self, runs_file: Annotated[str, Field(description="METR runs JSONL, a runs CSV or a per-model fits "
                                                      "CSV, inside the allowed roots")],
                release_dates: Annotated[str | None, Field(description="release_dates.yaml or CSV")] = None,
                models: Annotated[str | None, Field(description="frontier11, all, or a comma list")] = None,
                weighting: Literal["invsqrt", "equal", "none", "given"] = "invsqrt",
                bootstrap: Annotated[int, Field(ge=0, le=LIMITS["bootstrap"])] = 1000,
                seed: int = 42, p: str = "50,80",
                after: Annotated[str | None, Field(description="YYYY-MM-DD: only later models in the trend")] = None
                ) -> Horizons:
        """METR time horizons from a runs file: per-model 50%/80% horizons with bootstrap CIs, and the doubling
        time of the horizon against release date (nothing is written)."""
        from scalelab import horizon as H

        src = self.allowed_path(runs_file, "runs_file")
        dates = str(self.allowed_path(release_dates, "release_dates")) if release_dates else ""
        cfg = H.HorizonConfig(release_dates=dates, models=models or "", weighting=weighting, bootstrap=bootstrap,
                              seed=seed, p=p, after=after or "")
        res = cfg.analyse(src)
        fits = [HorizonModel(model=f.model, status=f.status, n_runs=f.n_runs,
                             horizons_min={H.p_label(q): _num(f.horizon(q)) for q in res.ps},
                             ci_min={H.p_label(q): [_num(v) for v in f.ci[q]] for q in res.ps if q in f.ci},
                             reading={H.p_label(q): f.describe(q) for q in res.ps}) for f in res.fits]
        trends = [HorizonTrend(p=H.p_label(t.p), doubling_days=_num(t.doubling_days), ci_days=[_num(v) for v in t.ci],
                               r2=_num(t.r2), models=t.models) for t in res.trends]
        return Horizons(source=str(src), models=fits, trends=trends, notes=res.notes,
                        settings={k: v for k, v in res.settings.items() if isinstance(v, str | int | float | None)})

    # ---- jobs --------------------------------------------------------------------------------------------
    def _new_run(self, name: str | None, default: str) -> Path:
        return self.run_dir(name or f"{default}-{time.strftime('%Y%m%d-%H%M%S')}", exist=False)

    def _job_info(self, d: Path, tail: int = 20) -> JobInfo:
        job = self.jobs.job(d)
        if job is None:
            raise ScalelabError(f"run {d.name!r} was not started as a job (no job.json)")
        p = jobsmod.progress(d)
        status = self._job_status(job)
        end = job.ended_at if status != "running" and job.ended_at else time.time()
        text = ""
        if tail:
            lines = jobsmod.tail_lines(d / jobsmod.LOG_FILE, LIMITS["log_bytes"])
            text = "\n".join(lines[-tail:])
        return JobInfo(name=job.name, kind=job.kind, status=status, pid=job.pid, started_at=_iso(job.started_at),
                       elapsed_s=round(end - job.started_at, 1), returncode=job.returncode, argv=job.argv,
                       step=p["step"], total=p["total"], loss=_num(p["loss"]), val_loss=_num(p["val_loss"]),
                       eta_s=p["eta_s"] if status == "running" else None, log=str(d / jobsmod.LOG_FILE),
                       log_tail=text)

    def _start(self, name: str, kind: str, args: list[str], d: Path) -> JobInfo:
        self.jobs.start(name, kind, args, d)
        return self._job_info(d, 0)

    def train_start(self, recipe: Annotated[str | None, Field(description="a shipped recipe (see list_recipes) or "
                                                              "a TOML file inside the allowed roots")] = "tiny",
                    overrides: Annotated[list[str] | None, Field(
                        description='section.key=value, as --set: ["train.max_steps=100", "model.norm=\\"dyt\\""]')
                    ] = None,
                    name: Annotated[str | None, Field(description="run name (default <recipe>-<time>)")] = None,
                    resume: Annotated[bool, Field(description="continue the run from its newest checkpoint")] = False
                    ) -> JobInfo:
        """Start training a model as a background job in runs/<name> (output in its job.log); follow it with
        job_status / job_wait, read it with run_report."""
        overrides = overrides or []
        cfg, recipe_args, pinned = self.checked_config(recipe, overrides)
        d = self._new_run(name, Path(recipe).stem if recipe else "run")
        if not resume and ((d / "config.toml").is_file() or (d / "checkpoints").is_dir()):
            raise ScalelabError(f"run {d.name!r} already exists; pass resume=true to continue it or choose another "
                                "name")
        args = ["train", *recipe_args, *[a for o in [*overrides, *pinned] for a in ("--set", o)], "--out", str(d),
                "--quiet", *(["--resume"] if resume else [])]
        return self._start(d.name, "train", args, d)

    def search_start(self, backend: Annotated[str, Field(description="smollm2, a run name, a .gguf file or "
                                                         "openai:<loopback url>#<model>")] = "smollm2",
                     tasks: Annotated[str, Field(description="arithmetic[:LEVEL], sudoku[:CLUES[:SIZE]] or a .jsonl "
                                                 "file inside the allowed roots")] = "arithmetic",
                     n: Annotated[int, Field(ge=1, le=LIMITS["search_problems"])] = 20,
                     k: Annotated[int, Field(ge=1, le=LIMITS["search_k"], description="candidates per problem")] = 8,
                     kv: Annotated[int, Field(ge=1, le=LIMITS["search_kv"],
                                              description="verifications per candidate")] = 2,
                     score: Literal["verdict", "prob"] = "verdict",
                     prompts: Literal["auto", "chat", "fewshot", "sudoku"] = "auto",
                     temperature: Annotated[float, Field(ge=0, le=5)] = 1.0,
                     max_tokens: Annotated[int, Field(ge=1, le=LIMITS["search_max_tokens"])] = 256,
                     verifier: Annotated[str, Field(description="same | checker | a backend spec")] = "same",
                     seed: int = 0,
                     overrides: Annotated[list[str] | None, Field(description="search.KEY=VALUE (any SearchConfig "
                                                                  "key)")] = None,
                     name: Annotated[str | None, Field(description="run name (default search-<time>)")] = None,
                     threads: Annotated[int, Field(ge=0, le=64)] = 1) -> JobInfo:
        """Start a sampling-based search with self-verification (Zhao et al. 2025) as a background job; rerun
        with the same name to resume it. Its report.md holds Pass@1, Consistency@k and Verification@k."""
        from scalelab import search
        from scalelab.backends import is_run

        overrides = overrides or []
        if len(overrides) > LIMITS["overrides"]:
            raise Refused(f"at most {LIMITS['overrides']} overrides")
        flags = dict(backend=backend, verifier=verifier, task=tasks, n_problems=n, k_inf=k, k_verif=kv,
                     score=score, prompts=prompts, temperature=temperature, max_tokens=max_tokens, seed=seed,
                     threads=threads)
        cfg = search.SearchConfig.load(flags, None, overrides)
        pinned = {"backend": self.backend_spec(cfg.backend, "backend")}
        if cfg.verifier not in ("same", "checker"):
            pinned["verifier"] = self.backend_spec(cfg.verifier, "verifier")
        if cfg.judge:
            pinned["judge"] = self.backend_spec(cfg.judge, "judge")
        if cfg.task.split(":")[0] not in ("arithmetic", "sudoku"):
            pinned["task"] = str(self.allowed_path(cfg.task, "tasks"))
        if cfg.prices_file:
            pinned["prices_file"] = str(self.allowed_path(cfg.prices_file, "search.prices_file"))
        if cfg.prompts == "auto":
            cfg.prompts = "sudoku" if is_run(pinned["backend"]) else "chat"
        cfg.validate()
        for key, cap in (("n_problems", "search_problems"), ("k_inf", "search_k"), ("k_verif", "search_kv"),
                         ("max_tokens", "search_max_tokens"), ("verify_max_tokens", "search_max_tokens")):
            if getattr(cfg, key) > LIMITS[cap]:
                raise Refused(f"search.{key} {getattr(cfg, key)} is above this server's cap of {LIMITS[cap]}")
        d = self._new_run(name, "search")
        args = ["search", "--backend", backend, "--tasks", tasks, "-n", str(n), "--k", str(k), "--kv", str(kv),
                "--score", score, "--prompts", prompts, "--temperature", str(temperature), "--max-tokens",
                str(max_tokens), "--verifier", verifier, "--seed", str(seed), "--threads", str(threads)]
        sets = [*overrides, *(f"search.{key}={json.dumps(v)}" for key, v in pinned.items())]
        args += [a for s in sets for a in ("--set", s)] + ["--out", str(d)]
        return self._start(d.name, "search", args, d)

    def reproduce_start(self, papers: Annotated[list[str] | None, Field(description="dyt, horizon, diloco, bd3lm, "
                                                                        "sss (default: all)")] = None,
                        quick: Annotated[bool, Field(description="a few minutes per paper on 2 cores")] = True,
                        name: Annotated[str | None, Field(description="run name (default reproduce-<time>)")] = None,
                        device: Annotated[Literal["cpu", "cuda"], Field(
                            description="cuda: every run on one GPU, full mode at the sections' GPU sizes")] = "cpu",
                        ) -> JobInfo:
        """Start paper reproductions as a background job: each section's claim, measurement and verdict in one
        report card (report.md); finished runs inside it are reused."""
        from scalelab.papers import PAPERS, check_device

        papers = papers or []
        unknown = [p for p in papers if p not in PAPERS]
        if unknown:
            raise ScalelabError(f"unknown paper {unknown[0]!r} (choose from {', '.join(PAPERS)})")
        check_device(device)  # refused here, before a job directory exists, rather than in the job's log
        d = self._new_run(name, "reproduce")
        args = ["reproduce", *papers, *(["--quick"] if quick else []), "--device", device, "--out", str(d)]
        return self._start(d.name, "reproduce", args, d)

    def sweep_start(self, sizes: Annotated[list[int], Field(min_length=1, max_length=LIMITS["sweep_points"],
                                                            description="model widths (model.d_model)")] = (64, 96, 128),
                    replicas: Annotated[list[int], Field(min_length=1, max_length=LIMITS["sweep_points"],
                                                         description="DiLoCo replica counts M")] = (1, 2, 4),
                    h: Annotated[int, Field(ge=1, le=10_000, description="inner steps between syncs")] = 30,
                    recipe: str | None = None,
                    overrides: Annotated[list[str] | None, Field(description="section.key=value for every run")] = None,
                    steps: Annotated[int | None, Field(ge=1, description="steps per run (default "
                                                                         "tokens-per-param × N)")] = None,
                    tokens_per_param: Annotated[float, Field(gt=0, le=1000)] = 20.0,
                    ddp: bool = True,
                    name: Annotated[str | None, Field(description="run name (default sweep-<time>)")] = None
                    ) -> JobInfo:
        """Start a DDP vs DiLoCo scaling sweep as a background job: every (size, M) trains, then L = A·N^α
        (per strategy) and L = A·N^α·M^β are fitted (scaling.md, sweep.json)."""
        if not all(8 <= s <= 4096 for s in sizes) or not all(1 <= m <= 64 for m in replicas):
            raise Refused("sizes must be in [8, 4096] and replicas in [1, 64]")
        overrides = overrides or []
        _, recipe_args, pinned = self.checked_config(recipe, overrides)
        if steps is not None and steps > self.opts.max_steps:
            raise Refused(f"steps {steps} is above this server's cap of {self.opts.max_steps} (--max-steps)")
        d = self._new_run(name, "sweep")
        args = ["sweep", "diloco", "--sizes", ",".join(map(str, sizes)), "--replicas", ",".join(map(str, replicas)),
                "--h", str(h), *recipe_args, *[a for o in [*overrides, *pinned] for a in ("--set", o)],
                *(["--steps", str(steps)] if steps else []), "--tokens-per-param", str(tokens_per_param),
                "--ddp" if ddp else "--no-ddp", "--out", str(d)]
        return self._start(d.name, "sweep", args, d)

    def job_status(self, job: Annotated[str, Field(description="the job's run name")],
                   tail: Annotated[int, Field(ge=0, le=200)] = 20) -> JobInfo:
        """A job's state (running, done, failed, stopped), step/total, loss, ETA and the tail of its log."""
        return self._job_info(self.run_dir(job), tail)

    async def job_wait(self, job: Annotated[str, Field(description="the job's run name")], ctx: Context,
                       timeout: Annotated[float, Field(gt=0, le=LIMITS["wait_s"])] = 60.0) -> JobInfo:
        """Wait until a job ends or `timeout` seconds pass, sending progress notifications (step/total and
        loss, from its metrics.jsonl) meanwhile; returns its status either way (call again to keep waiting)."""
        d = self.run_dir(job)
        deadline, sent, t0 = time.monotonic() + timeout, None, time.monotonic()
        while True:
            info = await anyio.to_thread.run_sync(functools.partial(self._job_info, d, 1))
            if info.kind in ("train", "search"):  # steps (or problems) done, from the run's files
                value, total = float(info.step or 0), info.total
                msg = f"step {info.step or 0}/{info.total or '?'}" + (f", loss {info.loss:.4f}" if info.loss else "")
            else:  # no step count (sweeps, reproductions): elapsed seconds, and the log's last line
                value, total, msg = float(int(time.monotonic() - t0)), None, info.log_tail[-200:]
            if sent is None or value > sent:  # progress must increase from one notification to the next
                await ctx.report_progress(value, total, msg)
                sent = value
            if info.status != "running" or time.monotonic() >= deadline:
                return await anyio.to_thread.run_sync(functools.partial(self._job_info, d, 20))
            await anyio.sleep(POLL_S)

    def job_stop(self, job: Annotated[str, Field(description="the job's run name")]) -> JobInfo:
        """Stop a running job (SIGTERM, then SIGKILL after 10 s) — only the process its job.json names, checked by
        pid, start time and command line. The run directory is kept; train_start(resume=true) continues it."""
        d = self.run_dir(job)
        self.jobs.stop(d)
        return self._job_info(d)

    def job_log(self, job: Annotated[str, Field(description="the job's run name")],
                tail: Annotated[int, Field(ge=1, le=LIMITS["log_lines"])] = 100) -> Text:
        """The last `tail` lines of a job's log (its stdout and stderr)."""
        d = self.run_dir(job)
        lines = jobsmod.tail_lines(d / jobsmod.LOG_FILE, LIMITS["log_bytes"])
        if not lines and not (d / jobsmod.LOG_FILE).is_file():
            raise ScalelabError(f"run {job!r} has no job.log (it was not started as a job)")
        return Text(run=job, path=str(d / jobsmod.LOG_FILE), text="\n".join(lines[-tail:]), truncated=len(lines) > tail)

    # ---- resources ---------------------------------------------------------------------------------------
    def res_runs(self) -> str:
        return self.list_runs().model_dump_json(indent=1)

    def res_config(self, name: str) -> str:
        d = self.run_dir(name)
        for f in ("config.toml", "search.json", "sweep.json", jobsmod.JOB_FILE):
            if (d / f).is_file():
                return _clip((d / f).read_text(errors="replace"), LIMITS["text_bytes"])[0]
        raise ScalelabError(f"run {name!r} has no config (config.toml, search.json or sweep.json)")

    def res_metrics(self, name: str) -> str:
        d = self.run_dir(name)
        if (d / "metrics.jsonl").is_file():
            return self.run_metrics(name, keys=None, max_points=LIMITS["metric_points"]).model_dump_json()
        if (d / "metrics.json").is_file():
            return _clip((d / "metrics.json").read_text(), LIMITS["text_bytes"])[0]
        raise ScalelabError(f"run {name!r} has no metrics yet")

    def res_report(self, name: str) -> str:
        return self.run_report(name).text

    def res_log(self, name: str) -> str:
        return self.job_log(name, LIMITS["log_lines"]).text

    def res_image(self, name: str, path: str) -> bytes:
        return self._png(name, path)


# ============================================================================================= the server
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
STARTS = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
INSTRUCTIONS = """scalelab: a lab that trains small language models and reproduces scaling papers.
Start with lab_info and list_runs. Training, search, reproductions and sweeps run as background jobs
(train_start, ...): follow one with job_wait (progress notifications) or job_status, then read it with
run_report, run_metrics, run_image and compare_runs. One job runs at a time unless the server allows more.
Runs are named [A-Za-z0-9._-]{1,64}; files must lie inside the allowed roots that lab_info lists."""


def _user_errors(fn: Callable[..., Any], error: type[Exception]) -> Callable[..., Any]:
    """`fn` with the errors a caller can cause turned into the SDK's anticipated errors (their message reaches
    the agent); anything else stays a crash, logged with its traceback."""

    def convert(e: Exception) -> Exception:
        if isinstance(e, OSError) and not isinstance(e, ScalelabError):
            return error(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        return error(str(e))

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapped_async(*a: Any, **kw: Any) -> Any:
            try:
                return await fn(*a, **kw)
            except (ScalelabError, OSError) as e:
                raise convert(e) from e
        return wrapped_async

    @functools.wraps(fn)
    def wrapped(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except (ScalelabError, OSError) as e:
            raise convert(e) from e
    return wrapped


def build_server(opts: Options) -> MCPServer:
    """The MCP server over a lab: its tools and resources, unstarted (any transport can run it)."""
    lab = Lab(opts)
    app = MCPServer("scalelab", version=__version__, instructions=INSTRUCTIONS, log_level="INFO")
    for fn in (lab.lab_info, lab.list_recipes, lab.list_runs, lab.run_summary, lab.run_metrics, lab.run_report,
               lab.run_image, lab.compare_runs, lab.horizon, lab.job_status, lab.job_wait, lab.job_log):
        app.add_tool(_user_errors(fn, ToolError), annotations=READ_ONLY)
    app.add_tool(_user_errors(lab.sample, ToolError), annotations=ToolAnnotations(read_only_hint=True))
    for fn in (lab.train_start, lab.search_start, lab.reproduce_start, lab.sweep_start):
        app.add_tool(_user_errors(fn, ToolError), annotations=STARTS)
    app.add_tool(_user_errors(lab.job_stop, ToolError),
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                                             open_world_hint=False))
    resources = [("runs", "", lab.res_runs, "application/json", "every run: name, kind, status, progress"),
                 ("config", "/{name}/config", lab.res_config, "text/plain", "a run's resolved config"),
                 ("metrics", "/{name}/metrics", lab.res_metrics, "application/json", "a run's metrics (thinned)"),
                 ("report", "/{name}/report", lab.res_report, "text/markdown", "a run's report.md"),
                 ("log", "/{name}/log", lab.res_log, "text/plain", "the tail of a job's log"),
                 ("image", "/{name}/images/{+path}", lab.res_image, "image/png", "a run's PNG figures (run_summary "
                                                                                 "lists them)")]
    for name, tail, fn, mime, desc in resources:
        app.resource(f"scalelab://runs{tail}", name=name, mime_type=mime, description=desc)(
            _user_errors(fn, ResourceError))
    return app


def transport_security(host: str) -> TransportSecuritySettings:
    """DNS-rebinding protection on: Host must be the bound address (or loopback), Origin absent or local."""
    names = ["127.0.0.1", "localhost", "[::1]"]
    if host in ("0.0.0.0", "::"):  # every interface: the names this machine is reached by
        names += [socket.gethostname(), socket.getfqdn()]
    elif not _is_loopback(host):
        names.append(f"[{host}]" if ":" in host else host)
    return TransportSecuritySettings(enable_dns_rebinding_protection=True,
                                     allowed_hosts=[h for n in names for h in (n, f"{n}:*")],
                                     allowed_origins=[o for n in names for o in (f"http://{n}", f"http://{n}:*")])


def main(opts: Options, http: bool = False, host: str | None = None, port: int | None = None,
         allow_remote: bool = False) -> None:
    """Serve until the client goes (stdio) or the process is interrupted (HTTP). Jobs outlive the server."""
    from scalelab import log as logmod

    logmod.setup()  # stderr: on stdio, stdout is the protocol
    if not http and (host is not None or port is not None):
        raise ScalelabError("--host and --port are for --http (stdio is the default transport)")
    if opts.max_jobs < 1 or opts.max_steps < 1:
        raise ScalelabError("--max-jobs and --max-steps must be >= 1")
    host, port = host or "127.0.0.1", 8765 if port is None else port
    if http and not _is_loopback(host):
        if not allow_remote:
            raise ScalelabError(f"--host {host} is not a loopback address, and the MCP server is unauthenticated: "
                                "anyone who reaches it can train, sample and read runs; pass --allow-remote to "
                                "serve it anyway")
        log.warning(f"warning: serving the unauthenticated MCP server on {host}:{port}, beyond this machine")
    app = build_server(opts)
    if not http:
        app.run("stdio")
        return
    import uvicorn

    asgi = app.streamable_http_app(streamable_http_path="/mcp", transport_security=transport_security(host), host=host)
    log.info(f"scalelab MCP server on http://{'[' + host + ']' if ':' in host else host}:{port}/mcp (unauthenticated)")
    # log_config=None: uvicorn logs through the root logger (stderr); its default sends access lines to stdout.
    uvicorn.Server(uvicorn.Config(asgi, host=host, port=port, log_config=None, log_level="warning")).run()
