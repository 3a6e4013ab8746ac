"""Run the real server (`python -m segactors.cli serve`) in a subprocess for tests.

Every wait is bounded; ``stop``/``kill`` always reap the process. Use the ``server_proc``
fixture (tests/conftest-free: import ``ServerProc`` and the fixture from here) so a failing
test still stops what it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = "proc-root-token"

# Runs the server like `segactors serve`, with Config fields overridden from a JSON argument
# (for settings that have no environment variable, such as `subscriber_queue`).
# `_sndbuf` sets SO_SNDBUF on the listening socket (accepted sockets inherit it), which turns
# off the kernel's send-buffer autotuning: a client that stops reading then blocks the
# server's writes after kilobytes rather than megabytes.
_OVERRIDE_LAUNCHER = """
import json, socket, sys, uvicorn
from segactors.app import create_app
from segactors.config import Config
host, port, data_dir, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
sndbuf = overrides.pop("_sndbuf", None)
app = create_app(Config.from_env(data_dir, **overrides))
print(f"segactors: serving on http://{host}:{port}", flush=True)
config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                        timeout_graceful_shutdown=5)
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if sndbuf:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(sndbuf))
sock.bind((host, port))
uvicorn.Server(config).run(sockets=[sock])
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProc:
    """One server process on a data dir; ``start`` again after ``kill``/``stop`` to restart."""

    def __init__(self, data_dir: Path, root_token: str = ROOT,
                 overrides: dict[str, Any] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.root_token = root_token
        self.overrides = overrides
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=10.0,
                            headers={"Authorization": f"Bearer {self.root_token}"}, **kw)

    def start(self, timeout: float = 15.0) -> ServerProc:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = dict(os.environ, SEGACTORS_ROOT_TOKEN=self.root_token)
        if self.overrides:
            import json

            cmd = [sys.executable, "-c", _OVERRIDE_LAUNCHER, "127.0.0.1", str(self.port),
                   str(self.data_dir), json.dumps(self.overrides)]
        else:
            cmd = [sys.executable, "-m", "segactors.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--data-dir", str(self.data_dir)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process below
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.base_url + "/healthz", timeout=1.0)
                if r.status_code == 200 and r.json() == {"status": "ok"}:
                    return
            except httpx.HTTPError as e:
                last = e
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server not healthy within {timeout}s ({last!r}):\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait (bounded), then SIGKILL if still alive. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)

    def restart_after_kill(self) -> ServerProc:
        self.kill()
        return self.start()


@pytest.fixture
def server_proc(tmp_path: Path) -> Iterator[ServerProc]:
    """A running real server on a fresh data dir; killed on teardown whatever happens."""
    sp = ServerProc(tmp_path / "data")
    try:
        sp.start()
        yield sp
    finally:
        sp.kill()
