"""A large batch is applied slice by slice: requests that arrive meanwhile are applied
between its slices (short ones while a small request is in flight), and the change log,
in memory and stored, stays in seq order."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from conftest import FakeClock
from segactors.config import Config
from segactors.server import Server, stored_changes
from segactors.wire import EventIn

SLICE = 4  # While a request of at most this many events is in flight.
ALONE = 32  # While none is.
BATCH = 400


async def test_single_events_are_applied_between_a_batchs_slices_and_logged_in_order(
        tmp_path: Path, clock: FakeClock) -> None:
    cfg = Config(data_dir=tmp_path, root_token="t", clock=clock, ingest_slice=SLICE,
                 ingest_slice_alone=ALONE)
    srv = Server(cfg)
    await srv.start(background=False)
    try:
        system = await srv.create_system("shop")
        batch = [EventIn(f"b{i:03d}", "buy", clock.now) for i in range(BATCH)]
        singles = [[EventIn(f"s{i:02d}", "buy", clock.now)] for i in range(40)]

        async def later(turns: int, events: list[EventIn]) -> tuple[int, int]:
            for _ in range(turns):
                await asyncio.sleep(0)
            return await srv.ingest_events(system, events)

        # The single events arrive one after another (a turn of the loop or two apart)
        # while the batch goes a slice a turn.
        got = await asyncio.gather(srv.ingest_events(system, batch),
                                   *(later(2 * i, s) for i, s in enumerate(singles)))
        assert got == [(BATCH, 0)] + [(1, 0)] * len(singles)
        listed = srv.logs["shop"].since(0)
        # Every change once, in seq order...
        assert [c.seq for c in listed] == list(range(1, BATCH + len(singles) + 1))
        assert {c.user_id for c in listed} == {e.user_id for e in batch} | {
            s[0].user_id for s in singles}
        assert all(c.segment == "all-users" and c.change == "enter" for c in listed)
        # ...the singles' spread among the batch's: none waited for the whole batch.
        order = "".join(c.user_id[0] for c in listed)
        assert order.index("s") < order.rindex("s") < order.rindex("b")
        assert order.count("bs") >= 10, order
        # The first slice, before any single arrived, was a long one; while singles are
        # in flight, slices are short.
        assert order.index("s") == ALONE, order
        runs = sorted(len(r) for r in order[order.index("s"):order.rindex("s")].split("s") if r)
        assert runs[len(runs) // 2] <= 2 * SLICE, order
    finally:
        await srv.stop()
    con = sqlite3.connect(tmp_path / "segactors.db")
    try:
        assert stored_changes(con, "shop") == listed
        stored = {r[0] for r in con.execute("SELECT user_id FROM members WHERE segment=?",
                                            ("all-users",))}
        assert stored == {c.user_id for c in listed}
        assert con.execute("SELECT count(*) FROM events").fetchone()[0] == BATCH + len(singles)
    finally:
        con.close()
