"""The disk's own sync latency: what a commit with ``synchronous=FULL`` waits for at least.

    python -m bench.disk [--quick] [--seconds S] [--beside 0 10 30]

For ``--seconds`` per setting, 8 KB are written to a file in a temporary dir and
``fdatasync``ed, every 5 ms (as a stream of small commits would); the sync times are
reported as p50 / p99 / max. Each ``--beside`` value (MB/s) runs one setting, with that
much written to another file of the same dir beside it, synced every 100 ms (as
checkpoints do). No segactors code runs: the figures say what any durable commit on this
disk may wait, whatever the server does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from bench.common import dist, print_rows, save

WRITE = 8192
EVERY = 0.005


def _beside(path: str, mb_per_s: float, stop: threading.Event) -> None:
    """Write ``mb_per_s`` to ``path`` in tenths of a second, each synced, until ``stop``."""
    chunk = os.urandom(int(mb_per_s * 100_000))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        t0, n = time.perf_counter(), 0
        while not stop.is_set():
            os.write(fd, chunk)
            os.fsync(fd)
            n += 1
            stop.wait(max(0.0, t0 + n * 0.1 - time.perf_counter()))
    finally:
        os.close(fd)


def once(seconds: float, mb_per_s: float) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix="segactors-disk-")
    stop = threading.Event()
    other = None
    if mb_per_s:
        other = threading.Thread(target=_beside, args=(os.path.join(d, "beside"), mb_per_s,
                                                       stop), daemon=True)
        other.start()
    fd = os.open(os.path.join(d, "commits"), os.O_WRONLY | os.O_CREAT)
    block = b"x" * WRITE
    ms: list[float] = []
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            os.write(fd, block)
            t = time.perf_counter()
            os.fdatasync(fd)
            ms.append((time.perf_counter() - t) * 1000)
            time.sleep(EVERY)
    finally:
        os.close(fd)
        stop.set()
        if other is not None:
            other.join()
        shutil.rmtree(d, ignore_errors=True)
    return dist(ms)


def run(seconds: float, beside: list[float]) -> dict[str, Any]:
    res: dict[str, Any] = {"seconds": seconds, "write_bytes": WRITE, "every_ms": EVERY * 1000}
    for mb in beside:
        res[f"fdatasync ms, {mb:g} MB/s beside"] = once(seconds, mb)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 s per setting")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--beside", type=float, nargs="+", default=[0, 10, 30])
    a = p.parse_args()
    res = run(5.0 if a.quick else a.seconds, a.beside)
    print_rows([(k, v) for k, v in res.items()])
    save("disk", res)


if __name__ == "__main__":
    main()
