"""Run every scenario; print one table; write bench/results/latest.json and bench/RESULTS.md.

    python -m bench all [--quick | --medium] [--skip latency ...]

Sizes (users / events):

| scenario | --quick | --medium | full (default) |
|---|---|---|---|
| ingest + DuckDB peer | 10k / 200k | 20k / 300k | 100k / 10M |
| latency (preload; s per level) | 10k / 50k; 5 s | 20k / 100k; 10 s | 100k / 1M; 30 s |
| time (preload; leavers over s; pending) | 10k / 50k; 20k over 10 s; 50k | 20k / 100k; 50k over 30 s; 200k | 100k / 1M; 200k over 60 s; 1M |
| memory, backfill, restart | 30k / 150k | 200k / 300k | 1M / 20M |

Each scenario runs in a bench process of its own. Each mode's results are also kept as
bench/results/<mode>.json; RESULTS.md shows every mode found there, each labelled with its
sizes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import ingest, latency, scale, timely
from bench.common import RESULTS, machine, run_scenario, settle_disk, stop_on_sigterm, utc_now

MODES: dict[str, dict[str, Any]] = {
    "quick": {"ingest": (10_000, 200_000), "latency": (10_000, 50_000, 5.0),
              "time": (10_000, 50_000, 20_000, 10.0, 50_000), "scale": (30_000, 150_000)},
    "medium": {"ingest": (20_000, 300_000), "latency": (20_000, 100_000, 10.0),
               "time": (20_000, 100_000, 50_000, 30.0, 200_000), "scale": (200_000, 300_000)},
    "full": {"ingest": (100_000, 10_000_000), "latency": (100_000, 1_000_000, 30.0),
             "time": (100_000, 1_000_000, 200_000, 60.0, 1_000_000), "scale": (1_000_000, 20_000_000)},
}
SCENARIOS = ["ingest", "latency", "time", "scale"]

TARGETS = {
    "ingest_events_per_s": (">=", 50_000),
    "push_p99_ms_at_50": ("<=", 20),
    "lateness_p99_ms": ("<=", 100),
    "bytes_per_idle_user": ("<=", 1536),
    "bytes_per_event": ("<=", 200),
    "backfill_s": ("<=", 10),
    "restart_s": ("<=", 30),
    "restart_writes_s": ("<=", 30),
}


def checkpoint(out: dict[str, Any]) -> None:
    """Write what is done so far (a long run that is cut short keeps its figures)."""
    out["figures"] = figures(out)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out['mode']}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")


def isolated(fn: Callable[..., dict[str, Any]], *args: Any, **kw: Any) -> dict[str, Any]:
    """Run one scenario in a fresh bench process: what an earlier scenario leaves in this
    one (a heap of millions of workload rows, threads, sockets) must not slow the client
    that times the next. A SIGTERM here stops it too (and so its servers)."""
    settled = settle_disk()  # What the scenario before left to write back is not this one's.
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_scenario, args=(theirs, fn, args, kw))
    proc.start()
    theirs.close()
    answer = None
    try:
        answer = ours.recv()
    except EOFError:
        pass
    finally:
        proc.join(timeout=60 if answer is not None else 0)  # It ends on its own once done.
        if proc.is_alive():
            proc.terminate()
        proc.join()
    if answer is None:
        raise RuntimeError(f"scenario {fn.__module__} died (exit code {proc.exitcode})")
    ok, got = answer
    if not ok:
        raise RuntimeError(f"scenario {fn.__module__} failed:\n{got}")
    got["disk_settle_before_s"] = settled
    return got


def run(mode: str, skip: list[str]) -> dict[str, Any]:
    sizes = MODES[mode]
    out: dict[str, Any] = {"mode": mode, "date": utc_now(), "machine": machine(),
                           "sizes": {k: list(v) for k, v in sizes.items()}, "scenarios": {}}
    sc = out["scenarios"]
    t0 = time.perf_counter()
    if "ingest" not in skip:
        u, e = sizes["ingest"]
        print(f"== ingest + peer: {u} users, {e} events", file=sys.stderr)
        sc["ingest"] = isolated(ingest.run, u, e, peer=True)
        checkpoint(out)
    if "latency" not in skip:
        u, e, d = sizes["latency"]
        print(f"== latency: {u} users, {e} preload, {d}s per level", file=sys.stderr)
        # Levels are fractions of the live traffic's own sustained rate, measured there.
        sc["latency"] = isolated(latency.run, u, e, None, [0.1, 0.5, 0.9], d)
        checkpoint(out)
    if "time" not in skip:
        u, e, n, s, pend = sizes["time"]
        print(f"== time: {u} users, {e} preload, {n} leavers over {s}s, {pend} pending",
              file=sys.stderr)
        sc["time"] = isolated(timely.run, u, e, n, s, pending=pend)
        checkpoint(out)
    if "scale" not in skip:
        u, e = sizes["scale"]
        print(f"== memory/backfill/restart: {u} users, {e} events", file=sys.stderr)
        sc["scale"] = isolated(scale.run, u, e, scale.PARTS)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    out["complete"] = True
    out["figures"] = figures(out)
    return out


def figures(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline table: figure, value, target, met?, sizes."""
    sc = out["scenarios"]
    rows: list[dict[str, Any]] = []

    def add(key: str | None, name: str, value: Any, size: str) -> None:
        t = TARGETS.get(key or "")
        met = None
        if t is not None and isinstance(value, (int, float)):
            met = value >= t[1] if t[0] == ">=" else value <= t[1]
        rows.append({"figure": name, "value": value,
                     "target": f"{t[0]} {t[1]}" if t else "", "met": met, "size": size})

    if "ingest" in sc:
        r = sc["ingest"]
        size = f"{r['users']} users, {r['accepted']} events, 20 segments"
        add("ingest_events_per_s", "ingest events/s (202, durable)", r["events_per_s"], size)
        add(None, "ingest events/s, first and last tenth",
            f"{r['events_per_s_by_tenth'][0]} -> {r['events_per_s_by_tenth'][-1]}", size)
        add(None, "server CPU s per 1k events", r["cpu_s_per_1k_events"], size)
        p = r["peer"]
        add(None, "DuckDB load s (NDJSON, cpu s)", f"{p['load_s']} ({p['load_cpu_s']})", size)
        add(None, "DuckDB full refresh s (cpu s)", f"{p['refresh_s']} ({p['refresh_cpu_s']})",
            size)
        add(None, "DuckDB refresh CPU / segactors ingest CPU",
            p["cpu_ratio_refresh_vs_server_ingest"], size)
        add(None, "segments equal to DuckDB",
            f"{p['segments_checked'] - p['mismatched_segments']}/{p['segments_checked']}", size)
    if "latency" in sc:
        r = sc["latency"]
        size = f"{r['users']} users, {r['preload_events']} preloaded, {r['duration_s']} s/level"
        add(None, "live events/s flat out (latency's 100 %)", r["sustained_events_per_s"], size)
        for k, v in r["levels"].items():
            s = v["send_ms"]
            add("push_p99_ms_at_50" if k == "50%" else None,
                f"send->push ms p50/p99/max at {k} load ({v['achieved_events_per_s']}"
                f"/{v['target_events_per_s']} ev/s)",
                s["p99"] if k == "50%" else f"{s['p50']} / {s['p99']} / {s['max']}", size)
            if k == "50%":
                rows[-1]["value"] = s["p99"]
                rows[-1]["detail"] = f"{s['p50']} / {s['p99']} / {s['max']}"
    if "time" in sc:
        r = sc["time"]
        d = r["lateness_ms"]
        size = (f"{r['users']} users, {r['leavers']} deadlines over {r['spread_s']} s, "
                f"{r.get('pending', 0)} more pending")
        add("lateness_p99_ms", "time-driven lateness ms p99", d["p99"], size)
        rows[-1]["detail"] = (f"{d['p99']} (p50 {d['p50']}, max {d['max']}; "
                             f"{r['leaves']}/{r['leavers']} leaves)")
    if "scale" in sc:
        r = sc["scale"]
        size = f"{r['users']} users, {r['events']} events"
        m, b, x = r.get("memory", {}), r.get("backfill", {}), r.get("restart", {})
        if m:
            add("bytes_per_idle_user", "RSS bytes per idle user", m["bytes_per_idle_user"], size)
            add("bytes_per_event", "RSS bytes per retained event", m["bytes_per_event"], size)
        if b:
            add("backfill_s", "new segment pending->active s", b["pending_to_active_s"], size)
            add(None, "estimate s", b["estimate_s"], size)
        if x:
            add("restart_s", "restart after kill -9: members served s",
                x.get("members_s", x.get("error")), size)
            add(None, "restart: /healthz s", x.get("healthz_s"), size)
            add("restart_writes_s", "restart: writes accepted (202) s", x.get("writes_s"), size)
            add(None, "restart: histories loaded, writes applied s", x.get("applied_s"), size)
    return rows


