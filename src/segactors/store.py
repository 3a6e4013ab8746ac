"""SQLite persistence: append-only events and profiles, systems, segments, changes, members.

One long-lived connection in WAL mode, in a writer process. Writes are queued and
committed together (group commit): the writer task sends each group to the process as one
message (one transaction), and every caller's future resolves once its rows are durable,
in submission order, so callbacks run in ``seq`` order. A thread of the writer process
copies the WAL into the database beside the commits (``_checkpoints``). Reads happen only
at start-up, on connections of their own.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from segactors.errors import Unavailable

Op = tuple[str, list[tuple[Any, ...]]]


# The hot writes. Each is an op name, not SQL: a group commit gathers the rows of each
# (in order) and writes them as one statement over a JSON array (json_each): a few
# statements a commit instead of one step per row.
INSERT_EVENT = "+events"  # (system, user_id, name, ts, event_id, session_id, props bytes)
INSERT_PROFILE = "+profiles"  # (system, user_id, props bytes)
INSERT_CHANGE = "+changes"  # (system, seq, segment, user_id, change, at)
ENTER = "+enter"  # (system, segment, user_id): the last of ENTER/LEAVE wins
LEAVE = "+leave"
CLOCK = "+clock"  # (instant as text,): the last wins

# Each op's table and the columns of its rows, in order; "props" holds JSON bytes.
_TABLES = {
    INSERT_EVENT: ("events", ("system", "user_id", "name", "ts", "event_id", "session_id",
                              "props")),
    INSERT_PROFILE: ("profiles", ("system", "user_id", "props")),
    INSERT_CHANGE: ("changes", ("system", "seq", "segment", "user_id", "change", "at")),
    ENTER: ("members", ("system", "segment", "user_id")),
    LEAVE: ("members", ("system", "segment", "user_id")),
}


def _statements(op: str) -> tuple[str, str]:
    """The statement over a JSON array of rows (each row an array), and the one for a row."""
    table, cols = _TABLES[op]
    names = ", ".join(cols)
    from_json = ", ".join(f"CAST(json_extract(value, '$[{k}]') AS BLOB)" if c == "props"
                          else f"json_extract(value, '$[{k}]')" for k, c in enumerate(cols))
    rows_ = "(SELECT value FROM json_each(?) ORDER BY key)"
    params = ", ".join("?" * len(cols))
    if op == LEAVE:
        return (f"DELETE FROM {table} WHERE ({names}) IN (SELECT {from_json} FROM {rows_})",
                f"DELETE FROM {table} WHERE ({names}) = ({params})")
    verb = "INSERT OR IGNORE" if op == ENTER else "INSERT"
    return (f"{verb} INTO {table} ({names}) SELECT {from_json} FROM {rows_}",
            f"{verb} INTO {table} ({names}) VALUES ({params})")


_SQL = {op: _statements(op) for op in _TABLES}
# The events' ids go to a table of their own as well, from the same rows: read whole at
# start (to know duplicates) without reading the events.
_IDS_SQL = ("INSERT INTO event_ids (system, id) SELECT json_extract(value, '$[0]'), "
            "json_extract(value, '$[4]') FROM json_each(?) "
            "WHERE json_type(value, '$[4]') = 'text' ORDER BY key",
            "INSERT INTO event_ids (system, id) VALUES (?,?)")
_encode = msgspec.json.encode


def _text_last(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row whose last column is JSON bytes (or None), with it as text for the array."""
    raw = row[-1]
    return row if raw is None else (*row[:-1], raw.decode())


def _write(db: sqlite3.Connection, op: str, text_rows: list[tuple[Any, ...]],
           rows_: list[tuple[Any, ...]]) -> None:
    """One statement over the JSON array of ``text_rows``; row by row (``rows_``) when a
    string holds a NUL character, which SQLite's JSON functions cut short."""
    payload = _encode(text_rows)
    if b"\\u0000" in payload:
        db.executemany(_SQL[op][1], rows_)
        if op == INSERT_EVENT:
            db.executemany(_IDS_SQL[1], [(r[0], r[4]) for r in rows_ if r[4] is not None])
    else:
        db.execute(_SQL[op][0], (payload,))
        if op == INSERT_EVENT:
            db.execute(_IDS_SQL[0], (payload,))


