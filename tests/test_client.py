"""The Python client (clients/python) against the real server process."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sys
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

from segactors_client import (  # noqa: E402
    Change, Memberships, SegactorsClient, SegactorsError, StreamGone,
)
from serverproc import ServerProc, server_proc  # noqa: E402,F401 - fixture

NY = {"name": "New Yorkers",
      "rules": [{"kind": "profile", "property": "city", "op": "eq", "value": "NY"}]}


async def take(it: Any, n: int, timeout: float = 10.0) -> list[Any]:
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(it.__anext__(), timeout))
    return out


async def all_changes(sa: SegactorsClient, since: int = 0) -> list[Change]:
    return [c async for c in sa.changes("shop", since=since, page_size=3)]


async def settled(sa: SegactorsClient) -> int:
    for _ in range(300):
        seq = (await sa.members_page("shop", "all-users", limit=1))["seq"]
        got = await all_changes(sa, max(0, seq - 1))
        if (got[-1].seq if got else 0) == seq:
            return int(seq)
        await asyncio.sleep(0.02)
    raise AssertionError("the log never settled")


def test_the_http_helpers_create_ingest_list_page_and_delete(server_proc: ServerProc) -> None:
    async def run() -> None:
        async with SegactorsClient(server_proc.base_url, server_proc.root_token) as sa:
            keys = await sa.create_system("shop")
            assert set(keys) == {"id", "write_key", "secret"}
            with pytest.raises(SegactorsError) as e:
                await sa.create_system("shop")
            assert (e.value.status, e.value.code) == (409, "conflict")
            seg = await sa.create_segment("shop", NY)
            assert (await sa.wait_active("shop", seg["id"]))["status"] == "active"
            async with SegactorsClient(server_proc.base_url, keys["write_key"]) as w:
                assert await w.ingest_profiles("shop", [
                    {"user_id": f"u{i:02d}", "props": {"city": "NY" if i % 3 else "LA"}}
                    for i in range(10)]) == {"accepted": 10, "duplicates": 0}
                assert await w.ingest_events("shop", {"id": "e1", "user_id": "u00",
                                                      "name": "buy", "ts": 1}) == {
                    "accepted": 1, "duplicates": 0}
            members = [m async for m in sa.members("shop", seg["id"], page_size=2)]
            assert members == [f"u{i:02d}" for i in range(10) if i % 3]
            assert [s["id"] for s in await sa.list_segments("shop", q="york")] == [seg["id"]]
            renamed = await sa.update_segment("shop", seg["id"], name="NYC")
            assert renamed["name"] == "NYC"
            assert (await sa.get_user("shop", "u00"))["events"] == 1
            assert (await sa.get_system("shop"))["users"] == 10
            tok = hmac.new(keys["secret"].encode(), b"u01", hashlib.sha256).hexdigest()
            async with SegactorsClient(server_proc.base_url) as anon:
                got = await anon.user_segments("shop", "u01", user_token=tok)
                assert got["segments"] == ["all-users", seg["id"]]
            await settled(sa)
            log = await all_changes(sa)
            assert [c.seq for c in log] == list(range(1, 17))
            assert all(isinstance(c, Change) for c in log)
            await sa.delete_segment("shop", seg["id"])
            with pytest.raises(SegactorsError) as e:
                await sa.get_segment("shop", seg["id"])
            assert e.value.status == 404

    asyncio.run(run())


def test_stream_delivers_changes_as_typed_objects(server_proc: ServerProc) -> None:
    async def run() -> None:
        async with SegactorsClient(server_proc.base_url, server_proc.root_token) as sa:
            await sa.create_system("shop")
            seg = (await sa.create_segment("shop", NY))["id"]
            await sa.wait_active("shop", seg)
            # From seq 0, so a change made before the subscription lands is not missed.
            it = sa.stream("shop", segments=[seg], since=0).__aiter__()
            first = asyncio.ensure_future(it.__anext__())
            await sa.ingest_profiles("shop", {"user_id": "u1", "props": {"city": "NY"}})
            c = await asyncio.wait_for(first, 10)
            assert isinstance(c, Change)
            assert (c.seq, c.segment, c.user_id, c.change) == (2, seg, "u1", "enter")
            assert c == (await all_changes(sa, 1))[0]
            await it.aclose()

    asyncio.run(run())


def test_stream_survives_a_kill_9_and_restart_without_gap_or_duplicate(
        server_proc: ServerProc) -> None:
    sp = server_proc

    async def run() -> None:
        async with SegactorsClient(sp.base_url, sp.root_token, first_backoff=0.05,
                                   max_backoff=0.5, max_retries=100) as sa:
            await sa.create_system("shop")
            seg = (await sa.create_segment("shop", NY))["id"]
            await sa.wait_active("shop", seg)
            await sa.ingest_profiles("shop", [{"user_id": f"a{i}", "props": {"city": "NY"}}
                                              for i in range(5)])
            it = sa.stream("shop", "*", since=0).__aiter__()
            before = await take(it, 10)
            assert [c.seq for c in before] == list(range(1, 11))
            sp.kill()
            sp.start()  # Same port and data dir: the client reconnects on its own.
            await sa.ingest_profiles("shop", [{"user_id": f"a{i}", "props": {"city": "LA"}}
                                              for i in range(3)])
            await sa.ingest_profiles("shop", {"user_id": "b1", "props": {"city": "NY"}})
            after = await take(it, 5)
            assert [c.seq for c in before + after] == list(range(1, 16))
            assert before + after == await all_changes(sa)
            await it.aclose()

    asyncio.run(run())


def test_watch_user_yields_memberships_then_only_that_users_changes_across_a_restart(
        server_proc: ServerProc) -> None:
    sp = server_proc

    async def run() -> None:
        async with SegactorsClient(sp.base_url, sp.root_token) as sa:
            keys = await sa.create_system("shop")
            seg = (await sa.create_segment("shop", NY))["id"]
            await sa.wait_active("shop", seg)
            await sa.ingest_profiles("shop", {"user_id": "u1", "props": {"city": "NY"}})
            tok = hmac.new(keys["secret"].encode(), b"u1", hashlib.sha256).hexdigest()
            async with SegactorsClient(sp.base_url, first_backoff=0.05, max_backoff=0.5,
                                       max_retries=100) as app:
                it = app.watch_user("shop", "u1", tok).__aiter__()
                (snap,) = await take(it, 1)
                assert snap == Memberships("u1", ("all-users", seg), 2)
                await sa.ingest_profiles("shop", [{"user_id": "u2", "props": {"city": "NY"}},
                                                  {"user_id": "u1", "props": {"city": "LA"}}])
                (left,) = await take(it, 1)
                assert (left.segment, left.user_id, left.change) == (seg, "u1", "leave")
                sp.kill()
                sp.start()
                await sa.ingest_profiles("shop", {"user_id": "u1", "props": {"city": "NY"}})
                got = await take(it, 2)
                assert isinstance(got[0], Memberships) and got[0].user_id == "u1"
                assert isinstance(got[1], Change)
                assert (got[1].seq, got[1].change) == (left.seq + 1, "enter")
                await it.aclose()
                async with aclosing(app.watch_user("shop", "u1", "0" * 64)) as bad:
                    with pytest.raises(SegactorsError) as e:
                        await take(bad, 1)
                assert e.value.code == "unauthorized"

    asyncio.run(run())


def test_stream_raises_stream_gone_when_the_log_no_longer_reaches_since(tmp_path: Path) -> None:
    sp = ServerProc(tmp_path / "data", overrides={"change_retention_count": 2})
    try:
        sp.start()

        async def run() -> None:
            async with SegactorsClient(sp.base_url, sp.root_token, max_retries=0) as sa:
                await sa.create_system("shop")
                await sa.ingest_profiles("shop", [{"user_id": f"u{i}", "props": {}}
                                                  for i in range(5)])
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    try:
                        await all_changes(sa)
                    except StreamGone:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the log was never trimmed")
                async with aclosing(sa.stream("shop", "*", since=0)) as it:
                    with pytest.raises(StreamGone):
                        await take(it, 1)
                async with aclosing(sa.stream("shop", "*", since=3)) as it:
                    got = await take(it, 2)
                assert [c.seq for c in got] == [4, 5]

        asyncio.run(run())
    finally:
        sp.kill()
