"""Scenarios 4-6 on one loaded server: memory, backfill and estimate, restart.

    python -m bench.scale [--quick] [--users 1000000] [--events 20000000] [--only memory backfill restart]

(``python -m bench.memory``, ``bench.backfill``, ``bench.restart`` run one part each; the load
is the same.) The server (own process) gets the 20 segments, then a profile update for
every user (so every user is known, most of them idle: RSS per idle user), then the events
(RSS per retained event). Bodies are encoded while sending, so the bench process does not
hold them all.

- memory: RSS after the segments (base), after the profiles, after the events, each after
  a 2 s settle. ``bytes_per_idle_user`` = (after profiles - base) / users;
  ``bytes_per_event`` = (after events - after profiles) / events.
- backfill: a new segment over every user (one new atom, so events are re-read) is
  POSTed; the time until GET shows it ``active``; then POST estimate of another new
  definition, timed (best of 3).
- restart: ``kill -9``; a new process on the same data dir; the time until /healthz answers
  200, until GET members of ``buyers 30d`` answers (reads are served while the users'
  histories load), whether its size is the same, and until an event is accepted (202:
  writes wait for the histories).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx

from bench.common import (SYS, client, post_all, print_rows, save, setup_system,
                          stop_on_sigterm, wait_active)
from bench.serverproc import ServerProc
from bench.workload import Workload

FULL = {"users": 1_000_000, "events": 20_000_000}
QUICK = {"users": 50_000, "events": 200_000}
PARTS = ["memory", "backfill", "restart"]

BACKFILL = {"name": "backfill: repeat buyers or API readers, paid", "rules": [
    {"kind": "group", "match": "any", "rules": [
        {"kind": "did", "event": "purchase", "count": {"op": "gte", "value": 2},
         "window": {"last": "30d"}},
        {"kind": "did", "event": "page_view", "window": {"last": "7d"},
         "where": [{"property": "url", "op": "eq", "value": "/docs/api"}]}]},
    {"kind": "profile", "property": "plan", "op": "neq", "value": "free"}]}
ESTIMATE = {"name": "estimate: London laptop searchers", "rules": [
    {"kind": "did", "event": "search", "window": {"last": "30d"},
     "where": [{"property": "query", "op": "icontains", "value": "laptop"}]},
    {"kind": "profile", "property": "city", "op": "eq", "value": "London"}]}


def settle_rss(srv: ServerProc, seconds: float = 2.0) -> int:
    time.sleep(seconds)
    return srv.rss_bytes()


def run(users: int, events: int, parts: list[str], seed: int = 1,
        restart_timeout: float = 1800, keep: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    w = Workload(users, events, 90, seed)
    print(f"scale: generated {len(w.rows)} events for {users} users in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    res: dict[str, Any] = {"users": users, "events": len(w.rows), "parts": parts}
    srv = ServerProc()
    try:
        with client(srv, timeout=600) as c:
            ids, _ = setup_system(c, w.now)
            base = settle_rss(srv)
            t = time.perf_counter()
            post_all(srv, f"/v1/systems/{SYS}/profiles", w.profile_batches(5000))
            res["profiles_s"] = round(time.perf_counter() - t, 1)
            after_users = settle_rss(srv)
            t, cpu0 = time.perf_counter(), srv.cpu_seconds()
            n = post_all(srv, f"/v1/systems/{SYS}/events", w.iter_batches(5000))
            el = time.perf_counter() - t
            res["events_s"] = round(el, 1)
            res["events_per_s"] = round(n / el)
            res["cpu_s_per_1k_events"] = round((srv.cpu_seconds() - cpu0) / n * 1000, 4)
            after_events = settle_rss(srv)
            if "memory" in parts:
                res["memory"] = {
                    "rss_mb_base": round(base / 2**20, 1),
                    "rss_mb_after_users": round(after_users / 2**20, 1),
                    "rss_mb_after_events": round(after_events / 2**20, 1),
                    "bytes_per_idle_user": round((after_users - base) / users),
                    "bytes_per_event": round((after_events - after_users) / n),
                    "bytes_per_user_all_in": round((after_events - base) / users),
                }
            if "backfill" in parts:
                res["backfill"] = backfill(c)
            if "restart" in parts:
                res["restart"] = restart(srv, c, ids["buyers 30d"], restart_timeout)
                srv = res["restart"].pop("_srv")
    finally:
        srv.stop()
        if keep:
            print(f"scale: data kept in {srv.data_dir}", file=sys.stderr)
        else:
            srv.remove_data_dir()
    return res


def backfill(c: httpx.Client) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = c.post(f"/v1/systems/{SYS}/segments", json=BACKFILL)
    r.raise_for_status()
    sid = r.json()["id"]
    wait_active(c, sid, 3600, poll=0.01)
    active_s = time.perf_counter() - t0
    size = c.get(f"/v1/systems/{SYS}/segments/{sid}").json()["size"]
    est = []
    for _ in range(3):
        t = time.perf_counter()
        r = c.post(f"/v1/systems/{SYS}/estimate", json=ESTIMATE)
        r.raise_for_status()
        est.append(time.perf_counter() - t)
    t = time.perf_counter()
    same = c.post(f"/v1/systems/{SYS}/estimate", json=BACKFILL).json()["users"]
    return {"pending_to_active_s": round(active_s, 3), "new_segment_size": size,
            "estimate_s": round(min(est), 3), "estimate_s_runs": [round(x, 3) for x in est],
            "estimate_users": r.json()["users"],
            "estimate_of_backfilled_definition": same,
            "estimate_of_backfilled_definition_s": round(time.perf_counter() - t, 3)}


def restart(srv: ServerProc, c: httpx.Client, seg: str, timeout: float) -> dict[str, Any]:
    before = c.get(f"/v1/systems/{SYS}/segments/{seg}").json()["size"]
    srv.kill()
    t0 = time.perf_counter()
    new = ServerProc(data_dir=srv.data_dir, wait=False)
    out: dict[str, Any] = {"_srv": new, "size_before": before}
    if not new.wait_healthy(timeout, poll=0.02):
        out["error"] = f"/healthz did not answer within {timeout}s"
        return out
    out["healthz_s"] = round(time.perf_counter() - t0, 3)
    with client(new, timeout=60) as c2:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = c2.get(f"/v1/systems/{SYS}/segments/{seg}/members", params={"limit": 10})
            if r.status_code == 200:
                out["members_s"] = round(time.perf_counter() - t0, 3)
                break
            time.sleep(0.02)
        out["size_after"] = c2.get(f"/v1/systems/{SYS}/segments/{seg}").json()["size"]
        out["status_after"] = c2.get(f"/v1/systems/{SYS}/segments/{seg}").json()["status"]
        # Writes are acknowledged once the stored event ids are loaded (the time to a 202),
        # and applied once every user's history is: the time until the user's details
        # (which wait for that) show the probe's event.
        with client(new, timeout=timeout) as c3:
            r = c3.post(f"/v1/systems/{SYS}/events", json={
                "user_id": "restart-probe", "name": "probe", "ts": int(time.time() * 1000)})
            if r.status_code == 202:
                out["writes_s"] = round(time.perf_counter() - t0, 3)
            r = c3.get(f"/v1/systems/{SYS}/users/restart-probe")
            if r.status_code == 200:
                out["applied_s"] = round(time.perf_counter() - t0, 3)
    out["rss_mb_after_restart"] = round(new.rss_bytes() / 2**20, 1)
    return out


def report(res: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("users / events", f"{res['users']} / {res['events']}")]
    if "memory" in res:
        m = res["memory"]
        rows += [("RSS base / +users / +events MB",
                  f"{m['rss_mb_base']} / {m['rss_mb_after_users']} / {m['rss_mb_after_events']}"),
                 ("bytes per idle user", m["bytes_per_idle_user"]),
                 ("bytes per retained event", m["bytes_per_event"])]
    if "backfill" in res:
        b = res["backfill"]
        rows += [("new segment pending->active s", b["pending_to_active_s"]),
                 ("estimate s", b["estimate_s"])]
    if "restart" in res:
        r = res["restart"]
        rows += [("restart: /healthz s", r.get("healthz_s", r.get("error"))),
                 ("restart: members served s", r.get("members_s")),
                 ("restart: writes accepted s", r.get("writes_s")),
                 ("restart: writes applied s", r.get("applied_s")),
                 ("restart: size before/after", f"{r['size_before']} / {r.get('size_after')}")]
    return rows


def main(parts: list[str] | None = None, name: str = "scale") -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=FULL["users"])
    p.add_argument("--events", type=int, default=FULL["events"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=PARTS, default=parts or PARTS)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['users']} users, {QUICK['events']} events")
    p.add_argument("--keep", action="store_true",
                   help="keep the server's data dir (its path is printed) to study it")
    a = p.parse_args()
    stop_on_sigterm()
    if a.quick:
        a.users, a.events = QUICK["users"], QUICK["events"]
    res = run(a.users, a.events, a.only, a.seed, keep=a.keep)
    print_rows(report(res))
    print(f"written {save(name, res)}")


if __name__ == "__main__":
    main()
