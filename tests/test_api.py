"""The HTTP contract of API.md: status codes, error shape, auth, ingestion, segments, reads.

Every rejected request is also checked to leave the system's counts as they were.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_MS, FakeClock, make_client
from starlette.testclient import TestClient

from segactors.definition import Limits

SHOP = "/v1/systems/shop"
DAY = 86_400_000
HORIZON = 7 * DAY
RFC3339_MS_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")


# Helpers


def ev(user: str, name: str = "view", ts: Any = BASE_MS, **extra: Any) -> dict[str, Any]:
    return {"user_id": user, "name": name, "ts": ts, **extra}


def did(event: str = "view", **fields: Any) -> dict[str, Any]:
    return {"kind": "did", "event": event, **fields}


def group(*rules: dict[str, Any], match: Any = "all") -> dict[str, Any]:
    return {"kind": "group", "match": match, "rules": list(rules)}


def definition(name: str = "Viewers", *rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"name": name, "rules": list(rules) or [did()], **top}


def post_raw(client: TestClient, path: str, body: str | bytes,
             content_type: str | None = "application/json",
             headers: dict[str, str] | None = None) -> Any:
    h = dict(headers or {})
    if content_type is not None:
        h["Content-Type"] = content_type
    return client.post(path, content=body, headers=h)


def counts(client: TestClient, sid: str = "shop") -> tuple[int, int, int]:
    r = client.get(f"/v1/systems/{sid}")
    assert r.status_code == 200, r.text
    b = r.json()
    return b["users"], b["events"], b["segments"]


def error_of(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert the contract's error shape and status; return the inner error object."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) <= {"code", "message", "details"}, err
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    if "details" in err:
        assert isinstance(err["details"], list)
    if code is not None:
        assert err["code"] == code, err
    return err


def bad_indexes(err: dict[str, Any]) -> set[int]:
    return {d["index"] for d in err["details"]}


def wait_active(client: TestClient, seg_id: str, sid: str = "shop") -> dict[str, Any]:
    deadline = time.monotonic() + 2.0
    while True:
        r = client.get(f"/v1/systems/{sid}/segments/{seg_id}")
        assert r.status_code == 200, r.text
        seg = r.json()
        if seg["status"] == "active":
            return seg
        assert seg["status"] == "pending", seg
        assert time.monotonic() < deadline, f"segment {seg_id} still {seg['status']}"
        time.sleep(0.01)


def create_segment(client: TestClient, defn: dict[str, Any], sid: str = "shop") -> dict[str, Any]:
    r = client.post(f"/v1/systems/{sid}/segments", json=defn)
    assert r.status_code == 201, r.text
    return wait_active(client, r.json()["id"], sid)


def ingest(client: TestClient, *events: dict[str, Any], sid: str = "shop") -> dict[str, Any]:
    r = client.post(f"/v1/systems/{sid}/events", json=list(events))
    assert r.status_code == 202, r.text
    return r.json()


def profile(client: TestClient, user: str, props: dict[str, Any]) -> None:
    r = client.post(f"{SHOP}/profiles", json={"user_id": user, "props": props})
    assert r.status_code == 202, r.text


def wait_log(client: TestClient, seq: int, sid: str = "shop", since: int = 0) -> None:
    """Wait until the change log shows ``seq``: changes are listed once durable."""
    deadline = time.monotonic() + 2.0
    while True:
        r = client.get(f"/v1/systems/{sid}/changes", params={"since": since})
        assert r.status_code == 200, r.text
        if r.json()["next"] >= seq:
            return
        assert time.monotonic() < deadline, f"seq {seq} never listed: {r.json()}"
        time.sleep(0.01)


def user_token(secret: str, user_id: str) -> str:
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def nested_array(levels: int) -> str:
    return "[" * levels + "]" * levels


def nested_definition(groups: int, value: Any) -> dict[str, Any]:
    """A definition whose nesting is ``2 * groups + 6`` when ``value`` is a flat list."""
    rule: dict[str, Any] = did(where=[{"property": "p", "op": "in", "value": value}])
    for _ in range(groups):
        rule = group(rule)
    return definition("Deep", rule)


@pytest.fixture
def custom(tmp_path: Path, clock: FakeClock) -> Iterator[Any]:
    """``custom(**overrides)``: a client with overridden limits and a system ``shop``."""
    opened: list[TestClient] = []

    def make(**overrides: Any) -> tuple[TestClient, dict[str, str]]:
        c = make_client(tmp_path / f"c{len(opened)}", clock, **overrides)
        c.__enter__()
        opened.append(c)
        r = c.post("/v1/systems", json={"id": "shop"})
        assert r.status_code == 201, r.text
        return c, r.json()

    yield make
    for c in opened:
        c.__exit__(None, None, None)


# Systems


def test_creating_a_system_returns_201_with_its_id_write_key_and_secret(
        client: TestClient) -> None:
    r = client.post("/v1/systems", json={"id": "shop"})
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"id", "write_key", "secret"}
    assert body["id"] == "shop"
    assert body["write_key"] and body["secret"] and body["write_key"] != body["secret"]


def test_creating_a_system_that_exists_is_409_and_keeps_its_keys(
        client: TestClient, shop: dict[str, str]) -> None:
    error_of(client.post("/v1/systems", json={"id": "shop"}), 409, "conflict")
    r = client.post(f"{SHOP}/events", json=ev("u1"),
                    headers={"Authorization": f"Bearer {shop['write_key']}"})
    assert r.status_code == 202
    assert [s["id"] for s in client.get("/v1/systems").json()] == ["shop"]


@pytest.mark.parametrize("body", [{}, {"id": ""}, {"id": 5}, {"id": "a/b"},
                                  {"id": "x", "extra": 1}, []])
def test_a_system_body_that_breaks_the_contract_is_422_and_creates_nothing(
        client: TestClient, body: Any) -> None:
    error_of(client.post("/v1/systems", json=body), 422, "invalid")
    assert client.get("/v1/systems").json() == []


def test_systems_list_and_get_count_known_users_accepted_events_and_segments(
        client: TestClient, shop: dict[str, str]) -> None:
    client.post("/v1/systems", json={"id": "blog"})
    assert counts(client) == (0, 0, 2)  # the two built-ins
    ingest(client, ev("u1", id="a"), ev("u1", id="b"), ev("u2", id="a"))  # one duplicate
    profile(client, "u3", {})  # an empty profile update makes a user known
    create_segment(client, definition())
    assert counts(client) == (2, 2, 3)  # u2's only event was a duplicate: u2 is unknown
    listed = {s["id"]: s for s in client.get("/v1/systems").json()}
    assert listed == {
        "shop": {"id": "shop", "users": 2, "events": 2, "segments": 3},
        "blog": {"id": "blog", "users": 0, "events": 0, "segments": 2},
    }
    assert client.get(SHOP).json() == listed["shop"]


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/systems/nope"),
    ("POST", "/v1/systems/nope/events"),
    ("POST", "/v1/systems/nope/profiles"),
    ("GET", "/v1/systems/nope/segments"),
    ("POST", "/v1/systems/nope/segments"),
    ("GET", "/v1/systems/nope/users/u1"),
    ("GET", "/v1/systems/nope/users/u1/segments"),
    ("GET", "/v1/systems/nope/changes"),
])
def test_an_unknown_system_is_404(client: TestClient, method: str, path: str) -> None:
    body = ev("u1") if path.endswith("events") else (
        {"user_id": "u1", "props": {}} if path.endswith("profiles") else definition())
    r = client.request(method, path, json=body if method == "POST" else None)
    error_of(r, 404, "not_found")
    assert client.get("/v1/systems").json() == []


# Auth

ROUTES = [
    ("GET", "/v1/systems"),
    ("POST", "/v1/systems"),
    ("GET", SHOP),
    ("POST", f"{SHOP}/events"),
    ("POST", f"{SHOP}/profiles"),
    ("GET", f"{SHOP}/segments"),
    ("POST", f"{SHOP}/segments"),
    ("GET", f"{SHOP}/segments/all-users"),
    ("PATCH", f"{SHOP}/segments/all-users"),
    ("DELETE", f"{SHOP}/segments/all-users"),
    ("GET", f"{SHOP}/segments/all-users/members"),
    ("POST", f"{SHOP}/estimate"),
    ("GET", f"{SHOP}/users/u1"),
    ("GET", f"{SHOP}/users/u1/segments"),
    ("GET", f"{SHOP}/changes"),
]


def body_for(path: str) -> Any:
    if path.endswith("/events"):
        return ev("u1")
    if path.endswith("/profiles"):
        return {"user_id": "u1", "props": {"plan": "pro"}}
    if path == "/v1/systems":
        return {"id": "other"}
    if path.endswith("/all-users"):
        return {"name": "renamed"}
    return definition()


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Bearer ", "Basic dGVzdA=="])
@pytest.mark.parametrize("method,path", ROUTES)
def test_a_missing_or_wrong_token_is_401_and_changes_nothing(
        client: TestClient, shop: dict[str, str], method: str, path: str,
        auth: str | None) -> None:
    profile(client, "u1", {})
    before = counts(client)
    headers = {"Authorization": auth or ""}
    r = client.request(method, path, headers=headers,
                       json=body_for(path) if method in ("POST", "PATCH") else None)
    error_of(r, 401, "unauthorized")
    assert counts(client) == before
    assert [s["id"] for s in client.get("/v1/systems").json()] == ["shop"]
    assert client.get(f"{SHOP}/segments/all-users").json()["name"] == "all-users"


def test_a_write_key_ingests_events_and_profiles_for_its_own_system(
        client: TestClient, shop: dict[str, str]) -> None:
    wk = {"Authorization": f"Bearer {shop['write_key']}"}
    r = client.post(f"{SHOP}/events", json=[ev("u1"), ev("u2")], headers=wk)
    assert (r.status_code, r.json()) == (202, {"accepted": 2, "duplicates": 0})
    r = client.post(f"{SHOP}/profiles", json={"user_id": "u3", "props": {"a": 1}}, headers=wk)
    assert r.status_code == 202
    assert counts(client) == (3, 2, 2)


@pytest.mark.parametrize("method,path", [
    (m, p) for m, p in ROUTES if not p.endswith(("/events", "/profiles"))])
def test_a_write_key_outside_ingestion_is_403_and_changes_nothing(
        client: TestClient, shop: dict[str, str], method: str, path: str) -> None:
    profile(client, "u1", {})
    before = counts(client)
    r = client.request(method, path, headers={"Authorization": f"Bearer {shop['write_key']}"},
                       json=body_for(path) if method in ("POST", "PATCH") else None)
    error_of(r, 403, "forbidden")
    assert counts(client) == before
    assert [s["id"] for s in client.get("/v1/systems").json()] == ["shop"]
    assert client.get(f"{SHOP}/segments/all-users").json()["name"] == "all-users"


@pytest.mark.parametrize("kind", ["events", "profiles"])
def test_a_write_key_of_another_system_is_403_and_changes_nothing(
        client: TestClient, shop: dict[str, str], kind: str) -> None:
    blog = client.post("/v1/systems", json={"id": "blog"}).json()
    r = client.post(f"{SHOP}/{kind}", json=body_for(f"/{kind}"),
                    headers={"Authorization": f"Bearer {blog['write_key']}"})
    error_of(r, 403, "forbidden")
    assert counts(client) == (0, 0, 2)
    assert counts(client, "blog") == (0, 0, 2)


# Body decoding: 400, 413, 415


@pytest.mark.parametrize("path", [f"{SHOP}/events", f"{SHOP}/profiles", f"{SHOP}/segments",
                                  "/v1/systems", f"{SHOP}/estimate"])
@pytest.mark.parametrize("body", ['{"user_id": "u1",', "not json", "", "[1, 2,]",
                                  '{"a": 1} {"b": 2}', "\xff"])
def test_a_body_that_is_not_json_is_400_and_changes_nothing(
        client: TestClient, shop: dict[str, str], path: str, body: str) -> None:
    error_of(post_raw(client, path, body.encode("latin-1")), 400, "bad_json")
    assert counts(client) == (0, 0, 2)
    assert [s["id"] for s in client.get("/v1/systems").json()] == ["shop"]


@pytest.mark.parametrize("path", [f"{SHOP}/events", f"{SHOP}/profiles", f"{SHOP}/segments",
                                  "/v1/systems"])
def test_a_body_of_exactly_32_levels_is_judged_and_33_levels_is_400(
        client: TestClient, shop: dict[str, str], path: str) -> None:
    error_of(post_raw(client, path, nested_array(32)), 422, "invalid")
    error_of(post_raw(client, path, nested_array(33)), 400, "bad_json")
    deep_obj = '{"user_id": ' * 33 + "1" + "}" * 33
    error_of(post_raw(client, path, deep_obj), 400, "bad_json")
    error_of(post_raw(client, path, nested_array(100_000)), 400, "bad_json")
    assert counts(client) == (0, 0, 2)


def test_a_segment_of_exactly_32_levels_is_created_and_one_of_33_is_400(custom: Any) -> None:
    c, _ = custom(definition_limits=Limits(rules=100, depth=100, filters=20))
    ok = json.dumps(nested_definition(13, ["a"]))  # 2 * 13 + 6 = 32 levels
    r = post_raw(c, f"{SHOP}/segments", ok)
    assert r.status_code == 201, r.text
    too_deep = json.dumps(nested_definition(13, [["a"]]) | {"name": "Deeper"})
    error_of(post_raw(c, f"{SHOP}/segments", too_deep), 400, "bad_json")
    assert counts(c) == (0, 0, 3)


def test_an_event_batch_over_max_body_is_413_and_one_at_the_limit_is_accepted(
        custom: Any) -> None:
    c, _ = custom(max_body=300)
    body = json.dumps([ev("u1", id="e1", props={"pad": ""})])
    exact = body.replace('"pad": ""', '"pad": "' + "x" * (300 - len(body)) + '"')
    assert len(exact.encode()) == 300
    over = exact.replace('"pad": "', '"pad": "y')
    error_of(post_raw(c, f"{SHOP}/events", over), 413, "too_large")
    assert counts(c) == (0, 0, 2)
    r = post_raw(c, f"{SHOP}/events", exact)
    assert (r.status_code, r.json()) == (202, {"accepted": 1, "duplicates": 0})


@pytest.mark.parametrize("path", [f"{SHOP}/profiles", f"{SHOP}/segments", "/v1/systems"])
def test_other_bodies_over_max_body_are_413_and_change_nothing(
        custom: Any, path: str) -> None:
    c, _ = custom(max_body=300)
    big = "x" * 400
    body = {"user_id": "u1", "props": {"p": big}} if path.endswith("profiles") else (
        definition("Big", description=big) if path.endswith("segments") else {"id": big})
    error_of(c.post(path, json=body), 413, "too_large")
    assert counts(c) == (0, 0, 2)
    assert len(c.get("/v1/systems").json()) == 1


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/jsonx", "text/json"])
@pytest.mark.parametrize("path", [f"{SHOP}/events", f"{SHOP}/profiles", f"{SHOP}/segments",
                                  "/v1/systems", f"{SHOP}/segments/all-users"])
def test_a_content_type_that_is_not_application_json_is_415_and_changes_nothing(
        client: TestClient, shop: dict[str, str], path: str, content_type: str | None) -> None:
    method = "PATCH" if path.endswith("all-users") else "POST"
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = client.request(method, path, content=json.dumps(body_for(path)), headers=headers)
    error_of(r, 415, "unsupported_media_type")
    assert counts(client) == (0, 0, 2)
    assert len(client.get("/v1/systems").json()) == 1


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8",
                                          "application/json;charset=UTF-8", "Application/JSON"])
def test_media_type_parameters_of_application_json_are_ignored(
        client: TestClient, shop: dict[str, str], content_type: str) -> None:
    r = post_raw(client, f"{SHOP}/events", json.dumps(ev("u1")), content_type)
    assert (r.status_code, r.json()) == (202, {"accepted": 1, "duplicates": 0})
    r = post_raw(client, f"{SHOP}/segments", json.dumps(definition()), content_type)
    assert r.status_code == 201


# Events: 422 and all-or-nothing


def test_a_batch_over_max_batch_is_422_and_one_at_the_limit_is_accepted(custom: Any) -> None:
    c, _ = custom(max_batch=3)
    error_of(c.post(f"{SHOP}/events", json=[ev(f"u{i}") for i in range(4)]), 422, "invalid")
    # Also when the items themselves are malformed.
    error_of(c.post(f"{SHOP}/events", json=[{"x": i} for i in range(4)]), 422, "invalid")
    error_of(c.post(f"{SHOP}/profiles", json=[{"user_id": f"u{i}", "props": {}}
                                              for i in range(4)]), 422, "invalid")
    assert counts(c) == (0, 0, 2)
    assert c.post(f"{SHOP}/events", json=[ev(f"u{i}") for i in range(3)]).json() == {
        "accepted": 3, "duplicates": 0}


@pytest.mark.parametrize("raw_ts", [
    "1767225600000.0", "1.7672256e12", "true", "null", '"1767225600000"',
    '"2026-01-01t00:00:00Z"', '"2026-01-01T00:00:00z"', '"2026-01-01T00:00:00"',
    '"2026-01-01 00:00:00Z"', '"2026-02-30T00:00:00Z"', '"2026-01-01T00:00Z"',
    '"2026-01-01T00:00:00+0100"', '"2026-01-01"', '""', "{}", "[]",
])
def test_an_event_whose_ts_is_not_a_timestamp_is_422_naming_it(
        client: TestClient, shop: dict[str, str], raw_ts: str) -> None:
    body = '{"user_id": "u1", "name": "view", "ts": %s}' % raw_ts
    err = error_of(post_raw(client, f"{SHOP}/events", body), 422, "invalid")
    assert bad_indexes(err) == {0}
    assert counts(client) == (0, 0, 2)


@pytest.mark.parametrize("ts", ["2026-01-01T01:00:00+01:00", "2026-01-01T00:00:00.123456Z",
                                BASE_MS, "2025-12-31T23:59:59-00:30"])
def test_an_event_with_an_rfc3339_or_integer_ts_is_accepted(
        client: TestClient, shop: dict[str, str], ts: Any) -> None:
    assert ingest(client, ev("u1", ts=ts)) == {"accepted": 1, "duplicates": 0}


def test_an_event_more_than_7_days_ahead_is_422_and_at_7_days_is_accepted(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    err = error_of(client.post(f"{SHOP}/events", json=ev("u1", ts=clock.now + HORIZON + 1)),
                   422, "invalid")
    assert bad_indexes(err) == {0}
    assert counts(client) == (0, 0, 2)
    assert ingest(client, ev("u1", ts=clock.now + HORIZON)) == {"accepted": 1, "duplicates": 0}


def test_a_future_event_counts_in_events_but_not_in_first_or_last_seen_until_now_reaches_it(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    future = clock.now + 3 * DAY
    ingest(client, ev("u1", ts=future))
    assert counts(client) == (1, 1, 2)
    u = client.get(f"{SHOP}/users/u1").json()
    assert u["events"] == 1
    assert u["profile"] == {}
    ingest(client, ev("u1", ts=clock.now - 1000))
    u = client.get(f"{SHOP}/users/u1").json()
    assert u["events"] == 2
    assert u["profile"] == {"first_seen": "2025-12-31T23:59:59.000Z",
                            "last_seen": "2025-12-31T23:59:59.000Z"}
    clock.advance(3 * DAY)
    u = client.get(f"{SHOP}/users/u1").json()
    assert u["profile"] == {"first_seen": "2025-12-31T23:59:59.000Z",
                            "last_seen": "2026-01-04T00:00:00.000Z"}


@pytest.mark.parametrize("bad", [
    {"props": {"a": {"b": 1}}}, {"props": {"a": [1]}}, {"props": {"a": []}}, {"props": []},
    {"user_id": ""}, {"user_id": 5}, {"name": ""}, {"name": None}, {"id": 7}, {"id": ""},
    {"session_id": 3}, {"unknown": 1},
])
def test_an_event_that_breaks_the_contract_is_422(
        client: TestClient, shop: dict[str, str], bad: dict[str, Any]) -> None:
    err = error_of(client.post(f"{SHOP}/events", json=ev("u1") | bad), 422, "invalid")
    assert bad_indexes(err) == {0}
    assert counts(client) == (0, 0, 2)


@pytest.mark.parametrize("missing", ["user_id", "name", "ts"])
def test_an_event_missing_a_required_field_is_422(
        client: TestClient, shop: dict[str, str], missing: str) -> None:
    e = ev("u1")
    del e[missing]
    err = error_of(client.post(f"{SHOP}/events", json=[ev("u0"), e]), 422, "invalid")
    assert bad_indexes(err) == {1}
    assert counts(client) == (0, 0, 2)


@pytest.mark.parametrize("body", [5, "event", None, True, [1, "x"]])
def test_an_event_body_that_is_not_an_object_or_array_of_objects_is_422(
        client: TestClient, shop: dict[str, str], body: Any) -> None:
    error_of(post_raw(client, f"{SHOP}/events", json.dumps(body)), 422, "invalid")
    assert counts(client) == (0, 0, 2)


def test_a_batch_with_one_bad_event_is_rejected_whole_and_changes_nothing(
        client: TestClient, shop: dict[str, str]) -> None:
    err = error_of(client.post(f"{SHOP}/events", json=[
        ev("u1", id="a"), ev("u2", id="b"), ev("u3", ts=1767225600000.5), ev("u4", id="c"),
    ]), 422, "invalid")
    assert bad_indexes(err) == {2}
    assert counts(client) == (0, 0, 2)
    error_of(client.get(f"{SHOP}/users/u1"), 404)
    # The ids of the rejected batch were not reserved.
    assert ingest(client, ev("u1", id="a"), ev("u4", id="c")) == {"accepted": 2, "duplicates": 0}


def test_a_batch_names_every_bad_index_whatever_is_wrong_with_each(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    batch = [
        ev("u1"),
        ev("u2", ts="2026-01-01t00:00:00Z"),  # not RFC 3339
        ev("u3"),
        ev("u4", props={"a": {"b": 1}}),  # nested props
        {"user_id": "u5", "ts": BASE_MS},  # no name
        ev("u6", ts=clock.now + HORIZON + 1),  # too far ahead
        ev("u7", ts=1767225600000.0),  # float ts
    ]
    err = error_of(client.post(f"{SHOP}/events", json=batch), 422, "invalid")
    assert bad_indexes(err) == {1, 3, 4, 5, 6}
    assert all(isinstance(d["message"], str) and d["message"] for d in err["details"])
    assert counts(client) == (0, 0, 2)


def test_a_batch_whose_only_problems_are_timestamps_names_each_of_them(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    batch = [ev("u1", ts=clock.now + HORIZON + 1), ev("u2"), ev("u3", ts="2026-01-01T00:00:00")]
    err = error_of(client.post(f"{SHOP}/events", json=batch), 422, "invalid")
    assert bad_indexes(err) == {0, 2}
    assert counts(client) == (0, 0, 2)


# Events: dedupe


def test_an_event_id_accepted_in_an_earlier_request_is_a_duplicate(
        client: TestClient, shop: dict[str, str]) -> None:
    assert ingest(client, ev("u1", id="e1")) == {"accepted": 1, "duplicates": 0}
    assert ingest(client, ev("u1", id="e1"), ev("u1", id="e2")) == {
        "accepted": 1, "duplicates": 1}
    assert counts(client) == (1, 2, 2)
    assert client.get(f"{SHOP}/users/u1").json()["events"] == 2


def test_an_event_id_repeated_within_one_batch_counts_once(
        client: TestClient, shop: dict[str, str]) -> None:
    assert ingest(client, ev("u1", id="x"), ev("u2", id="x"), ev("u1", id="y"),
                  ev("u1", id="x")) == {"accepted": 2, "duplicates": 2}
    assert counts(client) == (1, 2, 2)  # u2's only event was a duplicate


def test_events_without_an_id_are_never_duplicates(
        client: TestClient, shop: dict[str, str]) -> None:
    assert ingest(client, ev("u1"), ev("u1")) == {"accepted": 2, "duplicates": 0}
    assert ingest(client, ev("u1")) == {"accepted": 1, "duplicates": 0}
    assert counts(client) == (1, 3, 2)


def test_a_single_event_object_is_accepted_like_a_batch_of_one(
        client: TestClient, shop: dict[str, str]) -> None:
    r = client.post(f"{SHOP}/events", json=ev("u1", id="s", session_id="s1",
                                                props={"a": 1, "b": "x", "c": None, "d": 1.5}))
    assert (r.status_code, r.json()) == (202, {"accepted": 1, "duplicates": 0})
    r = client.post(f"{SHOP}/events", json=ev("u1", id="s"))
    assert (r.status_code, r.json()) == (202, {"accepted": 0, "duplicates": 1})


# Profiles


def test_a_profile_update_sets_properties_and_null_removes_one(
        client: TestClient, shop: dict[str, str]) -> None:
    profile(client, "u1", {"plan": "pro", "age": 30, "vip": True})
    profile(client, "u1", {"plan": None, "age": 31, "gone": None})
    u = client.get(f"{SHOP}/users/u1").json()
    assert u == {"user_id": "u1", "profile": {"age": 31, "vip": True},
                 "segments": ["all-users"], "events": 0}


def test_profile_updates_in_a_batch_apply_in_order(
        client: TestClient, shop: dict[str, str]) -> None:
    r = client.post(f"{SHOP}/profiles", json=[
        {"user_id": "u1", "props": {"a": 1}}, {"user_id": "u1", "props": {"a": None, "b": 2}},
        {"user_id": "u1", "props": {"b": 3}}])
    assert (r.status_code, r.json()["accepted"]) == (202, 3)
    assert client.get(f"{SHOP}/users/u1").json()["profile"] == {"b": 3}


def test_test_user_true_puts_the_user_into_test_users_and_false_takes_it_out(
        client: TestClient, shop: dict[str, str]) -> None:
    profile(client, "u1", {"test_user": True})
    profile(client, "u2", {"test_user": "true"})  # a string is not `true`
    assert client.get(f"{SHOP}/users/u1").json()["segments"] == ["all-users", "test-users"]
    assert client.get(f"{SHOP}/users/u2").json()["segments"] == ["all-users"]
    members = client.get(f"{SHOP}/segments/test-users/members").json()["members"]
    assert members == ["u1"]
    profile(client, "u1", {"test_user": False})
    assert client.get(f"{SHOP}/users/u1").json()["segments"] == ["all-users"]
    assert client.get(f"{SHOP}/segments/test-users").json()["size"] == 0


@pytest.mark.parametrize("prop", ["first_seen", "last_seen"])
@pytest.mark.parametrize("value", ["2026-01-01T00:00:00.000Z", BASE_MS, None])
def test_a_profile_update_that_sets_first_seen_or_last_seen_is_422(
        client: TestClient, shop: dict[str, str], prop: str, value: Any) -> None:
    profile(client, "u0", {"a": 1})
    err = error_of(client.post(f"{SHOP}/profiles", json=[
        {"user_id": "u1", "props": {"ok": 1}}, {"user_id": "u0", "props": {prop: value}}]),
        422, "invalid")
    assert bad_indexes(err) == {1}
    assert counts(client) == (1, 0, 2)
    assert client.get(f"{SHOP}/users/u0").json()["profile"] == {"a": 1}


@pytest.mark.parametrize("bad", [
    {"user_id": "u1", "props": {"a": {"b": 1}}}, {"user_id": "u1", "props": {"a": [1]}},
    {"user_id": "u1"}, {"props": {}}, {"user_id": "", "props": {}},
    {"user_id": "u1", "props": {}, "extra": 1}, {"user_id": "u1", "props": []},
])
def test_a_profile_update_that_breaks_the_contract_is_422(
        client: TestClient, shop: dict[str, str], bad: dict[str, Any]) -> None:
    err = error_of(client.post(f"{SHOP}/profiles", json=[{"user_id": "u9", "props": {}}, bad]),
                   422, "invalid")
    assert bad_indexes(err) == {1}
    assert counts(client) == (0, 0, 2)


def test_a_profile_batch_names_both_shape_and_read_only_problems(
        client: TestClient, shop: dict[str, str]) -> None:
    err = error_of(client.post(f"{SHOP}/profiles", json=[
        {"user_id": "u1", "props": {"first_seen": 1}},
        {"user_id": "u2", "props": {"ok": 1}},
        {"user_id": "u3", "props": {"a": [1]}},
    ]), 422, "invalid")
    assert bad_indexes(err) == {0, 2}
    assert counts(client) == (0, 0, 2)


# Segments: create, read, list


def test_creating_a_segment_returns_201_and_the_segment_object(
        client: TestClient, shop: dict[str, str]) -> None:
    ingest(client, ev("u1"), ev("u2", name="other"))
    defn = definition("Viewers", did(), did("view", count={"op": "gte", "value": 1}),
                      description="saw a page", window={"last": "30d"},
                      ends_at="2027-01-01T01:00:00+01:00")
    r = client.post(f"{SHOP}/segments", json=defn)
    assert r.status_code == 201, r.text
    seg = r.json()
    assert {"id", "name", "description", "definition", "status", "size", "rules", "window",
            "ends_at", "created_at", "created_by", "builtin"} <= set(seg)
    assert re.fullmatch(r"[A-Za-z0-9_\-~.]+", seg["id"])
    assert seg["id"] not in ("all-users", "test-users")
    assert seg["name"] == "Viewers" and seg["description"] == "saw a page"
    assert seg["status"] in ("pending", "active")
    assert seg["rules"] == 2
    assert seg["window"] == {"last": "30d"}
    assert seg["ends_at"] == "2027-01-01T00:00:00.000Z"
    assert seg["created_at"] == "2026-01-01T00:00:00.000Z"
    assert RFC3339_MS_Z.match(seg["created_at"])
    assert seg["builtin"] is False
    assert seg["definition"]["rules"] == defn["rules"]
    active = wait_active(client, seg["id"])
    assert active["size"] == 1
    assert client.get(f"{SHOP}/segments/{seg['id']}/members").json()["members"] == ["u1"]
    assert counts(client) == (2, 2, 3)


def test_a_segment_without_window_or_ends_at_shows_them_as_null(
        client: TestClient, shop: dict[str, str]) -> None:
    seg = create_segment(client, definition())
    assert seg["window"] is None and seg["ends_at"] is None
    assert seg["size"] == 0 and seg["status"] == "active"


def test_two_segments_get_distinct_ids(client: TestClient, shop: dict[str, str]) -> None:
    a = create_segment(client, definition("A"))
    b = create_segment(client, definition("B"))
    assert a["id"] != b["id"]


def test_a_duplicate_segment_name_is_409_and_changes_nothing(
        client: TestClient, shop: dict[str, str]) -> None:
    create_segment(client, definition("Viewers"))
    error_of(client.post(f"{SHOP}/segments", json=definition("Viewers", did("buy"))),
             409, "conflict")
    assert counts(client) == (0, 0, 3)


def test_the_built_ins_are_listed_with_builtin_true(
        client: TestClient, shop: dict[str, str]) -> None:
    segs = {s["id"]: s for s in client.get(f"{SHOP}/segments").json()}
    assert set(segs) == {"all-users", "test-users"}
    for bid in ("all-users", "test-users"):
        assert segs[bid]["builtin"] is True
        assert segs[bid]["status"] == "active"
        assert client.get(f"{SHOP}/segments/{bid}").json() == segs[bid]


def test_the_segment_list_filters_by_name_or_description_substring(
        client: TestClient, shop: dict[str, str]) -> None:
    a = create_segment(client, definition("Frequent buyers", description="bought 3 times"))
    b = create_segment(client, definition("Churn risk", description="did not buy lately"))
    c = create_segment(client, definition("Readers"))

    def ids(q: str) -> set[str]:
        r = client.get(f"{SHOP}/segments", params={"q": q})
        assert r.status_code == 200
        return {s["id"] for s in r.json()}

    assert ids("buy") == {a["id"], b["id"]}  # a by name, b by description
    assert ids("Read") == {c["id"]}
    assert ids("lately") == {b["id"]}
    assert ids("nothing-like-this") == set()
    assert ids("") == {a["id"], b["id"], c["id"], "all-users", "test-users"}
    assert ids("users") == {"all-users", "test-users"}


def test_an_unknown_segment_is_404_on_every_segment_route(
        client: TestClient, shop: dict[str, str]) -> None:
    p = f"{SHOP}/segments/seg_nope"
    error_of(client.get(p), 404, "not_found")
    error_of(client.patch(p, json={"name": "x"}), 404, "not_found")
    error_of(client.delete(p), 404, "not_found")
    error_of(client.get(p + "/members"), 404, "not_found")
    error_of(client.get(f"{SHOP}/changes", params={"segment": "seg_nope"}), 404, "not_found")
    assert counts(client) == (0, 0, 2)


# Segments: PATCH and DELETE


def test_patch_changes_only_name_and_description(
        client: TestClient, shop: dict[str, str]) -> None:
    seg = create_segment(client, definition("Old", description="d0"))
    p = f"{SHOP}/segments/{seg['id']}"
    r = client.patch(p, json={"name": "New"})
    assert r.status_code == 200
    assert (r.json()["name"], r.json()["description"]) == ("New", "d0")
    r = client.patch(p, json={"description": "d1"})
    assert (r.json()["name"], r.json()["description"]) == ("New", "d1")
    got = client.get(p).json()
    assert {k: v for k, v in got.items() if k not in ("name", "description")} == {
        k: v for k, v in seg.items() if k not in ("name", "description")}
    assert (got["name"], got["description"]) == ("New", "d1")


@pytest.mark.parametrize("patch", [
    {"rules": [{"kind": "did", "event": "buy"}]}, {"window": {"last": "1d"}},
    {"name": "X", "match": "any"}, {"definition": {}}, {"ends_at": "2027-01-01T00:00:00Z"},
    {"name": ""}, {"name": None}, {"name": 5}, {"name": "x" * 201}, [], "name",
])
def test_a_patch_that_tries_to_change_anything_else_is_422_and_changes_nothing(
        client: TestClient, shop: dict[str, str], patch: Any) -> None:
    seg = create_segment(client, definition("Keep", description="d"))
    p = f"{SHOP}/segments/{seg['id']}"
    error_of(client.patch(p, json=patch), 422, "invalid")
    assert client.get(p).json() == seg


def test_a_patch_to_a_name_another_segment_has_is_409(
        client: TestClient, shop: dict[str, str]) -> None:
    create_segment(client, definition("A"))
    b = create_segment(client, definition("B"))
    p = f"{SHOP}/segments/{b['id']}"
    error_of(client.patch(p, json={"name": "A"}), 409, "conflict")
    assert client.get(p).json()["name"] == "B"
    assert client.patch(p, json={"name": "B"}).status_code == 200  # its own name is fine


@pytest.mark.parametrize("bid", ["all-users", "test-users"])
def test_patching_or_deleting_a_built_in_is_409_and_changes_nothing(
        client: TestClient, shop: dict[str, str], bid: str) -> None:
    before = client.get(f"{SHOP}/segments/{bid}").json()
    error_of(client.patch(f"{SHOP}/segments/{bid}", json={"name": "x"}), 409, "conflict")
    error_of(client.patch(f"{SHOP}/segments/{bid}", json={"description": "x"}), 409, "conflict")
    error_of(client.delete(f"{SHOP}/segments/{bid}"), 409, "conflict")
    assert client.get(f"{SHOP}/segments/{bid}").json() == before
    assert counts(client) == (0, 0, 2)


def test_deleting_a_segment_answers_204_and_it_is_gone(
        client: TestClient, shop: dict[str, str]) -> None:
    ingest(client, ev("u1"))
    seg = create_segment(client, definition())
    r = client.delete(f"{SHOP}/segments/{seg['id']}")
    assert r.status_code == 204 and r.content == b""
    error_of(client.get(f"{SHOP}/segments/{seg['id']}"), 404, "not_found")
    assert counts(client) == (1, 1, 2)
    assert client.get(f"{SHOP}/users/u1").json()["segments"] == ["all-users"]
    # The name is free again.
    create_segment(client, definition())


@pytest.mark.parametrize("kind", ["in_segment", "not_in_segment"])
def test_deleting_a_segment_another_refers_to_is_409_until_the_referrer_is_gone(
        client: TestClient, shop: dict[str, str], kind: str) -> None:
    base = create_segment(client, definition("Base"))
    ref = create_segment(client, definition(
        "Ref", group(did("buy"), {"kind": kind, "segment": base["id"]})))
    error_of(client.delete(f"{SHOP}/segments/{base['id']}"), 409, "conflict")
    assert client.get(f"{SHOP}/segments/{base['id']}").status_code == 200
    assert counts(client) == (0, 0, 4)
    assert client.delete(f"{SHOP}/segments/{ref['id']}").status_code == 204
    assert client.delete(f"{SHOP}/segments/{base['id']}").status_code == 204
    assert counts(client) == (0, 0, 2)


# Segments: contract violations (422)


def past_or_now(clock: FakeClock) -> list[Any]:
    return [clock.now, clock.now - 1, "2025-12-31T23:59:59Z", "2026-01-01T00:00:00Z"]


def test_an_ends_at_already_past_is_422_and_a_future_one_is_accepted(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    for i, ends in enumerate(past_or_now(clock)):
        err = error_of(client.post(f"{SHOP}/segments",
                                   json=definition(f"S{i}", ends_at=ends)), 422, "invalid")
        assert "details" in err
    assert counts(client) == (0, 0, 2)
    seg = create_segment(client, definition("Later", ends_at=clock.now + 1))
    assert seg["ends_at"] == "2026-01-01T00:00:00.001Z"


def test_an_in_segment_rule_naming_an_unknown_segment_is_422(
        client: TestClient, shop: dict[str, str]) -> None:
    for kind in ("in_segment", "not_in_segment"):
        error_of(client.post(f"{SHOP}/segments", json=definition(
            f"Ref {kind}", {"kind": kind, "segment": "seg_nope"})), 422, "invalid")
    assert counts(client) == (0, 0, 2)


def test_an_in_segment_rule_may_name_a_built_in(
        client: TestClient, shop: dict[str, str]) -> None:
    profile(client, "u1", {"test_user": True})
    profile(client, "u2", {})
    seg = create_segment(client, definition(
        "Real users", {"kind": "not_in_segment", "segment": "test-users"}))
    assert client.get(f"{SHOP}/segments/{seg['id']}/members").json()["members"] == ["u2"]


def dids(n: int) -> list[dict[str, Any]]:
    return [did(f"e{i}") for i in range(n)]


@pytest.mark.parametrize("rules,ok", [
    (dids(20), True),
    (dids(21), False),
    ([group(*dids(19))], True),  # 1 group + 19 = 20 rule objects
    ([group(*dids(20))], False),  # 21 rule objects, counting the group
    ([group(group(*dids(9)), *dids(9))], True),  # 2 groups + 18 = 20
    ([group(group(*dids(10)), *dids(9))], False),  # 2 groups + 19 = 21
])
def test_a_definition_over_20_rule_objects_counting_groups_is_422(
        client: TestClient, shop: dict[str, str], rules: list[Any], ok: bool) -> None:
    r = client.post(f"{SHOP}/segments", json={"name": "Many", "rules": rules})
    if ok:
        assert r.status_code == 201, r.text
    else:
        error_of(r, 422, "invalid")
        assert counts(client) == (0, 0, 2)


def nest(depth: int) -> dict[str, Any]:
    rule = did()
    for _ in range(depth):
        rule = group(rule)
    return rule


def test_groups_nest_at_most_4_deep(client: TestClient, shop: dict[str, str]) -> None:
    r = client.post(f"{SHOP}/segments", json=definition("Four", nest(4)))
    assert r.status_code == 201, r.text
    error_of(client.post(f"{SHOP}/segments", json=definition("Five", nest(5))), 422, "invalid")
    assert counts(client) == (0, 0, 3)


def test_a_where_with_more_than_20_filters_is_422(
        client: TestClient, shop: dict[str, str]) -> None:
    def where(n: int) -> list[dict[str, Any]]:
        return [{"property": f"p{i}", "op": "exists"} for i in range(n)]

    r = client.post(f"{SHOP}/segments", json=definition("Twenty", did(where=where(20))))
    assert r.status_code == 201, r.text
    for i, rule in enumerate([
        did(where=where(21)),
        {"kind": "stopped", "event": "e", "before": "2d", "recent": "1d", "where": where(21)},
        {"kind": "sequence", "steps": [{"event": "a", "where": where(21)}]},
        {"kind": "did_then_not", "event": "a", "within": "1h",
         "then_not": {"event": "b", "where": where(21)}},
    ]):
        error_of(client.post(f"{SHOP}/segments", json=definition(f"T{i}", rule)),
                 422, "invalid")
    assert counts(client) == (0, 0, 3)


def test_definition_limits_are_configurable(custom: Any) -> None:
    c, _ = custom(definition_limits=Limits(rules=2, depth=1, filters=1))
    error_of(c.post(f"{SHOP}/segments", json={"name": "a", "rules": dids(3)}), 422)
    error_of(c.post(f"{SHOP}/segments", json=definition("b", nest(2))), 422)
    error_of(c.post(f"{SHOP}/segments", json=definition("c", did(where=[
        {"property": "a", "op": "exists"}, {"property": "b", "op": "exists"}]))), 422)
    assert counts(c) == (0, 0, 2)
    assert c.post(f"{SHOP}/segments", json=definition("d", nest(1))).status_code == 201


def test_max_segments_is_enforced_without_counting_built_ins(custom: Any) -> None:
    c, _ = custom(max_segments=2)
    a = create_segment(c, definition("A"))
    create_segment(c, definition("B"))
    error_of(c.post(f"{SHOP}/segments", json=definition("C")), 422, "invalid")
    assert counts(c) == (0, 0, 4)
    assert c.delete(f"{SHOP}/segments/{a['id']}").status_code == 204
    create_segment(c, definition("C"))


@pytest.mark.parametrize("op,value", [
    ("eq", ["a"]), ("eq", None), ("eq", {"a": 1}), ("neq", [1]), ("neq", None),
    ("contains", 5), ("contains", None), ("contains", ["a"]), ("not_contains", True),
    ("starts_with", 1), ("ends_with", None), ("icontains", 2), ("not_icontains", None),
    ("gt", True), ("gte", None), ("lt", ["a"]), ("lte", {}),
    ("in", "a"), ("in", [None]), ("in", [["a"]]), ("in", None), ("not_in", 5),
    ("exists", 1), ("not_exists", None), ("eq", "MISSING"), ("contains", "MISSING"),
])
def test_a_filter_value_of_the_wrong_shape_for_its_op_is_422(
        client: TestClient, shop: dict[str, str], op: str, value: Any) -> None:
    f: dict[str, Any] = {"property": "p", "op": op}
    if value != "MISSING":
        f["value"] = value
    error_of(client.post(f"{SHOP}/segments", json=definition("W", did(where=[f]))),
             422, "invalid")
    error_of(client.post(f"{SHOP}/segments", json=definition(
        "P", {"kind": "profile", **f})), 422, "invalid")
    assert counts(client) == (0, 0, 2)


@pytest.mark.parametrize("op,value", [
    ("eq", "a"), ("eq", 1), ("eq", 1.5), ("eq", False), ("contains", "a"), ("gt", 3),
    ("lte", "m"), ("in", []), ("in", ["a", 1, True]), ("not_in", [2.5]), ("exists", None),
])
def test_a_filter_value_of_the_right_shape_is_accepted(
        client: TestClient, shop: dict[str, str], op: str, value: Any) -> None:
    f: dict[str, Any] = {"property": "p", "op": op}
    if op != "exists":
        f["value"] = value
    r = client.post(f"{SHOP}/segments", json=definition("W", did(where=[f])))
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("bad", [
    {"rules": []}, {"name": ""}, {"name": "x" * 201}, {"rules": [{"kind": "nope"}]},
    {"rules": [did(window={"last": "0d"})]}, {"rules": [did(window={"last": "1 day"})]},
    {"window": {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}},
    {"match": {"at_least": 0}}, {"scope": "device"}, {"extra": 1},
    {"rules": [group()]}, {"ends_at": "tomorrow"}, {"match": {"at_least": 1.5}},
])
def test_a_definition_that_breaks_the_rules_is_422_and_changes_nothing(
        client: TestClient, shop: dict[str, str], bad: dict[str, Any]) -> None:
    error_of(client.post(f"{SHOP}/segments", json=definition("Bad") | bad), 422, "invalid")
    assert counts(client) == (0, 0, 2)
    assert client.get(f"{SHOP}/segments").json()[2:] == []


def test_a_segment_body_that_is_not_an_object_is_422(
        client: TestClient, shop: dict[str, str]) -> None:
    for body in ([], 5, "x", None):
        error_of(post_raw(client, f"{SHOP}/segments", json.dumps(body)), 422, "invalid")
    assert counts(client) == (0, 0, 2)


# Estimate


def test_estimate_answers_the_count_and_a_sample_without_saving(
        client: TestClient, shop: dict[str, str]) -> None:
    ingest(client, ev("u2"), ev("u1"), ev("u3", name="other"))
    r = client.post(f"{SHOP}/estimate", json=definition())
    assert (r.status_code, r.json()) == (200, {"users": 2, "sample": ["u1", "u2"]})
    assert counts(client) == (3, 3, 2)
    error_of(client.post(f"{SHOP}/estimate", json=definition("x", nest(5))), 422, "invalid")


# Members


def test_members_page_in_user_id_order_with_a_next_cursor_and_seq(
        client: TestClient, shop: dict[str, str]) -> None:
    ingest(client, *(ev(u) for u in ["u5", "u2", "u4", "u1", "u3"]), ev("x", name="other"))
    seg = create_segment(client, definition())
    p = f"{SHOP}/segments/{seg['id']}/members"
    seq = client.get(f"{SHOP}/changes").json()["next"]
    r = client.get(p, params={"limit": 2})
    assert r.status_code == 200
    assert r.json() == {"seq": seq, "members": ["u1", "u2"], "next": "u2"}
    assert client.get(p, params={"limit": 2, "after": "u2"}).json() == {
        "seq": seq, "members": ["u3", "u4"], "next": "u4"}
    assert client.get(p, params={"limit": 2, "after": "u4"}).json() == {
        "seq": seq, "members": ["u5"], "next": None}
    assert client.get(p, params={"limit": 3, "after": "u2"}).json()["next"] is None
    assert client.get(p).json() == {"seq": seq, "members": ["u1", "u2", "u3", "u4", "u5"],
                                    "next": None}
    assert client.get(p, params={"after": "u5"}).json()["members"] == []
    # `after` need not be a member.
    assert client.get(p, params={"after": "u25"}).json()["members"] == ["u3", "u4", "u5"]


def test_members_seq_is_the_change_log_position(
        client: TestClient, shop: dict[str, str]) -> None:
    seg = create_segment(client, definition())
    p = f"{SHOP}/segments/{seg['id']}/members"
    assert client.get(p).json()["seq"] == 0
    ingest(client, ev("u1"))  # all-users enter, then the segment's enter
    assert client.get(p).json() == {"seq": 2, "members": ["u1"], "next": None}


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "1.5"])
def test_a_members_limit_that_is_not_a_positive_integer_is_422(
        client: TestClient, shop: dict[str, str], limit: str) -> None:
    error_of(client.get(f"{SHOP}/segments/all-users/members", params={"limit": limit}),
             422, "invalid")


# Users


def test_a_user_shows_profile_segments_including_built_ins_and_event_count(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    seg = create_segment(client, definition())
    ingest(client, ev("u1", ts=BASE_MS - 5000), ev("u1", ts=BASE_MS - 1000),
           ev("u1", name="other", ts="2025-12-31T23:59:57.250Z"))
    profile(client, "u1", {"plan": "pro", "test_user": True})
    r = client.get(f"{SHOP}/users/u1")
    assert r.status_code == 200
    assert r.json() == {
        "user_id": "u1",
        "profile": {"plan": "pro", "test_user": True, "first_seen": "2025-12-31T23:59:55.000Z",
                    "last_seen": "2025-12-31T23:59:59.000Z"},
        "segments": ["all-users", "test-users", seg["id"]],
        "events": 3,
    }


def test_an_unknown_user_is_404(client: TestClient, shop: dict[str, str]) -> None:
    ingest(client, ev("u1"))
    error_of(client.get(f"{SHOP}/users/u2"), 404, "not_found")
    error_of(client.get(f"{SHOP}/users/u2/segments"), 404, "not_found")


def test_user_segments_with_the_root_token(client: TestClient, shop: dict[str, str]) -> None:
    seg = create_segment(client, definition())
    ingest(client, ev("u1"), ev("u2", name="other"))
    assert client.get(f"{SHOP}/users/u1/segments").json() == {
        "seq": 3, "segments": ["all-users", seg["id"]]}
    assert client.get(f"{SHOP}/users/u2/segments").json() == {
        "seq": 3, "segments": ["all-users"]}


def test_user_segments_with_a_valid_user_token_and_no_bearer(
        client: TestClient, shop: dict[str, str]) -> None:
    ingest(client, ev("u1"))
    r = client.get(f"{SHOP}/users/u1/segments",
                   params={"user_token": user_token(shop["secret"], "u1")},
                   headers={"Authorization": ""})
    assert (r.status_code, r.json()) == (200, {"seq": 1, "segments": ["all-users"]})


@pytest.mark.parametrize("token_of", ["other user", "garbage", "empty", "write key",
                                      "other system"])
def test_user_segments_with_a_wrong_or_other_users_token_is_401(
        client: TestClient, shop: dict[str, str], token_of: str) -> None:
    ingest(client, ev("u1"), ev("u2"))
    blog = client.post("/v1/systems", json={"id": "blog"}).json()
    token = {
        "other user": user_token(shop["secret"], "u2"),
        "garbage": "00" * 32,
        "empty": "",
        "write key": shop["write_key"],
        "other system": user_token(blog["secret"], "u1"),
    }[token_of]
    r = client.get(f"{SHOP}/users/u1/segments", params={"user_token": token},
                   headers={"Authorization": ""})
    error_of(r, 401, "unauthorized")


def test_a_user_token_does_not_open_other_routes(
        client: TestClient, shop: dict[str, str]) -> None:
    ingest(client, ev("u1"))
    tok = user_token(shop["secret"], "u1")
    for path in (f"{SHOP}/users/u1", f"{SHOP}/changes", SHOP):
        error_of(client.get(path, params={"user_token": tok}, headers={"Authorization": ""}),
                 401, "unauthorized")


# Changes


def test_changes_come_in_seq_order_with_next_and_limit(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    seg = create_segment(client, definition())
    ingest(client, ev("u1"))
    clock.advance(1234)
    ingest(client, ev("u2"))
    wait_log(client, 4)
    r = client.get(f"{SHOP}/changes", params={"since": 0})
    assert r.status_code == 200
    assert r.json() == {"changes": [
        {"seq": 1, "segment": "all-users", "user_id": "u1", "change": "enter",
         "at": "2026-01-01T00:00:00.000Z"},
        {"seq": 2, "segment": seg["id"], "user_id": "u1", "change": "enter",
         "at": "2026-01-01T00:00:00.000Z"},
        {"seq": 3, "segment": "all-users", "user_id": "u2", "change": "enter",
         "at": "2026-01-01T00:00:01.234Z"},
        {"seq": 4, "segment": seg["id"], "user_id": "u2", "change": "enter",
         "at": "2026-01-01T00:00:01.234Z"},
    ], "next": 4}
    assert client.get(f"{SHOP}/changes").json()["next"] == 4  # since defaults to 0
    page = client.get(f"{SHOP}/changes", params={"since": 1, "limit": 2}).json()
    assert [c["seq"] for c in page["changes"]] == [2, 3] and page["next"] == 3
    assert client.get(f"{SHOP}/changes", params={"since": 4}).json() == {
        "changes": [], "next": 4}
    only = client.get(f"{SHOP}/changes", params={"since": 0, "segment": seg["id"]}).json()
    assert [c["seq"] for c in only["changes"]] == [2, 4] and only["next"] == 4
    only = client.get(f"{SHOP}/changes",
                      params={"since": 0, "segment": "all-users", "limit": 1}).json()
    assert [c["seq"] for c in only["changes"]] == [1] and only["next"] == 1


def test_a_profile_driven_segment_logs_enter_then_leave(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    seg = create_segment(client, definition(
        "Pro", {"kind": "profile", "property": "plan", "op": "eq", "value": "pro"}))
    profile(client, "u1", {"plan": "pro"})
    clock.advance(10)
    profile(client, "u1", {"plan": None})
    wait_log(client, 3)
    got = client.get(f"{SHOP}/changes", params={"segment": seg["id"]}).json()
    assert [(c["seq"], c["change"], c["at"]) for c in got["changes"]] == [
        (2, "enter", "2026-01-01T00:00:00.000Z"), (3, "leave", "2026-01-01T00:00:00.010Z")]


def test_the_first_computation_emits_no_changes(
        client: TestClient, shop: dict[str, str]) -> None:
    ingest(client, ev("u1"), ev("u2"))
    seg = create_segment(client, definition())
    assert seg["size"] == 2
    wait_log(client, 2)
    got = client.get(f"{SHOP}/changes").json()
    assert [c["segment"] for c in got["changes"]] == ["all-users", "all-users"]


@pytest.mark.parametrize("params", [{"since": "-1"}, {"since": "x"}, {"limit": "0"},
                                    {"limit": "x"}])
def test_a_bad_changes_parameter_is_422(
        client: TestClient, shop: dict[str, str], params: dict[str, str]) -> None:
    error_of(client.get(f"{SHOP}/changes", params=params), 422, "invalid")


def test_a_since_older_than_the_retained_log_is_410(custom: Any, clock: FakeClock) -> None:
    c, _ = custom(change_retention_ms=1000)
    ingest(c, ev("u1"))
    wait_log(c, 1)
    clock.advance(5000)
    ingest(c, ev("u2"))
    wait_log(c, 2, since=1)
    deadline = time.monotonic() + 2.0
    while True:
        r = c.get(f"{SHOP}/changes", params={"since": 0})
        if r.status_code == 410:
            break
        assert r.status_code == 200
        assert time.monotonic() < deadline, "the change log was never trimmed"
        time.sleep(0.01)
    error_of(r, 410, "gone")
    assert c.get(f"{SHOP}/changes", params={"since": 1}).json()["changes"][0]["seq"] == 2


# Routing


def test_unknown_routes_and_methods_answer_in_the_error_shape(client: TestClient) -> None:
    error_of(client.get("/v1/nothing"), 404, "not_found")
    error_of(client.put("/v1/systems", json={}), 405)


# Time-driven changes and expiry, as seen over HTTP


def poll_changes(client: TestClient, seg_id: str, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 2.0
    while True:
        got = client.get(f"{SHOP}/changes", params={"segment": seg_id}).json()["changes"]
        if len(got) >= n:
            return got
        assert time.monotonic() < deadline, got
        time.sleep(0.01)


def test_a_time_driven_leave_is_logged_at_the_deadline_even_when_applied_late(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    seg = create_segment(client, definition("Recent", did(window={"last": "1h"})))
    ingest(client, ev("u1", ts=BASE_MS - 1000))
    clock.advance(5 * 3_600_000)
    got = poll_changes(client, seg["id"], 2)
    assert [(c["change"], c["at"]) for c in got] == [
        ("enter", "2026-01-01T00:00:00.000Z"), ("leave", "2026-01-01T00:59:59.000Z")]
    assert client.get(f"{SHOP}/segments/{seg['id']}").json()["size"] == 0


def test_a_segment_past_its_ends_at_is_expired_and_frozen(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    ingest(client, ev("u1"))
    seg = create_segment(client, definition(ends_at=clock.now + 1000))
    clock.advance(1000)
    got = client.get(f"{SHOP}/segments/{seg['id']}").json()
    assert (got["status"], got["size"]) == ("expired", 1)
    ingest(client, ev("u2"))
    assert client.get(f"{SHOP}/segments/{seg['id']}/members").json()["members"] == ["u1"]
    assert client.get(f"{SHOP}/users/u2").json()["segments"] == ["all-users"]


# More ingestion edges


def test_a_streamed_body_over_max_body_is_413_without_a_content_length(custom: Any) -> None:
    c, _ = custom(max_body=300)
    chunks = [b'[{"user_id": "u1", "name": "n", "ts": 1, "props": {"p": "', b"x" * 400, b'"}}]']
    r = c.post(f"{SHOP}/events", content=iter(chunks),
               headers={"Content-Type": "application/json"})
    error_of(r, 413, "too_large")
    assert counts(c) == (0, 0, 2)


def test_event_ids_are_deduplicated_per_system(
        client: TestClient, shop: dict[str, str]) -> None:
    client.post("/v1/systems", json={"id": "blog"})
    assert ingest(client, ev("u1", id="e1")) == {"accepted": 1, "duplicates": 0}
    assert ingest(client, ev("u1", id="e1"), sid="blog") == {"accepted": 1, "duplicates": 0}


def test_an_empty_batch_is_accepted_and_changes_nothing(
        client: TestClient, shop: dict[str, str]) -> None:
    r = client.post(f"{SHOP}/events", json=[])
    assert (r.status_code, r.json()) == (202, {"accepted": 0, "duplicates": 0})
    assert counts(client) == (0, 0, 2)


def test_the_write_key_of_a_system_named_root_is_not_the_root_token(client: TestClient) -> None:
    keys = client.post("/v1/systems", json={"id": "root"}).json()
    as_writer = {"Authorization": f"Bearer {keys['write_key']}"}
    assert client.get("/v1/systems", headers=as_writer).status_code == 403
    r = client.post("/v1/systems/root/events", headers=as_writer,
                    json={"user_id": "u", "name": "n", "ts": 1_767_225_600_000})
    assert r.status_code == 202
