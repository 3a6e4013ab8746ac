"""Shared pieces of the scenarios: HTTP helpers, percentiles, machine info, results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Iterable

import httpx

from bench.serverproc import ROOT, ServerProc
from bench.workload import resolve_refs, segments

RESULTS = Path(__file__).parent / "results"
SYS = "bench"
HEADERS = {"Authorization": f"Bearer {ROOT}", "Content-Type": "application/json"}


def stop_on_sigterm() -> None:
    """Turn SIGTERM (e.g. from `timeout`) into SystemExit, so `finally` stops the servers."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_scenario(conn: Connection, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...],
                 kw: dict[str, Any]) -> None:
    """In a process of its own (``bench all``): run one scenario, send back (ok, result or
    traceback)."""
    stop_on_sigterm()
    try:
        conn.send((True, fn(*args, **kw)))
    except BaseException:
        conn.send((False, traceback.format_exc()))
        raise


def settle_disk(timeout: float = 120.0) -> float:
    """Flush what earlier writes left dirty in the page cache (``sync``) and wait until the
    kernel's writeback is done, so its disk traffic does not stall the fsyncs of what is
    measured next (a scenario after one that wrote GBs, a measurement after a preload).
    Returns the seconds it took."""
    t0 = time.perf_counter()
    os.sync()
    while time.perf_counter() - t0 < timeout:
        kb = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(("Dirty:", "Writeback:")):
                kb += int(line.split()[1])
        if kb < 16 * 1024:
            break
        time.sleep(0.2)
    return round(time.perf_counter() - t0, 2)


def quiet_gc() -> None:
    """Freeze what this process holds (the workload): its collector's passes would
    otherwise stall the loop that timestamps arrivals, and show as server latency."""
    import gc
    gc.collect()
    gc.freeze()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))]


def dist(values: list[float], digits: int = 2) -> dict[str, float]:
    return {"n": len(values), "p50": round(pct(values, 50), digits),
            "p99": round(pct(values, 99), digits), "max": round(max(values), digits)
            if values else float("nan")}


def machine() -> dict[str, Any]:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "ram_gb": round(mem / 2**30, 1), "cpu": model,
            "python": platform.python_version(), "platform": platform.platform()}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def client(srv: ServerProc, timeout: float = 120) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers=HEADERS, timeout=timeout)


def setup_system(c: httpx.Client, now: int, extra: list[dict[str, Any]] = (),
                 exclude: Iterable[str] = ()
                 ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Create system `bench` and the 20 segments (but those named in `exclude`; plus
    `extra`); wait until all are active. Returns (name -> id, id -> resolved definition)."""
    c.post("/v1/systems", json={"id": SYS}).raise_for_status()
    ids: dict[str, str] = {}
    defs: dict[str, dict[str, Any]] = {}
    for spec in [*(s for s in segments(now) if s["name"] not in set(exclude)), *extra]:
        d = resolve_refs(spec, ids)
        r = c.post(f"/v1/systems/{SYS}/segments", json=d)
        if r.status_code != 201:
            raise RuntimeError(f"creating {spec['name']!r}: {r.status_code} {r.text}")
        ids[spec["name"]] = r.json()["id"]
        defs[ids[spec["name"]]] = d
    for sid in ids.values():
        wait_active(c, sid, 60)
    return ids, defs


def wait_active(c: httpx.Client, sid: str, timeout: float, poll: float = 0.02) -> float:
    """Poll a segment until it is active; returns the seconds waited."""
    t0 = time.perf_counter()
    while True:
        st = c.get(f"/v1/systems/{SYS}/segments/{sid}").json()["status"]
        if st == "active":
            return time.perf_counter() - t0
        if st == "failed" or time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"segment {sid} is {st} after {timeout}s")
        time.sleep(poll)


def post_all(srv: ServerProc, path: str, bodies: Iterable[bytes], concurrency: int = 2,
             done: list[tuple[float, int]] | None = None) -> int:
    """POST every body (at most `concurrency` in flight); returns the items accepted.
    ``done`` receives (perf_counter at the 202, items accepted) per request."""
    local = threading.local()

    def post(body: bytes) -> int:
        cc = getattr(local, "c", None)
        if cc is None:
            cc = local.c = client(srv, timeout=300)
        r = cc.post(path, content=body)
        if r.status_code != 202:
            raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:500]}")
        n = int(r.json()["accepted"])
        if done is not None:
            done.append((time.perf_counter(), n))
        return n

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(post, bodies))


def read_members(c: httpx.Client, sid: str, limit: int = 10_000
                 ) -> tuple[set[str], int, int]:
    """Every member, paging; with the wall ms before the first request and after the last."""
    out: set[str] = set()
    t_a = now_ms()
    after = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        r = c.get(f"/v1/systems/{SYS}/segments/{sid}/members", params=params)
        r.raise_for_status()
        body = r.json()
        out.update(body["members"])
        after = body["next"]
        if after is None:
            return out, t_a, now_ms()


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"date": utc_now(), "machine": machine(), **result}, indent=2,
                              default=str) + "\n")
    return out


def sized_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments of the in-process benchmarks: ``--quick``, ``--users``, ``--events``,
    ``--repeat``."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--users", type=int)
    p.add_argument("--events", type=int)
    p.add_argument("--repeat", type=int, default=3)
    return p


def sized(a: argparse.Namespace, quick: dict[str, int],
          full: dict[str, int]) -> tuple[int, int]:
    """(users, events) as ``sized_parser``'s arguments ask."""
    size = quick if a.quick else full
    return a.users or size["users"], a.events or size["events"]


def print_rows(rows: list[tuple[str, Any]]) -> None:
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
