"""Outbound webhooks: batched, signed POSTs of changes in ``seq`` order, at least once.

Each sink has its own delivery task and cursor, so a sink that is down never holds back
another sink or the stream. The last delivered ``seq`` is durable: after a restart a sink
resumes where it stopped (receivers dedupe by ``seq``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec

from segactors.changelog import ChangeLog
from segactors.errors import Gone, Invalid
from segactors.supervisor import Change
from segactors.timefmt import format_ts

_enc = msgspec.json.Encoder()

MAX_BATCH = 500
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0


def sign(secret: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 keyed with the UTF-8 secret over the exact body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_url(url: str, allowed_hosts: tuple[str, ...] | None) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("a webhook url is an http(s) URL")
    if allowed_hosts is not None and parts.hostname not in allowed_hosts:
        raise Invalid(f"host {parts.hostname!r} is not in the webhook allow-list")


def body_of(changes: list[Change]) -> bytes:
    return _enc.encode({"changes": [
        {"seq": c.seq, "segment": c.segment, "user_id": c.user_id, "change": c.change,
         "at": format_ts(c.at)} for c in changes]})


@dataclass(eq=False)
class Webhook:
    id: str
    system: str
    url: str
    segments: list[str] | str
    signing_secret: str
    created_at: int
    last_seq: int = 0  # Highest seq acknowledged by the receiver (durable).
    last_error: str | None = None
    attempts: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def wants(self, c: Change) -> bool:
        return self.segments == "*" or c.segment in self.segments

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "segments": self.segments,
                "signing_secret": self.signing_secret, "last_seq": self.last_seq,
                "last_error": self.last_error, "created_at": format_ts(self.created_at)}

    def row(self) -> tuple[Any, ...]:
        body = {"url": self.url, "segments": self.segments,
                "signing_secret": self.signing_secret, "created_at": self.created_at}
        return (self.system, self.id, _enc.encode(body), self.last_seq)


class Deliverer:
    """Runs one task per webhook; ``save`` persists a webhook's cursor."""

    def __init__(self, log_of: Callable[[str], ChangeLog],
                 save: Callable[[Webhook], asyncio.Future[None]],
                 timeout: float = 10.0, first_backoff: float = FIRST_BACKOFF) -> None:
        self.log_of = log_of
        self.save = save
        self.timeout = timeout
        self.first_backoff = first_backoff
        self.hooks: dict[str, Webhook] = {}
        self._client: httpx.AsyncClient | None = None

    def start(self, hook: Webhook) -> None:
        self.hooks[hook.id] = hook
        hook.task = asyncio.create_task(self._run(hook), name=f"segactors-webhook-{hook.id}")

    async def stop(self, hook: Webhook) -> None:
        self.hooks.pop(hook.id, None)
        if hook.task is not None:
            hook.task.cancel()
            try:
                await hook.task
            except (asyncio.CancelledError, Exception):
                pass

    async def close(self) -> None:
        for hook in list(self.hooks.values()):
            await self.stop(hook)
        if self._client is not None:
            await self._client.aclose()

    def notify(self, system: str) -> None:
        for hook in self.hooks.values():
            if hook.system == system:
                hook.wake.set()

    def _pending(self, hook: Webhook) -> list[Change]:
        log = self.log_of(hook.system)
        try:
            got = log.since(hook.last_seq)
        except Gone:
            hook.last_error = (f"changes after seq {hook.last_seq} were no longer retained; "
                               "delivery resumed at the oldest retained change")
            hook.last_seq = log.dropped_upto
            got = log.since(hook.last_seq)
        batch = []
        for c in got:
            if hook.wants(c):
                batch.append(c)
                if len(batch) >= MAX_BATCH:
                    break
        if not batch and got:
            hook.last_seq = got[-1].seq  # Nothing for this sink: move the cursor on.
        return batch

    async def _post(self, hook: Webhook, body: bytes) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        r = await self._client.post(hook.url, content=body, headers={
            "Content-Type": "application/json",
            "X-Segactors-Signature": sign(hook.signing_secret, body)})
        if not 200 <= r.status_code < 300:
            raise RuntimeError(f"receiver answered {r.status_code}")

    async def _run(self, hook: Webhook) -> None:
        backoff = self.first_backoff
        while True:
            batch = self._pending(hook)
            if not batch:
                hook.wake.clear()
                if not self._pending_exists(hook):
                    await hook.wake.wait()
                continue
            try:
                await self._post(hook, body_of(batch))
            except Exception as e:
                hook.last_error = f"{type(e).__name__}: {e}"
                hook.attempts += 1
                # Exponential backoff with jitter, capped.
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            backoff = self.first_backoff
            hook.last_seq = batch[-1].seq
            hook.last_error = None
            try:
                await self.save(hook)
            except Exception as e:
                hook.last_error = f"cursor not saved: {e}"

    def _pending_exists(self, hook: Webhook) -> bool:
        return self.log_of(hook.system).published > hook.last_seq
