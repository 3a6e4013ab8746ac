"""Run the real server in its own process for a benchmark, and read its resource use."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = "bench-root-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes ``pids`` (every thread), summed; a process
    already gone counts 0."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class ServerProc:
    """`segactors serve` on 127.0.0.1 with a fresh data dir; stopped on exit."""

    def __init__(self, data_dir: str | None = None, extra_env: dict[str, str] | None = None,
                 start_timeout: float = 30.0, wait: bool = True):
        """``wait=False`` returns at once after spawning (see ``wait_healthy``)."""
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="segactors-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SEGACTORS_ROOT_TOKEN": ROOT, **(extra_env or {})}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "segactors.cli", "serve", "--port", str(self.port),
             "--data-dir", self.data_dir], env=env, stdout=subprocess.DEVNULL)
        if wait and not self.wait_healthy(start_timeout):
            self.stop()
            raise RuntimeError("server did not start")

    def wait_healthy(self, timeout: float, poll: float = 0.1) -> bool:
        """Poll /healthz until it answers 200 (True) or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(poll)
        return False

    def kill(self) -> None:
        """SIGKILL (kill -9) and reap: nothing is flushed or closed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def remove_data_dir(self) -> None:
        """Delete the data dir (after stop or kill)."""
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def pids(self) -> list[int]:
        """The server process, then its helpers (the writer and the id process)."""
        pid = self.proc.pid
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            kids = []
        return [pid, *map(int, kids)]

    def rss_bytes(self) -> int:
        """Resident memory of the server and its helper processes, summed (pages a helper
        shares with the server since the fork count twice: a few MB, and a constant, which
        figures taken as differences cancel)."""
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total

    def cpu_seconds(self, helpers: bool = False) -> float:
        """User + system CPU seconds of the server process (every thread), and with
        ``helpers`` of its helper processes too."""
        return cpu_seconds(self.pids() if helpers else [self.proc.pid])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
