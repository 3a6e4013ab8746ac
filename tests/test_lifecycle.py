"""Segment lifecycle: pending first computation, dependencies, the Calculate dry run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from conftest import FakeClock, make_client
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


def test_ingestion_is_acknowledged_while_a_segment_is_computed_over_100k_users(
        tmp_path: Path, clock: FakeClock) -> None:
    with make_client(tmp_path, clock, backfill_slice=500) as client:
        assert client.post("/v1/systems", json={"id": "shop"}).status_code == 201
        for start in range(0, 100_000, 10_000):
            send(client, *({"user_id": f"u{i:06d}", "name": "view", "ts": clock.now}
                           for i in range(start, start + 10_000)))
        r = client.post("/v1/systems/shop/segments", json={
            "name": "viewers", "rules": [{"kind": "did", "event": "view"}]})
        seg = r.json()["id"]
        # Acknowledged while the first computation is still running...
        send(client, {"user_id": "late", "name": "view", "ts": clock.now})
        send(client, {"user_id": "u000001", "name": "view", "ts": clock.now})
        assert client.get(f"/v1/systems/shop/segments/{seg}").json()["status"] == "pending"
        wait_for(lambda: client.get(f"/v1/systems/shop/segments/{seg}").json()["status"]
                 == "active", timeout=60)
        # ...and counted once it is done.
        assert client.get(f"/v1/systems/shop/segments/{seg}").json()["size"] == 100_001
