"""The WebSocket protocol of API.md (`/v1/systems/{sys}/stream`).

Most tests run in-process (TestClient); overflow and kill -9 resume run the real server.
Every receive is bounded by a timeout so a missing message fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import websockets
from starlette.testclient import TestClient
from websockets.asyncio.client import connect

from conftest import BASE_MS, FakeClock, make_client, ok, wait_until
from segactors.store import INSERT_CHANGE
from segactors.timefmt import format_ts
from serverproc import ServerProc, server_proc  # noqa: F401 - fixture

STREAM = "/v1/systems/shop/stream"
NY = {"name": "New Yorkers",
      "rules": [{"kind": "profile", "property": "city", "op": "eq", "value": "NY"}]}
BUYERS = {"name": "buyers", "rules": [{"kind": "did", "event": "buy"}]}
RECENT = {"name": "recent buyers", "window": {"last": "10s"},
          "rules": [{"kind": "did", "event": "buy"}]}


def user_token(secret: str, uid: str) -> str:
    return hmac.new(secret.encode(), uid.encode(), hashlib.sha256).hexdigest()


# In-process helpers ------------------------------------------------------------------------


def recv(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    """The next JSON message, or fail after ``timeout`` seconds (never hang)."""

    async def get() -> Any:
        with anyio.fail_after(timeout):
            return await ws._send_rx.receive()

    msg = ws.portal.call(get)
    assert msg["type"] == "websocket.send", msg
    return json.loads(msg["text"])


def nothing_within(ws: Any, seconds: float = 0.2) -> None:
    async def get() -> Any:
        with anyio.move_on_after(seconds):
            return await ws._send_rx.receive()
        return None

    msg = ws.portal.call(get)
    assert msg is None, f"unexpected message {msg}"


def recv_n(ws: Any, n: int) -> list[dict[str, Any]]:
    return [recv(ws) for _ in range(n)]




def segment(client: TestClient | httpx.Client, body: dict[str, Any]) -> str:
    sid = ok(client.post("/v1/systems/shop/segments", json=body), 201)["id"]
    wait_until(lambda: ok(client.get(f"/v1/systems/shop/segments/{sid}"))["status"] == "active")
    return sid


def changes(client: TestClient | httpx.Client, since: int = 0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(1000):
        page = ok(client.get("/v1/systems/shop/changes", params={"since": since}))
        if not page["changes"]:
            return out
        out.extend(page["changes"])
        since = page["next"]
    raise AssertionError("too many pages")


def as_msgs(chs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "change", **c} for c in chs]


def event(client: TestClient | httpx.Client, uid: str, name: str = "buy",
          ts: int | None = None) -> None:
    ok(client.post("/v1/systems/shop/events",
                   json={"user_id": uid, "name": name, "ts": BASE_MS if ts is None else ts}), 202)


def profile(client: TestClient | httpx.Client, uid: str, **props: Any) -> None:
    ok(client.post("/v1/systems/shop/profiles", json={"user_id": uid, "props": props}), 202)


def settled(client: TestClient | httpx.Client) -> int:
    """Wait until every assigned change is durable and visible in GET /changes; its seq."""
    for _ in range(300):
        seq = ok(client.get("/v1/systems/shop/segments/all-users/members"))["seq"]
        got = ok(client.get("/v1/systems/shop/changes", params={"since": max(0, seq - 1)}))
        if got["next"] == seq:
            return int(seq)
        time.sleep(0.02)
    raise AssertionError("the log never settled")


# Subscribe ---------------------------------------------------------------------------------


def test_a_subscriber_receives_the_change_an_ingested_event_causes(
        client: TestClient, shop: dict[str, str]) -> None:
    buyers = segment(client, BUYERS)
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"op": "subscribe", "segments": [buyers]})
        assert recv(ws) == {"type": "subscribed", "segments": [buyers], "seq": 0}
        event(client, "u1")
        got = recv(ws)
        assert got == {"type": "change", "seq": 2, "segment": buyers, "user_id": "u1",
                       "change": "enter", "at": format_ts(BASE_MS)}
        assert as_msgs(changes(client, 1)) == [got]
        nothing_within(ws)  # The all-users enter (seq 1) is not for this subscription.


def test_subscribe_to_star_gets_every_segment_and_the_echo_keeps_the_star(
        client: TestClient, shop: dict[str, str]) -> None:
    ny = segment(client, NY)
    profile(client, "u0", city="LA")
    seq = settled(client)
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"op": "subscribe", "segments": "*"})
        assert recv(ws) == {"type": "subscribed", "segments": "*", "seq": seq}
        profile(client, "u1", city="NY")
        got = recv_n(ws, 2)
        assert got == as_msgs(changes(client, seq))
        assert {(m["segment"], m["user_id"], m["change"]) for m in got} == {
            ("all-users", "u1", "enter"), (ny, "u1", "enter")}


def test_subscribe_to_a_list_gets_only_those_segments_and_echoes_the_list(
        client: TestClient, shop: dict[str, str]) -> None:
    ny, buyers = segment(client, NY), segment(client, BUYERS)
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"op": "subscribe", "segments": [ny, "test-users"]})
        assert recv(ws) == {"type": "subscribed", "segments": [ny, "test-users"], "seq": 0}
        event(client, "u1")  # all-users + buyers: not subscribed.
        profile(client, "u1", city="NY", test_user=True)
        got = recv_n(ws, 2)
        log = changes(client)
        assert got == as_msgs([c for c in log if c["segment"] in (ny, "test-users")])
        assert {c["segment"] for c in log} == {"all-users", buyers, ny, "test-users"}
        nothing_within(ws)


def test_subscribe_with_since_replays_the_log_after_since_then_goes_live_without_gap_or_dup(
        client: TestClient, shop: dict[str, str]) -> None:
    ny = segment(client, NY)
    for i in range(6):
        profile(client, f"u{i}", city="NY" if i % 2 else "LA")
    profile(client, "u1", city="LA")
    seq = settled(client)
    log = changes(client)
    assert [c["seq"] for c in log] == list(range(1, seq + 1))
    since = 4
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"op": "subscribe", "segments": "*", "since": since})
        replay = recv_n(ws, seq - since)
        assert replay == as_msgs(changes(client, since))
        assert recv(ws) == {"type": "subscribed", "segments": "*", "seq": seq}
        profile(client, "u0", city="NY")
        profile(client, "u9", city="NY")
        live = recv_n(ws, 3)
        assert live == as_msgs(changes(client, seq))
        assert [m["seq"] for m in replay + live] == list(range(since + 1, seq + 4))
        nothing_within(ws)
    # With a segment list the replay is filtered the same way GET /changes filters.
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"op": "subscribe", "segments": [ny], "since": 0})
        want = ok(client.get("/v1/systems/shop/changes", params={"since": 0, "segment": ny}))
        assert len(want["changes"]) == 6  # u1, u3, u5 enter; u1 leaves; u0, u9 enter.
        assert recv_n(ws, 6) == as_msgs(want["changes"])
        assert recv(ws) == {"type": "subscribed", "segments": [ny], "seq": seq + 3}


def test_subscribe_with_since_equal_to_the_last_seq_replays_nothing(
        client: TestClient, shop: dict[str, str]) -> None:
    profile(client, "u1")
    seq = settled(client)
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"op": "subscribe", "segments": "*", "since": seq})
        assert recv(ws) == {"type": "subscribed", "segments": "*", "seq": seq}


@pytest.fixture
def slow_change_writes(client: TestClient) -> Iterator[None]:
    """Make every write of changes take 0.3 s more to become durable (a slow disk), so the
    window between a change being assigned and being pushed is wide and deterministic."""
    store = client.app.state.server.store  # type: ignore[attr-defined]
    real = store.write

    def write(ops: Any) -> asyncio.Future[None]:
        fut = real(ops)
        if not any(sql == INSERT_CHANGE for sql, _ in ops):
            return fut
        loop = asyncio.get_running_loop()
        late: asyncio.Future[None] = loop.create_future()

        def done(f: asyncio.Future[None]) -> None:
            def resolve() -> None:
                if f.exception() is not None:
                    late.set_exception(f.exception())  # type: ignore[arg-type]
                else:
                    late.set_result(None)
            loop.call_later(0.3, resolve)
        fut.add_done_callback(done)
        return late

    store.write = write
    try:
        yield
    finally:
        store.write = real


def _listed(client: TestClient, seg: str, seq: int) -> dict[str, Any]:
    """Poll the members listing until its ``seq`` reaches ``seq`` (the ticker ran)."""
    return wait_until(lambda: (m := ok(client.get(f"/v1/systems/shop/segments/{seg}/members")))
                      ["seq"] >= seq and m, timeout=2.0, step=0.005)


def test_a_time_driven_change_still_being_written_is_neither_repeated_nor_skipped(
        client: TestClient, shop: dict[str, str], clock: FakeClock,
        slow_change_writes: None) -> None:
    """Listings count a change the moment it is made; the stream pushes it once durable.
    Subscribing in between must not push again what the listing already reflects, and the
    ``seq`` a subscription announces must be one a client can resume from."""
    recent = segment(client, RECENT)
    event(client, "u1")  # seq 1 all-users, seq 2 recent enter (ingest awaits durability).
    assert settled(client) == 2
    with client.websocket_connect(STREAM) as ws:
        clock.advance(20_000)  # u1 leaves recent: seq 3, durable 0.3 s later.
        listed = _listed(client, recent, 3)
        assert listed == {"seq": 3, "members": [], "next": None}
        ws.send_json({"op": "subscribe", "segments": "*", "since": listed["seq"]})
        assert recv(ws) == {"type": "subscribed", "segments": "*", "seq": 3}
        assert settled(client) == 3
        ws.send_json({"op": "ping"})
        assert recv(ws) == {"type": "pong"}  # seq 3 was in the listing: not pushed again.
    with client.websocket_connect(STREAM) as ws:
        event(client, "u2", ts=clock.now)  # seq 4, 5.
        clock.advance(20_000)  # seq 6: u2 leaves, not yet durable.
        assert _listed(client, recent, 6)["seq"] == 6
        ws.send_json({"op": "subscribe", "segments": "*"})
        sub = recv(ws)
        # Live changes begin right after the announced seq, so seq 6 must come after a
        # `subscribed` at 5; announcing 6 would make a client that resumes from it lose 6.
        assert sub == {"type": "subscribed", "segments": "*", "seq": 5}
        assert recv(ws) == as_msgs(changes(client, 5))[0]
    with client.websocket_connect(STREAM, headers={"Authorization": ""}) as ws:
        event(client, "u3", ts=clock.now)  # seq 7, 8.
        clock.advance(20_000)  # seq 9: u3 leaves, not yet durable.
        assert _listed(client, recent, 9)["seq"] == 9
        ws.send_json({"op": "watch_user", "user_id": "u3",
                      "user_token": user_token(shop["secret"], "u3")})
        assert recv(ws) == {"type": "memberships", "user_id": "u3", "segments": ["all-users"],
                            "seq": 9}
        assert settled(client) == 9
        ws.send_json({"op": "ping"})
        assert recv(ws) == {"type": "pong"}  # The leave is in the snapshot: not pushed.


# watch_user --------------------------------------------------------------------------------


def test_watch_user_with_a_valid_token_gets_memberships_then_only_that_users_changes(
        client: TestClient, shop: dict[str, str]) -> None:
    ny = segment(client, NY)
    profile(client, "u1", city="NY", test_user=True)
    profile(client, "u2", city="NY")
    seq = settled(client)
    with client.websocket_connect(STREAM, headers={"Authorization": ""}) as ws:
        ws.send_json({"op": "watch_user", "user_id": "u1",
                      "user_token": user_token(shop["secret"], "u1")})
        assert recv(ws) == {"type": "memberships", "user_id": "u1",
                            "segments": ["all-users", "test-users", ny], "seq": seq}
        profile(client, "u2", city="LA")
        profile(client, "u1", city="LA")
        got = recv(ws)
        assert got == {"type": "change", "seq": seq + 2, "segment": ny, "user_id": "u1",
                       "change": "leave", "at": format_ts(BASE_MS)}
        assert as_msgs(changes(client, seq)) == [
            {**got, "seq": seq + 1, "user_id": "u2"}, got]
        nothing_within(ws)


def test_watch_user_with_since_replays_only_that_users_changes(
        client: TestClient, shop: dict[str, str]) -> None:
    ny = segment(client, NY)
    profile(client, "u1", city="NY")
    profile(client, "u2", city="NY")
    profile(client, "u1", city="LA")
    seq = settled(client)
    with client.websocket_connect(STREAM, headers={"Authorization": ""}) as ws:
        ws.send_json({"op": "watch_user", "user_id": "u1", "since": 0,
                      "user_token": user_token(shop["secret"], "u1")})
        first = recv(ws)
        assert first == {"type": "memberships", "user_id": "u1", "segments": ["all-users"],
                         "seq": seq}
        mine = [c for c in changes(client) if c["user_id"] == "u1"]
        assert [(c["segment"], c["change"]) for c in mine] == [
            ("all-users", "enter"), (ny, "enter"), (ny, "leave")]
        assert recv_n(ws, 3) == as_msgs(mine)
        nothing_within(ws)


@pytest.mark.parametrize("token", ["forged", "other-user", "missing", "uppercase"])
def test_watch_user_with_a_bad_token_is_unauthorized_and_the_connection_stays_usable(
        client: TestClient, shop: dict[str, str], token: str) -> None:
    profile(client, "u1")
    good = user_token(shop["secret"], "u1")
    msg: dict[str, Any] = {"op": "watch_user", "user_id": "u1"}
    if token == "forged":
        msg["user_token"] = user_token("not-the-secret", "u1")
    elif token == "other-user":
        msg["user_token"] = user_token(shop["secret"], "u2")
    elif token == "uppercase":
        msg["user_token"] = good[:-1] + ("0" if good[-1] != "0" else "1")
    with client.websocket_connect(STREAM, headers={"Authorization": ""}) as ws:
        ws.send_json(msg)
        err = recv(ws)
        assert err["type"] == "error" and err["code"] == "unauthorized", err
        ws.send_json({"op": "ping"})
        assert recv(ws) == {"type": "pong"}
        profile(client, "u1", city="X")
        nothing_within(ws, 0.1)  # Nothing leaks through the refused watch.
        ws.send_json({"op": "watch_user", "user_id": "u1", "user_token": good})
        assert recv(ws)["type"] == "memberships"


# Auth and errors ---------------------------------------------------------------------------


def test_subscribe_without_a_token_is_unauthorized_and_with_a_write_key_forbidden(
        client: TestClient, shop: dict[str, str]) -> None:
    with client.websocket_connect(STREAM, headers={"Authorization": ""}) as ws:
        ws.send_json({"op": "subscribe", "segments": "*"})
        err = recv(ws)
        assert (err["type"], err["code"]) == ("error", "unauthorized")
        ws.send_json({"op": "ping"})
        assert recv(ws) == {"type": "pong"}
    with client.websocket_connect(STREAM + "?token=" + shop["write_key"],
                                  headers={"Authorization": ""}) as ws:
        ws.send_json({"op": "subscribe", "segments": "*"})
        err = recv(ws)
        assert (err["type"], err["code"]) == ("error", "forbidden")
        profile(client, "u1")
        ws.send_json({"op": "ping"})
        assert recv(ws) == {"type": "pong"}  # And no change was delivered before it.
    with client.websocket_connect(STREAM + "?token=wrong", headers={"Authorization": ""}) as ws:
        ws.send_json({"op": "subscribe", "segments": "*"})
        assert recv(ws)["code"] == "unauthorized"
    with client.websocket_connect(STREAM + "?token=test-root-token",
                                  headers={"Authorization": ""}) as ws:
        ws.send_json({"op": "subscribe", "segments": "*"})
        assert recv(ws)["type"] == "subscribed"


def test_subscribe_to_an_unknown_segment_is_unknown_segment_and_subscribes_nothing(
        client: TestClient, shop: dict[str, str]) -> None:
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"op": "subscribe", "segments": ["all-users", "seg_nope"]})
        err = recv(ws)
        assert (err["type"], err["code"]) == ("error", "unknown_segment")
        profile(client, "u1")
        ws.send_json({"op": "ping"})
        assert recv(ws) == {"type": "pong"}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"subscribe"', '{"op": "dance"}',
                                  '{"segments": "*"}',
                                  '{"op": "subscribe", "segments": "all-users"}',
                                  '{"op": "subscribe", "segments": "*", "since": -1}',
                                  '{"op": "subscribe", "segments": "*", "since": "3"}',
                                  '{"op": "watch_user", "user_token": "x"}'])
def test_a_bad_message_gets_bad_message_and_the_connection_stays_open(
        client: TestClient, shop: dict[str, str], text: str) -> None:
    with client.websocket_connect(STREAM) as ws:
        ws.send_text(text)
        err = recv(ws)
        assert (err["type"], err["code"]) == ("error", "bad_message"), err
        assert isinstance(err["message"], str) and err["message"]
        ws.send_json({"op": "ping"})
        assert recv(ws) == {"type": "pong"}


def test_subscribe_with_a_since_older_than_the_retained_log_is_gone(tmp_path: Path) -> None:
    clock = FakeClock()
    with make_client(tmp_path, clock, change_retention_count=3) as client:
        ok(client.post("/v1/systems", json={"id": "shop"}), 201)
        for i in range(6):
            profile(client, f"u{i}")
        # The ticker trims the log; GET /changes shows when it has.
        wait_until(lambda: client.get("/v1/systems/shop/changes",
                                      params={"since": 1}).status_code == 410)
        with client.websocket_connect(STREAM) as ws:
            ws.send_json({"op": "subscribe", "segments": "*", "since": 1})
            err = recv(ws)
            assert (err["type"], err["code"]) == ("error", "gone")
            ws.send_json({"op": "subscribe", "segments": "*", "since": 3})
            assert recv_n(ws, 3) == as_msgs(changes(client, 3))
            assert recv(ws) == {"type": "subscribed", "segments": "*", "seq": 6}


def test_subscribe_with_a_since_past_the_retention_time_is_gone(tmp_path: Path) -> None:
    clock = FakeClock()
    with make_client(tmp_path, clock, change_retention_ms=60_000) as client:
        ok(client.post("/v1/systems", json={"id": "shop"}), 201)
        profile(client, "u1")
        profile(client, "u2")
        clock.advance(61_000)
        profile(client, "u3")
        wait_until(lambda: client.get("/v1/systems/shop/changes",
                                      params={"since": 0}).status_code == 410)
        with client.websocket_connect(STREAM) as ws:
            ws.send_json({"op": "subscribe", "segments": "*", "since": 0})
            assert recv(ws)["code"] == "gone"
            ws.send_json({"op": "subscribe", "segments": "*", "since": 2})
            assert recv(ws) == {"type": "change", "seq": 3, "segment": "all-users",
                                "user_id": "u3", "change": "enter",
                                "at": format_ts(BASE_MS + 61_000)}
            assert recv(ws)["type"] == "subscribed"
        with client.websocket_connect(STREAM, headers={"Authorization": ""}) as ws:
            ws.send_json({"op": "watch_user", "user_id": "u1", "since": 0,
                          "user_token": user_token(_secret(client), "u1")})
            err = recv(ws)
            assert (err["type"], err["code"]) == ("error", "gone")
            ws.send_json({"op": "ping"})
            assert recv(ws) == {"type": "pong"}


def _secret(client: TestClient) -> str:
    return str(client.app.state.server.systems["shop"].secret)  # type: ignore[attr-defined]


def test_a_time_driven_change_is_pushed_with_the_deadline_as_its_instant(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    recent = segment(client, RECENT)
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"op": "subscribe", "segments": [recent]})
        assert recv(ws)["type"] == "subscribed"
        event(client, "u1", ts=BASE_MS - 4000)
        assert recv(ws)["change"] == "enter"
        clock.advance(30_000)  # Applied late: the instant is still ts + 10 s.
        assert recv(ws) == {"type": "change", "seq": 3, "segment": recent, "user_id": "u1",
                            "change": "leave", "at": format_ts(BASE_MS + 6000)}


def test_unsubscribe_stops_the_changes_of_those_segments(
        client: TestClient, shop: dict[str, str]) -> None:
    ny = segment(client, NY)
    with client.websocket_connect(STREAM) as ws:
        ws.send_json({"op": "subscribe", "segments": [ny, "all-users"]})
        assert recv(ws)["type"] == "subscribed"
        ws.send_json({"op": "unsubscribe", "segments": ["all-users"]})
        assert recv(ws)["type"] == "unsubscribed"
        profile(client, "u1", city="NY")
        got = recv(ws)
        assert (got["segment"], got["change"]) == (ny, "enter")
        nothing_within(ws)


# Real server: slow consumers, cut connections, kill -9 ------------------------------------


def _raw_ws(port: int, path: str, rcvbuf: int = 4096) -> socket.socket:
    """A WebSocket client that never reads after the handshake (a tiny receive buffer)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 4096:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def _send_frame(s: socket.socket, text: str) -> None:
    data = text.encode()
    mask = os.urandom(4)
    assert len(data) < 126
    s.sendall(bytes([0x81, 0x80 | len(data)]) + mask
              + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def _read_frames(s: socket.socket, timeout: float = 10.0) -> tuple[list[str], int | None]:
    """Read every frame until the server closes: (text frames, close code)."""
    s.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        buf += chunk
    texts: list[str] = []
    code = None
    i = 0
    while i + 2 <= len(buf):
        op, ln = buf[i] & 0x0F, buf[i + 1] & 0x7F
        i += 2
        if ln == 126:
            ln = struct.unpack(">H", buf[i:i + 2])[0]
            i += 2
        elif ln == 127:
            ln = struct.unpack(">Q", buf[i:i + 8])[0]
            i += 8
        payload = buf[i:i + ln]
        i += ln
        if op == 1:
            texts.append(payload.decode())
        elif op == 8:
            code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
    return texts, code


def test_a_slow_consumer_gets_overflow_with_its_last_seq_and_is_closed_while_a_fast_one_gets_all(
        tmp_path: Path) -> None:
    # Each ingest below publishes 100 users x 5 segments = 500 changes at once: a queue of
    # 1000 holds that for a reader that keeps up, not for one that stopped reading.
    sp = ServerProc(tmp_path / "data", overrides={"subscriber_queue": 1000,
                                                         "_sndbuf": 8192})
    try:
        sp.start()
        with sp.http() as c:
            ok(c.post("/v1/systems", json={"id": "shop"}), 201)
            for k in range(4):
                segment(c, {"name": f"everyone {k}",
                            "rules": [{"kind": "did_not", "event": f"never{k}"}]})
            slow = _raw_ws(sp.port, STREAM + "?token=" + sp.root_token)
            _send_frame(slow, json.dumps({"op": "subscribe", "segments": "*"}))

            async def fast_consumer(total_batches: int) -> list[dict[str, Any]]:
                got: list[dict[str, Any]] = []
                async with connect(sp.ws_url + STREAM, additional_headers={
                        "Authorization": f"Bearer {sp.root_token}"}) as ws:
                    await ws.send(json.dumps({"op": "subscribe", "segments": "*"}))
                    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["seq"] == 0
                    async with httpx.AsyncClient(base_url=sp.base_url, headers={
                            "Authorization": f"Bearer {sp.root_token}"}, timeout=10) as ac:
                        for b in range(total_batches):
                            r = await ac.post("/v1/systems/shop/profiles", json=[
                                {"user_id": f"b{b}-{i:03d}", "props": {}}
                                for i in range(100)])
                            assert r.status_code == 202
                            while len(got) < (b + 1) * 500:  # Keep up: read as we go.
                                got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                return got

            total = 8
            got = asyncio.run(fast_consumer(total))
            assert [m["seq"] for m in got] == list(range(1, total * 500 + 1))
            assert got == as_msgs(changes(c))
            texts, code = _read_frames(slow)
            slow.close()
        msgs = [json.loads(t) for t in texts]
        assert msgs[0] == {"type": "subscribed", "segments": "*", "seq": 0}
        assert msgs[-1]["type"] == "overflow", msgs[-3:]
        delivered = [m["seq"] for m in msgs if m["type"] == "change"]
        assert delivered == list(range(1, len(delivered) + 1))
        assert len(delivered) < total * 500
        # `seq` is the last change the slow client was handed: it resumes from there.
        assert delivered, "the slow client got nothing before it stopped reading"
        assert msgs[-1]["seq"] == delivered[-1]
        assert code == 1008
    finally:
        sp.kill()


async def _collect(url: str, token: str, sub: dict[str, Any], until_seq: int,
                   limit: int = 10_000) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Subscribe and read until a change with ``until_seq``; (changes, subscribed msg)."""
    got: list[dict[str, Any]] = []
    subscribed: dict[str, Any] = {}
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.send(json.dumps(sub))
        for _ in range(limit):
            if got and got[-1]["seq"] >= until_seq and subscribed:
                break
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if m["type"] == "subscribed":
                subscribed = m
                if m["seq"] <= (got[-1]["seq"] if got else sub.get("since", 0)) and \
                        m["seq"] >= until_seq:
                    break
            else:
                assert m["type"] == "change", m
                got.append(m)
    return got, subscribed


def test_a_client_cut_mid_stream_resumes_with_since_and_gets_exactly_the_rest(
        server_proc: ServerProc) -> None:
    sp = server_proc
    with sp.http() as c:
        ok(c.post("/v1/systems", json={"id": "shop"}), 201)

        async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            first: list[dict[str, Any]] = []
            async with connect(sp.ws_url + STREAM, additional_headers={
                    "Authorization": f"Bearer {sp.root_token}"}) as ws:
                await ws.send(json.dumps({"op": "subscribe", "segments": "*"}))
                json.loads(await asyncio.wait_for(ws.recv(), 5))
                ok(c.post("/v1/systems/shop/profiles",
                          json=[{"user_id": f"a{i:02d}", "props": {}} for i in range(30)]), 202)
                for _ in range(12):
                    first.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
                # Cut: the rest of the 30 is still queued for (or in flight to) this socket.
                ws.transport.abort()  # type: ignore[attr-defined]
            last = first[-1]["seq"]
            ok(c.post("/v1/systems/shop/profiles",
                      json=[{"user_id": f"b{i:02d}", "props": {}} for i in range(20)]), 202)
            rest, subscribed = await _collect(sp.ws_url + STREAM, sp.root_token,
                                              {"op": "subscribe", "segments": "*",
                                               "since": last}, 50)
            assert subscribed == {"type": "subscribed", "segments": "*", "seq": 50}
            return first, rest

        first, rest = asyncio.run(run())
        assert [m["seq"] for m in first] == list(range(1, 13))
        assert rest == as_msgs(changes(c, 12))
        assert [m["seq"] for m in first + rest] == list(range(1, 51))


def test_after_kill_9_and_restart_a_resume_with_since_gets_exactly_the_missed_changes(
        server_proc: ServerProc) -> None:
    sp = server_proc
    with sp.http() as c:
        ok(c.post("/v1/systems", json={"id": "shop"}), 201)
        ny = segment(c, NY)

        async def before_kill() -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = []
            async with connect(sp.ws_url + STREAM, additional_headers={
                    "Authorization": f"Bearer {sp.root_token}"}) as ws:
                await ws.send(json.dumps({"op": "subscribe", "segments": "*"}))
                json.loads(await asyncio.wait_for(ws.recv(), 5))
                ok(c.post("/v1/systems/shop/profiles",
                          json=[{"user_id": f"u{i}", "props": {"city": "NY"}}
                                for i in range(5)]), 202)
                for _ in range(10):
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
                sp.kill()
                with pytest.raises(websockets.ConnectionClosed):
                    for _ in range(100):
                        got.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
            return got

        got = asyncio.run(before_kill())
    assert [m["seq"] for m in got] == list(range(1, 11))
    sp.start()
    with sp.http() as c:
        ok(c.post("/v1/systems/shop/profiles",
                  json=[{"user_id": f"u{i}", "props": {"city": "LA"}} for i in range(3)]), 202)
        rest, subscribed = asyncio.run(_collect(
            sp.ws_url + STREAM, sp.root_token,
            {"op": "subscribe", "segments": "*", "since": 10}, 13))
        assert subscribed["seq"] == 13
        assert rest == as_msgs(changes(c, 10))
        assert [(m["seq"], m["segment"], m["change"]) for m in rest] == [
            (11, ny, "leave"), (12, ny, "leave"), (13, ny, "leave")]


def test_a_stream_of_an_unknown_system_is_refused_with_404(client: TestClient) -> None:
    from starlette.testclient import WebSocketDenialResponse

    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect("/v1/systems/nope/stream"):
            pass
    assert denied.value.status_code == 404
    assert denied.value.json()["error"]["code"] == "not_found"
