"""Scenario 1, ingest: sustained events/s acknowledged durable (202) with the 20 segments,
and server CPU seconds per 1k events; with ``--peer``, the DuckDB peer and the exactness check.

    python -m bench.ingest [--quick] [--users 100000] [--events 10000000] [--peer]

The server runs in its own process (bench/serverproc.py) with the 20 segments of
bench/workload.py, all active before ingestion. Profiles of every user are posted first
(timed apart), then the events in timestamp order, in batches of ``--batch`` with
``--concurrency`` requests in flight. Bodies are generated and encoded before the clock
starts, so the rate is the server's (plus loopback HTTP). CPU is the server process's
user+system time from /proc (every thread), the one that limits the rate; "helpers too" adds
its writer and id processes. RSS is the server's and its helpers' summed.

With ``--peer`` the members of every segment are then read (GET members, paging), the server
is stopped, and DuckDB loads the same events (bench/peer.py) and refreshes the 20 segments
at the instant the last segment was read; the check compares each segment at the instants
it was read (see bench.peer.compare). A mismatch exits non-zero listing segment and users.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

from bench.common import (SYS, client, dist, post_all, print_rows, read_members, save,
                          setup_system, stop_on_sigterm)
from bench.serverproc import ServerProc
from bench.workload import Workload

FULL = {"users": 100_000, "events": 10_000_000}
QUICK = {"users": 10_000, "events": 200_000}


def run(users: int, events: int, batch: int = 5000, concurrency: int = 2, seed: int = 1,
        days: int = 90, peer: bool = False, threads: int | None = None,
        exclude: list[str] = ()) -> dict[str, Any]:
    t0 = time.perf_counter()
    w = Workload(users, events, days, seed)
    bodies = w.batches(batch)
    profile_bodies = w.profile_batches(batch)
    gen_s = time.perf_counter() - t0
    print(f"ingest: generated {len(w.rows)} events for {users} users in {gen_s:.1f}s",
          file=sys.stderr)
    res: dict[str, Any] = {"users": users, "events": len(w.rows), "batch": batch,
                           "concurrency": concurrency, "seed": seed, "days": days,
                           "workload": w.summary(), "excluded_segments": list(exclude)}
    srv = ServerProc()
    try:
        with client(srv) as c:
            ids, defs = setup_system(c, w.now, exclude=exclude)
            names = {v: k for k, v in ids.items()}
            res["segments"] = len(ids)
            rss0 = srv.rss_bytes()
            tp = time.perf_counter()
            post_all(srv, f"/v1/systems/{SYS}/profiles", profile_bodies, concurrency)
            res["profiles_s"] = round(time.perf_counter() - tp, 2)
            cpu0, all0, t0 = srv.cpu_seconds(), srv.cpu_seconds(True), time.perf_counter()
            done: list[tuple[float, int]] = []
            accepted = post_all(srv, f"/v1/systems/{SYS}/events", bodies, concurrency, done)
            elapsed = time.perf_counter() - t0
            res["events_per_s_by_tenth"] = by_tenth(done, t0)
            cpu = srv.cpu_seconds() - cpu0
            cpu_all = srv.cpu_seconds(True) - all0
            rss = srv.rss_bytes()
            info = c.get(f"/v1/systems/{SYS}").json()
            res.update({
                "accepted": accepted, "known_users": info["users"],
                "seconds": round(elapsed, 2), "events_per_s": round(accepted / elapsed),
                "server_cpu_s": round(cpu, 2),
                "cpu_s_per_1k_events": round(cpu / accepted * 1000, 4),
                "server_cpu_util": round(cpu / elapsed, 2),
                "cpu_s_per_1k_events_with_helpers": round(cpu_all / accepted * 1000, 4),
                "rss_mb": round(rss / 2**20, 1), "rss_mb_before": round(rss0 / 2**20, 1),
            })
            if peer:
                reads = {}
                for sid in ids.values():
                    reads[sid] = read_members(c, sid)
                res["sizes"] = {names[s]: len(r[0]) for s, r in reads.items()}
                res["members_read_s"] = round(
                    (max(r[2] for r in reads.values()) - min(r[1] for r in reads.values()))
                    / 1000, 2)
    finally:
        srv.stop()
        srv.remove_data_dir()
    if peer:
        res["peer"] = run_peer(w, defs, names, reads, cpu, threads)
    return res


def by_tenth(done: list[tuple[float, int]], t0: float) -> list[int]:
    """The rate over each tenth of the events, in order (does it hold as history grows?)."""
    done = sorted(done)
    total = sum(n for _, n in done)
    out, acc, t_prev, n_prev, k = [], 0, t0, 0, 1
    for t, n in done:
        acc += n
        if acc >= total * k / 10:
            out.append(round((acc - n_prev) / max(1e-9, t - t_prev)))
            t_prev, n_prev, k = t, acc, k + 1
    return out


def run_peer(w: Workload, defs: dict[str, Any], names: dict[str, str],
             reads: dict[str, tuple[set[str], int, int]], server_cpu: float,
             threads: int | None) -> dict[str, Any]:
    from bench.peer import Peer, compare

    tmp = tempfile.mkdtemp(prefix="segactors-peer-")
    ep, pp = os.path.join(tmp, "events.ndjson"), os.path.join(tmp, "profiles.ndjson")
    try:
        t0 = time.perf_counter()
        w.write_ndjson(ep, pp)
        write_s = time.perf_counter() - t0
        p = Peer(threads)
        load = p.load(ep, pp)
        now = max(r[2] for r in reads.values())
        order = list(defs.items())
        ref = [p.refresh(order, now) for _ in range(3)]
        best = min(ref, key=lambda r: r["refresh_s"])
        checks = compare(p, defs, names, reads)
        p.close()
    finally:
        for f in (ep, pp):
            if os.path.exists(f):
                os.remove(f)
        os.rmdir(tmp)
    bad = [c for c in checks if c["only_server"] or c["only_peer"]]
    return {
        "threads": threads or os.cpu_count(), "ndjson_write_s": round(write_s, 2),
        "load_s": round(load["load_s"], 2), "load_cpu_s": round(load["load_cpu_s"], 2),
        "refresh_s": round(best["refresh_s"], 3), "refresh_cpu_s": round(best["refresh_cpu_s"], 3),
        "refresh_s_runs": [round(r["refresh_s"], 3) for r in ref],
        "cpu_ratio_refresh_vs_server_ingest": round(best["refresh_cpu_s"] / server_cpu, 3),
        "segments_checked": len(checks), "mismatched_segments": len(bad),
        "in_flux_users": sum(c["in_flux"] for c in checks),
        "checks": checks,
    }


def report(res: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [("users / events", f"{res['users']} / {res['accepted']}"),
            ("events/s acknowledged (202)", res["events_per_s"]),
            ("events/s by tenth of the run", res["events_per_s_by_tenth"]),
            ("server CPU s per 1k events", res["cpu_s_per_1k_events"]),
            ("server CPU utilisation (cores)", res["server_cpu_util"]),
            ("CPU s per 1k events, helpers too", res.get("cpu_s_per_1k_events_with_helpers")),
            ("RSS after ingest MB", res["rss_mb"])]
    if "peer" in res:
        pr = res["peer"]
        rows += [("duckdb load s (cpu s)", f"{pr['load_s']} ({pr['load_cpu_s']})"),
                 ("duckdb refresh s (cpu s)", f"{pr['refresh_s']} ({pr['refresh_cpu_s']})"),
                 ("duckdb refresh CPU / segactors ingest CPU",
                  pr["cpu_ratio_refresh_vs_server_ingest"]),
                 ("segments matching duckdb", f"{pr['segments_checked'] - pr['mismatched_segments']}"
                                              f"/{pr['segments_checked']}")]
    return rows


def mismatches(res: dict[str, Any]) -> list[str]:
    out = []
    for c in res.get("peer", {}).get("checks", []):
        if c["only_server"] or c["only_peer"]:
            out.append(f"MISMATCH {c['name']} ({c['segment']}): server {c['server']}, duckdb "
                       f"{c['peer_at_lo']}..{c['peer_at_hi']}; only in server: "
                       f"{c['only_server'][:20]} ({len(c['only_server'])}); only in duckdb: "
                       f"{c['only_peer'][:20]} ({len(c['only_peer'])})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=FULL["users"])
    p.add_argument("--events", type=int, default=FULL["events"])
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--peer", action="store_true", help="also run the DuckDB peer and check")
    p.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all)")
    p.add_argument("--without", nargs="*", default=[], metavar="NAME",
                   help="leave out these segments (by name; to find a costly one)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['users']} users, {QUICK['events']} events")
    a = p.parse_args()
    stop_on_sigterm()
    if a.quick:
        a.users, a.events = QUICK["users"], QUICK["events"]
    res = run(a.users, a.events, a.batch, a.concurrency, a.seed, a.days, a.peer, a.threads,
              a.without)
    print_rows(report(res))
    print(f"written {save('peer' if a.peer else 'ingest', res)}")
    bad = mismatches(res)
    for line in bad:
        print(line, file=sys.stderr)
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
