"""Webhooks against a real local HTTP receiver that fails on purpose for a while."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import FakeClock, make_client
from test_time import new_segment, send, wait_for


class Receiver:
    """An HTTP server on 127.0.0.1 that answers 500 to the first ``fail`` requests."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.requests: list[tuple[bytes, str]] = []
        self.delivered: list[dict[str, Any]] = []
        recv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                recv.requests.append((body, self.headers.get("X-Segactors-Signature", "")))
                if recv.fail > 0:
                    recv.fail -= 1
                    self.send_response(500)
                else:
                    recv.delivered.extend(json.loads(body)["changes"])
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail=3)
    yield r
    r.close()


def test_webhook_delivers_every_change_in_order_signed_after_failures(
        tmp_path: Path, clock: FakeClock, receiver: Receiver) -> None:
    with make_client(tmp_path, clock, webhook_first_backoff=0.02) as client:
        client.post("/v1/systems", json={"id": "shop"})
        seg = new_segment(client, {"name": "b", "rules": [{"kind": "did", "event": "buy"}]})
        r = client.post("/v1/systems/shop/webhooks", json={"url": receiver.url,
                                                           "segments": [seg]})
        assert r.status_code == 201, r.text
        hook = r.json()
        for i in range(5):
            send(client, {"user_id": f"u{i}", "name": "buy", "ts": clock.now})
        wait_for(lambda: len(receiver.delivered) >= 5)
        log = client.get("/v1/systems/shop/changes", params={"segment": seg}).json()["changes"]
        assert receiver.delivered == log  # In seq order, all-users changes not included.
        assert len(receiver.requests) >= 4  # Three failures, then success.
        for body, signature in receiver.requests:
            expected = hmac.new(hook["signing_secret"].encode(), body, hashlib.sha256)
            assert signature == "sha256=" + expected.hexdigest()
        shown = wait_for(lambda: (h := client.get(f"/v1/systems/shop/webhooks/{hook['id']}")
                                  .json())["last_seq"] == log[-1]["seq"] and h)
        assert shown["last_error"] is None


def test_a_sink_that_stays_down_does_not_hold_back_another(
        tmp_path: Path, clock: FakeClock) -> None:
    down, up = Receiver(fail=10**6), Receiver()
    try:
        with make_client(tmp_path, clock, webhook_first_backoff=0.02) as client:
            client.post("/v1/systems", json={"id": "shop"})
            for r in (down, up):
                assert client.post("/v1/systems/shop/webhooks",
                                   json={"url": r.url, "segments": "*"}).status_code == 201
            send(client, {"user_id": "u1", "name": "buy", "ts": clock.now})
            wait_for(lambda: up.delivered)
            assert [c["segment"] for c in up.delivered] == ["all-users"]
            assert down.delivered == []
            hooks = client.get("/v1/systems/shop/webhooks").json()
            errors = {h["url"]: h["last_error"] for h in hooks}
            assert errors[up.url] is None
            wait_for(lambda: any(h["last_error"] for h in
                                 client.get("/v1/systems/shop/webhooks").json()))
    finally:
        down.close()
        up.close()


def test_webhook_resumes_after_restart_from_its_last_delivered_seq(
        tmp_path: Path, clock: FakeClock) -> None:
    rec = Receiver()
    try:
        with make_client(tmp_path, clock, webhook_first_backoff=0.02) as client:
            client.post("/v1/systems", json={"id": "shop"})
            client.post("/v1/systems/shop/webhooks", json={"url": rec.url, "segments": "*"})
            send(client, {"user_id": "u1", "name": "buy", "ts": clock.now})
            wait_for(lambda: len(rec.delivered) == 1)
            rec.fail = 10**6
            send(client, {"user_id": "u2", "name": "buy", "ts": clock.now})
            wait_for(lambda: len(rec.requests) >= 2)
        rec.fail = 0
        with make_client(tmp_path, clock, webhook_first_backoff=0.02) as client:
            wait_for(lambda: len(rec.delivered) >= 2)
            assert [c["seq"] for c in rec.delivered] == [1, 2]
    finally:
        rec.close()


def test_webhook_with_a_bad_url_or_unknown_segment_is_rejected(
        tmp_path: Path, clock: FakeClock) -> None:
    with make_client(tmp_path, clock) as client:
        client.post("/v1/systems", json={"id": "shop"})
        for body in ({"url": "ftp://x/y", "segments": "*"},
                     {"url": "http://127.0.0.1:1/x", "segments": ["nope"]}):
            r = client.post("/v1/systems/shop/webhooks", json=body)
            assert r.status_code == 422
        assert client.get("/v1/systems/shop/webhooks").json() == []
        assert client.get("/v1/systems/shop/webhooks/wh_x").status_code == 404