class _Bulk:
    """The hot writes of a run of ops, gathered until written."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[Any, ...]]] = {INSERT_EVENT: [], INSERT_PROFILE: [],
                                                       INSERT_CHANGE: []}
        self.members: dict[tuple[Any, ...], bool] = {}
        self.clock: str | None = None

    def add(self, op: str, rows_: list[tuple[Any, ...]]) -> None:
        if op in self.rows:
            self.rows[op].extend(rows_)
        elif op == CLOCK:
            self.clock = rows_[-1][0] if rows_ else self.clock
        else:
            inside = op == ENTER
            for r in rows_:
                self.members.pop(r, None)  # Re-inserted: dict order is the last change's.
                self.members[r] = inside

    def write(self, db: sqlite3.Connection) -> None:
        fix: dict[str, Callable[[tuple[Any, ...]], tuple[Any, ...]]] = {
            INSERT_EVENT: _text_last, INSERT_PROFILE: _text_last}
        for op, rows_ in self.rows.items():
            if rows_:
                f = fix.get(op)
                _write(db, op, rows_ if f is None else list(map(f, rows_)), rows_)
                rows_.clear()
        if self.members:
            for op, inside in ((ENTER, True), (LEAVE, False)):
                keys = [k for k, v in self.members.items() if v is inside]
                if keys:
                    _write(db, op, keys, keys)
            self.members.clear()
        if self.clock is not None:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clock', ?)",
                       (self.clock,))
            self.clock = None

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
CREATE TABLE IF NOT EXISTS event_ids (system TEXT NOT NULL, id TEXT NOT NULL);
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


# The WAL is copied into the database by a thread of the writer process, beside commits
# (see `_checkpoints`), every CHECKPOINT_EVERY seconds; once it holds WAL_RESTART_PAGES
# pages, the writer itself copies the rest (little), so that the next commit starts the
# WAL over from its beginning.
CHECKPOINT_EVERY = 0.1
WAL_RESTART_PAGES = 16_384  # 64 MB of 4 KB pages.


def _open(path: str, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA wal_autocheckpoint=0")  # `_checkpoints` does it, beside commits.
    db.execute(f"PRAGMA journal_size_limit={WAL_RESTART_PAGES * 4096}")
    db.executescript(SCHEMA)
    if db.execute("SELECT 1 FROM meta WHERE key='event_ids'").fetchone() is None:
        # A database from before the table: filled once from the events.
        db.execute("BEGIN")
        db.execute("INSERT INTO event_ids (system, id) SELECT system, event_id FROM events "
                   "WHERE event_id IS NOT NULL ORDER BY rowid")
        db.execute("INSERT INTO meta (key, value) VALUES ('event_ids', '1')")
        db.execute("COMMIT")
    return db


def _checkpoints(path: str, stop: threading.Event, full: threading.Event) -> None:
    """Copy the WAL into the database every ``CHECKPOINT_EVERY`` seconds, on a connection
    and a thread of their own (SQLite runs without the GIL), and set ``full`` once the WAL
    holds ``WAL_RESTART_PAGES`` pages.

    SQLite's default is that the commit which takes the WAL past 1000 pages runs the
    checkpoint, and its fsync of the database file: that commit, and every push and
    time-driven change behind it, waits for both. A passive checkpoint takes no lock a
    commit needs, so commits no longer copy (a commit's own sync may still wait for the
    checkpoint's: the file system orders them). But while commits go on, it seldom finds
    the WAL wholly copied (new pages came in meanwhile), and only then may a commit start
    the WAL over: so once it is long, the writer copies the rest itself, between two
    commits (``_serve_writes``).
    """
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        while not stop.wait(CHECKPOINT_EVERY):
            try:
                _, log, _ = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error:
                continue  # Tried again next time.
            if log >= WAL_RESTART_PAGES:
                full.set()
    finally:
        con.close()


def _commit(db: sqlite3.Connection, ops: list[Op]) -> None:
    """One transaction for a group of writes (in the writer process)."""
    db.execute("BEGIN")
    try:
        bulk = _Bulk()
        for sql, rows_ in ops:
            if sql[0] == "+":
                bulk.add(sql, rows_)
            else:  # Any other write keeps its place after the hot ones before it.
                bulk.write(db)
                db.executemany(sql, rows_)
        bulk.write(db)
        db.execute("COMMIT")
    except BaseException:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        raise


pack = msgspec.msgpack.Encoder().encode
_unpack_ops = msgspec.msgpack.Decoder(list[tuple[str, list[tuple[Any, ...]]]]).decode


def frame(payload: bytes) -> bytes:
    """A message between processes: its length (4 bytes), then it."""
    return len(payload).to_bytes(4, "big") + payload


async def read_answer(reader: asyncio.StreamReader) -> Any:
    """The next framed msgpack message from a helper process."""
    head = await reader.readexactly(4)
    return msgspec.msgpack.decode(await reader.readexactly(int.from_bytes(head, "big")))


def recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None once the server's end is closed (or reset: it was killed)."""
    buf = bytearray()
    while len(buf) < n:
        try:
            got = sock.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not got:
            return None
        buf += got
    return bytes(buf)


def _serve_writes(sock: socket.socket, server_end: socket.socket, path: str,
                  synchronous: str) -> None:
    """The writer process: open the database, then commit each group of ops it receives
    (a frame of msgpack) and answer with a frame: nil once durable, or the error. It
    exits when the server's end closes (a stop, or the server killed)."""
    server_end.close()  # Forked with both ends: only the server's may keep this one open.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # The server decides when to stop: on close.
    try:
        db = _open(path, synchronous)
    except Exception as e:
        sock.sendall(frame(pack(f"could not open {path}: {e}")))
        return
    sock.sendall(frame(pack(None)))
    stop, full = threading.Event(), threading.Event()
    checkpointer = threading.Thread(target=_checkpoints, args=(path, stop, full),
                                    name="segactors-checkpoints", daemon=True)
    checkpointer.start()
    while (head := recv_exactly(sock, 4)) is not None:
        body = recv_exactly(sock, int.from_bytes(head, "big"))
        if body is None:
            break
        try:
            _commit(db, _unpack_ops(body))
            answer = None
        except Exception as e:  # Reported to the server: nothing of the group is durable.
            answer = f"{type(e).__name__}: {e}"
        try:
            sock.sendall(frame(pack(answer)))
        except OSError:  # The server is gone: what was committed stays.
            break
        if full.is_set():  # After the answer: only the next commit waits for this.
            full.clear()
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass  # The thread says so again.
    stop.set()
    checkpointer.join()
    db.close()


class Store:
    """Durable state under ``data_dir/segactors.db``.

    Writes happen in a writer process of their own: the event loop's thread hands it each
    group commit as one message, and the writer never competes with it for the GIL (a
    writer thread did: it takes the GIL for every statement, and each time waited for the
    busy loop to let go of it, which made commits, and pushes, tens of ms late)."""

    def __init__(self, data_dir: Path, synchronous: str = "FULL") -> None:
        self.path = Path(data_dir) / "segactors.db"
        self.synchronous = synchronous
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._reader: asyncio.StreamReader | None = None
        self._conn: asyncio.StreamWriter | None = None
        self._queue: list[tuple[list[Op], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair()
        # Forked, not spawned: the writer needs nothing but this module, and starts in ms.
        self._proc = multiprocessing.get_context("fork").Process(
            target=_serve_writes, args=(theirs, ours, str(self.path), self.synchronous),
            name="segactors-writer", daemon=True)
        self._proc.start()
        theirs.close()
        self._reader, self._conn = await asyncio.open_unix_connection(sock=ours)
        err = await self._answer()
        if err is not None:
            raise Unavailable(err)
        self._writer = asyncio.create_task(self._write_loop(), name="segactors-store-writer")

    def fileno(self) -> int:
        """The server's end of the socket to the writer process."""
        assert self._conn is not None
        return int(self._conn.get_extra_info("socket").fileno())

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

    async def _answer(self) -> str | None:
        assert self._reader is not None
        got = await read_answer(self._reader)
        return got if got is None else str(got)

    async def _write_loop(self) -> None:
        assert self._conn is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch, self._queue = self._queue, []
            try:
                self._conn.write(frame(pack([op for ops, _ in batch for op in ops])))
                await self._conn.drain()
                err = await self._answer()
                if err is not None:
                    raise sqlite3.Error(err)
            except Exception as e:  # IncompleteReadError too: the writer process is gone.
                # Nothing of this batch is acknowledged.
                why = e if not isinstance(e, asyncio.IncompleteReadError) else "writer gone"
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(Unavailable(f"could not make data durable: {why}"))
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
        if self._conn is not None:
            self._conn.close()  # The writer sees the end, and exits.
            self._conn = None
        if self._proc is not None:
            await asyncio.to_thread(self._proc.join, 10)
            self._proc = None


def rows(con: sqlite3.Connection, sql: str, *args: Any) -> Iterator[tuple[Any, ...]]:
    cur = con.execute(sql, args)
    while True:
        chunk = cur.fetchmany(10_000)
        if not chunk:
            return
        yield from chunk


def columns(con: sqlite3.Connection, where: str, names: list[str],
            *args: Any) -> list[list[str]]:
    """The columns ``names`` of the rows ``where`` selects (``"FROM ... WHERE ..."``), as
    text, aligned (one pass reads them all): joined by SQLite and split once here (millions
    of rows take seconds less than one Python row each), or read row by row if a value
    holds the separator."""
    joined = ", ".join(f"group_concat({n}, char(0))" for n in names)
    n, *got = con.execute(f"SELECT count(*), {joined} {where}", args).fetchone()
    if not n:
        return [[] for _ in names]
    split = [g.split("\0") if g is not None else [] for g in got]
    if all(len(c) == n for c in split):
        return split
    rows_ = con.execute(f"SELECT {', '.join(names)} {where}", args).fetchall()
    return [[str(r[k]) for r in rows_] for k in range(len(names))]


def column(con: sqlite3.Connection, where: str, name: str, *args: Any) -> list[str]:
    """One text column (never NULL where ``where`` selects), as ``columns`` reads it."""
    return columns(con, where, [name], *args)[0]
