"""Time-driven changes land at their exact instant, on an injected clock."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.testclient import TestClient

from conftest import MS, FakeClock, wait_until
from segactors.timefmt import format_ts


def wait_for(fn: Any, timeout: float = 10_000 * MS) -> Any:
    """Poll ``fn`` until it returns something truthy (bounded, in scalable units)."""
    return wait_until(fn, timeout, 10 * MS)


def settle(client: TestClient) -> None:
    """Run, on the server's loop, every time-driven change due at the clock's instant,
    and wait until what that emitted is durable and published: after this, a change that
    was due has been read by ``changes_of``, and one that is not due has not happened."""
    srv = client.app.state.server  # type: ignore[attr-defined]

    async def drain() -> None:
        while srv.run_due():
            await asyncio.sleep(0)
        await srv.store.write([])  # Commits (and their pushes) complete in order.

    client.portal.call(drain)  # type: ignore[union-attr]


def new_segment(client: TestClient, definition: dict[str, Any]) -> str:
    r = client.post("/v1/systems/shop/segments", json=definition)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    wait_for(lambda: client.get(f"/v1/systems/shop/segments/{sid}").json()["status"] == "active")
    return str(sid)


def changes_of(client: TestClient, seg: str) -> list[dict[str, Any]]:
    r = client.get("/v1/systems/shop/changes", params={"segment": seg, "since": 0})
    return list(r.json()["changes"])


def send(client: TestClient, *events: dict[str, Any]) -> None:
    r = client.post("/v1/systems/shop/events", json=list(events))
    assert r.status_code == 202, r.text


def test_user_leaves_a_sliding_window_exactly_window_length_after_the_event(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    seg = new_segment(client, {"name": "w", "rules": [
        {"kind": "did", "event": "buy", "window": {"last": "5s"}}]})
    t0 = clock.now
    send(client, {"user_id": "u1", "name": "buy", "ts": t0})
    clock.advance(4999)
    settle(client)
    assert [c["change"] for c in changes_of(client, seg)] == ["enter"]
    clock.advance(1)
    got = wait_for(lambda: len(changes_of(client, seg)) == 2 and changes_of(client, seg))
    assert got[1]["change"] == "leave"
    assert got[1]["at"] == format_ts(t0 + 5000)


def test_cart_without_purchase_enters_at_cart_time_plus_within(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    seg = new_segment(client, {"name": "abandoned", "rules": [
        {"kind": "did_then_not", "event": "cart", "then_not": {"event": "buy"},
         "within": "10m"}]})
    t0 = clock.now
    send(client, {"user_id": "a", "name": "cart", "ts": t0},
         {"user_id": "b", "name": "cart", "ts": t0},
         {"user_id": "b", "name": "buy", "ts": t0 + 1000})
    clock.advance(600_000 - 1)
    settle(client)
    assert changes_of(client, seg) == []
    clock.advance(1)
    got = wait_for(lambda: changes_of(client, seg))
    assert [(c["user_id"], c["change"], c["at"]) for c in got] == [
        ("a", "enter", format_ts(t0 + 600_000))]


def test_future_dated_event_counts_once_the_clock_reaches_it(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    seg = new_segment(client, {"name": "f", "rules": [{"kind": "did", "event": "buy"}]})
    t1 = clock.now + 3_600_000
    send(client, {"user_id": "u1", "name": "launch", "ts": clock.now},
         {"user_id": "u1", "name": "buy", "ts": t1})
    settle(client)
    assert changes_of(client, seg) == []
    user = client.get("/v1/systems/shop/users/u1").json()
    assert user["events"] == 2
    assert user["profile"]["last_seen"] == format_ts(clock.now)
    clock.now = t1
    got = wait_for(lambda: changes_of(client, seg))
    assert [(c["change"], c["at"]) for c in got] == [("enter", format_ts(t1))]
    user = client.get("/v1/systems/shop/users/u1").json()
    assert user["profile"]["last_seen"] == format_ts(t1)


def test_profile_date_enters_and_leaves_the_range_at_its_edges(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    seg = new_segment(client, {"name": "appointment in 5 days", "rules": [
        {"kind": "profile_time", "property": "appt", "from": "+5d", "to": "+6d"}]})
    day = 86_400_000
    appt = clock.now + 7 * day
    r = client.post("/v1/systems/shop/profiles",
                    json={"user_id": "u1", "props": {"appt": format_ts(appt)}})
    assert r.status_code == 202
    # Holds while now + 5d <= appt < now + 6d, i.e. now in (appt - 6d, appt - 5d].
    clock.now = appt - 6 * day + 1
    got = wait_for(lambda: changes_of(client, seg))
    assert [(c["change"], c["at"]) for c in got] == [("enter", format_ts(appt - 6 * day + 1))]
    clock.now = appt - 5 * day + 1
    got = wait_for(lambda: len(changes_of(client, seg)) == 2 and changes_of(client, seg))
    assert (got[1]["change"], got[1]["at"]) == ("leave", format_ts(appt - 5 * day + 1))


def test_membership_is_frozen_from_ends_at_on(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    ends = clock.now + 10_000
    seg = new_segment(client, {"name": "e", "ends_at": format_ts(ends), "rules": [
        {"kind": "did", "event": "buy", "window": {"last": "20s"}}]})
    send(client, {"user_id": "u1", "name": "buy", "ts": clock.now})
    clock.now = ends
    wait_for(lambda: client.get(f"/v1/systems/shop/segments/{seg}").json()["status"]
             == "expired")
    send(client, {"user_id": "u2", "name": "buy", "ts": clock.now})
    clock.advance(30_000)  # u1's event leaves the window after ends_at: no leave.
    settle(client)
    assert [(c["user_id"], c["change"]) for c in changes_of(client, seg)] == [("u1", "enter")]
    members = client.get(f"/v1/systems/shop/segments/{seg}/members").json()["members"]
    assert members == ["u1"]


def test_stopped_user_enters_when_recent_activity_ages_out(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    seg = new_segment(client, {"name": "stopped", "rules": [
        {"kind": "stopped", "event": "login", "before": "30s", "recent": "10s"}]})
    t0 = clock.now
    send(client, {"user_id": "u1", "name": "login", "ts": t0})
    # In (now-30s, now-10s] and none in (now-10s, now]: from t0+10s until t0+30s.
    clock.now = t0 + 10_000
    got = wait_for(lambda: changes_of(client, seg))
    assert (got[0]["change"], got[0]["at"]) == ("enter", format_ts(t0 + 10_000))
    clock.now = t0 + 30_000
    got = wait_for(lambda: len(changes_of(client, seg)) == 2 and changes_of(client, seg))
    assert (got[1]["change"], got[1]["at"]) == ("leave", format_ts(t0 + 30_000))
