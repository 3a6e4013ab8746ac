"""The id process: exact dedupe of event ids, in arrival order, across restarts."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
from pathlib import Path

import pytest

from segactors.errors import Unavailable
from segactors.ids import Ids
from segactors.store import SCHEMA


def _db(path: Path, stored: list[tuple[str, str]], systems: list[str]) -> Path:
    db = path / "segactors.db"
    con = sqlite3.connect(db)
    con.executescript(SCHEMA)
    con.executemany("INSERT INTO systems VALUES (?, 'k', 's', 0)", [(s,) for s in systems])
    con.executemany("INSERT INTO event_ids (system, id) VALUES (?, ?)", stored)
    con.commit()
    con.close()
    return db


async def _opened(db: Path) -> Ids:
    ids = Ids(db)
    await ids.open(others=[])
    await asyncio.wait_for(ids.loaded.wait(), 10)
    return ids


async def test_requests_answered_in_arrival_order_match_a_set(tmp_path: Path) -> None:
    """Random batches (repeats within and across batches, several systems, odd ids), sent
    without waiting for answers: each id is new exactly when a set, fed in the same order,
    did not hold it. (JSON bodies cannot hold lone surrogates: msgspec refuses them.)"""
    rng = random.Random(7)
    pool = [f"e{i}" for i in range(300)] + ["", "a\0b", "\0", "é", "e1 ", "😀"]
    stored = [("a", eid) for eid in rng.sample(pool, 40)] + [("b", "e1")]
    ids = await _opened(_db(tmp_path, stored, ["a", "b"]))
    try:
        model = {"a": {e for s, e in stored if s == "a"}, "b": {"e1"}, "c": set()}
        sent, futs = [], []
        for _ in range(60):
            sid = rng.choice("abc")
            batch = [rng.choice(pool) for _ in range(rng.randrange(0, 30))]
            sent.append((sid, batch))
            futs.append(asyncio.ensure_future(ids.add(sid, batch)))
        got = await asyncio.gather(*futs)
        for (sid, batch), answer in zip(sent, got):
            want = []
            for eid in batch:
                want.append(eid not in model[sid])
                model[sid].add(eid)
            assert list(answer) == want
        for sid, kept in model.items():
            assert (await ids.count(sid))[0] == len(kept)
    finally:
        await ids.close()


async def test_discarded_ids_are_new_again_and_stored_ones_are_known(tmp_path: Path) -> None:
    ids = await _opened(_db(tmp_path, [("shop", "x"), ("shop", "y")], ["shop"]))
    try:
        assert await ids.add("shop", ["x", "z", "z", "w"]) == bytes([0, 1, 0, 1])
        await ids.discard("shop", ["z", "x"])
        assert await ids.add("shop", ["z", "x", "y", "w"]) == bytes([1, 1, 0, 0])
        assert await ids.count("shop") == (4, 0)
    finally:
        await ids.close()


async def test_a_dead_id_process_fails_requests_with_503(tmp_path: Path) -> None:
    """Requests waiting on it, and later ones, fail as unavailable; none hangs."""
    ids = await _opened(_db(tmp_path, [], ["shop"]))
    try:
        assert await ids.add("shop", ["a"]) == b"\x01"
        assert ids._proc is not None and ids._proc.pid is not None
        os.kill(ids._proc.pid, signal.SIGKILL)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(ids.add("shop", ["b"]), 10)
        with pytest.raises(Unavailable):
            await ids.add("shop", ["c"])
    finally:
        await ids.close()


async def test_ingest_answers_503_and_applies_nothing_once_the_id_process_is_gone(
        tmp_path: Path) -> None:
    from conftest import FakeClock
    from segactors.config import Config
    from segactors.server import Server
    from segactors.wire import EventIn

    clock = FakeClock()
    srv = Server(Config(data_dir=tmp_path, root_token="t", clock=clock))
    await srv.start(background=False)
    try:
        system = await srv.create_system("shop")
        assert await srv.ingest_events(system, [EventIn("u", "buy", clock.now, id="e1")]) == (1, 0)
        assert srv.ids._proc is not None and srv.ids._proc.pid is not None
        os.kill(srv.ids._proc.pid, signal.SIGKILL)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(srv.ingest_events(
                system, [EventIn("v", "buy", clock.now, id="e2")]), 10)
        assert system.events == 1 and "v" not in system.users
    finally:
        await srv.stop()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_stored_ids_move_to_buckets_then_the_process_sleeps(tmp_path: Path) -> None:
    """Staged at load, moved into buckets between requests; once none is left staged the
    process waits for requests instead of spinning."""
    stored = [("shop", f"e{i}") for i in range(2000)]
    ids = await _opened(_db(tmp_path, stored, ["shop"]))
    try:
        for _ in range(500):
            kept, staged = await ids.count("shop")
            if not staged:
                break
            await asyncio.sleep(0.01)
        assert (kept, staged) == (2000, 0)
        assert ids._proc is not None and ids._proc.pid is not None
        before = _cpu_seconds(ids._proc.pid)
        await asyncio.sleep(0.5)
        assert _cpu_seconds(ids._proc.pid) - before < 0.25
        assert await ids.add("shop", ["e0", "e1999", "e2000"]) == bytes([0, 0, 1])
    finally:
        await ids.close()


async def test_ids_that_cannot_be_read_fail_requests_with_503(tmp_path: Path) -> None:
    """A database the process cannot read (not SQLite) makes ingest answer 503, not hang."""
    db = tmp_path / "segactors.db"
    db.write_bytes(b"not a database" * 100)
    ids = Ids(db)
    await ids.open(others=[])
    try:
        await asyncio.wait_for(ids.loaded.wait(), 10)
        with pytest.raises(Unavailable, match="could not read the stored event ids"):
            await asyncio.wait_for(ids.add("shop", ["a"]), 10)
    finally:
        await ids.close()
