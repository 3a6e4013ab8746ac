"""Scenario 3, time: lateness of time-driven changes with many pending deadlines.

    python -m bench.timely [--quick] [--leavers 200000] [--spread 60] [--pending 1000000]

The server (own process) holds the 20 segments plus ``seen 2m`` (did ``heartbeat`` in the
last 2 minutes), preloaded with profiles and history (``--users``/``--events``), whose
own windows keep deadlines pending too. Then ``--leavers`` users each get one
``heartbeat`` placed so that it leaves the 2-minute window during the measurement: the
deadlines ``ts + 2m`` are spread uniformly over ``--spread`` seconds, starting a lead time
after the posting (enough to ingest them). A subscriber on ``seen 2m`` records, for every
``leave``, its ``at`` (the deadline, by API.md) and the wall time it arrived here;
lateness = arrival - at (same machine clock). RULES.md requires within 1 s.

``--pending`` more users each get one ``ping`` first, which keeps them in ``seen 1d``
(did ``ping`` in the last day) with a deadline a day away: that many deadlines wait in the
heap, besides the leavers' and the preloaded users' own, while the leavers' come due.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

import msgspec
import websockets

from bench.common import (SYS, client, dist, now_ms, post_all, print_rows, quiet_gc, save,
                          settle_disk, setup_system, stop_on_sigterm)
from bench.serverproc import ROOT, ServerProc
from bench.workload import Workload

SEEN = {"name": "seen 2m", "rules": [{"kind": "did", "event": "heartbeat",
                                      "window": {"last": "2m"}}]}
SEEN_LONG = {"name": "seen 1d", "rules": [{"kind": "did", "event": "ping",
                                            "window": {"last": "1d"}}]}
WINDOW_MS = 120_000


def ping_bodies(n: int, at: int, batch: int = 5000) -> list[bytes]:
    return [("[" + ",".join(f'{{"id":"pd{k}","user_id":"pd{k:07d}","name":"ping","ts":{at}}}'
                            for k in range(i, min(n, i + batch))) + "]").encode()
            for i in range(0, n, batch)]


def run(users: int, events: int, leavers: int, spread: float, seed: int = 1,
        pending: int = 0) -> dict[str, Any]:
    w = Workload(users, events, 90, seed)
    res: dict[str, Any] = {"users": users, "preload_events": len(w.rows), "leavers": leavers,
                           "spread_s": spread, "pending": pending}
    srv = ServerProc()
    try:
        with client(srv) as c:
            ids, _ = setup_system(c, w.now, [SEEN, SEEN_LONG])
            post_all(srv, f"/v1/systems/{SYS}/profiles", w.profile_batches())
            post_all(srv, f"/v1/systems/{SYS}/events", w.batches(5000))
            if pending:
                t0 = time.perf_counter()
                post_all(srv, f"/v1/systems/{SYS}/events", ping_bodies(pending, now_ms()))
                res["pending_post_s"] = round(time.perf_counter() - t0, 1)
                res["pending_members"] = c.get(
                    f"/v1/systems/{SYS}/segments/{ids['seen 1d']}").json()["size"]
            res["rss_mb_before"] = round(srv.rss_bytes() / 2**20, 1)
        res["disk_settle_s"] = settle_disk()  # The preload's writeback, not measured.
        lead_ms = 5_000 + leavers // 5  # ~5k events/s of heartbeats plus 5 s
        res["lead_s"] = lead_ms / 1000
        res.update(asyncio.run(measure(srv, ids["seen 2m"], leavers, spread, lead_ms, seed)))
        res["rss_mb_after"] = round(srv.rss_bytes() / 2**20, 1)
    finally:
        srv.stop()
        srv.remove_data_dir()
    return res


async def measure(srv: ServerProc, seg: str, leavers: int, spread: float, lead_ms: int,
                  seed: int) -> dict[str, Any]:
    quiet_gc()
    rng = random.Random(seed)
    ws_url = srv.url.replace("http", "ws") + f"/v1/systems/{SYS}/stream?token={ROOT}"
    late: list[float] = []
    enters = 0
    done = asyncio.Event()
    ready = asyncio.Event()
    dec = msgspec.json.Decoder()

    async def sub() -> None:
        nonlocal enters
        async with websockets.connect(ws_url, max_queue=None, open_timeout=30) as ws:
            await ws.send(json.dumps({"op": "subscribe", "segments": [seg]}))
            await ws.recv()
            ready.set()
            async for raw in ws:
                t = time.time_ns() / 1e6
                m = dec.decode(raw)
                if m.get("type") != "change":
                    continue
                if m["change"] == "leave":
                    late.append(t - ts_ms_of(m["at"]))
                    if len(late) >= leavers:
                        done.set()
                else:
                    enters += 1

    task = asyncio.create_task(sub())
    await asyncio.wait_for(ready.wait(), 30)
    first = now_ms() + lead_ms
    spread_ms = int(spread * 1000)
    lines = []
    for k in range(leavers):
        deadline = first + rng.randrange(spread_ms)
        lines.append(f'{{"id":"hb{k}","user_id":"hb{k:07d}","name":"heartbeat",'
                     f'"ts":{deadline - WINDOW_MS}}}')
    bodies = [("[" + ",".join(lines[i:i + 5000]) + "]").encode()
              for i in range(0, leavers, 5000)]
    t0 = time.perf_counter()
    await asyncio.to_thread(post_all, srv, f"/v1/systems/{SYS}/events", bodies)
    post_s = time.perf_counter() - t0
    posted_at = now_ms()
    try:
        await asyncio.wait_for(done.wait(), (first + spread_ms - now_ms()) / 1000 + 15)
    except asyncio.TimeoutError:
        pass
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return {"post_s": round(post_s, 2), "posted_before_first_deadline_ms": first - posted_at,
            "enters": enters, "leaves": len(late), "lateness_ms": dist(late, 1)}


def ts_ms_of(at: str) -> float:
    """``at`` (RFC 3339 with ms and Z) -> epoch ms."""
    from datetime import datetime
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() * 1000


def report(res: dict[str, Any]) -> list[tuple[str, Any]]:
    d = res["lateness_ms"]
    return [("deadlines pending besides (seen 1d)", res.get("pending", 0)),
            ("leavers (deadlines over s)", f"{res['leavers']} ({res['spread_s']})"),
            ("leaves received", f"{res['leaves']} (enters {res['enters']})"),
            ("lateness ms p50/p99/max", f"{d['p50']} / {d['p99']} / {d['max']}")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--events", type=int, default=1_000_000, help="preload history")
    p.add_argument("--leavers", type=int, default=200_000)
    p.add_argument("--spread", type=float, default=60)
    p.add_argument("--pending", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="10k users, 50k preload, "
                   "20k leavers over 15 s, 50k pending")
    a = p.parse_args()
    stop_on_sigterm()
    if a.quick:
        a.users, a.events, a.leavers, a.spread, a.pending = 10_000, 50_000, 20_000, 15, 50_000
    res = run(a.users, a.events, a.leavers, a.spread, a.seed, a.pending)
    print_rows(report(res))
    print(f"written {save('timely', res)}")


if __name__ == "__main__":
    main()
