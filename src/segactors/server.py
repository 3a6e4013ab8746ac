"""The server core: systems, durable ingestion, segment lifecycle, the clock, the change log.

HTTP and WebSocket handlers are thin wrappers over this. All state mutates on the event
loop thread, one message at a time; SQLite work happens in the store's writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import secrets
import sqlite3
from collections import deque
from collections.abc import Callable
from functools import partial
from itertools import islice
from typing import Any

import msgspec

from segactors.changelog import ChangeLog
from segactors.config import Config
from segactors.definition import Definition, Limits, parse_definition, to_json
from segactors.errors import Conflict, Invalid, NotFound, Unavailable
from segactors.hub import Hub
from segactors.webhooks import Deliverer, Webhook, check_url
from segactors.rules.compile import AtomRegistry, compile_definition
from segactors.ids import Ids
from segactors.store import (CLOCK, ENTER, INSERT_CHANGE, INSERT_EVENT, INSERT_PROFILE, LEAVE, Op,
                              Store, column, columns, rows)
from segactors.supervisor import Change, Segment, Status, System, load_events, new_key
from segactors.timefmt import MAX_TS, MIN_TS, parse_ts
from segactors.wire import EventIn, ProfileIn

_json = msgspec.json.Encoder()

SAVE_WEBHOOK = "INSERT OR REPLACE INTO webhooks (system, id, body, last_seq) VALUES (?,?,?,?)"
SAVE_SEGMENT = "INSERT OR REPLACE INTO segments (system, id, idx, body) VALUES (?,?,?,?)"
# What was stored before a restart (rowid at most ?): ingest goes on meanwhile.
EVENTS_IN_ORDER = ("SELECT system, user_id, name, ts, session_id, props "
                   "FROM events WHERE rowid <= ? ORDER BY rowid")
PROFILES_IN_ORDER = "SELECT system, user_id, props FROM profiles WHERE rowid <= ? ORDER BY rowid"


def _event_row(sid: str, e: EventIn, ts: int, raw: bytes | None) -> tuple[Any, ...]:
    return (sid, e.user_id, e.name, ts, e.id, e.session_id, raw)


def _profile_rows(sid: str, items: list[ProfileIn]) -> list[tuple[Any, ...]]:
    return [(sid, p.user_id, _json.encode(p.props)) for p in items]


def stored_changes(con: sqlite3.Connection, sid: str) -> list[Change]:
    """The change log of system ``sid`` as stored, in ``seq`` order (see ``columns``)."""
    seqs, segs, uids, kinds, ats = columns(
        con, "FROM (SELECT * FROM changes WHERE system=? ORDER BY seq)",
        ["seq", "segment", "user_id", "change", "at"], sid)
    intern_ = {}.setdefault  # One copy of each segment id and kind, not one per change.
    return list(map(Change, map(int, seqs), [intern_(g, g) for g in segs], uids,
                    [intern_(k, k) for k in kinds], map(int, ats)))


def count_rules(rules: list[Any]) -> int:
    return sum(1 + (count_rules(r.rules) if hasattr(r, "rules") else 0) for r in rules)


# What `identify` returns for the root token: no system id can take this value.
ROOT = ":root"


def user_token(secret: str, user_id: str) -> str:
    """``hex(HMAC-SHA256(secret, user_id))``, as the customer's backend computes it."""
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def user_token_valid(secret: str, user_id: str, token: object) -> bool:
    return isinstance(token, str) and hmac.compare_digest(
        token.encode(), user_token(secret, user_id).encode())


