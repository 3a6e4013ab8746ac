"""Restart on the same data dir, against the real server process (kill -9 and SIGTERM)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from segactors.timefmt import format_ts
from conftest import ok, wait_until
from serverproc import ServerProc, server_proc  # noqa: F401 - fixture

BUY_RECENT = {"name": "recent buyers", "window": {"last": "3s"},
              "rules": [{"kind": "did", "event": "buy"}]}
BUY_HOUR = {"name": "buyers this hour", "window": {"last": "1h"},
            "rules": [{"kind": "did", "event": "buy"}]}
NY = {"name": "New Yorkers", "rules": [{"kind": "profile", "property": "city", "op": "eq",
                                        "value": "NY"}]}
NEVER_BOUGHT = {"name": "never bought", "rules": [{"kind": "did_not", "event": "buy"}]}


def now_ms() -> int:
    return time.time_ns() // 1_000_000




def all_changes(c: httpx.Client, sid: str = "shop") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    since = 0
    for _ in range(1000):
        page = ok(c.get(f"/v1/systems/{sid}/changes", params={"since": since, "limit": 7}))
        out.extend(page["changes"])
        if not page["changes"]:
            return out
        since = page["next"]
    raise AssertionError("too many pages")


def all_members(c: httpx.Client, seg: str, sid: str = "shop") -> list[str]:
    out: list[str] = []
    after = ""
    for _ in range(1000):
        page = ok(c.get(f"/v1/systems/{sid}/segments/{seg}/members",
                        params={"after": after, "limit": 2}))
        out.extend(page["members"])
        if page["next"] is None:
            return out
        after = page["next"]
    raise AssertionError("too many pages")


def make_segments(c: httpx.Client, *defs: dict[str, Any]) -> list[str]:
    ids = [ok(c.post("/v1/systems/shop/segments", json=d), 201)["id"] for d in defs]
    wait_until(lambda: all(ok(c.get(f"/v1/systems/shop/segments/{i}"))["status"] == "active"
                           for i in ids))
    return ids


def settled(c: httpx.Client) -> int:
    """Wait until every change assigned so far is durable and shown by GET /changes."""
    def caught_up() -> int | None:
        seq = ok(c.get("/v1/systems/shop/segments/all-users/members"))["seq"]
        got = ok(c.get("/v1/systems/shop/changes", params={"since": max(0, seq - 1)}))
        return int(seq) + 1 if got["next"] == seq else None
    return int(wait_until(caught_up)) - 1


def snapshot(c: httpx.Client, users: list[str]) -> dict[str, Any]:
    settled(c)
    segs = ok(c.get("/v1/systems/shop/segments"))
    return {
        "systems": ok(c.get("/v1/systems")),
        "system": ok(c.get("/v1/systems/shop")),
        "segments": segs,
        "members": {s["id"]: all_members(c, s["id"]) for s in segs},
        "users": {u: ok(c.get(f"/v1/systems/shop/users/{u}")) for u in users},
        "user_segments": {u: ok(c.get(f"/v1/systems/shop/users/{u}/segments")) for u in users},
        "changes": all_changes(c),
    }


def test_kill_9_and_restart_restores_every_system_segment_member_user_and_change(
        server_proc: ServerProc) -> None:
    sp = server_proc
    with sp.http() as c:
        keys = ok(c.post("/v1/systems", json={"id": "shop"}), 201)
        ok(c.post("/v1/systems", json={"id": "blog"}), 201)
        hour, ny, never = make_segments(c, BUY_HOUR, NY, NEVER_BOUGHT)
        t = now_ms()
        ok(c.post("/v1/systems/shop/events", json=[
            {"id": "e1", "user_id": "u1", "name": "buy", "ts": t - 1000, "props": {"p": 9.5}},
            {"id": "e2", "user_id": "u2", "name": "view", "ts": t - 2000},
            {"id": "e3", "user_id": "u1", "name": "view", "ts": t - 500, "session_id": "s1"},
        ]), 202)
        ok(c.post("/v1/systems/shop/profiles", json=[
            {"user_id": "u1", "props": {"city": "NY", "plan": "pro"}},
            {"user_id": "u2", "props": {"city": "LA"}},
            {"user_id": "u3", "props": {"city": "NY", "test_user": True}},
        ]), 202)
        ok(c.post("/v1/systems/shop/profiles", json={"user_id": "u2", "props": {"city": "NY"}}),
           202)
        ok(c.post("/v1/systems/shop/profiles", json={"user_id": "u1", "props": {"city": None}}),
           202)
        users = ["u1", "u2", "u3"]
        before = snapshot(c, users)
    # The state the test built is what it expects, so "equal after restart" means something.
    assert before["members"][hour] == ["u1"]
    assert before["members"][ny] == ["u2", "u3"]
    assert before["members"][never] == ["u2", "u3"]
    assert before["members"]["all-users"] == users
    assert before["members"]["test-users"] == ["u3"]
    assert before["users"]["u1"]["events"] == 2
    assert before["users"]["u1"]["profile"]["plan"] == "pro"
    assert "city" not in before["users"]["u1"]["profile"]
    assert [ch["seq"] for ch in before["changes"]] == list(range(1, len(before["changes"]) + 1))
    assert len(before["changes"]) >= 8

    sp.kill()
    sp.start()
    with sp.http() as c:
        after = snapshot(c, users)
        assert after == before
        # The keys survive too: the write key still ingests, into the same seq sequence.
        last = before["changes"][-1]["seq"]
        r = httpx.post(sp.base_url + "/v1/systems/shop/events",
                       headers={"Authorization": f"Bearer {keys['write_key']}"},
                       json={"id": "e4", "user_id": "u4", "name": "view", "ts": now_ms()})
        ok(r, 202)
        settled(c)
        new = ok(c.get("/v1/systems/shop/changes", params={"since": last}))["changes"]
        assert [(ch["seq"], ch["segment"], ch["user_id"], ch["change"]) for ch in new] == [
            (last + 1, "all-users", "u4", "enter"), (last + 2, never, "u4", "enter")]
        # Duplicates are still recognised after the restart.
        assert ok(c.post("/v1/systems/shop/events", json={
            "id": "e1", "user_id": "u1", "name": "buy", "ts": t}), 202) == {
            "accepted": 0, "duplicates": 1}
        # And a second restart keeps counting from there.
    sp.kill()
    sp.start()
    with sp.http() as c:
        ok(c.post("/v1/systems/shop/profiles", json={"user_id": "u4", "props": {"city": "NY"}}),
           202)
        settled(c)
        tail = ok(c.get("/v1/systems/shop/changes", params={"since": last + 2}))["changes"]
        assert [(ch["seq"], ch["segment"], ch["user_id"], ch["change"]) for ch in tail] == [
            (last + 3, ny, "u4", "enter")]


def test_ids_holding_a_nul_character_survive_a_restart(server_proc: ServerProc) -> None:
    """Stored members and event ids are read back joined by NUL: ids holding one too are
    read back one by one, and still equal."""
    sp = server_proc
    users = ["a\u0000b", "a", "b", "c\u0000"]
    with sp.http() as c:
        ok(c.post("/v1/systems", json={"id": "shop"}), 201)
        (buyers,) = make_segments(c, BUY_HOUR)
        ok(c.post("/v1/systems/shop/events", json=[
            {"id": f"{u}\u0000{i}", "user_id": u, "name": "buy", "ts": now_ms()}
            for i, u in enumerate(users)]), 202)
        settled(c)
        assert all_members(c, buyers) == sorted(users)
        changes = all_changes(c)
        assert {ch["user_id"] for ch in changes} == set(users)
    sp.kill()
    sp.start()
    with sp.http() as c:
        assert all_members(c, buyers) == sorted(users)
        assert all_changes(c) == changes
        assert ok(c.post("/v1/systems/shop/events", json=[
            {"id": f"{u}\u0000{i}", "user_id": u, "name": "buy", "ts": now_ms()}
            for i, u in enumerate(users)] + [
            {"id": "a", "user_id": "a", "name": "buy", "ts": now_ms()}]), 202) == {
            "accepted": 1, "duplicates": 4}


def test_a_window_deadline_passed_while_down_is_emitted_on_restart_at_the_deadline_instant(
        server_proc: ServerProc) -> None:
    sp = server_proc
    with sp.http() as c:
        ok(c.post("/v1/systems", json={"id": "shop"}), 201)
        (recent,) = make_segments(c, BUY_RECENT)
        t0 = now_ms()
        ok(c.post("/v1/systems/shop/events", json={"user_id": "u1", "name": "buy", "ts": t0}),
           202)
        settled(c)
        changes = all_changes(c)
        assert [(ch["segment"], ch["change"]) for ch in changes] == [
            ("all-users", "enter"), (recent, "enter")]
    sp.kill()
    assert now_ms() < t0 + 3000, "the machine is too slow for this test's 3 s window"
    time.sleep(max(0.0, (t0 + 3400 - now_ms()) / 1000))
    started = now_ms()
    sp.start()
    with sp.http() as c:
        got = wait_until(lambda: all_changes(c)[2:])
        assert got == [{"seq": 3, "segment": recent, "user_id": "u1", "change": "leave",
                        "at": format_ts(t0 + 3000)}]
        assert t0 + 3000 < started  # It really was due while the server was down.
        assert all_members(c, recent) == []


def test_an_event_acknowledged_with_202_survives_a_kill_9_right_after(
        server_proc: ServerProc) -> None:
    sp = server_proc
    with sp.http() as c:
        ok(c.post("/v1/systems", json={"id": "shop"}), 201)
        t = now_ms()
        batch = [{"id": f"k{i}", "user_id": f"u{i % 7}", "name": "view", "ts": t - i}
                 for i in range(300)]
        assert ok(c.post("/v1/systems/shop/events", json=batch), 202) == {
            "accepted": 300, "duplicates": 0}
        assert ok(c.post("/v1/systems/shop/profiles",
                         json={"user_id": "u0", "props": {"tier": "gold"}}), 202)
        sp.kill()  # At once, no pause: the 202 promised durability.
    sp.start()
    with sp.http() as c:
        assert ok(c.get("/v1/systems/shop"))["events"] == 300
        u0 = ok(c.get("/v1/systems/shop/users/u0"))
        assert u0["events"] == len(range(0, 300, 7))
        assert u0["profile"]["tier"] == "gold"
        assert ok(c.post("/v1/systems/shop/events", json=batch), 202) == {
            "accepted": 0, "duplicates": 300}


def test_sigterm_shutdown_keeps_the_data(server_proc: ServerProc) -> None:
    sp = server_proc
    with sp.http() as c:
        ok(c.post("/v1/systems", json={"id": "shop"}), 201)
        (ny,) = make_segments(c, NY)
        ok(c.post("/v1/systems/shop/profiles", json={"user_id": "u1", "props": {"city": "NY"}}),
           202)
        before = snapshot(c, ["u1"])
    sp.stop()
    sp.start()
    with sp.http() as c:
        assert snapshot(c, ["u1"]) == before
        assert all_members(c, ny) == ["u1"]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] in "ZX"  # Exited (a zombie until reaped).
    except FileNotFoundError:
        return True


def test_the_helper_processes_end_with_the_server_even_on_kill_9(tmp_path: Path) -> None:
    """Writes go through a writer process, event ids through an id process: neither may
    outlive a killed server (the writer would hold the database, both a process slot),
    nor one that stops normally."""
    for stop in ("kill", "stop"):
        sp = ServerProc(tmp_path / stop)
        try:
            sp.start()
            assert sp.proc is not None
            helpers = _children(sp.proc.pid)
            assert len(helpers) == 2 and not any(map(_gone, helpers))
            getattr(sp, stop)()
            assert wait_until(lambda: all(map(_gone, helpers)), timeout=10)
        finally:
            sp.kill()


def test_sigterm_exits_with_code_0(tmp_path: Path) -> None:
    sp = ServerProc(tmp_path / "data")
    try:
        sp.start()
        assert sp.stop() == 0
    finally:
        sp.kill()


async def test_after_a_restart_writes_are_acknowledged_while_histories_load_and_applied_after(
        tmp_path: Path) -> None:
    """Members are served at once; an event posted while the histories load is durable
    (202) before they are loaded, and applied after them, over the whole history (3 buys in
    all: the user enters); a duplicate of a stored event is known as one meanwhile."""
    import asyncio

    from conftest import FakeClock
    from segactors.config import Config
    from segactors.server import Server
    from segactors.wire import EventIn, ProfileIn

    clock = FakeClock()
    cfg = dict(data_dir=tmp_path, root_token="t", clock=clock, load_slice=2)
    first = Server(Config(**cfg))  # type: ignore[arg-type]
    await first.start(background=False)
    system = await first.create_system("shop")
    seg = await first.create_segment(system, {"name": "3 buys in NY", "rules": [
        {"kind": "did", "event": "buy", "count": {"op": "gte", "value": 3}},
        {"kind": "profile", "property": "city", "op": "eq", "value": "NY"}]})
    await first.run_backfills()
    await first.ingest_profiles(system, [ProfileIn(u, {"city": "NY"}) for u in "abc"])
    await first.ingest_events(system, [EventIn(u, "buy", clock.now, id=f"e{i}")
                                       for i, u in enumerate("aabbb")])
    assert list(seg.members) == ["b"]
    await first.stop()

    srv = Server(Config(**cfg))  # type: ignore[arg-type]
    # The histories' load is held (after its first slice) until the writes below are in.
    go_on = asyncio.Event()
    srv._between_slices = go_on.wait  # type: ignore[method-assign]
    await srv.start()
    try:
        assert not srv.ready.is_set()
        restored = srv.systems["shop"]
        for _ in range(3):
            await asyncio.sleep(0)
        # Profiles load in slices as events do: the loop serves in between.
        assert sorted(u for u, a in restored.users.items() if a.props) == ["a", "b"]
        assert list(restored.segments[seg.id].members) == ["b"]
        got = await asyncio.wait_for(srv.ingest_events(restored, [
            EventIn("a", "buy", clock.now, id="late"), EventIn("b", "buy", clock.now, id="e4"),
        ]), 10)
        assert got == (1, 1) and not srv.ready.is_set()
        assert await srv.ingest_profiles(restored, [ProfileIn("b", {"city": "LA"})]) == 1
        assert not srv.ready.is_set()
        go_on.set()
        await asyncio.wait_for(srv.ready.wait(), 10)
        assert list(restored.segments[seg.id].members) == ["a"]
        assert [(c.user_id, c.change) for c in srv.logs["shop"].since(0)][-2:] == [
            ("a", "enter"), ("b", "leave")]
    finally:
        await srv.stop()

    again = Server(Config(**cfg))  # type: ignore[arg-type]
    await again.start(background=False)
    try:
        assert list(again.systems["shop"].segments[seg.id].members) == ["a"]
        assert len(again.systems["shop"].users["a"].ts) == 3
    finally:
        await again.stop()


async def test_stored_event_ids_are_known_after_a_restart_also_from_a_database_without_their_table(
        tmp_path: Path) -> None:
    """Ids are read back from a table of their own, per system; a database written before
    that table existed gets it filled from its events when first opened."""
    import sqlite3

    from conftest import FakeClock
    from segactors.config import Config
    from segactors.server import Server
    from segactors.wire import EventIn

    clock = FakeClock()
    cfg = dict(data_dir=tmp_path, root_token="t", clock=clock)

    async def restart_and_post() -> dict[str, tuple[int, int]]:
        srv = Server(Config(**cfg))  # type: ignore[arg-type]
        await srv.start(background=False)
        try:
            return {sid: await srv.ingest_events(srv.systems[sid], [
                EventIn("u", "buy", clock.now, id=eid) for eid in ("a", "b", "c", "d")])
                for sid in ("shop", "blog")}
        finally:
            await srv.stop()

    first = Server(Config(**cfg))  # type: ignore[arg-type]
    await first.start(background=False)
    for sid, ids in (("shop", "ab"), ("blog", "c")):
        system = await first.create_system(sid)
        await first.ingest_events(system, [EventIn("u", "buy", clock.now, id=i) for i in ids]
                                  + [EventIn("u", "view", clock.now)])
    await first.stop()
    with sqlite3.connect(tmp_path / "segactors.db") as db:
        assert sorted(db.execute("SELECT system, id FROM event_ids")) == [
            ("blog", "c"), ("shop", "a"), ("shop", "b")]
        db.execute("DROP TABLE event_ids")
        db.execute("DELETE FROM meta WHERE key='event_ids'")
    # Each system's earlier ids are duplicates there and only there.
    assert await restart_and_post() == {"shop": (2, 2), "blog": (3, 1)}
    # What the last run accepted is known too.
    assert await restart_and_post() == {"shop": (0, 4), "blog": (0, 4)}


async def test_stored_event_ids_move_to_compact_buckets_after_a_restart_and_stay_known(
        tmp_path: Path) -> None:
    """Ids read back at start (by the id process) are staged in a plain set, so writes are
    taken sooner; the process then moves them into the compact buckets between requests."""
    from conftest import FakeClock
    from segactors.config import Config
    from segactors.server import Server
    from segactors.wire import EventIn

    clock = FakeClock()
    cfg = dict(data_dir=tmp_path, root_token="t", clock=clock)
    first = Server(Config(**cfg))  # type: ignore[arg-type]
    await first.start(background=False)
    system = await first.create_system("shop")
    await first.ingest_events(system, [EventIn("u", "buy", clock.now, id=f"e{i}")
                                       for i in range(50)])
    await first.stop()
    srv = Server(Config(**cfg))  # type: ignore[arg-type]
    await srv.start()
    try:
        await asyncio.wait_for(srv.wait_ready(), 10)
        for _ in range(1000):
            kept, staged = await srv.ids.count("shop")
            if not staged:
                break
            await asyncio.sleep(0.01)
        assert (kept, staged) == (50, 0)
        got = await srv.ingest_events(srv.systems["shop"], [
            EventIn("u", "buy", clock.now, id=eid) for eid in ("e0", "e49", "e50")])
        assert got == (1, 2)
        assert await srv.ids.count("shop") == (51, 0)
    finally:
        await srv.stop()
