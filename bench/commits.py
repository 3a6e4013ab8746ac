"""The store alone: how long a group commit takes, with the WAL checkpointed by SQLite
inside commits (``SEGACTORS_CHECKPOINT_INTERVAL=0``) or by the writer process's own
thread (the default), in alternating runs of the same writes.

    python -m bench.commits [--commits 1500] [--rows 300] [--repeat 3] [--intervals 0 0.25]

Each commit holds ``--rows`` events of about 100 bytes of props and a third as many
changes, written through ``Store.write`` as the server does, one every 2 ms after the last
one lands (steady load). Per run: commit time p50/p99/max (from ``write`` to durable, in
ms), and the largest the WAL file grew. The figure per interval is the median of its runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import pct, print_rows, save
from segactors.store import CLOCK, INSERT_CHANGE, INSERT_EVENT, Store

PROPS = b'{"url":"/pricing/page/12345","referrer":"https://www.google.com/search?q=x","amount":12.5}'


async def once(interval: float, commits: int, rows: int) -> dict[str, float]:
    data = Path(tempfile.mkdtemp(prefix="segactors-commits-"))
    store = Store(data, "FULL", interval)
    await store.open()
    wal = data / "segactors.db-wal"
    took, biggest, k = [], 0, 0
    try:
        for _ in range(commits):
            events = [("bench", f"u{k + i}", "page_view", k + i, f"e{k + i}", "s1", PROPS)
                      for i in range(rows)]
            changes = [("bench", k + i, "seg", f"u{k + i}", "enter", k) for i in range(rows // 3)]
            k += rows
            t = time.perf_counter()
            await store.write([(INSERT_EVENT, events), (INSERT_CHANGE, changes),
                               (CLOCK, [(str(k),)])])
            took.append((time.perf_counter() - t) * 1000)
            biggest = max(biggest, wal.stat().st_size if wal.exists() else 0)
            await asyncio.sleep(0.002)
    finally:
        await store.close()
        shutil.rmtree(data, ignore_errors=True)
    return {"p50": pct(took, 50), "p99": pct(took, 99), "max": max(took),
            "wal_mb": biggest / 1e6}


def run(intervals: list[float], commits: int, rows: int, repeat: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {str(i): [] for i in intervals}
    for _ in range(repeat):
        for i in intervals:  # Alternating, so drift on the machine hits both alike.
            runs[str(i)].append(asyncio.run(once(i, commits, rows)))
    med = {i: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
           for i, rs in runs.items()}
    return {"commits": commits, "rows": rows, "repeat": repeat, "cpus": os.cpu_count(),
            "median": med, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commits", type=int, default=1500)
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--intervals", type=float, nargs="+", default=[0, 0.25])
    a = p.parse_args()
    res = run(a.intervals, a.commits, a.rows, a.repeat)
    print_rows([(f"checkpoint interval {i}: commit ms p50/p99/max, WAL max MB",
                 f"{m['p50']} / {m['p99']} / {m['max']}, {m['wal_mb']}")
                for i, m in res["median"].items()])
    print(f"written {save('commits', res)}")


if __name__ == "__main__":
    main()
