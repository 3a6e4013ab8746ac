"""A user actor: timeline, profile and per-atom matches of one user.

A plain object with ``__slots__``, not a Task: the supervisor hands it one message at a
time, so nothing inside needs a lock.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from segactors.rules.evaluate import (
    ALL_SESSIONS, EMPTY, NEVER, AggState, SessionState, Matches, new_matches, seen_props, unanswered, unanswered_add_a, unanswered_add_not,
)

if TYPE_CHECKING:
    from segactors.rules.compile import AtomRegistry
    from segactors.rules.evaluate import Veto
    from segactors.supervisor import System


_decode_props = msgspec.json.Decoder(dict[str, Any]).decode
_NO_PROPS: dict[str, Any] = {}


def props_of(raw: bytes | None) -> dict[str, Any]:
    """Decode stored props (msgspec JSON bytes; None when there were none)."""
    return _decode_props(raw) if raw else _NO_PROPS


# The columns of a user with no event yet: shared, replaced on the first event.
_NONE: tuple[Any, ...] = ()

# Event names as codes (4 bytes an event in a user's ``names`` column, not an 8-byte
# pointer): one table for the process, as ``sys.intern`` keeps one.
_CODES: dict[str, int] = {}
NAMES: list[str] = []


def name_code(name: str) -> int:
    """The code of event name ``name`` (``NAMES[code] == name``), given on first use."""
    code = _CODES.get(name)
    if code is None:
        code = _CODES[name] = len(NAMES)
        NAMES.append(name)
    return code


def _drop_before(m: Matches, cutoff: int) -> None:
    k = bisect_left(m.ts, cutoff)
    if k > 1:
        del m.ts[1:k]
        if m.vals is not None:
            m.epoch += 1
            del m.vals[1:k]


class UserActor:
    """One user's state. Its events are kept, for segments created later, as four columns
    sorted by ``ts`` (ties in arrival order): ``ts`` (an ``array('q')``), ``names`` (an
    ``array('I')`` of ``name_code``), ``sids`` (shared along a session: ``same_sid``) and
    ``raws`` (the props as the encoded JSON stored in SQLite, decoded only when a new atom
    is first built; None when there were none).
    About 28 bytes per event plus its props' length, when that payload is not shared.
    """

    __slots__ = ("uid", "props", "ts", "names", "raws", "sids", "matches", "deadline",
                 "sessions", "scache", "born")

    def __init__(self, uid: str, born: int = 0) -> None:
        self.uid = uid
        # Atoms (and pairs) with an id below `born` existed when the user appeared, so every
        # event of the user went through them: no entry in `matches` means none matched.
        # Later atoms are built from the columns when first read.
        self.born = born
        self.props: dict[str, Any] = {}
        self.ts: array[int] | tuple[int, ...] = _NONE
        self.names: array[int] | tuple[int, ...] = _NONE
        self.raws: list[bytes | None] | tuple[bytes | None, ...] = _NONE
        self.sids: list[str | None] | tuple[str | None, ...] = _NONE
        self.matches: dict[int, Matches] = {}
        self.deadline: int | None = None
        self.sessions: dict[str, int] | None = None
        # Per session-scope segment: its sessions' last results (SessionState); per
        # aggregate rule: its running value (AggState).
        self.scache: dict[object, SessionState | AggState] | None = None

    def append(self, ts: int, name: int, raw: bytes | None, sid: str | None) -> None:
        """Store one event (``name``: its ``name_code``) in ``ts`` order. O(1) in order,
        O(events) out of order."""
        col = self.ts
        if col is _NONE:
            self.ts, self.names = array("q", (ts,)), array("I", (name,))
            self.raws, self.sids = [raw], [sid]
        elif col[-1] <= ts:
            col.append(ts)
            self.names.append(name)  # type: ignore[union-attr]
            self.raws.append(raw)  # type: ignore[union-attr]
            self.sids.append(sid)  # type: ignore[union-attr]
        else:
            i = bisect_right(col, ts)
            col.insert(i, ts)  # type: ignore[union-attr]
            self.names.insert(i, name)  # type: ignore[union-attr]
            self.raws.insert(i, raw)  # type: ignore[union-attr]
            self.sids.insert(i, sid)  # type: ignore[union-attr]

    def matched_after(self, atoms: tuple[int, ...], ts: int) -> bool:
        """Whether one of ``atoms`` may have a match after ``ts`` (an atom not built for
        this user yet may)."""
        for a in atoms:
            m = self.matches.get(a)
            if m is None:
                if a >= self.born:
                    return True
            elif m.ts and m.ts[-1] > ts:
                return True
        return False

    def vetoed_until(self, vetoes: tuple[Veto, ...], now: int) -> int | None:
        """None unless ``vetoes`` (``CompiledSegment.vetoes``) rule the segment out at
        ``now``; then an instant before which they still do (``NEVER``: they always will).
        An atom not built for this user yet rules out nothing here."""
        matches = self.matches
        for a, lo, hi in vetoes:
            m = matches.get(a)
            if m is None or not m.ts:
                continue
            ts = m.ts
            top = now - hi
            if lo is None:
                if ts[0] <= top:  # The first match is always kept.
                    return NEVER
                continue
            last = ts[-1]
            if last > top:
                k = bisect_right(ts, top)
                if not k:
                    continue
                last = ts[k - 1]
            if last > now - lo:  # In range until it is ``lo`` old.
                return last + lo
        return None

    def same_sid(self, sid: str) -> str:
        """The latest event's session id object when ``sid`` equals it: one string per run
        of a session's events (not one per event), without a lookup in a table of every
        session id (as ``sys.intern`` would)."""
        sids = self.sids
        if sids:
            last = sids[-1]
            if last == sid:
                return last  # type: ignore[return-value]
        return sid

    def events(self) -> Iterator[tuple[int, str, bytes | None, str | None]]:
        """(ts, name, raw props, session id) in ``ts`` order."""
        return zip(self.ts, map(NAMES.__getitem__, self.names), self.raws, self.sids)

    def add_event(self, system: System, ts: int, name: str, props: dict[str, Any] | None,
                  raw: bytes | None, sid: str | None) -> list[int]:
        """Record an event; return the ids of atoms whose matches may have changed.

        ``props`` is the decoded form of ``raw``, or None to decode it only if needed.
        """
        code = name_code(name)
        started = True  # Whether the event's session (if any) started no later than it.
        if sid is not None:
            sids = self.sids  # `same_sid`, spelled out: this runs once per event.
            if sids and sids[-1] == sid:
                # After the latest event, of the same session: it started no later.
                started = self.ts[-1] <= ts
                sid = sids[-1]
            else:
                started = False
        self.append(ts, code, raw, sid)
        if not started and self.sessions is not None:
            first = self.sessions.get(sid)  # type: ignore[arg-type]
            if first is None or ts < first:
                self.sessions[sid] = ts  # type: ignore[index]
        changed = []
        registry = system.atoms
        matches = self.matches
        for aid, where, vp, pairs in registry.steps.get(name, ()):
            m = matches.get(aid)
            if m is None:
                if aid >= self.born:
                    changed.append(aid)  # Built lazily, from `events`, when first read.
                    continue
                m = EMPTY
            if where is not None or vp is not None:
                if props is None:
                    props = props_of(raw)
                if where is not None and not where(props):
                    continue
            if m is EMPTY:
                m = matches[aid] = registry.by_id[aid].new_matches()
            seen = m.ts
            if type(m) is Matches and (not seen or seen[-1] <= ts):
                seen.append(ts)  # The common case: in order, no values, no sessions.
            else:
                m.insert(ts, None if vp is None else props.get(vp), sid)
            changed.append(aid)
            for pair in pairs:
                good = matches.get(pair.id)
                if good is None and pair.id >= self.born:
                    continue  # Built lazily when first read.
                if good is None or good is EMPTY:
                    good = matches[pair.id] = new_matches()
                if pair.not_ == aid:
                    unanswered_add_not(good.ts, ts, pair.within)
                if pair.a == aid:
                    nots = matches.get(pair.not_, EMPTY)  # Absent: none (born before it).
                    unanswered_add_a(good.ts, nots.ts, ts, pair.within)
        return changed

    def set_props(self, props: dict[str, Any]) -> None:
        """Apply one profile update: ``None`` removes a property."""
        for k, v in props.items():
            if v is None:
                self.props.pop(k, None)
            else:
                self.props[k] = v

    def prune(self, cutoff: int) -> int:
        """Forget events before ``cutoff``, keeping the first of every list (``first_did``
        and ``restarted`` read it) and, of the raw events, the first of each name and props
        payload (a filter reads only the props, so whatever filter a segment created later
        uses, the first event it matches is kept) and the latest (``last_seen`` may read
        it). Returns how many raw events were dropped. O(events)."""
        col = self.ts
        k = bisect_left(col, cutoff)
        if k <= 2:
            return 0
        names, raws = self.names, self.raws
        seen: set[tuple[int, bytes | None]] = set()
        keep = []
        for i in range(k - 1):
            key = (names[i], raws[i])
            if key not in seen:
                seen.add(key)
                keep.append(i)
        keep.append(k - 1)
        dropped = k - len(keep)
        if dropped:
            self.ts = array("q", [col[i] for i in keep])
            self.ts.extend(col[k:])
            self.names = array("I", [names[i] for i in keep])
            self.names.extend(names[k:])
            self.raws = [raws[i] for i in keep] + raws[k:]
            sids = self.sids
            self.sids = [sids[i] for i in keep] + sids[k:]
        for m in self.matches.values():
            # Session-scope atoms are never pruned: their segments look back forever.
            _drop_before(m, cutoff)
        return dropped

    def session_starts(self) -> dict[str, int]:
        """Each session id and the ts of its first event. Built once, then kept current."""
        if self.sessions is None:
            self.sessions = {}
            for ts, sid in zip(self.ts, self.sids):
                if sid is not None and sid not in self.sessions:
                    self.sessions[sid] = ts  # The first in ts order is the earliest.
        return self.sessions


class ActorCtx:
    """The ``Ctx`` the rules read: one actor, seen through its system, at one evaluation."""

    __slots__ = ("actor", "system", "_profile", "_profile_at", "_scratch", "_kept", "dirty")

    def __init__(self, actor: UserActor, system: System, scratch: AtomRegistry | None = None):
        """``scratch``: atoms of a dry run, built here from raw events and never kept."""
        self.actor, self.system = actor, system
        self._profile: Mapping[str, Any] | None = None
        self._profile_at = 0
        self._scratch = scratch
        self._kept: dict[int, Matches] = actor.matches if scratch is None else {}
        # Which session an event-driven evaluation may have changed (None: none, as for a
        # deadline); ALL_SESSIONS when anything may have (profiles, memberships, first runs).
        self.dirty: str | None = ALL_SESSIONS

    def _kept_state(self, key: object, new: type[Any]) -> tuple[Any, bool]:
        """The user's state kept for ``key`` (created as ``new()`` if missing), and whether
        it was just created."""
        caches = self.actor.scache
        if caches is None:
            caches = self.actor.scache = {}
        state = caches.get(key)
        if state is None:
            state = caches[key] = new()
            return state, True
        return state, False

    def session_cache(self, key: object) -> tuple[SessionState | None, str | None]:
        if self._scratch is not None:
            return None, ALL_SESSIONS
        if not self.actor.session_starts():
            return None, ALL_SESSIONS  # No session: nothing to keep.
        state, created = self._kept_state(key, SessionState)
        # A new state has met no session yet: all of them, once.
        return state, ALL_SESSIONS if created else self.dirty

    def m(self, atom_id: int) -> Matches:
        got = self._kept.get(atom_id)
        if got is None and self._scratch is None and atom_id < self.actor.born:
            return EMPTY
        if got is None:
            registry = self._scratch if self._scratch is not None else self.system.atoms
            atom = registry.by_id[atom_id]
            got = atom.new_matches()
            event = atom.event
            plain = atom.where is None and atom.value_prop is None
            needles = atom.needles
            u = self.actor
            names, col, raws, sids = u.names, u.ts, u.raws, u.sids
            code = _CODES.get(event)
            i = -1
            try:
                while code is not None:
                    i = names.index(code, i + 1)  # A scan in C: most events are skipped.
                    raw = raws[i]
                    if needles is not None and (
                            raw is None or not any(n in raw for n in needles)):
                        continue  # Cannot pass the filter: no need to decode.
                    atom.record(got, col[i], _NO_PROPS if plain else props_of(raw), sids[i])
            except ValueError:
                pass
            # Most users match most atoms never: they share one read-only empty list.
            self._kept[atom_id] = got if got.ts else EMPTY
        return got

    def agg_state(self, node: object) -> AggState | None:
        """The running aggregate of ``node`` for this user, kept between evaluations."""
        if self._scratch is not None:
            return None
        return self._kept_state(node, AggState)[0]

    def unanswered(self, pair_id: int) -> Sequence[int] | None:
        """The kept list of a ``did_then_not`` pair, built on first use. Dry runs scan."""
        if self._scratch is not None:
            return None
        got = self._kept.get(pair_id)
        if got is None and pair_id < self.actor.born:
            return EMPTY.ts
        if got is None:
            pair = self.system.atoms.by_id[pair_id]
            got = new_matches()
            got.ts = array("q", unanswered(self.m(pair.a).ts, self.m(pair.not_).ts, pair.within))
            self._kept[pair_id] = got if got.ts else EMPTY
        return got.ts

    def profile(self, now: int, seen: bool = True) -> Mapping[str, Any]:
        if not seen:
            return self.actor.props
        if self._profile is None or self._profile_at != now:
            seen = seen_props(self.actor.ts, now)
            self._profile = {**self.actor.props, **seen} if seen else self.actor.props
            self._profile_at = now
        return self._profile

    def member(self, segment: str) -> bool:
        seg = self.system.segments.get(segment)
        return seg is not None and seg.members.has(self.actor.uid)

    def next_event_after(self, now: int) -> int:
        ts = self.actor.ts
        i = bisect_right(ts, now)
        return ts[i] if i < len(ts) else NEVER
