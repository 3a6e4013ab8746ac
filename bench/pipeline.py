"""The server's ingest path in this process, without HTTP: CPU per event of the event loop's
process and of its helper processes (the SQLite writer and the id process).

    python -m bench.pipeline [--quick] [--users N] [--events N] [--repeat 3] [--slice 16 ...]

A ``Server`` (the real one: its writer and id processes, SQLite with ``synchronous=FULL``,
a temporary data dir) gets the 20 segments and the profiles, then the workload's events,
already decoded, through ``Server.ingest_events`` in batches of 5000 with two requests in
flight, as ``bench.ingest`` posts them. Left out: HTTP and JSON decoding (about 15 % of
the server's time in ``bench.ingest``'s profile). Each ``--slice`` value (the
``ingest_slice_alone`` setting: no small request is in flight here, so batches go in
slices of that many events) runs ``--repeat`` times, the values taking turns, and the
medians are reported: changes to how a batch is applied, committed and acknowledged are
compared here, where runs differ by a few percent, not by the ±15 % of runs over HTTP on a
shared machine.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.common import print_rows, save, sized, sized_parser
from bench.serverproc import cpu_seconds
from bench.workload import Workload, resolve_refs, segments
from segactors.config import Config
from segactors.server import Server
from segactors.wire import EventIn, ProfileIn

QUICK = {"users": 10_000, "events": 200_000}
FULL = {"users": 100_000, "events": 2_000_000}
BATCH = 5000


async def once(w: Workload, profiles: list[list[ProfileIn]], batches: list[list[EventIn]],
               ingest_slice: int) -> dict[str, float]:
    data_dir = tempfile.mkdtemp(prefix="segactors-pipeline-")
    srv = Server(Config(data_dir=Path(data_dir), root_token="bench", clock=lambda: w.now,
                        ingest_slice_alone=ingest_slice))
    await srv.start(background=False)
    try:
        system = await srv.create_system("bench")
        ids: dict[str, str] = {}
        for spec in segments(w.now):
            ids[spec["name"]] = (await srv.create_segment(system, resolve_refs(spec, ids))).id
        await srv.run_backfills()
        for p in profiles:
            await srv.ingest_profiles(system, p)
        assert srv.store._proc is not None and srv.ids._proc is not None
        helpers = [srv.store._proc.pid, srv.ids._proc.pid]
        todo = iter(batches)

        async def requests() -> None:
            for b in todo:
                await srv.ingest_events(system, b)

        h0 = cpu_seconds(helpers)
        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(requests(), requests())
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        helper_cpu = cpu_seconds(helpers) - h0
    finally:
        await srv.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    n = sum(map(len, batches))
    return {"events_per_s": n / wall, "us_per_event": cpu / n * 1e6,
            "helpers_us_per_event": helper_cpu / n * 1e6}


def run(users: int, events: int, repeat: int = 3, slices: tuple[int, ...] = (16,),
        seed: int = 1) -> dict[str, Any]:
    w = Workload(users, events, 90, seed)
    events_of = msgspec.json.Decoder(list[EventIn]).decode
    profiles_of = msgspec.json.Decoder(list[ProfileIn]).decode
    batches = [events_of(b) for b in w.batches(BATCH)]
    profiles = [profiles_of(b) for b in w.profile_batches(BATCH)]
    runs: dict[int, list[dict[str, float]]] = {s: [] for s in slices}
    for _ in range(repeat):
        for s in slices:
            runs[s].append(asyncio.run(once(w, profiles, batches, s)))
    res: dict[str, Any] = {"users": users, "events": events, "repeat": repeat}
    for s, rs in runs.items():
        for k in ("events_per_s", "us_per_event", "helpers_us_per_event"):
            vals = [r[k] for r in rs]
            res[f"slice {s}: {k}"] = round(statistics.median(vals), 2)
            res[f"slice {s}: {k} runs"] = [round(v, 2) for v in vals]
    return res


def main() -> None:
    p = sized_parser(__doc__)
    p.add_argument("--slice", type=int, nargs="+", default=[Config.ingest_slice_alone])
    a = p.parse_args()
    res = run(*sized(a, QUICK, FULL), a.repeat, tuple(a.slice))
    print_rows([(k, v) for k, v in res.items()])
    save("pipeline", res)


if __name__ == "__main__":
    main()