def fmt(v: Any) -> str:
    return "" if v is None else str(v)


def table(out: dict[str, Any]) -> str:
    lines = ["| figure | value | target | met | size |", "|---|---|---|---|---|"]
    for r in out["figures"]:
        val = r.get("detail", r["value"]) if "detail" in r else r["value"]
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['figure']} | {fmt(val)} | {r['target']} | {met} | {r['size']} |")
    return "\n".join(lines)


def write_markdown() -> Path:
    m = machine()
    parts = ["# Benchmark results", "",
             "Written by `python -m bench all` (see bench/README.md for what each figure means "
             "and how it is measured). One section per mode that has been run on this "
             "machine; each row names its sizes.", ""]
    for mode in ["full", "medium", "quick"]:
        f = RESULTS / f"{mode}.json"
        if not f.exists():
            continue
        out = json.loads(f.read_text())
        out["figures"] = figures(out)
        mm = out["machine"]
        parts += [f"## `{mode}` — {out['date']}", "",
                  f"Machine: {mm['cores']} cores ({mm['cpu']}), {mm['ram_gb']} GB RAM, "
                  f"Python {mm['python']}, {mm['platform']}. Command: "
                  f"`python -m bench all{'' if mode == 'full' else ' --' + mode}` "
                  f"({out.get('total_s', 'cut short, partial')} s).", ""]
        if out.get("note"):
            parts += [out["note"], ""]
        parts += [table(out), ""]
        chk = out["scenarios"].get("ingest", {}).get("peer", {}).get("checks", [])
        if chk:
            parts += ["<details><summary>segment sizes, server vs DuckDB</summary>", "",
                      "| segment | server | DuckDB | in flux | mismatches |", "|---|---|---|---|---|"]
            for c in chk:
                parts.append(f"| {c['name']} | {c['server']} | {c['peer_at_hi']} | "
                             f"{c['in_flux']} | {len(c['only_server']) + len(c['only_peer'])} |")
            parts += ["", "</details>", ""]
    parts.append(f"_Machine of the last write: {m['cores']} cores, {m['ram_gb']} GB, Python "
                 f"{m['python']}._")
    path = Path(__file__).parent / "RESULTS.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["all"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--medium", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], choices=SCENARIOS)
    a = p.parse_args()
    stop_on_sigterm()
    mode = "quick" if a.quick else "medium" if a.medium else "full"
    out = run(mode, a.skip)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{mode}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (RESULTS / "latest.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(table(out))
    print(f"written {RESULTS / 'latest.json'}, {write_markdown()}")
    bad = ingest.mismatches(out["scenarios"].get("ingest", {}))
    for line in bad:
        print(line, file=sys.stderr)
    if bad:
        print(f"FAIL: {len(bad)} segment(s) differ between segactors and DuckDB",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
