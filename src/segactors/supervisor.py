"""One system's supervisor: routes events, profile updates and deadlines to user actors.

Everything here is synchronous and takes ``now`` explicitly, so tests drive it with any
clock. It returns membership changes; persisting and pushing them is the server's job.
"""

from __future__ import annotations

import enum
import heapq
from bisect import insort
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from sortedcontainers import SortedSet

from segactors.actor import ActorCtx, UserActor, name_code, props_of
from segactors.definition import Definition
from segactors.rules.compile import AtomRegistry, CompiledSegment, compile_builtin
from segactors.rules.evaluate import ALL_SESSIONS, NEVER, SessionState, Veto, needs_event

BUILTINS = ("all-users", "test-users")


def _stale(u: UserActor, seg: Segment, sid: str) -> None:
    """A session-scope segment is not evaluated on an event of session ``sid`` (it can
    only make a member's sessions hold, or a non-member's fail): the result it keeps for
    that session is computed again at its next evaluation. That comes no later than the
    next change of any result it keeps, the only instants its membership may change."""
    states = u.scache
    state = states.get(seg.compiled) if states is not None else None
    if isinstance(state, SessionState):
        state.wait(sid)


def _idx(seg: Segment) -> int:
    return seg.idx


class Status(str, enum.Enum):
    PENDING = "pending"
    ACTIVE = "active"
    EXPIRED = "expired"
    FAILED = "failed"


class Change(msgspec.Struct, frozen=True, gc=False):
    """One membership change (a C struct: millions are retained, and restored at start)."""

    seq: int
    segment: str
    user_id: str
    change: str  # "enter" | "leave"
    at: int


class Members(SortedSet):
    """A segment's members, in ``user_id`` order. ``has(uid)`` tests membership in C:
    ``uid in members`` goes through a Python method, and the hot path asks often."""

    def __init__(self, iterable: Iterable[str] | None = None, key: Any = None) -> None:
        super().__init__(iterable, key)
        self.has = self._set.__contains__


@dataclass(eq=False)
class Segment:
    """A segment and its members. ``members`` is sorted, for paging in ``user_id`` order."""

    id: str
    idx: int
    name: str
    description: str
    definition: Definition | None
    definition_json: Any
    compiled: CompiledSegment
    created_at: int
    created_by: str = "root"
    builtin: bool = False
    ends_at: int | None = None
    status: Status = Status.PENDING
    reason: str | None = None
    members: Members = field(default_factory=Members)
    dependents: list[Segment] = field(default_factory=list)

    def status_at(self, now: int) -> Status:
        if self.status is Status.ACTIVE and self.ends_at is not None and now >= self.ends_at:
            return Status.EXPIRED
        return self.status

    def live_at(self, now: int) -> bool:
        """Whether membership may still change at ``now`` (not failed, not past ``ends_at``)."""
        if self.status is Status.FAILED or self.status is Status.EXPIRED:
            return False
        return self.ends_at is None or now < self.ends_at


class DeadlineHeap:
    """(instant, user) entries; an entry is stale unless it equals the actor's ``deadline``.

    Push and pop are O(log n); stale entries are skipped when popped.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []

    def push(self, t: int, uid: str) -> None:
        heapq.heappush(self._heap, (t, uid))

    def peek(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: int) -> Iterator[tuple[int, str]]:
        heap = self._heap
        while heap and heap[0][0] <= now:
            yield heapq.heappop(heap)

    def __len__(self) -> int:
        return len(self._heap)


def load_events(systems: dict[str, System],
                rows: Iterable[tuple[str, str, str, int, str | None, bytes | None]]) -> None:
    """Restore stored events ``(system, user, name, ts, session id, props)``
    without evaluating anything (start-up; call ``System.loaded`` once all are in). One
    tight loop: this is most of a restart's time."""
    cur: str | None = None
    system: System | None = None
    users: dict[str, UserActor] = {}
    share = None
    count = 0
    for sys_id, uid, name, ts, sid, raw in rows:
        if sys_id != cur:
            if system is not None:
                system.events += count
            cur, system, count = sys_id, systems[sys_id], 0
            users, share = system.users, system._share
        count += 1
        u = users.get(uid)
        if u is None:
            u = users[uid] = UserActor(uid)
        code = name_code(name)
        if sid is not None:
            sid = u.same_sid(sid)
        if raw is not None:
            raw = share(raw)  # type: ignore[misc]
        col = u.ts
        if col and col[-1] <= ts:
            col.append(ts)  # type: ignore[union-attr]
            u.names.append(code)  # type: ignore[union-attr]
            u.raws.append(raw)  # type: ignore[union-attr]
            u.sids.append(sid)  # type: ignore[union-attr]
        else:
            u.append(ts, code, raw, sid)
    if system is not None:
        system.events += count


