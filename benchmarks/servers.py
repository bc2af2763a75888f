"""A `scalelab serve` subprocess on a free 127.0.0.1 port, for the serve benchmarks."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, stderr=subprocess.DEVNULL, timeout: float = 300,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """Start `scalelab serve --model MODEL [extra flags]` and wait until /health answers; (process, port)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen([sys.executable, "-m", "scalelab.cli", "serve", "--model", model, "--port", str(port),
                               *extra], env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + timeout
    while True:
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise SystemExit("the server did not come up")
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/health")
            return server, port
        except OSError:
            time.sleep(0.5)
