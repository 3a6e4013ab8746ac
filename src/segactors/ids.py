"""Every system's accepted event ids, kept in a process of their own.

Deduplication is exact and forever (an id once accepted is a duplicate ever after), so
every id is kept: in an ``IdSet`` (about 14 bytes an id), which takes a microsecond or two
of interpreter time an id. That time is spent in a forked process, on another core, while
the server's loop goes on with other requests: the loop sends a request's ids and gets
back which of them are new, in the order it asked (one socket, answered in turn), so two
requests holding the same id see it accepted once, in arrival order.

At start the process reads the stored ids (staged in plain sets, at C speed), says it is
loaded, then moves them into compact buckets whenever no request waits.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import signal
import socket
from collections import deque
from pathlib import Path
from typing import Any

import msgspec

from segactors.errors import Unavailable
from segactors.idset import IdSet
from segactors.store import column, columns, frame, pack, read_answer, recv_exactly

ADD = "add"  # (ADD, system, ids) -> bytes: 1 where the id was new (and is now kept), else 0
DISCARD = "discard"  # (DISCARD, system, ids) -> None: forget ids (their events were not stored)
COUNT = "count"  # (COUNT, system, []) -> [ids kept, of which still staged]

_unpack = msgspec.msgpack.Decoder(tuple[str, str, list[str]]).decode
_SLICE = 50_000  # Stored ids read, or moved into buckets, at a time.


def load_ids(path: str | Path) -> dict[str, IdSet]:
    """Every system's stored event ids, staged (``IdSet.stage``)."""
    import sqlite3

    sets: dict[str, IdSet] = {}
    con = sqlite3.connect(path)
    try:
        top = con.execute("SELECT max(rowid) FROM event_ids").fetchone()[0] or 0
        systems = [s for (s,) in con.execute("SELECT id FROM systems")]
        if len(systems) == 1:
            only = sets[systems[0]] = IdSet(expect=top)  # Room for them all: no split.
        for lo in range(0, top, _SLICE):
            hi = min(top, lo + _SLICE)
            if len(systems) == 1:  # Half the reading: no system column.
                only.stage(column(con, "FROM event_ids WHERE rowid > ? AND rowid <= ? "
                                  "AND system = ?", "id", lo, hi, systems[0]))
                continue
            sids, ids = columns(con, "FROM event_ids WHERE rowid > ? AND rowid <= ?",
                                ["system", "id"], lo, hi)
            by_system: dict[str, list[str]] = {}
            for sid, eid in zip(sids, ids):
                by_system.setdefault(sid, []).append(eid)
            for sid, got in by_system.items():
                sets.setdefault(sid, IdSet()).stage(got)
    finally:
        con.close()
    return sets


def answer(sets: dict[str, IdSet], op: str, sid: str, ids: list[str]) -> Any:
    """What the id process answers to one request."""
    got = sets.get(sid)
    if got is None:
        got = sets[sid] = IdSet()
    if op == ADD:
        return bytes(map(got.add, ids))
    if op == DISCARD:
        for eid in ids:
            got.discard(eid)
        return None
    if op == COUNT:
        return [len(got), len(got._staged or ())]
    raise ValueError(f"unknown request {op!r}")


def _serve_ids(sock: socket.socket, server_end: socket.socket, path: str,
               others: list[int]) -> None:
    """The id process: load, say so (nil, or the error), then answer each request frame
    with a frame; between requests, move staged ids into buckets. It exits when the
    server's end closes. ``others``: the server's ends of other helpers' sockets, closed
    here, so that those helpers see the end when the server closes them (or dies)."""
    server_end.close()
    for fd in others:
        os.close(fd)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # The server decides when to stop: on close.
    try:
        sets = load_ids(path)
    except Exception as e:
        sock.sendall(frame(pack(f"could not read the stored event ids: {e}")))
        return
    sock.sendall(frame(pack(None)))
    staged = [s for s in sets.values() if s._staged]
    while True:
        if staged and not select.select([sock], [], [], 0)[0]:
            if staged[-1].unstage(_SLICE):
                staged.pop()
            continue
        head = recv_exactly(sock, 4)
        body = None if head is None else recv_exactly(sock, int.from_bytes(head, "big"))
        if body is None:
            return
        try:
            got = answer(sets, *_unpack(body))
        except Exception as e:  # Reported: the request changed nothing it should not.
            got = f"{type(e).__name__}: {e}"
        try:
            sock.sendall(frame(pack(got)))
        except OSError:
            return


class Ids:
    """The server's end of the id process. ``loaded`` is set once it has read the stored
    ids; requests sent before wait for it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.loaded = asyncio.Event()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: asyncio.StreamWriter | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._reader_task: asyncio.Task[None] | None = None
        self._broken: str | None = None

    async def open(self, others: list[int]) -> None:
        """Fork the process (it reads the ids meanwhile: wait for ``loaded``); ``others``:
        file descriptors of the server the process must not hold (see ``_serve_ids``)."""
        ours, theirs = socket.socketpair()
        self._proc = multiprocessing.get_context("fork").Process(
            target=_serve_ids, args=(theirs, ours, str(self.path), others), name="segactors-ids",
            daemon=True)
        self._proc.start()
        theirs.close()
        reader, self._conn = await asyncio.open_unix_connection(sock=ours)
        self._reader_task = asyncio.create_task(self._read(reader), name="segactors-ids")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Resolve each waiting request with its answer, in turn."""
        try:
            err = await read_answer(reader)
            if err is not None:
                raise Unavailable(str(err))
            self.loaded.set()
            while True:
                got = await read_answer(reader)
                fut = self._waiting.popleft()
                if fut.done():
                    continue
                if isinstance(got, str):
                    fut.set_exception(Unavailable(f"event ids: {got}"))
                else:
                    fut.set_result(got)
        except (Exception, asyncio.CancelledError) as e:
            self._broken = "the event id process is gone" if not isinstance(
                e, Unavailable) else str(e)
            self.loaded.set()  # Requests fail now, rather than wait.
            while self._waiting:
                fut = self._waiting.popleft()
                if not fut.done():
                    fut.set_exception(Unavailable(self._broken))
            if isinstance(e, asyncio.CancelledError):
                raise

    def _ask(self, op: str, sid: str, ids: list[str]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._broken is not None or self._conn is None:
            fut.set_exception(Unavailable(self._broken or "the event id process is closed"))
            return fut
        self._waiting.append(fut)
        self._conn.write(frame(pack((op, sid, ids))))
        return fut

    async def add(self, sid: str, ids: list[str]) -> bytes:
        """Keep ``ids`` of system ``sid``; per id, 1 if it was new, 0 if a duplicate (of
        one kept before, or earlier in ``ids``)."""
        if not ids:
            return b""
        got: bytes = await self._ask(ADD, sid, ids)
        return got

    async def discard(self, sid: str, ids: list[str]) -> None:
        """Forget ``ids`` (their events could not be stored)."""
        await self._ask(DISCARD, sid, ids)

    async def count(self, sid: str) -> tuple[int, int]:
        """(ids kept for ``sid``, of which still staged)."""
        kept, staged = await self._ask(COUNT, sid, [])
        return kept, staged

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()  # The process sees the end, and exits.
            self._conn = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                pass
            self._reader_task = None
        if self._proc is not None:
            await asyncio.to_thread(self._proc.join, 10)
            self._proc = None
