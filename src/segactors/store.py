"""SQLite persistence: append-only events and profiles, systems, segments, changes, members.

One long-lived connection in WAL mode. Writes are queued and committed together by one
writer task (group commit): every caller's future resolves once its rows are durable, in
submission order, so callbacks run in ``seq`` order. Reads happen only at start-up.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosqlite

from segactors.errors import Unavailable

Op = tuple[str, list[tuple[Any, ...]]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS systems (
    id TEXT PRIMARY KEY, write_key TEXT NOT NULL, secret TEXT NOT NULL, created_at INTEGER);
CREATE TABLE IF NOT EXISTS segments (
    system TEXT NOT NULL, id TEXT NOT NULL, idx INTEGER NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (system, id));
CREATE TABLE IF NOT EXISTS events (
    system TEXT NOT NULL, user_id TEXT NOT NULL, name TEXT NOT NULL, ts INTEGER NOT NULL,
    event_id TEXT, session_id TEXT, props BLOB);
CREATE TABLE IF NOT EXISTS profiles (system TEXT NOT NULL, user_id TEXT NOT NULL, props BLOB);
CREATE TABLE IF NOT EXISTS changes (
    system TEXT NOT NULL, seq INTEGER NOT NULL, segment TEXT NOT NULL, user_id TEXT NOT NULL,
    change TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (system, seq));
CREATE TABLE IF NOT EXISTS webhooks (
    system TEXT NOT NULL, id TEXT NOT NULL, body BLOB NOT NULL, last_seq INTEGER NOT NULL,
    PRIMARY KEY (system, id));
CREATE TABLE IF NOT EXISTS members (
    system TEXT NOT NULL, segment TEXT NOT NULL, user_id TEXT NOT NULL,
    PRIMARY KEY (system, segment, user_id)) WITHOUT ROWID;
"""


class Store:
    """Durable state under ``data_dir/segactors.db``."""

    def __init__(self, data_dir: Path, synchronous: str = "FULL") -> None:
        self.path = Path(data_dir) / "segactors.db"
        self.synchronous = synchronous
        self._db: aiosqlite.Connection | None = None
        self._queue: list[tuple[list[Op], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute(f"PRAGMA synchronous={self.synchronous}")
        await self._db.executescript(SCHEMA)
        self._writer = asyncio.create_task(self._write_loop(), name="segactors-store-writer")

    def read(self) -> sqlite3.Connection:
        """A plain read connection for loading at start-up (before anything is written)."""
        con = sqlite3.connect(self.path)
        return con

    def write(self, ops: list[Op]) -> asyncio.Future[None]:
        """Queue ``ops`` for the next group commit; the future resolves once durable."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing:
            fut.set_exception(Unavailable("the store is closing"))
            return fut
        self._queue.append((ops, fut))
        self._wake.set()
        return fut

    async def _write_loop(self) -> None:
        db = self._db
        assert db is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch, self._queue = self._queue, []
            try:
                await db.execute("BEGIN")
                for ops, _ in batch:
                    for sql, rows in ops:
                        await db.executemany(sql, rows)
                await db.execute("COMMIT")
            except Exception as e:  # Nothing of this batch is acknowledged.
                try:
                    await db.execute("ROLLBACK")
                except Exception:
                    pass
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(Unavailable(f"could not make data durable: {e}"))
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def close(self) -> None:
        """Commit what is queued, then close."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
        if self._db is not None:
            await self._db.close()


def rows(con: sqlite3.Connection, sql: str, *args: Any) -> Iterator[tuple[Any, ...]]:
    cur = con.execute(sql, args)
    while True:
        chunk = cur.fetchmany(10_000)
        if not chunk:
            return
        yield from chunk
