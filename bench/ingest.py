"""Ingest throughput: events/s acknowledged durable by one server process, with segments.

    python -m bench.ingest [--users 10000] [--events 1000000] [--segments 10] [--batch 5000]

Drives the real server over HTTP from this process on 127.0.0.1. Events are generated and
encoded before the clock starts, so the figure is the server's (plus loopback HTTP).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import msgspec

from bench.serverproc import ROOT, ServerProc

NAMES = ["page_view", "add_to_cart", "purchase", "app_launch", "search"]
SEGMENTS = [
    {"name": "buyers 30d", "rules": [{"kind": "did", "event": "purchase",
                                       "window": {"last": "30d"}}]},
    {"name": "3+ carts 7d", "rules": [{"kind": "did", "event": "add_to_cart",
                                        "window": {"last": "7d"},
                                        "count": {"op": "gte", "value": 3}}]},
    {"name": "cart no buy 10m", "rules": [{"kind": "did_then_not", "event": "add_to_cart",
                                            "then_not": {"event": "purchase"}, "within": "10m",
                                            "window": {"last": "1d"}}]},
    {"name": "big spenders", "rules": [{"kind": "aggregate", "event": "purchase", "fn": "sum",
                                         "property": "amount", "compare": {"op": "gt",
                                                                          "value": 500}}]},
    {"name": "NY", "rules": [{"kind": "profile", "property": "city", "op": "eq",
                               "value": "New York"}]},
    {"name": "viewed pricing", "rules": [{"kind": "did", "event": "page_view", "where": [
        {"property": "url", "op": "contains", "value": "/pricing"}], "window": {"last": "1h"}}]},
    {"name": "no launch 1d", "rules": [{"kind": "did_not", "event": "app_launch",
                                         "window": {"last": "1d"}}]},
    {"name": "first launch 7d", "rules": [{"kind": "first_did", "event": "app_launch",
                                            "window": {"last": "7d"}}]},
    {"name": "searchers", "match": {"at_least": 2}, "rules": [
        {"kind": "did", "event": "search", "window": {"last": "1h"}},
        {"kind": "did", "event": "page_view", "window": {"last": "5m"}},
        {"kind": "did", "event": "purchase", "window": {"last": "7d"}}]},
    {"name": "browse then buy", "rules": [{"kind": "sequence", "steps": [
        {"event": "page_view"}, {"event": "add_to_cart"}, {"event": "purchase"}],
        "within": "1h"}]},
]


def make_batches(users: int, events: int, batch: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    weights = [1 / (i + 1) for i in range(users)]  # Zipf-like activity.
    uids = rng.choices(range(users), weights=weights, k=events)
    enc = msgspec.json.Encoder()
    out = []
    for start in range(0, events, batch):
        items = []
        for k in range(start, min(events, start + batch)):
            name = rng.choice(NAMES)
            props: dict[str, object] = {}
            if name == "page_view":
                props["url"] = rng.choice(["/", "/pricing", "/docs", "/blog/x"])
            elif name == "purchase":
                props["amount"] = round(rng.uniform(5, 300), 2)
            items.append({"id": f"e{k}", "user_id": f"u{uids[k]}", "name": name,
                          "ts": now - rng.randrange(0, 3_600_000), "props": props,
                          "session_id": f"s{uids[k]}-{k // 50_000}"})
        out.append(enc.encode(items))
    return out


def run(args: argparse.Namespace) -> dict[str, object]:
    batches = make_batches(args.users, args.events, args.batch, args.seed)
    with ServerProc() as srv:
        h = {"Authorization": f"Bearer {ROOT}", "Content-Type": "application/json"}
        with httpx.Client(base_url=srv.url, headers=h, timeout=60) as c:
            c.post("/v1/systems", json={"id": "bench"}).raise_for_status()
            for spec in SEGMENTS[: args.segments]:
                c.post("/v1/systems/bench/segments", json=spec).raise_for_status()
            rss0 = srv.rss_bytes()
            cpu0 = srv.cpu_seconds()

            def post(body: bytes) -> int:
                with httpx.Client(base_url=srv.url, headers=h, timeout=120) as cc:
                    r = cc.post("/v1/systems/bench/events", content=body)
                    r.raise_for_status()
                    return int(r.json()["accepted"])

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                accepted = sum(pool.map(post, batches))
            elapsed = time.perf_counter() - t0
            cpu = srv.cpu_seconds() - cpu0
            info = c.get("/v1/systems/bench").json()
            sizes = {s["name"]: s["size"] for s in c.get("/v1/systems/bench/segments").json()}
            rss = srv.rss_bytes()
    return {
        "users": args.users, "events": args.events, "segments": args.segments,
        "batch": args.batch, "concurrency": args.concurrency, "accepted": accepted,
        "known_users": info["users"], "seconds": round(elapsed, 2),
        "events_per_s": round(accepted / elapsed), "server_cpu_s": round(cpu, 2),
        "cpu_s_per_1k_events": round(cpu / accepted * 1000, 4),
        "rss_mb": round(rss / 2**20, 1), "rss_mb_before_ingest": round(rss0 / 2**20, 1),
        "rss_bytes_per_event": round((rss - rss0) / max(1, accepted)),
        "segment_sizes": sizes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--segments", type=int, default=10)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="100k events")
    args = p.parse_args()
    if args.quick:
        args.events = 100_000
    runs = [run(args) for _ in range(args.repeat)]
    rates = sorted(r["events_per_s"] for r in runs)  # type: ignore[misc]
    result = dict(runs[len(runs) // 2])
    result["events_per_s_runs"] = rates
    result["machine"] = {"python": platform.python_version(), "cpus": __import__("os").cpu_count()}
    result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"{'figure':<28}{'value':>14}")
    for k in ("users", "events", "segments", "accepted", "seconds", "events_per_s",
              "server_cpu_s", "cpu_s_per_1k_events", "rss_mb", "rss_bytes_per_event"):
        print(f"{k:<28}{result[k]!s:>14}")
    out = Path(__file__).parent / "results" / "ingest.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
