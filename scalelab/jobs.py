"""Background jobs: a `python -m scalelab ...` process per run directory, found again from its `job.json`.

The MCP server (scalelab/mcp_server.py) starts training, search, reproduction and sweep runs as jobs; this
module owns their life cycle, so that the server itself stays a thin layer of tools.

- A job is an argument list run with `sys.executable -m scalelab` (never through a shell), in its own session
  (`start_new_session`): it has its own process group, so stopping a sweep also stops the `torchrun` children
  it launches, and a Ctrl-C aimed at the server does not reach it. stdout and stderr go to
  `<run>/job.log`, stdin is /dev/null.
- `<run>/job.json` records the argument list, the pid, the process's start time as the kernel reports it
  (`/proc/<pid>/stat` field 22 on Linux, `ps -o lstart=` elsewhere) and, when this process sees it end, the
  exit status. A job outlives the server that started it; a later server finds it from the file.
- A pid alone never identifies a job: pids are reused. `alive` requires the recorded start time and a command
  line naming `scalelab` and the run directory, so `stop` can only ever signal the process it started.
- Progress is read from the run's own files (the tail of `metrics.jsonl` and `config.toml`, or the
  `problem i/n done` lines a search logs), never from the process: a report can always be rebuilt from disk.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scalelab.errors import ScalelabError
from scalelab.report import make_dir, write_json

JOB_FILE, LOG_FILE = "job.json", "job.log"
SEARCH_PROGRESS = re.compile(r"problem (\d+)/(\d+) done")


class JobError(ScalelabError):
    """A job that cannot be started, found or stopped as asked."""


@dataclass
class Job:
    """What `job.json` holds."""

    name: str
    kind: str  # train | search | reproduce | sweep
    argv: list[str]
    run_dir: str  # absolute
    pid: int = 0
    proc_start: str = ""  # the process's start time as the OS reports it: (pid, proc_start) names one process
    started_at: float = 0.0  # time.time()
    returncode: int | None = None  # None: running, or ended while no server of ours was watching
    ended_at: float | None = None
    stopped: bool = False  # ended by `stop`

    @classmethod
    def read(cls, run_dir: Path) -> Job | None:
        try:
            d = json.loads((Path(run_dir) / JOB_FILE).read_text())
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (json.JSONDecodeError, TypeError, KeyError, UnicodeDecodeError):
            raise JobError(f"{run_dir}/{JOB_FILE} is not a job record scalelab wrote") from None

    def write(self) -> None:
        write_json(Path(self.run_dir) / JOB_FILE, asdict(self))


# ============================================================================================= processes
def proc_start(pid: int) -> str | None:
    """The start time of process `pid` as an opaque string, or None when it is gone (or a zombie)."""
    if pid <= 0:
        return None
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            text = stat.read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        # The command name (field 2) is in parentheses and may hold spaces or ')': split after the last one.
        fields = text[text.rindex(")") + 2:].split()
        return None if fields[0] in ("Z", "X") else fields[19]  # state, ..., starttime (field 22)
    try:  # macOS and other systems without procfs
        out = subprocess.run(["ps", "-o", "stat=,lstart=", "-p", str(pid)], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out or out.startswith("Z"):
        return None
    return out.split(None, 1)[1] if " " in out else None


def alive(job: Job) -> bool:
    """Whether the process `job` started is still running. The pid and its start time identify the process (a
    reused pid has another start time); the command line, when it can be read whole from /proc, must also be
    the job's own. `ps` truncates long command lines, so it is not used for that check."""
    if not job.pid or not job.proc_start or proc_start(job.pid) != job.proc_start:
        return False
    try:
        raw = Path(f"/proc/{job.pid}/cmdline").read_bytes()
    except OSError:
        return True  # no procfs (macOS): the start time alone decides
    cmd = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return not cmd or (any("scalelab" in a for a in cmd) and job.run_dir in cmd)