class Server:
    """Everything one segactors process holds."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.clock: Callable[[], int] = config.clock
        self.store = Store(config.data_dir, config.synchronous)
        self.ids = Ids(self.store.path)
        self.systems: dict[str, System] = {}
        self.logs: dict[str, ChangeLog] = {}
        self.by_write_key: dict[str, str] = {}
        self.root_token = ""
        self.hub = Hub()
        self.webhooks = Deliverer(lambda sid: self.logs[sid], self._save_webhook,
                                  first_backoff=config.webhook_first_backoff)
        self._loaded_hooks: list[Webhook] = []
        self.ready = asyncio.Event()  # Set once users' histories are loaded.
        # Set once the stored event ids are loaded (so duplicates are known): from then
        # on, ingest is acknowledged, and what arrives before ``ready`` is applied then.
        # (The same as ``self.ids.loaded``.)
        self.accepting = self.ids.loaded
        self._batches = asyncio.Lock()
        self._small = 0  # Requests of at most `ingest_slice` events in flight.
        # What was ingested while the histories load: applied, in order, once they are.
        self._deferred: deque[Callable[[], asyncio.Future[None]]] = deque()
        self.recovered = asyncio.Event()  # Set once every restored user is up to date.
        self._prune_queue: deque[tuple[System, list[str], int]] | None = None
        self._last_prune = config.clock()
        self._backfills: deque[tuple[System, Segment]] = deque()
        self._backfill_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # Lifecycle

    async def start(self, background: bool = True) -> None:
        """Load what reads need (systems, segments, members, the change log), then serve.
        Users' histories load next, in slices that yield: meanwhile reads and streams are
        served, and whatever needs the users' state (ingest, profiles, estimates, user and
        system details, time-driven changes, first computations) waits for ``ready``.
        ``background=False`` loads everything before returning and starts no task."""
        self._load_root_token()
        await self.store.open()
        # The id process reads the stored ids while this one loads what reads need, and
        # then the histories.
        await self.ids.open(others=[self.store.fileno()])
        gc.set_threshold(*self.config.gc_threshold)
        last = self._load_state()
        if not background:
            await self.accepting.wait()
            await self._load_histories(last)
            return
        for hook in self._loaded_hooks:
            self.webhooks.start(hook)
        if self.config.gc_freeze_interval > 0:
            self._tasks.append(asyncio.create_task(self._freezer(), name="segactors-gc"))
        self._tasks.append(asyncio.create_task(self._serve_after_load(last),
                                               name="segactors-load"))

    async def _serve_after_load(self, last: int) -> None:
        await self._load_histories(last)
        self._tasks.append(asyncio.create_task(self.run_recovery(), name="segactors-recovery"))
        self._tasks.append(asyncio.create_task(self._ticker(), name="segactors-ticker"))
        self._tasks.append(asyncio.create_task(self._backfiller(), name="segactors-backfill"))

    @staticmethod
    def _load_profiles(systems: dict[str, System], rows_: list[tuple[Any, ...]]) -> None:
        """Stored profile updates ``(system, user_id, props)``, in order."""
        for sid, uid, props in rows_:
            systems[sid].load_profile(uid, msgspec.json.decode(props))

    async def _load_histories(self, last: int) -> None:
        """Users' profiles and events, in slices that yield; then what was ingested
        meanwhile (once ``accepting``) is applied, in order; then ``ready``."""
        con = self.store.read()
        step = self.config.load_slice
        try:
            # What is stored now; anything later is ingested meanwhile, and deferred.
            top_event = con.execute("SELECT max(rowid) FROM events").fetchone()[0] or 0
            top_profile = con.execute("SELECT max(rowid) FROM profiles").fetchone()[0] or 0
            for sql, top, load in ((PROFILES_IN_ORDER, top_profile, self._load_profiles),
                                   (EVENTS_IN_ORDER, top_event, load_events)):
                cur = con.execute(sql, (top,))
                while chunk := cur.fetchmany(step):
                    load(self.systems, chunk)
                    await self._between_slices()
        finally:
            con.close()
        for system in self.systems.values():
            system.loaded(last)
            for seg in system.segments.values():
                if seg.status is Status.PENDING:
                    self._backfills.append((system, seg))
        futs = []
        while self._deferred:  # Ingested while loading: applied in arrival order.
            futs.append(self._deferred.popleft()())
            await asyncio.sleep(0)
        await self._durable(futs)
        self._backfill_wake.set()
        # Everything loaded lives as long as the process: keep the collector off it.
        gc.collect()
        gc.freeze()
        self.ready.set()

    async def _between_slices(self) -> None:
        """Between slices of the histories' load: the loop serves what waits meanwhile."""
        await asyncio.sleep(0)

    async def wait_ready(self) -> None:
        """Wait until users' histories are loaded (at once, but just after a restart)."""
        if not self.ready.is_set():
            await self.ready.wait()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        await self.webhooks.close()
        await self.store.close()
        await self.ids.close()

    def _load_root_token(self) -> None:
        path = self.config.data_dir / "root_token"
        if self.config.root_token:
            self.root_token = self.config.root_token
            return
        if path.exists():
            self.root_token = path.read_text().strip()
            return
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.root_token = secrets.token_urlsafe(32)
        path.write_text(self.root_token + "\n")
        path.chmod(0o600)
        print(f"segactors: generated root token (stored in {path}): {self.root_token}",
              flush=True)

    def _load_state(self) -> int:
        """Systems, segments, members, webhooks and the change log from SQLite; returns
        the instant the stored state was last written."""
        con = self.store.read()
        try:
            for sid, wk, secret, created in rows(con, "SELECT * FROM systems"):
                self._add_system(System(sid, wk, secret, created or 0))
            meta = dict(rows(con, "SELECT key, value FROM meta"))
            last = int(meta.get("clock", self.clock()))
            for sid, seg_id, idx, body in rows(
                con, "SELECT system, id, idx, body FROM segments ORDER BY system, idx"
            ):
                self._load_segment(self.systems[sid], seg_id, msgspec.json.decode(body))
            for sid, system in self.systems.items():
                for seg in system.segments.values():
                    # In user_id order (the key's), so the one sort costs O(n).
                    seg.members.update(column(
                        con, "FROM members WHERE system=? AND segment=?", "user_id",
                        sid, seg.id))
            for sid, hid, body, last_seq in rows(con, "SELECT * FROM webhooks"):
                b = msgspec.json.decode(body)
                self._loaded_hooks.append(Webhook(hid, sid, b["url"], b["segments"],
                                                  b["signing_secret"], b["created_at"],
                                                  last_seq))
            for sid in self.systems:
                self.logs[sid].restore(stored_changes(con, sid))
        finally:
            con.close()
        for system in self.systems.values():
            system.seq = self.logs[system.id].last_seq
        return last

    async def run_recovery(self) -> None:
        """Recover restored users in slices that yield, so the server serves meanwhile;
        a user touched by an event first is recovered then (see ``System.recover``)."""
        step = self.config.recover_slice
        for system in list(self.systems.values()):
            while system.unrecovered:
                uids = list(islice(system.unrecovered, step))
                out: list[Change] = []
                system.recover(uids, self.clock(), out)
                self._emit(system, out)
                await asyncio.sleep(0)
        self.recovered.set()

    def _load_segment(self, system: System, seg_id: str, body: dict[str, Any]) -> None:
        if body.get("builtin"):
            seg = system.segments[seg_id]
            seg.members.clear()
            return
        # Stored definitions were checked at creation; limits may have changed since.
        defn = parse_definition(body["definition"], -(1 << 62), lambda s: s in system.segments,
                                Limits(1 << 30, 1 << 30, 1 << 30))
        seg = self._new_segment(system, seg_id, defn, body["created_at"], body["created_by"])
        seg.status = Status(body["status"])
        seg.reason = body.get("reason")
        system.add_segment(seg)

    def _add_system(self, system: System) -> None:
        self.systems[system.id] = system
        self.logs[system.id] = ChangeLog(self.config.change_retention_ms,
                                         self.config.change_retention_count)
        self.by_write_key[system.write_key] = system.id

    def identify(self, token: str) -> str | None:
        """``ROOT`` for the root token, the system id for a write key, else None."""
        if hmac.compare_digest(token.encode(), self.root_token.encode()):
            return ROOT
        return self.by_write_key.get(token)

    # Systems

    async def create_system(self, sid: str) -> System:
        if sid in self.systems:
            raise Conflict(f"system {sid!r} already exists")
        system = System(sid, new_key(), new_key(), self.clock())
        self._add_system(system)
        ops: list[Op] = [("INSERT INTO systems VALUES (?,?,?,?)",
                          [(sid, system.write_key, system.secret, system.created_at)])]
        ops.append((SAVE_SEGMENT, [self._segment_row(system, s)
                                   for s in system.segments.values()]))
        try:
            await self.store.write(ops)
        except Exception:
            del self.systems[sid], self.logs[sid], self.by_write_key[system.write_key]
            raise
        return system

    def system(self, sid: str) -> System:
        system = self.systems.get(sid)
        if system is None:
            raise NotFound(f"unknown system {sid!r}")
        return system

    # Ingestion

    def _check_ts(self, raw: int | str, now: int) -> tuple[int | None, str | None]:
        try:
            ts = parse_ts(raw)
        except ValueError as e:
            return None, str(e)
        if ts > now + self.config.future_horizon_ms:
            return None, "ts lies more than the future horizon ahead of the server clock"
        return ts, None

    async def ingest_events(self, system: System, items: list[EventIn]) -> tuple[int, int]:
        """Validate all, dedupe, apply and make durable. All-or-nothing. While histories
        load after a restart, made durable at once and applied once they are loaded.
        Returns (accepted, duplicates)."""
        if len(items) > self.config.ingest_slice:
            return await self._ingest_events(system, items)
        self._small += 1  # Batches go in short slices meanwhile.
        try:
            return await self._ingest_events(system, items)
        finally:
            self._small -= 1

    async def _ingest_events(self, system: System, items: list[EventIn]) -> tuple[int, int]:
        if not self.accepting.is_set():
            await self.accepting.wait()
        now = self.clock()
        top = min(MAX_TS, now + self.config.future_horizon_ms)
        stamped: list[int] = []
        ids: list[str] = []
        for e in items:
            ts = e.ts
            # The common case inline: integer epoch ms in range and not too far ahead.
            if type(ts) is not int or not MIN_TS <= ts <= top:
                stamped = self._stamp(items, now)
                ids = [e.id for e in items if e.id is not None]
                break
            stamped.append(ts)
            if e.id is not None:
                ids.append(e.id)
        # Reserved now (in arrival order), so a concurrent request sees them as duplicates.
        new = await self.ids.add(system.id, ids)
        if 0 not in new:
            fresh = list(zip(items, stamped))
        else:  # `new` holds one flag per event that has an id, in order.
            flags = iter(new)
            fresh = [(e, ts) for e, ts in zip(items, stamped) if e.id is None or next(flags)]
        if not self.ready.is_set():
            if fresh:
                raws = [_json.encode(e.props) if e.props else None for e, _ in fresh]
                rows_ = [_event_row(system.id, e, ts, raw) for (e, ts), raw in zip(fresh, raws)]
                try:
                    await self._defer(partial(self._apply_events, system, fresh, False, raws),
                                      [(INSERT_EVENT, rows_)])
                except Exception:  # Not stored: not seen (unless the id process is gone).
                    with contextlib.suppress(Unavailable):
                        await self.ids.discard(system.id, [e.id for e, _ in fresh
                                                           if e.id is not None])
                    raise
            return len(fresh), len(items) - len(fresh)
        # Events are applied, then committed together with the changes they cause, in
        # chunks whose commits queue in seq order; the 202 waits for every chunk.
        small = self.config.ingest_slice
        if len(fresh) <= small:
            await self._durable([self._apply_events(system, fresh, True)])
            return len(fresh), len(items) - len(fresh)
        futs = []
        # One batch at a time goes slice by slice, so between two slices the loop runs one
        # slice of work, not one of every batch in flight: what waits behind (a small
        # request, a commit, a push) waits a slice, not many. Slices are short while a
        # small request is in flight (each of its steps waits for a turn of the loop).
        async with self._batches:
            k = 0
            while k < len(fresh):
                step = small if self._small else self.config.ingest_slice_alone
                futs.append(self._apply_events(system, fresh[k:k + step], True))
                k += step
                if k < len(fresh):
                    await asyncio.sleep(0)
        await self._durable(futs)
        return len(fresh), len(items) - len(fresh)

    async def _defer(self, apply: Callable[[], asyncio.Future[None]], ops: list[Op]) -> None:
        """Store ``ops`` now, and ``apply`` what they hold once the histories are loaded."""
        await self._durable([self.store.write(ops)])
        if self.ready.is_set():  # Loaded meanwhile.
            await self._durable([apply()])
        else:
            self._deferred.append(apply)

    def _apply_events(self, system: System, items: list[tuple[EventIn, int]], write: bool,
                      raws: list[bytes | None] | None = None) -> asyncio.Future[None]:
        """Apply events ``(event, ts)`` (``raws``: their props encoded, if they are already)
        and commit the changes they cause (with the events, if ``write``) in one commit;
        commits queue in seq order."""
        out: list[Change] = []
        now = self.clock()
        chunk: list[tuple[Any, ...]] = []
        sid_, apply, encode, add = system.id, system.apply_event, _json.encode, chunk.append
        if raws is None:
            raws = [encode(e.props) if e.props else None for e, _ in items]
        for (e, ts), raw in zip(items, raws):
            uid, name, session = e.user_id, e.name, e.session_id
            apply(uid, name, ts, e.props, session, now, out, raw)
            if write:  # `_event_row`, spelled out.
                add((sid_, uid, name, ts, e.id, session, raw))
        return self._emit(system, out, [(INSERT_EVENT, chunk)] if write else [])

    def _apply_profiles(self, system: System, items: list[ProfileIn],
                        write: bool) -> asyncio.Future[None]:
        """Apply profile updates, and commit as ``_apply_events`` does."""
        out: list[Change] = []
        now = self.clock()
        for p in items:
            system.apply_profile(p.user_id, p.props, now, out)
        return self._emit(system, out,
                          [(INSERT_PROFILE, _profile_rows(system.id, items))] if write else [])

    def _stamp(self, items: list[EventIn], now: int) -> list[int]:
        """Every event's ``ts`` in epoch ms, or the 422 naming each one refused."""
        details = []
        stamped = []
        for i, e in enumerate(items):
            ts, problem = self._check_ts(e.ts, now)
            if problem is not None:
                details.append({"index": i, "message": f"ts: {problem}"})
            stamped.append(ts)
        if details:
            raise Invalid("invalid event(s); nothing was accepted", details)
        return stamped

    async def _durable(self, futs: list[asyncio.Future[None]]) -> None:
        """Wait for every write; the first failure (503) is raised once all have settled."""
        results = await asyncio.gather(*futs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def ingest_profiles(self, system: System, items: list[ProfileIn]) -> int:
        """Validate all, apply and make durable (deferred like events while loading)."""
        if not self.accepting.is_set():
            await self.accepting.wait()
        details = []
        for i, p in enumerate(items):
            bad = [k for k in p.props if k in ("first_seen", "last_seen")]
            if bad:
                details.append({"index": i, "message": f"{bad[0]!r} is read-only"})
        if details:
            raise Invalid("invalid profile update(s); nothing was accepted", details)
        if not self.ready.is_set():
            await self._defer(partial(self._apply_profiles, system, items, False),
                              [(INSERT_PROFILE, _profile_rows(system.id, items))])
        else:
            await self._durable([self._apply_profiles(system, items, True)])
        return len(items)

    # Changes

    def _emit(self, system: System, changes: list[Change],
              ops: list[Op] | None = None) -> asyncio.Future[None]:
        """Log changes and persist them (with ``ops`` and the members they imply) in one
        commit; push them once durable. Returns the commit's future."""
        ops = list(ops or [])
        sid = system.id
        if changes:
            self.logs[sid].extend(changes)
            ops.append((INSERT_CHANGE, [(sid, c.seq, c.segment, c.user_id, c.change, c.at)
                                        for c in changes]))
            # The stored membership follows the last change of each (segment, user).
            final = {(c.segment, c.user_id): c.change for c in changes}
            ops.append((ENTER, [(sid, g, u) for (g, u), ch in final.items() if ch == "enter"]))
            ops.append((LEAVE, [(sid, g, u) for (g, u), ch in final.items() if ch == "leave"]))
        ops.append((CLOCK, [(str(self.clock()),)]))
        fut = self.store.write(ops)
        if changes:
            fut.add_done_callback(lambda f: self._publish(sid, changes, f))
        return fut

    def _publish(self, sid: str, changes: list[Change], fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        self.logs[sid].mark_published(changes[-1].seq)
        self.hub.publish(sid, changes)
        self.webhooks.notify(sid)

    # Segments

    def _new_segment(self, system: System, seg_id: str, defn: Definition, created_at: int,
                     created_by: str) -> Segment:
        ends_at = None if isinstance(defn.ends_at, msgspec.UnsetType) else parse_ts(defn.ends_at)
        desc = "" if isinstance(defn.description, msgspec.UnsetType) else defn.description
        return Segment(seg_id, 0, defn.name, desc, defn, to_json(defn),
                       compile_definition(defn, system.atoms), created_at, created_by,
                       ends_at=ends_at)

    def _segment_row(self, system: System, seg: Segment) -> tuple[Any, ...]:
        body = {
            "name": seg.name, "description": seg.description, "definition": seg.definition_json,
            "created_at": seg.created_at, "created_by": seg.created_by,
            "status": seg.status.value, "reason": seg.reason, "builtin": seg.builtin,
        }
        return (system.id, seg.id, seg.idx, _json.encode(body))

    def parse(self, system: System, body: Any) -> Definition:
        return parse_definition(body, self.clock(), lambda s: s in system.segments,
                                self.config.definition_limits)

    async def create_segment(self, system: System, body: Any) -> Segment:
        defn = self.parse(system, body)
        if any(s.name == defn.name for s in system.segments.values()):
            raise Conflict(f"a segment named {defn.name!r} already exists")
        if sum(not s.builtin for s in system.segments.values()) >= self.config.max_segments:
            raise Invalid(f"a system holds at most {self.config.max_segments} segments")
        seg_id = "seg_" + secrets.token_hex(6)
        seg = self._new_segment(system, seg_id, defn, self.clock(), "root")
        for ref in seg.compiled.refs:
            if system.segments[ref].status is Status.FAILED:
                seg.status, seg.reason = Status.FAILED, f"depends on failed segment {ref!r}"
        system.add_segment(seg)
        try:
            await self.store.write([(SAVE_SEGMENT, [self._segment_row(system, seg)])])
        except Exception:
            system.remove_segment(seg)
            raise
        if seg.status is Status.PENDING:
            self._backfills.append((system, seg))
            self._backfill_wake.set()
        return seg

    def segment(self, system: System, seg_id: str) -> Segment:
        seg = system.segments.get(seg_id)
        if seg is None:
            raise NotFound(f"unknown segment {seg_id!r}")
        return seg

    async def patch_segment(self, system: System, seg: Segment, name: str | None,
                            description: str | None) -> Segment:
        if seg.builtin:
            raise Conflict("built-in segments cannot be changed")
        if name is not None:
            if not 1 <= len(name) <= 200:
                raise Invalid("a name is 1 to 200 characters")
            if any(s.name == name and s is not seg for s in system.segments.values()):
                raise Conflict(f"a segment named {name!r} already exists")
        old = (seg.name, seg.description)
        if name is not None:
            seg.name = name
        if description is not None:
            seg.description = description
        try:
            await self.store.write([(SAVE_SEGMENT, [self._segment_row(system, seg)])])
        except Exception:
            seg.name, seg.description = old
            raise
        return seg

    async def delete_segment(self, system: System, seg: Segment) -> None:
        if seg.builtin:
            raise Conflict("built-in segments cannot be deleted")
        users = system.referrers(seg.id)
        if users:
            raise Conflict(f"segment {users[0].id!r} refers to this segment")
        system.remove_segment(seg)
        await self.store.write([
            ("DELETE FROM segments WHERE system=? AND id=?", [(system.id, seg.id)]),
            ("DELETE FROM members WHERE system=? AND segment=?", [(system.id, seg.id)]),
        ])

    def _activate(self, system: System, seg: Segment) -> None:
        if seg.status is Status.PENDING:
            seg.status = Status.ACTIVE
        self.store.write([(SAVE_SEGMENT, [self._segment_row(system, seg)])] + [
            (ENTER, [(system.id, seg.id, u) for u in seg.members])
        ])

    async def run_backfills(self) -> None:
        """First computation of every pending segment, in slices that yield to the loop."""
        while self._backfills:
            system, seg = self._backfills.popleft()
            if system.segments.get(seg.id) is not seg or seg.status is not Status.PENDING:
                continue
            uids = list(system.users)
            step = self.config.backfill_slice
            for i in range(0, len(uids), step):
                out: list[Change] = []
                system.backfill(seg, uids[i:i + step], self.clock(), out)
                self._emit(system, out)
                await asyncio.sleep(0)
            if seg.status is Status.PENDING:
                self._activate(system, seg)
            else:
                self.store.write([(SAVE_SEGMENT, [self._segment_row(system, seg)])])

    async def _backfiller(self) -> None:
        while True:
            await self._backfill_wake.wait()
            self._backfill_wake.clear()
            await self.run_backfills()

    async def estimate(self, system: System, body: Any, sample: int = 10) -> tuple[int, list[str]]:
        """The Calculate dry run: members of an unsaved definition now, in slices."""
        await self.wait_ready()
        defn = self.parse(system, body)
        scratch = AtomRegistry()
        compiled = compile_definition(defn, scratch)
        uids = list(system.users)
        found: list[str] = []
        now = self.clock()
        step = self.config.backfill_slice
        for i in range(0, len(uids), step):
            system.estimate(compiled, scratch, now, uids[i:i + step], found)
            await asyncio.sleep(0)
        return len(found), sorted(found)[:sample]

    # Webhooks

    def _save_webhook(self, hook: Webhook) -> asyncio.Future[None]:
        return self.store.write([(SAVE_WEBHOOK, [hook.row()])])

    async def create_webhook(self, system: System, url: str,
                             segments: list[str] | str) -> Webhook:
        check_url(url, self.config.webhook_hosts)
        if segments != "*":
            if not isinstance(segments, list):
                raise Invalid("'segments' is a list of segment ids or '*'")
            unknown = [s for s in segments if s not in system.segments]
            if unknown:
                raise Invalid(f"unknown segment {unknown[0]!r}")
        # A new sink starts at the current end of the log: it receives what changes next.
        hook = Webhook("wh_" + secrets.token_hex(6), system.id, url, segments,
                       secrets.token_urlsafe(32), self.clock(), self.logs[system.id].published)
        await self._save_webhook(hook)
        self.webhooks.start(hook)
        return hook

    def webhook(self, system: System, hid: str) -> Webhook:
        hook = self.webhooks.hooks.get(hid)
        if hook is None or hook.system != system.id:
            raise NotFound(f"unknown webhook {hid!r}")
        return hook

    async def delete_webhook(self, system: System, hook: Webhook) -> None:
        await self.webhooks.stop(hook)
        await self.store.write([("DELETE FROM webhooks WHERE system=? AND id=?",
                                 [(system.id, hook.id)])])

    # Time

    def prune_step(self, now: int) -> None:
        """Forget events past retention, a slice of users per call; a sweep every interval."""
        if self._prune_queue is None:
            if now - self._last_prune < self.config.prune_interval_ms:
                return
            self._last_prune = now
            self._prune_queue = deque()
            for system in self.systems.values():
                cutoff = system.retention_cutoff(now, self.config.event_retention_ms)
                if cutoff is not None:
                    self._prune_queue.append((system, list(system.users), cutoff))
        if not self._prune_queue:
            self._prune_queue = None
            return
        system, uids, cutoff = self._prune_queue[0]
        step = uids[-self.config.backfill_slice:]
        del uids[-self.config.backfill_slice:]
        system.prune(step, cutoff)
        if not uids:
            self._prune_queue.popleft()

    def run_due(self) -> bool:
        """Apply time-driven changes due by now, a slice at a time. True if more are due."""
        now = self.clock()
        self.prune_step(now)
        more = False
        for system in self.systems.values():
            out, m = system.tick(now, limit=self.config.ingest_slice)
            self._emit(system, out)
            dropped = self.logs[system.id].trim(now)
            if dropped:
                self.store.write([("DELETE FROM changes WHERE system=? AND seq<=?",
                                   [(system.id, dropped)])])
            more = more or m
        return more

    async def _freezer(self) -> None:
        """Keep the collector's passes short as state grows: every interval, collect the
        youngest generation, then move every tracked object to the permanent generation,
        which the collector no longer scans (so the older generations stay small and their
        passes take milliseconds, not seconds, with millions of users). Users' state is
        acyclic and lives until pruned or replaced, when reference counting frees it; the
        cost is that a reference cycle alive at a freeze, or one that reached the middle
        generation, is not reclaimed once it dies: rare here (tens of objects a minute)."""
        while True:
            await asyncio.sleep(self.config.gc_freeze_interval)
            gc.collect(0)
            gc.freeze()

    async def _ticker(self) -> None:
        while True:
            if self.run_due():
                await asyncio.sleep(0)
                continue
            now = self.clock()
            nxt = min((d for s in self.systems.values() if (d := s.next_deadline()) is not None),
                      default=None)
            wait = self.config.tick_interval
            if nxt is not None:
                wait = max(0.0, min(wait, (nxt - now) / 1000))
            await asyncio.sleep(wait)
