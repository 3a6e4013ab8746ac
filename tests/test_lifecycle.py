"""Segment lifecycle: pending first computation, dependencies, the Calculate dry run."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from conftest import FakeClock
from segactors.config import Config
from segactors.server import Server
from segactors.supervisor import Status
from segactors.wire import EventIn
from test_time import new_segment, send, wait_for


def members(client: TestClient, seg: str) -> list[str]:
    return list(client.get(f"/v1/systems/shop/segments/{seg}/members").json()["members"])


def test_first_computation_sets_members_without_emitting_enters(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    send(client, *({"user_id": f"u{i}", "name": "buy" if i % 2 else "view", "ts": clock.now}
                   for i in range(10)))
    seg = new_segment(client, {"name": "buyers", "rules": [{"kind": "did", "event": "buy"}]})
    assert members(client, seg) == sorted(f"u{i}" for i in range(1, 10, 2))
    r = client.get("/v1/systems/shop/changes", params={"segment": seg})
    assert r.json()["changes"] == []
    send(client, {"user_id": "u0", "name": "buy", "ts": clock.now})
    r = client.get("/v1/systems/shop/changes", params={"segment": seg})
    assert [(c["user_id"], c["change"]) for c in r.json()["changes"]] == [("u0", "enter")]


def test_a_change_of_one_segment_reevaluates_its_dependents_at_once(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    a = new_segment(client, {"name": "a", "rules": [{"kind": "did", "event": "buy"}]})
    b = new_segment(client, {"name": "b", "rules": [
        {"kind": "not_in_segment", "segment": a},
        {"kind": "in_segment", "segment": "all-users"}]})
    send(client, {"user_id": "u1", "name": "view", "ts": clock.now})
    assert members(client, b) == ["u1"]
    send(client, {"user_id": "u1", "name": "buy", "ts": clock.now})
    assert members(client, a) == ["u1"]
    assert members(client, b) == []
    r = client.delete(f"/v1/systems/shop/segments/{a}")
    assert r.status_code == 409


def test_estimate_counts_members_of_an_unsaved_definition(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    send(client, *({"user_id": f"u{i}", "name": "buy", "ts": clock.now,
                    "props": {"amount": i}} for i in range(20)))
    before = client.get("/v1/systems/shop").json()
    r = client.post("/v1/systems/shop/estimate", json={"name": "x", "rules": [
        {"kind": "did", "event": "buy", "where": [
            {"property": "amount", "op": "gte", "value": 15}]}]})
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    assert body["users"] == 5
    assert set(body["sample"]) <= {f"u{i}" for i in range(15, 20)} and body["sample"]
    assert client.get("/v1/systems/shop").json() == before


async def test_ingestion_is_acknowledged_while_a_segment_is_computed_over_100k_users(
        tmp_path: Path, clock: FakeClock) -> None:
    srv = Server(Config(data_dir=tmp_path, root_token="t", clock=clock, backfill_slice=100))
    await srv.start(background=False)
    try:
        system = await srv.create_system("shop")
        for start in range(0, 100_000, 10_000):
            await srv.ingest_events(system, [EventIn(f"u{i:06d}", "view", clock.now)
                                             for i in range(start, start + 10_000)])
        seg = await srv.create_segment(system, {"name": "viewers", "rules": [
            {"kind": "did", "event": "view"}]})
        backfill = asyncio.create_task(srv.run_backfills())
        await asyncio.sleep(0)
        assert seg.status is Status.PENDING
        # Events posted while the first computation runs are acknowledged...
        late = [EventIn("late", "view", clock.now), EventIn("u000001", "view", clock.now)]
        ingest = asyncio.create_task(srv.ingest_events(system, late))
        # ...and the loop keeps turning: the computation yields after every slice.
        turns = 0
        while not backfill.done():
            turns += 1
            await asyncio.sleep(0)
        assert turns >= 100_000 // 100 // 2
        assert await ingest == (2, 0)
        # ...and counted once it is done.
        assert seg.status is Status.ACTIVE
        assert len(seg.members) == 100_001
    finally:
        await srv.stop()


def test_a_segment_depending_on_two_that_change_together_is_evaluated_once(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    a = new_segment(client, {"name": "a", "rules": [{"kind": "did", "event": "buy"}]})
    b = new_segment(client, {"name": "b", "rules": [{"kind": "did", "event": "buy",
                                                     "count": {"op": "gte", "value": 1}}]})
    c = new_segment(client, {"name": "c", "match": "any", "rules": [
        {"kind": "in_segment", "segment": a}, {"kind": "in_segment", "segment": b}]})
    send(client, {"user_id": "u1", "name": "buy", "ts": clock.now})
    assert members(client, c) == ["u1"]
    r = client.get("/v1/systems/shop/changes", params={"segment": c})
    assert [(x["user_id"], x["change"]) for x in r.json()["changes"]] == [("u1", "enter")]
