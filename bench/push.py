"""Push latency: from ingest acknowledgement to the change received on WebSocket subscribers.

    python -m bench.push [--subscribers 1 1000 5000] [--samples 50] [--quick]

Runs the real server in its own process; this process holds every subscriber connection
and posts one event per sample over HTTP, all on 127.0.0.1. For each sample and each
subscriber it records the delay from the 202 reaching this process to the change reaching
that subscriber (it can be negative: the server pushes the moment the commit lands, and may
do so before the 202 is read here), and from the request being sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import websockets

from bench.serverproc import ROOT, ServerProc


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def scenario(url: str, subscribers: int, samples: int) -> dict[str, Any]:
    h = {"Authorization": f"Bearer {ROOT}"}
    async with httpx.AsyncClient(base_url=url, headers=h, timeout=60) as http:
        sys_id = f"push{subscribers}"
        (await http.post("/v1/systems", json={"id": sys_id})).raise_for_status()
        r = await http.post(f"/v1/systems/{sys_id}/segments", json={
            "name": "pinged", "rules": [{"kind": "did", "event": "ping"}]})
        seg = r.json()["id"]
        for _ in range(200):
            if (await http.get(f"/v1/systems/{sys_id}/segments/{seg}")).json()["status"] \
                    == "active":
                break
            await asyncio.sleep(0.05)
        ws_url = url.replace("http", "ws") + f"/v1/systems/{sys_id}/stream?token={ROOT}"
        arrivals: dict[int, list[float]] = {}
        decoder = msgspec.json.Decoder()

        async def subscriber(ready: asyncio.Event, conns: list[Any]) -> None:
            ws = await websockets.connect(ws_url, max_queue=None, open_timeout=60)
            conns.append(ws)
            await ws.send(json.dumps({"op": "subscribe", "segments": [seg]}))
            await ws.recv()  # subscribed
            ready.set()
            async for raw in ws:
                t = time.perf_counter()
                msg = decoder.decode(raw)
                if msg.get("type") == "change":
                    arrivals.setdefault(msg["seq"], []).append(t)

        conns: list[Any] = []
        tasks = []
        for i in range(subscribers):
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(subscriber(ready, conns)))
            await asyncio.wait_for(ready.wait(), 60)
        from_ack: list[float] = []
        from_send: list[float] = []
        t_start = time.perf_counter()
        delivered = 0
        for k in range(samples):
            t0 = time.perf_counter()
            r = await http.post(f"/v1/systems/{sys_id}/events",
                                json={"user_id": f"u{k}", "name": "ping", "ts": int(time.time()
                                                                                    * 1000)})
            t_ack = time.perf_counter()
            r.raise_for_status()
            seq = (await http.get(f"/v1/systems/{sys_id}/changes",
                                  params={"segment": seg, "since": 0, "limit": 10000})
                   ).json()["changes"][-1]["seq"]
            deadline = time.monotonic() + 30
            while len(arrivals.get(seq, ())) < subscribers and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            got = arrivals.get(seq, [])
            delivered += len(got)
            from_ack += [(t - t_ack) * 1000 for t in got]
            from_send += [(t - t0) * 1000 for t in got]
        elapsed = time.perf_counter() - t_start
        for t in tasks:
            t.cancel()
        for ws in conns:
            await ws.close()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "subscribers": subscribers, "samples": samples, "delivered": delivered,
        "expected": subscribers * samples,
        "p50_ms_from_ack": round(statistics.median(from_ack), 2),
        "p99_ms_from_ack": round(pct(from_ack, 99), 2),
        "p50_ms_from_send": round(statistics.median(from_send), 2),
        "p99_ms_from_send": round(pct(from_send, 99), 2),
        "max_ms_from_send": round(max(from_send), 2),
        "changes_delivered_per_s": round(delivered / elapsed),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subscribers", type=int, nargs="+", default=[1, 1000, 5000])
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="1 and 1000 subscribers, 20 samples")
    args = p.parse_args()
    if args.quick:
        args.subscribers, args.samples = [1, 1000], 20
    rows = []
    with ServerProc() as srv:
        for n in args.subscribers:
            rows.append(asyncio.run(scenario(srv.url, n, args.samples)))
    cols = ["subscribers", "samples", "delivered", "p50_ms_from_ack", "p99_ms_from_ack",
            "p50_ms_from_send", "p99_ms_from_send", "max_ms_from_send",
            "changes_delivered_per_s"]
    print(" ".join(f"{c:>22}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]!s:>22}" for c in cols))
    out = Path(__file__).parent / "results" / "push.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "rows": rows}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
