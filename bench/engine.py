"""The engine alone: the supervisor's CPU per event with the 20 segments, in this process.

    python -m bench.engine [--quick] [--users 10000] [--events 200000] [--count]

No HTTP, no SQLite, no WebSocket: profiles then events (timestamp order, as bench.ingest
sends them) go straight to ``System.apply_profile`` / ``System.apply_event`` at the
workload's ``now``. It isolates decode-free evaluation cost, the part of the hot path a
change to the rules or the actors moves, so before/after figures of such a change come from
here (median of ``--repeat`` runs). ``--count`` also reports how many segment evaluations
an event causes (it wraps the evaluator, so its timings are not comparable).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import msgspec

from bench.common import print_rows, save
from bench.workload import Workload, resolve_refs, segments
from segactors.definition import Limits, parse_definition
from segactors.rules.compile import CompiledSegment, compile_definition
from segactors.supervisor import Segment, Status, System

QUICK = {"users": 10_000, "events": 200_000}
FULL = {"users": 100_000, "events": 2_000_000}


def build(now: int) -> System:
    system = System("bench", "k", "s", now)
    ids: dict[str, str] = {}
    for i, spec in enumerate(segments(now)):
        body = resolve_refs(spec, ids)
        defn = parse_definition(body, now, lambda s: s in system.segments, Limits())
        seg = Segment(f"seg{i}", 0, defn.name, "", defn, body,
                      compile_definition(defn, system.atoms), now, status=Status.ACTIVE)
        system.add_segment(seg)
        ids[spec["name"]] = seg.id
    return system


def once(w: Workload, decoded: list[tuple[str, str, int, Any, str | None, bytes | None]],
         count: bool) -> dict[str, Any]:
    system = build(w.now)
    evals = [0]
    if count:
        inner = CompiledSegment.eval

        def counted(self: CompiledSegment, *a: Any) -> Any:
            evals[0] += 1
            return inner(self, *a)
        CompiledSegment.eval = counted  # type: ignore[method-assign]
    try:
        out: list[Any] = []
        for p in w.profiles():
            system.apply_profile(p["user_id"], p["props"], w.now, out)
        gc.collect()
        evals[0] = 0
        cpu0 = time.process_time()
        for uid, name, ts, props, sid, raw in decoded:
            system.apply_event(uid, name, ts, props, sid, w.now, out, raw)
        cpu = time.process_time() - cpu0
    finally:
        if count:
            CompiledSegment.eval = inner  # type: ignore[method-assign]
    res = {"us_per_event": round(cpu / len(decoded) * 1e6, 2), "changes": len(out)}
    if count:
        res["evals_per_event"] = round(evals[0] / len(decoded), 2)
    return res


def run(users: int, events: int, repeat: int = 3, count: bool = False,
        seed: int = 1) -> dict[str, Any]:
    w = Workload(users, events, 90, seed)
    dec = msgspec.json.Decoder(dict[str, Any]).decode
    decoded = []
    for ts, user, name, sid, props in w.rows:
        raw = props.encode() if props != "{}" else None
        decoded.append((w.uids[user], name, ts, dec(raw) if raw else {}, sid, raw))
    runs = [once(w, decoded, count) for _ in range(repeat)]
    res: dict[str, Any] = {"users": users, "events": events, "repeat": repeat,
                           "us_per_event_runs": [r["us_per_event"] for r in runs],
                           "us_per_event": statistics.median(r["us_per_event"] for r in runs),
                           "changes": runs[0]["changes"]}
    if count:
        res["evals_per_event"] = runs[0]["evals_per_event"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--users", type=int)
    p.add_argument("--events", type=int)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--count", action="store_true")
    a = p.parse_args()
    size = QUICK if a.quick else FULL
    res = run(a.users or size["users"], a.events or size["events"], a.repeat, a.count)
    print_rows([(k, v) for k, v in res.items()])
    save("engine", res)


if __name__ == "__main__":
    main()
