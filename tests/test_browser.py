"""clients/js/segactors.js in a real browser (Debian's Chromium, driven by Playwright).

The real server runs as a subprocess (`python -m segactors.cli serve`); the test page and the
client module are served by a tiny http.server on another port, so `track` is a cross-origin
request (CORS) while the WebSocket is not subject to CORS.

Without Chromium or the `playwright` package these tests skip, unless
SEGACTORS_REQUIRE_BROWSER is set (as CI does): then they fail.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
JS_DIR = REPO / "clients" / "js"
CHROMIUM = os.environ.get("SEGACTORS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ROOT_TOKEN = "browser-test-root-token"
WAIT_MS = 15_000  # upper bound of any single wait in the page
# Fast reconnects for tests (the module's defaults are 500 ms .. 30 s).
FAST = {"initialDelay": 200, "maxDelay": 1000, "jitter": 0.5}


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the 'playwright' Python package is not installed (pip install playwright)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    return None


def _require_browser() -> None:
    why = _missing_browser()
    if why is None:
        return
    if os.environ.get("SEGACTORS_REQUIRE_BROWSER"):
        pytest.fail(f"SEGACTORS_REQUIRE_BROWSER is set but {why}", pytrace=False)
    pytest.skip(f"browser tests skipped: {why}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user_token(secret: str, user_id: str) -> str:
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


class ServerProcess:
    """`segactors serve` as a subprocess on a fixed port and data dir; restartable."""

    def __init__(self, port: int, data_dir: Path, log: Path) -> None:
        self.port, self.data_dir, self.log_path = port, data_dir, log
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        env = {**os.environ, "SEGACTORS_ROOT_TOKEN": ROOT_TOKEN}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "segactors.cli", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port), "--data-dir", str(self.data_dir)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/healthz", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not healthy within {timeout}s:\n{self.logs()}")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


class Api:
    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, timeout=10.0,
                                 headers={"Authorization": f"Bearer {ROOT_TOKEN}"})

    def post(self, path: str, body: Any, status: int, **kw: Any) -> Any:
        r = self.http.post(path, json=body, **kw)
        assert r.status_code == status, (path, r.status_code, r.text)
        return r.json()

    def event(self, system: str, user_id: str, name: str, **extra: Any) -> Any:
        ev = {"user_id": user_id, "name": name, "ts": int(time.time() * 1000), **extra}
        return self.post(f"/v1/systems/{system}/events", ev, 202)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript", ".mjs": "text/javascript"}

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def static_origin() -> Iterator[str]:
    """clients/js served from its own origin (another port than the API)."""
    handler = functools.partial(_QuietHandler, directory=str(JS_DIR))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                               timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    _require_browser()  # don't bother starting a server for a skipped test
    srv = ServerProcess(free_port(), tmp_path / "data", tmp_path / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def api(server: ServerProcess) -> Iterator[Api]:
    a = Api(server.base)
    try:
        yield a
    finally:
        a.http.close()


@pytest.fixture
def shop(api: Api) -> dict[str, Any]:
    """System "shop" with segments "buyers" (did buy) and "repeat" (did buy twice), all time."""
    sys_ = api.post("/v1/systems", {"id": "shop"}, 201)
    buyers = api.post("/v1/systems/shop/segments",
                      {"name": "buyers", "rules": [{"kind": "did", "event": "buy"}]}, 201)
    repeat = api.post("/v1/systems/shop/segments",
                      {"name": "repeat", "rules": [{"kind": "did", "event": "buy",
                                                    "count": {"op": "gte", "value": 2}}]}, 201)
    return {**sys_, "buyers": buyers["id"], "repeat": repeat["id"]}


@pytest.fixture
def page(browser: Any, static_origin: str) -> Iterator[Any]:
    context = browser.new_context()
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    try:
        p.goto(static_origin + "/test/page.html", timeout=WAIT_MS)
        p.wait_for_function("window.__ready === true", timeout=WAIT_MS)
        yield p
        assert not errors, f"uncaught errors in the page: {errors}"
    finally:
        with contextlib.suppress(Exception):
            p.evaluate("window.__watch && window.__watch.close()")
        context.close()


def log_of(page: Any, kind: str | None = None) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = page.evaluate("window.__log")
    return [e for e in entries if kind is None or e["kind"] == kind]


def wait_log(page: Any, predicate_js: str, what: str, timeout: int = WAIT_MS) -> None:
    """Wait until some entry `e` of window.__log satisfies `predicate_js` (a JS expression)."""
    try:
        page.wait_for_function(f"window.__log.some(e => {predicate_js})", timeout=timeout)
    except Exception as e:
        log = json.dumps(log_of(page), indent=1)[-3000:]
        raise AssertionError(f"timed out waiting for {what}; page log:\n{log}") from e


def start_watch(page: Any, server: ServerProcess, userId: str, userToken: str,
                **opts: Any) -> None:
    page.evaluate("o => window.startWatch(o)", {"baseUrl": server.base, "system": "shop",
                                               "userId": userId, "userToken": userToken,
                                               **FAST, **opts})


def test_snapshot_then_enter_arrives(page: Any, server: ServerProcess, api: Api,
                                     shop: dict[str, Any]) -> None:
    api.event("shop", "u1", "view")  # the user now exists: in all-users, not a buyer
    start_watch(page, server, "u1", user_token(shop["secret"], "u1"))
    wait_log(page, "e.kind === 'memberships'", "the memberships snapshot")
    [snap] = log_of(page, "memberships")
    assert snap["data"]["userId"] == "u1"
    assert "all-users" in snap["data"]["segments"]
    assert shop["buyers"] not in snap["data"]["segments"]
    assert snap["data"]["resumed"] is False

    api.event("shop", "u1", "buy")
    wait_log(page, f"e.kind === 'enter' && e.data.segment === {json.dumps(shop['buyers'])}",
             "the enter of 'buyers'")
    [enter] = log_of(page, "enter")
    assert enter["data"]["userId"] == "u1" and enter["data"]["change"] == "enter"
    assert enter["data"]["seq"] > snap["data"]["seq"]
    segments = page.evaluate("[...window.__watch.segments]")
    assert set(segments) >= {"all-users", shop["buyers"]}
    assert not log_of(page, "error")


def test_user_entering_all_users_is_reported(page: Any, server: ServerProcess, api: Api,
                                             shop: dict[str, Any]) -> None:
    start_watch(page, server, "new", user_token(shop["secret"], "new"))
    wait_log(page, "e.kind === 'memberships'", "the memberships snapshot")
    assert log_of(page, "memberships")[0]["data"]["segments"] == []
    api.event("shop", "new", "view")
    wait_log(page, "e.kind === 'enter' && e.data.segment === 'all-users'", "enter all-users")


def test_forged_token_is_reported_as_an_error(page: Any, server: ServerProcess, api: Api,
                                              shop: dict[str, Any]) -> None:
    api.event("shop", "u1", "view")
    forged = user_token("not-the-secret", "u1")
    start_watch(page, server, "u1", forged)
    wait_log(page, "e.kind === 'error'", "the error callback")
    [err] = log_of(page, "error")
    assert err["data"]["code"] == "unauthorized" and err["data"]["fatal"] is True
    # A token of another user is no better.
    page.evaluate("window.__watch.close(); window.__log.length = 0")
    start_watch(page, server, "u1", user_token(shop["secret"], "u2"))
    wait_log(page, "e.kind === 'error'", "the error callback")
    assert log_of(page, "error")[0]["data"]["code"] == "unauthorized"
    page.wait_for_timeout(300)
    assert not log_of(page, "memberships")
    assert page.evaluate("window.__watch.closed") is True  # fatal: no reconnect loop


def test_reconnects_after_restart_and_resumes_without_duplicates(
        page: Any, server: ServerProcess, api: Api, shop: dict[str, Any]) -> None:
    token = user_token(shop["secret"], "u1")
    api.event("shop", "u1", "buy")  # all-users + buyers
    start_watch(page, server, "u1", token)
    wait_log(page, "e.kind === 'memberships'", "the memberships snapshot")
    snap = log_of(page, "memberships")[0]["data"]
    assert shop["buyers"] in snap["segments"]

    # Restart 1: the change happens after the page is back (live path).
    server.stop()
    wait_log(page, "e.kind === 'close'", "the close of the socket")
    server.start()
    wait_log(page, "e.kind === 'memberships' && e.data.resumed", "the resumed snapshot")
    api.event("shop", "u1", "buy")  # second buy: enters "repeat"
    wait_log(page, f"e.kind === 'enter' && e.data.segment === {json.dumps(shop['repeat'])}",
             "enter of 'repeat' after the restart")

    # Restart 2: the change happens while the page is away (replayed with `since`). The
    # backoff is made long, then cut short with reconnectNow() once the change is in.
    page.evaluate("Object.assign(window.__watch.opts, {initialDelay: 6e5, maxDelay: 6e5})")
    closes = len(log_of(page, "close"))
    server.stop()
    wait_log(page, f"e.kind === 'close' && window.__log.filter(x => x.kind === 'close')"
                   f".length > {closes}", "the second close")
    server.start()
    assert page.evaluate("window.__watch.connected") is False
    api.post("/v1/systems/shop/segments",
             {"name": "tripled", "rules": [{"kind": "did", "event": "buy",
                                            "count": {"op": "gte", "value": 3}}]}, 201)
    api.event("shop", "u1", "buy")
    page.evaluate("window.__watch.reconnectNow()")
    wait_log(page, "e.kind === 'enter' && e.data.segment !== 'all-users' && "
                   f"![{json.dumps(shop['buyers'])}, {json.dumps(shop['repeat'])}]"
                   ".includes(e.data.segment)", "the change made while disconnected")

    page.wait_for_timeout(500)  # room for any duplicate to show up
    changes = log_of(page, "enter") + log_of(page, "leave")
    seqs = [c["data"]["seq"] for c in changes]
    assert len(seqs) == len(set(seqs)), f"duplicate changes: {changes}"
    assert seqs == sorted(seqs)
    # The server's own log agrees with what the page saw after its first snapshot.
    listed = api.http.get("/v1/systems/shop/changes", params={"since": snap["seq"]}).json()
    expected = [c["seq"] for c in listed["changes"] if c["user_id"] == "u1"]
    assert seqs == expected
    assert page.evaluate("window.__watch.lastSeq") == max(seqs)
    assert not [e for e in log_of(page, "error")]


def test_backoff_and_dedupe_with_a_scripted_socket(page: Any) -> None:
    """No server: a fake WebSocket replays an old change on resume, which must be dropped,
    and refuses connections for a while, which must back off exponentially up to the cap."""
    result = page.evaluate("""async () => {
      const opened = [];
      let refuse = 0;
      class FakeWS {
        constructor(url) {
          this.url = url; this.readyState = 0; this.sent = [];
          opened.push({t: performance.now(), ws: this});
          setTimeout(() => {
            if (refuse > 0) { refuse--; this.readyState = 3;
              this.onclose && this.onclose({code: 1006, reason: ""}); return; }
            this.readyState = 1; this.onopen && this.onopen();
          }, 1);
        }
        send(data) {
          const m = JSON.parse(data); this.sent.push(m);
          const reply = (o) => setTimeout(() => this.onmessage({data: JSON.stringify(o)}), 1);
          if (m.op === "watch_user") {
            reply({type: "memberships", user_id: "u1", segments: ["all-users"], seq: 10});
            if (m.since !== undefined) {
              reply(ch(11, "enter"));
              reply(ch(12, "leave"));
            }
          } else if (m.op === "ping") reply({type: "pong"});
        }
        close() {
          this.readyState = 3;
          setTimeout(() => this.onclose({code: 1000, reason: ""}), 1);
        }
        drop() { this.readyState = 3; this.onclose && this.onclose({code: 1006, reason: ""}); }
      }
      const ch = (seq, change) =>
        ({type: "change", seq, segment: "s", user_id: "u1", change, at: "x"});
      const seen = [];
      const w = window.segactors.watchUser({baseUrl: "http://fake", system: "s", userId: "u1",
        userToken: "t", WebSocket: FakeWS, initialDelay: 20, maxDelay: 80, jitter: 0,
        onChange: (c) => seen.push(c.seq)});
      const until = async (f) => {
        for (let i = 0; i < 500 && !f(); i++) await new Promise(r => setTimeout(r, 10));
      };
      await until(() => w.lastSeq === 10);
      // Live change 11, then the link drops; the resume replays 11 (old) and 12 (new).
      opened[0].ws.onmessage({data: JSON.stringify(ch(11, "enter"))});
      refuse = 4;
      opened[0].ws.drop();
      await until(() => seen.includes(12));
      const last = opened[opened.length - 1].ws;
      const gaps = opened.slice(1).map((o, i) => Math.round(o.t - opened[i].t));
      w.close();
      return {seen, since: last.sent[0].since, attempts: opened.length, gaps,
              lastSeq: w.lastSeq, url: opened[0].ws.url, segments: [...w.segments]};
    }""")
    assert result["url"] == "ws://fake/v1/systems/s/stream"
    assert result["seen"] == [11, 12], result  # 11 replayed again but dropped
    assert result["since"] == 11 and result["lastSeq"] == 12
    assert result["segments"] == ["all-users"]
    assert result["attempts"] == 6  # first + 4 refused + the one that worked
    # Delays 20, 40, 80, 80 (capped), 80 ms; timers are never early.
    assert [g >= d - 2 for g, d in zip(result["gaps"], [20, 40, 80, 80, 80])] == [True] * 5, \
        result["gaps"]


def test_track_posts_an_event_cross_origin(page: Any, server: ServerProcess, api: Api,
                                           shop: dict[str, Any]) -> None:
    """`track` from a page on another origin than the API: needs the server's CORS support."""
    start_watch(page, server, "u9", user_token(shop["secret"], "u9"))
    wait_log(page, "e.kind === 'memberships'", "the memberships snapshot")
    result = page.evaluate("""async (o) => {
      try {
        const r = await window.segactors.track(o, {user_id: "u9", name: "buy", id: "ev-1"});
        const again = await window.segactors.track(o, {user_id: "u9", name: "buy", id: "ev-1"});
        return {ok: true, r, again};
      } catch (e) { return {ok: false, name: e.name, message: String(e.message), code: e.code}; }
    }""", {"baseUrl": server.base, "system": "shop", "writeKey": shop["write_key"]})
    if not result["ok"] and result.get("name") == "TypeError":
        pre = httpx.options(server.base + "/v1/systems/shop/events", headers={
            "Origin": page.url.split("/test/")[0], "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        pytest.fail(f"track was blocked by the browser (CORS?): {result}; preflight answered "
                    f"{pre.status_code} {dict(pre.headers)}")
    assert result == {"ok": True, "r": {"accepted": 1, "duplicates": 0},
                      "again": {"accepted": 0, "duplicates": 1}}, result
    wait_log(page, f"e.kind === 'enter' && e.data.segment === {json.dumps(shop['buyers'])}",
             "the enter caused by track")
    user = api.http.get("/v1/systems/shop/users/u9").json()
    assert user["events"] == 1

    # A wrong write key is a 401 the caller can see (the CORS headers are on errors too).
    bad = page.evaluate("""async (o) => {
      try { await window.segactors.track(o, {user_id: "u9", name: "buy"}); return null; }
      catch (e) { return {name: e.name, status: e.status, code: e.code}; }
    }""", {"baseUrl": server.base, "system": "shop", "writeKey": "nope"})
    assert bad is not None and bad["name"] == "SegactorsError" and bad["status"] == 401, bad