# ============================================================================================= the registry
@dataclass
class Jobs:
    """The jobs under one runs root; at most `max_jobs` run at once."""

    runs_root: Path
    max_jobs: int = 1
    cwd: Path = field(default_factory=Path.cwd)
    _children: dict[str, subprocess.Popen] = field(default_factory=dict)  # the ones this process started
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def job(self, run_dir: Path) -> Job | None:
        """The job record of a run directory, with its exit status filled in when this process saw it end."""
        job = Job.read(run_dir)
        if job is None:
            return None
        child = self._children.get(job.run_dir)
        if child is not None and child.pid == job.pid and job.returncode is None:
            rc = child.poll()  # also reaps it, so a finished child never lingers as a zombie
            if rc is not None:
                job.returncode, job.ended_at = rc, time.time()
                job.write()
                del self._children[job.run_dir]
        return job

    def running(self) -> list[Job]:
        """Jobs whose process is alive, started by this server or an earlier one (their `job.json` says so)."""
        found = []
        if self.runs_root.is_dir():
            for d in sorted(self.runs_root.iterdir()):
                if (d / JOB_FILE).is_file():
                    try:
                        job = self.job(d)
                    except JobError:
                        continue
                    if job is not None and job.returncode is None and alive(job):
                        found.append(job)
        return found

    def start(self, name: str, kind: str, args: list[str], run_dir: Path) -> Job:
        """Start `python -m scalelab ARGS` for run directory `run_dir` (which `args` must name)."""
        run_dir = Path(run_dir).resolve()
        if str(run_dir) not in args:  # `alive` recognises the job by its run directory on the command line
            raise ValueError(f"the arguments of job {name!r} must name its run directory {run_dir}")
        with self._lock:  # the count and the start are one step: two racing starts cannot both pass
            busy = self.running()
            if any(j.run_dir == str(run_dir) for j in busy):
                raise JobError(f"a job is already running in run {name!r}; wait for it (job_wait) or stop it "
                               f"(job_stop)")
            if len(busy) >= self.max_jobs:
                names = ", ".join(repr(j.name) for j in busy)
                raise JobError(f"{len(busy)} job(s) already running ({names}) and this server runs at most "
                               f"{self.max_jobs} at a time (--max-jobs); wait for it with job_wait or stop it "
                               f"with job_stop, then start again")
            make_dir(run_dir)
            argv = [sys.executable, "-m", "scalelab", *args]
            with open(run_dir / LOG_FILE, "ab") as log:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} scalelab {' '.join(args)}\n".encode())
                log.flush()
                try:
                    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=self.cwd, start_new_session=True, close_fds=True)
                except OSError as e:
                    raise JobError(f"cannot start {argv[0]}: {e.strerror}") from None
            job = Job(name, kind, argv, str(run_dir), child.pid, proc_start(child.pid) or "", time.time())
            self._children[job.run_dir] = child
            job.write()
            return job

    def stop(self, run_dir: Path, grace_s: float = 10.0) -> Job:
        """SIGTERM the job's process group, SIGKILL it after `grace_s`; only a process that is the job's own.

        Checkpoints are written atomically, so a run stopped at any instant is intact and resumes."""
        job = self.job(run_dir)
        if job is None:
            raise JobError(f"{Path(run_dir).name!r} has no {JOB_FILE}: it was not started as a job")
        if job.returncode is not None or not alive(job):
            raise JobError(f"job {job.name!r} is not running (pid {job.pid} has ended or is now another process); "
                           "nothing was signalled")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(job.pid, sig)  # the job leads its own session: pgid == pid
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self._still(job):
                time.sleep(0.1)
            if not self._still(job):
                break
        job = self.job(run_dir) or job
        job.stopped, job.ended_at = True, job.ended_at or time.time()
        job.write()
        return job

    def _still(self, job: Job) -> bool:
        child = self._children.get(job.run_dir)
        if child is not None and child.pid == job.pid:
            return child.poll() is None
        return proc_start(job.pid) == job.proc_start


# ============================================================================================= progress
def tail_lines(path: Path, max_bytes: int = 65536) -> list[str]:
    """The complete last lines of a file, reading at most `max_bytes` from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[1:] if size > max_bytes and lines else lines


def last_rows(run_dir: Path) -> tuple[dict | None, dict | None]:
    """(last train row, last eval row) of `metrics.jsonl`, from its tail; a line cut short is skipped."""
    train = evals = None
    for line in reversed(tail_lines(Path(run_dir) / "metrics.jsonl")):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_loss" in rec:
            evals = evals or rec
        elif "loss" in rec:
            train = train or rec
        if train and evals:
            break
    return train, evals


def progress(run_dir: Path) -> dict[str, Any]:
    """step, total, loss, val_loss and ETA (seconds) of a run, from its files; missing values are None."""
    run_dir = Path(run_dir)
    out: dict[str, Any] = {"step": None, "total": None, "loss": None, "val_loss": None, "eta_s": None}
    if (run_dir / "config.toml").is_file():
        from scalelab import config as configmod

        try:
            out["total"] = configmod.load(run_dir / "config.toml").train.max_steps
        except ScalelabError:
            pass
        train, evals = last_rows(run_dir)
        if train:
            out["step"], out["loss"] = train.get("step"), train.get("loss")
            step, elapsed = train.get("step") or 0, train.get("elapsed")
            if out["total"] and step and elapsed:
                out["eta_s"] = round(max(0, out["total"] - step) * elapsed / step, 1)  # evals included in the rate
        if evals:
            out["val_loss"] = evals.get("val_loss")
        return out
    for line in reversed(tail_lines(run_dir / LOG_FILE, 16384)):  # a search logs "problem i/n done"
        if m := SEARCH_PROGRESS.search(line):
            out["step"], out["total"] = int(m.group(1)), int(m.group(2))
            break
    return out
