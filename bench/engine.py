"""The engine alone: the supervisor's CPU per event with the 20 segments, in this process.

    python -m bench.engine [--quick] [--users 10000] [--events 200000] [--count] [--memory]

No HTTP, no SQLite, no WebSocket: profiles then events (timestamp order, as bench.ingest
sends them) go straight to ``System.apply_profile`` / ``System.apply_event`` at the
workload's ``now``. It isolates decode-free evaluation cost, the part of the hot path a
change to the rules or the actors moves, so before/after figures of such a change come from
here (median of ``--repeat`` runs). ``--count`` also reports how many segment evaluations
an event causes (it wraps the evaluator, so its timings are not comparable). ``--memory``
reports the bytes the events add (tracemalloc: every allocation the events cause, once
the profiles are in), per event, and which part of the users' state holds them.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import tracemalloc
from typing import Any

import msgspec

from bench.common import print_rows, save, sized, sized_parser
from bench.workload import Workload, resolve_refs, segments
from segactors.definition import Limits, parse_definition
from segactors.rules.compile import compile_definition
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


def _deep(o: Any, seen: set[int]) -> int:
    """Bytes of ``o`` and of what it holds, each object counted once (``seen``)."""
    if id(o) in seen:
        return 0
    seen.add(id(o))
    n = sys.getsizeof(o)
    if isinstance(o, dict):
        n += sum(_deep(k, seen) + _deep(v, seen) for k, v in o.items())
    elif isinstance(o, (list, tuple, set, frozenset)):
        n += sum(_deep(x, seen) for x in o)
    elif hasattr(o, "__struct_fields__"):
        n += sum(_deep(getattr(o, k), seen) for k in o.__struct_fields__)
    elif hasattr(o, "__slots__"):
        n += sum(_deep(getattr(o, k), seen) for k in o.__slots__ if hasattr(o, k))
    return n


def breakdown(system: System) -> dict[str, int]:
    """Bytes per part of every user's state (shared objects counted where first met)."""
    seen: set[int] = set()
    parts = {"timeline": ("ts", "names", "raws", "sids", "events", "all_ts"),
             "matches": ("matches",),
             "sessions": ("sessions", "scache"), "profile": ("props",)}
    out = dict.fromkeys(parts, 0)
    for u in system.users.values():
        for part, slots in parts.items():
            out[part] += sum(_deep(getattr(u, k), seen) for k in slots if hasattr(u, k))
    return out


def once(w: Workload, decoded: list[tuple[str, str, int, Any, str | None, bytes | None]],
         count: bool, memory: bool = False) -> dict[str, Any]:
    system = build(w.now)
    evals = [0]
    if count:
        inner = System._evaluate

        def counted(self: System, u: Any, segs: Any, *a: Any, **kw: Any) -> Any:
            segs = list(segs)
            evals[0] += len(segs)  # Not counting dependents re-evaluated after a flip.
            return inner(self, u, segs, *a, **kw)
        System._evaluate = counted  # type: ignore[method-assign]
    try:
        out: list[Any] = []
        for p in w.profiles():
            system.apply_profile(p["user_id"], p["props"], w.now, out)
        gc.collect()
        evals[0] = 0
        if memory:
            parts0 = breakdown(system)
            tracemalloc.start()
            mem0 = tracemalloc.get_traced_memory()[0]
        cpu0 = time.process_time()
        for uid, name, ts, props, sid, raw in decoded:
            system.apply_event(uid, name, ts, props, sid, w.now, out, raw)
        cpu = time.process_time() - cpu0
        if memory:
            out.clear()
            gc.collect()
            mem = tracemalloc.get_traced_memory()[0] - mem0
            tracemalloc.stop()
    finally:
        if count:
            System._evaluate = inner  # type: ignore[method-assign]
    res = {"us_per_event": round(cpu / len(decoded) * 1e6, 2), "changes": len(out)}
    if memory:
        n = len(decoded)
        res["bytes_per_event"] = round(mem / n, 1)
        res["bytes_per_event_by_part"] = {
            k: round((v - parts0[k]) / n, 1) for k, v in breakdown(system).items()}
    if count:
        res["evals_per_event"] = round(evals[0] / len(decoded), 2)
    return res


def run(users: int, events: int, repeat: int = 3, count: bool = False,
        seed: int = 1, memory: bool = False) -> dict[str, Any]:
    w = Workload(users, events, 90, seed)
    dec = msgspec.json.Decoder(dict[str, Any]).decode
    decoded = []
    for ts, user, name, sid, props in w.rows:
        raw = props.encode() if props != "{}" else None
        decoded.append((w.uids[user], name, ts, dec(raw) if raw else {}, sid, raw))
    runs = [once(w, decoded, count) for _ in range(repeat)]
    if memory:
        runs[0].update({k: v for k, v in once(w, decoded, False, True).items()
                        if k.startswith("bytes")})
    res: dict[str, Any] = {"users": users, "events": events, "repeat": repeat,
                           "us_per_event_runs": [r["us_per_event"] for r in runs],
                           "us_per_event": statistics.median(r["us_per_event"] for r in runs),
                           "changes": runs[0]["changes"]}
    if count:
        res["evals_per_event"] = runs[0]["evals_per_event"]
    if memory:
        res["bytes_per_event"] = runs[0]["bytes_per_event"]
        res["bytes_per_event_by_part"] = runs[0]["bytes_per_event_by_part"]
    return res


def main() -> None:
    p = sized_parser(__doc__)
    p.add_argument("--count", action="store_true")
    p.add_argument("--memory", action="store_true")
    a = p.parse_args()
    res = run(*sized(a, QUICK, FULL), a.repeat, a.count, memory=a.memory)
    print_rows([(k, v) for k, v in res.items()])
    save("engine", res)


if __name__ == "__main__":
    main()
