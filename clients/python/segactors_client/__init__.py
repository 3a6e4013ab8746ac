"""An asyncio client for segactors: the HTTP API and a change stream that resumes itself.

    async with SegactorsClient("http://127.0.0.1:8765", token=ROOT) as sa:
        await sa.create_system("shop")
        seg = await sa.create_segment("shop", {"name": "NY", "rules": [...]})
        async for change in sa.stream("shop", segments="*"):
            print(change.seq, change.segment, change.user_id, change.change, change.at)

``stream`` and ``watch_user`` reconnect on their own with exponential backoff (with jitter,
capped) and resume with ``since`` = the last ``seq`` delivered, so the caller sees every
change once, in order, across dropped connections, ``overflow`` and server restarts.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
import json
import random
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import connect

__all__ = ["Change", "Memberships", "SegactorsClient", "SegactorsError", "StreamGone"]


@dataclass(frozen=True, slots=True)
class Change:
    """One membership change. ``at`` is RFC 3339 UTC with milliseconds, as sent."""

    seq: int
    segment: str
    user_id: str
    change: str  # "enter" | "leave"
    at: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Change:
        return cls(int(d["seq"]), str(d["segment"]), str(d["user_id"]), str(d["change"]),
                   str(d["at"]))


@dataclass(frozen=True, slots=True)
class Memberships:
    """The segments a watched user is in, as of ``seq`` (sent on every (re)connect)."""

    user_id: str
    segments: tuple[str, ...]
    seq: int


class SegactorsError(Exception):
    """An error answer from the server (HTTP or a stream ``error`` message)."""

    def __init__(self, code: str, message: str, status: int | None = None,
                 details: Any = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (HTTP {status})" if status else ""))
        self.code, self.message, self.status, self.details = code, message, status, details


class StreamGone(SegactorsError):
    """The ``since`` to resume from is older than the retained log: re-list members."""


class _Reconnect(Exception):
    pass


class SegactorsClient:
    """``base_url`` like ``http://127.0.0.1:8765``; ``token`` the root token or a write key
    (``None`` for an in-app client that only calls ``watch_user``/``user_segments``)."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 10.0,
                 first_backoff: float = 0.1, max_backoff: float = 10.0,
                 max_retries: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.max_retries = max_retries  # Consecutive failed (re)connects; None: no limit.
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> SegactorsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    # HTTP

    async def _call(self, method: str, path: str, *, json_body: Any = None,
                    params: dict[str, Any] | None = None, expect: Iterable[int] = (200,)) -> Any:
        r = await self.http.request(method, path, json=json_body,
                                    params={k: v for k, v in (params or {}).items()
                                            if v is not None})
        if r.status_code not in tuple(expect):
            try:
                err = r.json()["error"]
                code, msg, details = err["code"], err["message"], err.get("details")
            except (ValueError, KeyError, TypeError):
                code, msg, details = "http_error", r.text[:200], None
            cls = StreamGone if r.status_code == 410 else SegactorsError
            raise cls(code, msg, r.status_code, details)
        return r.json() if r.content else None

    async def create_system(self, system_id: str) -> dict[str, Any]:
        """→ ``{"id", "write_key", "secret"}``."""
        return await self._call("POST", "/v1/systems", json_body={"id": system_id},
                                expect=(201,))

    async def list_systems(self) -> list[dict[str, Any]]:
        return await self._call("GET", "/v1/systems")

    async def get_system(self, system: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/systems/{system}")

    async def ingest_events(self, system: str,
                            events: dict[str, Any] | list[dict[str, Any]]) -> dict[str, int]:
        """One event or a batch; → ``{"accepted", "duplicates"}`` once durable."""
        return await self._call("POST", f"/v1/systems/{system}/events", json_body=events,
                                expect=(202,))

    async def ingest_profiles(self, system: str,
                              profiles: dict[str, Any] | list[dict[str, Any]]) -> dict[str, int]:
        return await self._call("POST", f"/v1/systems/{system}/profiles", json_body=profiles,
                                expect=(202,))

    async def create_segment(self, system: str, definition: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", f"/v1/systems/{system}/segments",
                                json_body=definition, expect=(201,))

    async def list_segments(self, system: str, q: str | None = None) -> list[dict[str, Any]]:
        return await self._call("GET", f"/v1/systems/{system}/segments", params={"q": q})

    async def get_segment(self, system: str, segment: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/systems/{system}/segments/{segment}")

    async def update_segment(self, system: str, segment: str, *, name: str | None = None,
                             description: str | None = None) -> dict[str, Any]:
        body = {k: v for k, v in (("name", name), ("description", description))
                if v is not None}
        return await self._call("PATCH", f"/v1/systems/{system}/segments/{segment}",
                                json_body=body)

    async def delete_segment(self, system: str, segment: str) -> None:
        await self._call("DELETE", f"/v1/systems/{system}/segments/{segment}", expect=(204,))

    async def wait_active(self, system: str, segment: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll until the segment leaves ``pending``; → the segment."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            seg = await self.get_segment(system, segment)
            if seg["status"] != "pending" or loop.time() >= deadline:
                return seg
            await asyncio.sleep(0.05)

    async def members(self, system: str, segment: str,
                      page_size: int = 1000) -> AsyncIterator[str]:
        """Every member in ``user_id`` order, one page request at a time."""
        after: str | None = None
        while True:
            page = await self._call("GET", f"/v1/systems/{system}/segments/{segment}/members",
                                    params={"after": after, "limit": page_size})
            for uid in page["members"]:
                yield uid
            if page["next"] is None:
                return
            after = page["next"]

    async def members_page(self, system: str, segment: str, after: str | None = None,
                           limit: int = 1000) -> dict[str, Any]:
        """One page: ``{"seq", "members", "next"}`` (``seq`` is where to resume a stream)."""
        return await self._call("GET", f"/v1/systems/{system}/segments/{segment}/members",
                                params={"after": after, "limit": limit})

    async def changes(self, system: str, since: int = 0, segment: str | None = None,
                      page_size: int = 1000) -> AsyncIterator[Change]:
        """Retained changes with ``seq > since`` up to now, paging; ``StreamGone`` (410)
        when ``since`` is older than the retained log."""
        while True:
            page = await self._call("GET", f"/v1/systems/{system}/changes",
                                    params={"since": since, "limit": page_size,
                                            "segment": segment})
            for c in page["changes"]:
                yield Change.from_json(c)
            if not page["changes"]:
                return
            since = page["next"]

    async def get_user(self, system: str, user_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/systems/{system}/users/{user_id}")

    async def user_segments(self, system: str, user_id: str,
                            user_token: str | None = None) -> dict[str, Any]:
        return await self._call("GET", f"/v1/systems/{system}/users/{user_id}/segments",
                                params={"user_token": user_token})

    # Streams

    def _ws_url(self, system: str) -> str:
        base = self.base_url
        if base.startswith("https://"):
            base = "wss://" + base[len("https://"):]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://"):]
        return f"{base}/v1/systems/{system}/stream"

    def _backoff(self, attempt: int) -> float:
        delay = min(self.max_backoff, self.first_backoff * (2 ** attempt))
        return delay * random.uniform(0.5, 1.0)

    async def stream(self, system: str, segments: list[str] | str = "*",
                     since: int | None = None) -> AsyncIterator[Change]:
        """Every change of ``segments`` (ids or ``"*"``), live; with ``since``, first every
        retained change after it. Reconnects and resumes by itself; raises ``StreamGone``
        if the log no longer reaches back to the resume point, ``SegactorsError`` for a
        refused subscription (``unauthorized``, ``forbidden``, ``unknown_segment``)."""
        segs: list[str] | str = segments if segments == "*" else list(segments)

        def op(last: int | None) -> dict[str, Any]:
            msg: dict[str, Any] = {"op": "subscribe", "segments": segs}
            if last is not None:
                msg["since"] = last
            return msg

        # aclosing: closing this generator closes the connection at once, not at GC.
        async with aclosing(self._run(system, op, since, "subscribed")) as items:
            async for item in items:
                assert isinstance(item, Change)
                yield item

    async def watch_user(self, system: str, user_id: str, user_token: str,
                         since: int | None = None) -> AsyncIterator[Memberships | Change]:
        """A ``Memberships`` snapshot on every (re)connect, then that user's changes, each
        once (resumed with ``since`` = the last seq seen)."""

        def op(last: int | None) -> dict[str, Any]:
            msg: dict[str, Any] = {"op": "watch_user", "user_id": user_id,
                                   "user_token": user_token}
            if last is not None:
                msg["since"] = last
            return msg

        async with aclosing(self._run(system, op, since, "memberships")) as items:
            async for item in items:
                yield item

    async def _run(self, system: str, make_op: Any, since: int | None,
                   ready: str) -> AsyncIterator[Memberships | Change]:
        last = since  # Highest seq handed to the caller (or announced as the start).
        failures = 0
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        while True:
            try:
                async with connect(self._ws_url(system), additional_headers=headers,
                                   open_timeout=10, close_timeout=2) as ws:
                    await ws.send(json.dumps(make_op(last)))
                    async for raw in ws:
                        msg = json.loads(raw)
                        kind = msg.get("type")
                        if kind == "change":
                            c = Change.from_json(msg)
                            if last is None or c.seq > last:
                                last = c.seq
                                yield c
                        elif kind == ready:
                            failures = 0
                            if kind == "memberships":
                                yield Memberships(msg["user_id"], tuple(msg["segments"]),
                                                  int(msg["seq"]))
                                if last is None:
                                    last = int(msg["seq"])
                            elif last is None or int(msg["seq"]) > last:
                                # Live changes begin after this seq: resume from here.
                                last = int(msg["seq"])
                        elif kind == "error":
                            cls = StreamGone if msg.get("code") == "gone" else SegactorsError
                            raise cls(str(msg.get("code")), str(msg.get("message")))
                        elif kind == "overflow":
                            raise _Reconnect()
                    raise _Reconnect()  # The server closed the connection.
            except (_Reconnect, OSError, asyncio.TimeoutError,
                    websockets.exceptions.WebSocketException) as e:
                if self.max_retries is not None and failures >= self.max_retries:
                    raise ConnectionError(f"stream lost after {failures} retries") from e
                await asyncio.sleep(self._backoff(failures))
                failures += 1
