"""Scenario 2, latency: from ingest acknowledgement to the change received on a WebSocket
subscriber, while a background load runs at 10 %, 50 % and 90 % of the sustained rate.

    python -m bench.latency [--quick] [--rate EV_PER_S] [--duration 30] [--levels 0.1 0.5 0.9]

The server (own process) holds the 20 segments plus ``probe`` (did ``probe``). It is first
preloaded with profiles and history (``--users``/``--events``, the ingest workload). Then
the sustained rate of *this* traffic is measured: live events (timestamps within the last
minute, so inside every window, unlike the history of scenario 1) posted as fast as the
server takes them for a few seconds. Unless ``--rate`` is given, the levels are fractions of
that live rate (the preload's rate is reported next to it: live events cost about twice as
much, since every segment's window holds them). Then for each level a background task posts live events (batches of ``--batch``, at most 4 requests in
flight, paced to the level's rate; it falls behind rather than queueing without bound),
a subscriber on ``*`` takes every change (a realistic consumer), and a probe posts one
``probe`` event of a new user every ``--probe-ms``: each probe enters ``probe``, and a second
subscriber (on ``probe`` only) timestamps its arrival. Per probe:

- ``ack``: arrival minus the moment this process read the 202 (negative when the push
  overtakes the HTTP answer: the server publishes once the commit lands);
- ``send``: arrival minus the moment the request was sent (an upper bound of ingest-to-push).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from typing import Any

import httpx
import websockets

from bench.common import (HEADERS, SYS, client, dist, now_ms, post_all, print_rows, quiet_gc,
                          save, settle_disk, setup_system, stop_on_sigterm)
from bench.serverproc import ROOT, ServerProc
from bench.workload import Workload

PROBE = {"name": "probe", "rules": [{"kind": "did", "event": "probe"}]}


async def level(url: str, probe_seg: str, bodies: list[bytes], rate: float, batch: int,
                duration: float, probe_ms: float, tag: str) -> dict[str, Any]:
    quiet_gc()
    ws_url = url.replace("http", "ws") + f"/v1/systems/{SYS}/stream?token={ROOT}"
    arrivals: dict[str, float] = {}
    counts = {"firehose": 0, "overflow": 0}

    async def sub(segments: Any, on: Any, ready: asyncio.Event) -> None:
        async with websockets.connect(ws_url, max_queue=None, open_timeout=30) as ws:
            await ws.send(json.dumps({"op": "subscribe", "segments": segments}))
            await ws.recv()
            ready.set()
            async for raw in ws:
                on(raw, time.perf_counter())

    def on_probe(raw: Any, t: float) -> None:
        m = json.loads(raw)
        if m.get("type") == "change":
            arrivals.setdefault(m["user_id"], t)

    def on_any(raw: Any, t: float) -> None:
        counts["firehose"] += 1
        if b"overflow" in (raw if isinstance(raw, bytes) else raw.encode()):
            counts["overflow"] += 1

    readies = [asyncio.Event(), asyncio.Event()]
    subs = [asyncio.create_task(sub([probe_seg], on_probe, readies[0])),
            asyncio.create_task(sub("*", on_any, readies[1]))]
    for r in readies:
        await asyncio.wait_for(r.wait(), 30)

    sent = {"events": 0, "requests": 0}
    interval = batch / rate if rate > 0 else math.inf
    stop_at = time.perf_counter() + duration

    async def background() -> None:
        sem = asyncio.Semaphore(4)
        async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=120) as bg:
            async def one(body: bytes) -> None:
                try:
                    r = await bg.post(f"/v1/systems/{SYS}/events", content=body)
                    r.raise_for_status()
                    sent["events"] += r.json()["accepted"]
                    sent["requests"] += 1
                finally:
                    sem.release()
            t0 = time.perf_counter()
            pending = []
            for i, body in enumerate(bodies):
                target = t0 + i * interval
                if target >= stop_at:
                    break
                delay = target - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await sem.acquire()
                if time.perf_counter() >= stop_at:
                    sem.release()
                    break
                pending.append(asyncio.create_task(one(body)))
            await asyncio.gather(*pending)

    probes: list[tuple[str, float, float]] = []

    async def prober() -> None:
        async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=60) as pc:
            k = 0
            while time.perf_counter() < stop_at:
                uid = f"probe-{tag}-{k}"
                body = {"id": f"p-{tag}-{k}", "user_id": uid, "name": "probe", "ts": now_ms()}
                t_send = time.perf_counter()
                r = await pc.post(f"/v1/systems/{SYS}/events", json=body)
                t_ack = time.perf_counter()
                r.raise_for_status()
                probes.append((uid, t_send, t_ack))
                k += 1
                await asyncio.sleep(max(0.0, probe_ms / 1000 - (t_ack - t_send)))

    t_start = time.perf_counter()
    await asyncio.gather(background(), prober())
    elapsed = time.perf_counter() - t_start
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline and any(u not in arrivals for u, _, _ in probes):
        await asyncio.sleep(0.01)
    for t in subs:
        t.cancel()
    await asyncio.gather(*subs, return_exceptions=True)
    got = [(arrivals[u], ts, ta) for u, ts, ta in probes if u in arrivals]
    return {
        "target_events_per_s": round(rate), "achieved_events_per_s": round(sent["events"] / elapsed),
        "probes": len(probes), "delivered": len(got),
        "ack_ms": dist([(a - ta) * 1000 for a, _, ta in got]),
        "send_ms": dist([(a - ts) * 1000 for a, ts, _ in got]),
        "http_ack_ms": dist([(ta - ts) * 1000 for _, ts, ta in probes]),
        "firehose_changes": counts["firehose"], "overflows": counts["overflow"],
    }


def run(users: int, events: int, rate: float | None, levels: list[float], duration: float,
        batch: int = 500, probe_ms: float = 50, seed: int = 1) -> dict[str, Any]:
    w = Workload(users, events, 90, seed)
    res: dict[str, Any] = {"users": users, "preload_events": len(w.rows), "batch": batch,
                           "duration_s": duration, "probe_ms": probe_ms}
    srv = ServerProc()
    try:
        with client(srv) as c:
            ids, _ = setup_system(c, w.now, [PROBE])
            post_all(srv, f"/v1/systems/{SYS}/profiles", w.profile_batches())
            t0 = time.perf_counter()
            n = post_all(srv, f"/v1/systems/{SYS}/events", w.batches(5000))
            preload_rate = n / (time.perf_counter() - t0)
        res["preload_events_per_s"] = round(preload_rate)

        def live_bodies(n: int, i: int) -> list[bytes]:
            live = Workload(users, n, 1, seed + 100 + i)
            t_gen = now_ms()
            return list(live.iter_batches(batch, f"L{i}-",
                                          lambda k: t_gen - (k * 7919) % 60_000))

        if rate is None:
            sat_s = min(duration, 10.0)
            print(f"latency: live sustained rate, {sat_s}s flat out", file=sys.stderr)
            bodies = live_bodies(int(preload_rate * sat_s * 1.2) + batch, 99)
            sat = asyncio.run(level(srv.url, ids["probe"], bodies, 1e12, batch, sat_s,
                                    probe_ms, "sat"))
            res["saturation"] = sat
            rate = float(sat["achieved_events_per_s"])
        sustained = rate
        res["sustained_events_per_s"] = round(sustained)
        res["levels"] = {}
        for i, frac in enumerate(levels):
            target = sustained * frac
            bodies = live_bodies(int(target * duration * 1.2) + batch, i)
            print(f"latency: level {frac:.0%} ({target:.0f} events/s) for {duration}s",
                  file=sys.stderr)
            settled = settle_disk()
            cpu0, wall0, own0 = srv.cpu_seconds(), time.perf_counter(), time.process_time()
            got = asyncio.run(
                level(srv.url, ids["probe"], bodies, target, batch, duration, probe_ms, str(i)))
            wall = time.perf_counter() - wall0
            got["server_cpu_util"] = round((srv.cpu_seconds() - cpu0) / wall, 2)
            got["bench_cpu_util"] = round((time.process_time() - own0) / wall, 2)
            got["server_rss_mb"] = round(srv.rss_bytes() / 2**20, 1)
            got["disk_settle_s"] = settled
            res["levels"][f"{round(frac * 100)}%"] = got
    finally:
        srv.stop()
        srv.remove_data_dir()
    return res


def report(res: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [("preload (history) events/s", res["preload_events_per_s"]),
            ("sustained live rate used (events/s)", res["sustained_events_per_s"])]
    for k, v in res["levels"].items():
        rows.append((f"load {k}: achieved events/s", f"{v['achieved_events_per_s']}"
                                                     f" (target {v['target_events_per_s']})"))
        rows.append((f"load {k}: CPU cores server / bench",
                     f"{v.get('server_cpu_util')} / {v.get('bench_cpu_util')}"))
        rows.append((f"load {k}: ack->push ms p50/p99/max",
                     f"{v['ack_ms']['p50']} / {v['ack_ms']['p99']} / {v['ack_ms']['max']}"))
        rows.append((f"load {k}: send->push ms p50/p99/max",
                     f"{v['send_ms']['p50']} / {v['send_ms']['p99']} / {v['send_ms']['max']}"
                     f" (n={v['delivered']}/{v['probes']})"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--events", type=int, default=1_000_000, help="preload history")
    p.add_argument("--rate", type=float, default=None, help="sustained events/s (default: "
                   "measured with live events, flat out)")
    p.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--duration", type=float, default=None, help="seconds per level (30)")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--probe-ms", type=float, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="10k users, 50k preload, 8 s per level")
    a = p.parse_args()
    stop_on_sigterm()
    if a.quick:
        a.users, a.events = 10_000, 50_000
    a.duration = a.duration or (8 if a.quick else 30)
    res = run(a.users, a.events, a.rate, a.levels, a.duration, a.batch, a.probe_ms, a.seed)
    print_rows(report(res))
    print(f"written {save('latency', res)}")


if __name__ == "__main__":
    main()