def new_key() -> str:
    return secrets.token_urlsafe(24)


class System:
    """A tenant: its users, segments, atoms, deadlines and change sequence."""

    def __init__(self, sid: str, write_key: str, secret: str, created_at: int) -> None:
        self.id, self.write_key, self.secret = sid, write_key, secret
        self.created_at = created_at
        self.users: dict[str, UserActor] = {}
        self.segments: dict[str, Segment] = {}
        self.atoms = AtomRegistry()
        self.events = 0
        self.seq = 0
        self.next_idx = 0
        self.deadlines = DeadlineHeap()
        self.recover_at = 0
        self._payloads: dict[bytes, bytes] = {}
        self.unrecovered: set[str] = set()
        # Atom -> the segments reading it, each with its horizon and sign for that atom, the
        # segment's vetoes and the last steps the atom's events need after them (see
        # CompiledSegment).
        self._by_atom: dict[int, list[tuple[Segment, int | None, int, tuple[Veto, ...] | None,
                                            tuple[int, ...] | None]]] = {}
        self._by_prop: dict[str, list[Segment]] = {}
        self._seen: list[Segment] = []
        # Session-scope segments that a new session may change before any of its atoms match.
        self._on_new_session: list[Segment] = []
        for bid in BUILTINS:
            self.add_segment(Segment(bid, 0, bid, "", None, None, compile_builtin(bid),
                                     created_at, builtin=True, status=Status.ACTIVE))

    # Segments

    def add_segment(self, seg: Segment) -> None:
        """Register a segment and index what it watches. Its first computation is separate."""
        seg.idx = self.next_idx
        self.next_idx += 1
        self.segments[seg.id] = seg
        c = seg.compiled
        for a, horizon in c.atoms.items():
            self._by_atom.setdefault(a, []).append(
                (seg, horizon, c.signs[a], c.vetoes or None, c.after.get(a)))
        for p in c.profile_props:
            if p in ("first_seen", "last_seen"):
                self._seen.append(seg)
            else:
                self._by_prop.setdefault(p, []).append(seg)
        if c.session_scope and not needs_event(c.root):
            # Any event with a session id may open a session that satisfies it. (A segment
            # that needs an event of its own atoms in the session is evaluated by that one.)
            self._on_new_session.append(seg)
        for ref in c.refs:
            self.segments[ref].dependents.append(seg)

    def remove_segment(self, seg: Segment) -> None:
        del self.segments[seg.id]
        for a, readers in self._by_atom.items():
            self._by_atom[a] = [r for r in readers if r[0] is not seg]
        for lst in (*self._by_prop.values(), self._seen,
                    self._on_new_session):
            if seg in lst:
                lst.remove(seg)
        for ref in seg.compiled.refs:
            target = self.segments.get(ref)
            if target is not None and seg in target.dependents:
                target.dependents.remove(seg)

    def referrers(self, seg_id: str) -> list[Segment]:
        return [s for s in self.segments.values() if seg_id in s.compiled.refs]

    def user_segments(self, uid: str) -> list[str]:
        return [s.id for s in self.segments.values() if s.members.has(uid)]

    # Evaluation

    def _evaluate(self, u: UserActor, segs: Iterable[Segment], now: int, at: int,
                  out: list[Change], dirty: str | None = ALL_SESSIONS) -> int:
        """Evaluate ``segs`` (and, on change, their dependents) for ``u`` in creation order.

        Appends a ``Change`` per membership flip of an active segment; returns the earliest
        instant any evaluated segment could change next. ``dirty`` says which session's
        events changed, for session-scope segments (see ``eval_sessions``).
        """
        ctx = ActorCtx(u, self)
        order = sorted(segs, key=_idx)
        nxt = NEVER
        uid = u.uid
        forced: set[int] = set()  # Dependents of a flipped segment: anything may differ.
        i = 0
        while i < len(order):
            seg = order[i]
            i += 1
            status = seg.status
            if seg.ends_at is not None or status is Status.FAILED or status is Status.EXPIRED:
                if not seg.live_at(now):
                    continue
            c = seg.compiled
            try:
                if c.session_scope:
                    everything = seg.idx in forced or seg in self._seen
                    ctx.dirty = ALL_SESSIONS if everything else dirty
                    holds, n = c.eval(ctx, now, u.session_starts)
                else:
                    holds, n = c.root.eval(ctx, now)
            except Exception as e:  # A broken segment must not take the server down.
                self.fail(seg, f"evaluation error: {e!r}")
                continue
            if seg.ends_at is not None and n >= seg.ends_at:
                n = NEVER
            if n < nxt:
                nxt = n
            members = seg.members
            if holds == members.has(uid):
                continue
            if holds:
                members.add(uid)
            else:
                members.discard(uid)
            if status is Status.ACTIVE:
                self.seq += 1
                out.append(Change(self.seq, seg.id, uid, "enter" if holds else "leave", at))
            # Dependents come later in creation order; queue each once.
            rest = order[i:]
            for dep in seg.dependents:
                forced.add(dep.idx)
                if dep not in rest:
                    insort(order, dep, lo=i, key=_idx)
                    rest = order[i:]
        return nxt

    def fail(self, seg: Segment, reason: str) -> None:
        """Mark ``seg`` failed, and every segment that depends on it."""
        if seg.status is Status.FAILED:
            return
        seg.status, seg.reason = Status.FAILED, reason
        for dep in seg.dependents:
            self.fail(dep, f"depends on failed segment {seg.id!r}")

    def _schedule(self, u: UserActor, nxt: int, fresh: bool) -> None:
        """Keep ``u.deadline`` at or before every segment's next possible change."""
        if not fresh and u.deadline is not None and u.deadline <= nxt:
            return
        if nxt >= NEVER:
            u.deadline = None
            return
        if u.deadline != nxt:
            u.deadline = nxt
            self.deadlines.push(nxt, u.uid)

    def _advance(self, u: UserActor, until: int, out: list[Change]) -> None:
        """Apply every time-driven change of ``u`` due by ``until``, each at its own instant."""
        while u.deadline is not None and u.deadline <= until:
            t = u.deadline
            u.deadline = None
            nxt = self._evaluate(u, self.segments.values(), t, t, out, dirty=None)
            self._schedule(u, nxt, fresh=True)

    def tick(self, now: int, limit: int | None = None) -> tuple[list[Change], bool]:
        """Run the deadlines due by ``now``; at most ``limit`` users. Returns (changes, more)."""
        out: list[Change] = []
        handled = 0
        for t, uid in self.deadlines.pop_due(now):
            u = self.users.get(uid)
            if u is None or u.deadline != t:
                continue
            self._advance(u, now, out)
            handled += 1
            if limit is not None and handled >= limit:
                break
        nxt = self.deadlines.peek()
        return out, nxt is not None and nxt <= now

    def next_deadline(self) -> int | None:
        return self.deadlines.peek()

    def _share(self, raw: bytes | None) -> bytes | None:
        """One copy of each short, common props payload (same page, same referrer...):
        a bounded table, so unique payloads cost nothing more than themselves."""
        if raw is None or len(raw) > 96:
            return raw
        got = self._payloads.get(raw)
        if got is not None:
            return got
        if len(self._payloads) < 65_536:
            self._payloads[raw] = raw
        return raw

    def loaded(self, last: int) -> None:
        """After start-up loading: every user still has to be recovered (``recover``)
        from instant ``last``, when the stored state was last written."""
        self.recover_at = last
        self.unrecovered = set(self.users)

    def recover(self, uids: Iterable[str], now: int, out: list[Change]) -> None:
        """Bring restored users up to ``now``: evaluate every segment at the instant the
        state was stored (a change found then is emitted at that instant), then apply each
        time-driven change that came due since, at its own instant. O(segments) per user."""
        for uid in uids:
            u = self.users.get(uid)
            if u is not None and uid in self.unrecovered:
                self._recover(u, now, out)

    def _recover(self, u: UserActor, now: int, out: list[Change]) -> None:
        self.unrecovered.discard(u.uid)
        at = min(self.recover_at, now)
        nxt = self._evaluate(u, self.segments.values(), at, at, out)
        self._schedule(u, nxt, fresh=True)
        self._advance(u, now, out)

    def load_profile(self, uid: str, props: dict[str, Any]) -> None:
        u = self.users.get(uid)
        if u is None:
            u = self.users[uid] = UserActor(uid)
        u.set_props(props)

    def _user(self, uid: str, now: int, out: list[Change]) -> tuple[UserActor, bool]:
        u = self.users.get(uid)
        if u is None:
            u = self.users[uid] = UserActor(uid, len(self.atoms.by_id))
            return u, True
        if self.unrecovered and uid in self.unrecovered:
            self._recover(u, now, out)
        self._advance(u, now, out)
        return u, False

    def apply_event(self, uid: str, name: str, ts: int, props: dict[str, Any],
                    sid: str | None, now: int, out: list[Change],
                    raw: bytes | None = None) -> None:
        """Route one accepted event to its actor and re-evaluate what it can affect."""
        self.events += 1
        u, new = self._user(uid, now, out)
        if raw is None and props:
            raw = msgspec.json.encode(props)
        # A session that session-scope segments have not seen yet (or that starts after
        # now) must be evaluated whatever its events: `did_not` holds on an empty session.
        new_session = False
        if sid is not None and self._on_new_session:
            first = NEVER if u.sessions is None else u.sessions.get(sid, NEVER)
            new_session = first > now
        changed = u.add_event(self, ts, name, props, self._share(raw), sid)
        later = NEVER  # The earliest instant a segment skipped by its vetoes may hold again.
        if new:
            segs: Iterable[Segment] = self.segments.values()
        else:
            found: dict[int, Segment] = {}
            for a in changed:
                for s, horizon, sign, vetoes, after in self._by_atom.get(a, ()):
                    # Past its horizon, the event cannot change the segment now or later;
                    # nor can an event that can only make a member hold, or a non-member
                    # fail (its next change can only come later, and the deadline kept is
                    # at or before the earlier one).
                    if horizon is not None and ts + horizon <= now:
                        continue
                    # A step before the last of a sequence, with no last step after it,
                    # joins no chain.
                    if after is not None and not u.matched_after(after, ts):
                        continue
                    if sign or vetoes is not None:
                        member = s.members.has(uid)
                        if sign and member == (sign > 0) and (
                                -1 <= sign <= 1 or self._adds_no_negative(a, props, raw)):
                            if sid is not None and s.compiled.session_scope:
                                _stale(u, s, sid)
                            continue
                        # A non-member whose events rule the segment out now stays out
                        # until they may stop to: evaluated then, not now.
                        if vetoes is not None and not member:
                            until = u.vetoed_until(vetoes, now)
                            if until is not None:
                                if until < later:
                                    later = until
                                continue
                    found[s.idx] = s
            for s in self._seen:
                found[s.idx] = s
            if new_session:
                for s in self._on_new_session:
                    found[s.idx] = s
            if not found:
                # Nothing to evaluate: the deadline kept stays right, or comes earlier.
                if later < NEVER and (u.deadline is None or u.deadline > later):
                    self._schedule(u, later, fresh=False)
                return
            segs = found.values()
        nxt = self._evaluate(u, segs, now, now, out, dirty=ALL_SESSIONS if new else sid)
        if later < nxt:
            nxt = later
        # `_schedule`'s first test, spelled out: most events leave the deadline as it is.
        if new or u.deadline is None or u.deadline > nxt:
            self._schedule(u, nxt, fresh=new)

    def _adds_no_negative(self, atom: int, props: dict[str, Any] | None,
                          raw: bytes | None) -> bool:
        """Whether an event adds to the sums of ``atom`` (whose sign is ``SUM_SIGN`` times
        +1 or -1) a non-negative number or nothing."""
        if props is None:
            props = props_of(raw)
        v = props.get(self.atoms.by_id[atom].value_prop)  # type: ignore[arg-type]
        return not ((type(v) is int or type(v) is float) and v < 0)

    def apply_profile(self, uid: str, props: dict[str, Any], now: int,
                      out: list[Change]) -> None:
        """Apply one profile update (``None`` removes a property) and re-evaluate."""
        u, new = self._user(uid, now, out)
        u.set_props(props)
        if new:
            segs: Iterable[Segment] = self.segments.values()
        else:
            found = {s.idx: s for k in props for s in self._by_prop.get(k, ())}
            segs = found.values()
        nxt = self._evaluate(u, segs, now, now, out)
        self._schedule(u, nxt, fresh=new)

    def backfill(self, seg: Segment, uids: Iterable[str], now: int, out: list[Change]) -> None:
        """First computation of ``seg`` over existing users: its members are set silently.

        ``out`` still receives the time-driven changes of other segments that come due.
        """
        for uid in uids:
            u, _ = self._user(uid, now, out) if uid in self.users else (None, False)
            if u is None:
                continue
            nxt = self._evaluate(u, (seg,), now, now, out)
            self._schedule(u, nxt, fresh=False)

    def estimate(self, segment: CompiledSegment, atoms: AtomRegistry, now: int,
                 uids: Iterable[str], into: list[str]) -> None:
        """Dry run: append the users of ``uids`` for whom ``segment`` holds at ``now``.

        ``segment`` was compiled over the scratch registry ``atoms``: nothing is kept.
        """
        for uid in uids:
            u = self.users.get(uid)
            if u is not None:
                ctx = ActorCtx(u, self, atoms)
                holds, _ = segment.eval(ctx, now, u.session_starts)
                if holds:
                    into.append(uid)

    def retention_cutoff(self, now: int, minimum: int) -> int | None:
        """Events before this instant may be forgotten: none of the live segments looks
        further back than ``max(minimum, their lookback)``. None when one looks back forever.

        Work still owed for earlier instants (overdue deadlines, users not yet recovered
        after a restart) is judged from those instants."""
        due = self.deadlines.peek()
        if due is not None and due < now:
            now = due
        if self.unrecovered:
            now = min(now, self.recover_at)
        keep = minimum
        for seg in self.segments.values():
            if seg.builtin or not seg.live_at(now):
                continue
            lb = seg.compiled.lookback
            if lb is None:
                return None
            keep = max(keep, lb)
        return now - keep

    def prune(self, uids: Iterable[str], cutoff: int | None) -> int:
        """Forget the events of ``uids`` before ``cutoff`` (None: keep everything)."""
        if cutoff is None:
            return 0
        dropped = 0
        for uid in uids:
            u = self.users.get(uid)
            if u is not None:
                dropped += u.prune(cutoff)
        return dropped

    def _check(self) -> None:
        """Invariants: every actor with a deadline has a heap entry at that instant; its
        columns line up in ts order, and its matches and session states are consistent."""
        entries = set(self.deadlines._heap)
        for u in self.users.values():
            assert u.deadline is None or (u.deadline, u.uid) in entries
            assert list(u.ts) == sorted(u.ts)
            assert len(u.ts) == len(u.names) == len(u.raws) == len(u.sids)
            for m in u.matches.values():
                m._check()
            for state in (u.scache or {}).values():
                state._check()
