"""Compiled rule kinds: each answers "does it hold at `now`?" and "when could that change?".

Every node's ``eval(ctx, now)`` returns ``(holds, next)`` where ``next`` is the earliest
instant after ``now`` at which the answer can change with no new input (``NEVER`` if none).
``next`` may be early (a wake-up that changes nothing is harmless) but is never late.

Event rules read per-user ``Matches``: the timestamps (and, where needed, the values and
session ids) of the user's events that passed one atom's filter, in ``ts`` order. Windows
are bisects over them, so a re-evaluation costs O(log n) per leaf for most kinds.
"""

from __future__ import annotations

import heapq
import math
from array import array
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Mapping, MutableSequence, Sequence
from typing import Any, ClassVar, Protocol

import msgspec

from segactors.rules.filters import Predicate, eq_key
from segactors.timefmt import format_ts, parse_rfc3339

NEVER = 1 << 62


class Matches(msgspec.Struct, gc=False):
    """The events of one user that passed one atom, sorted by ``ts`` (ties keep arrival order).

    ``ts`` is an ``array('q')`` (8 bytes a match). Insert is O(n) in the worst case and
    O(1) for in-order arrivals. An atom that reads a value keeps the values too
    (``vals``); an atom of a session-scope segment also keeps one ``Matches`` per session
    (``by_sid``), so a session's view costs a dict lookup. ``new_matches(with_vals,
    with_sids)`` makes one of the subclass with room for just those: most atoms need
    neither, and their object is 24 bytes (a C struct the collector does not track: it
    refers to no object that could refer back to it).
    """

    ts: array[int]
    # Read on every kind; fields only of the subclasses that have them.
    vals: ClassVar[list[Any] | None] = None
    by_sid: ClassVar[dict[str, Matches] | None] = None
    # Running aggregates over index ranges (AggState) follow the values: a prune bumps
    # `epoch` (they start over); an insert before the end counts in `moved`, and the last
    # few are kept in `moves` as (index, value) to replay.
    epoch: ClassVar[int] = 0
    moved: ClassVar[int] = 0
    moves: ClassVar[list[tuple[int, Any]] | None] = None

    def insert(self, ts: int, val: Any, sid: str | None) -> None:
        ts_list = self.ts
        vals = self.vals
        if vals is not None:
            val = shared(val)
        if not ts_list or ts_list[-1] <= ts:
            ts_list.append(ts)
            if vals is not None:
                vals.append(val)
        else:
            i = bisect_right(ts_list, ts)
            ts_list.insert(i, ts)
            if vals is not None:
                vals.insert(i, val)
                self.moved += 1
                moves = self.moves
                if moves is None:
                    moves = self.moves = []
                moves.append((i, val))
                if len(moves) > _MOVES_KEPT:
                    del moves[0]
        if self.by_sid is not None and sid is not None:
            sub = self.by_sid.get(sid)
            if sub is None:
                sub = self.by_sid[sid] = new_matches(vals is not None)
            sub.insert(ts, val, None)

    def only_session(self, sid: str) -> Matches:
        """The events of session ``sid``. O(1)."""
        return EMPTY if self.by_sid is None else self.by_sid.get(sid, EMPTY)

    def _check(self) -> None:
        assert list(self.ts) == sorted(self.ts)
        assert self.vals is None or len(self.vals) == len(self.ts)
        if self.by_sid is not None:
            assert sum(len(m.ts) for m in self.by_sid.values()) <= len(self.ts)


# One copy of each common value that atoms keep (prices, SKUs, currencies repeat): a
# bounded table per type, so 1 and 1.0 stay apart, and unique values cost only themselves.
_SHARED: dict[type, dict[Any, Any]] = {float: {}, int: {}, str: {}}
_SHARED_MAX = 65_536


def shared(val: Any) -> Any:
    """``val``, or an equal object of the same type kept before. Zeros are not shared,
    so that -0.0 stays -0.0."""
    table = _SHARED.get(type(val))
    if table is None or not val:
        return val
    got = table.get(val)
    if got is not None:
        return got
    if len(table) < _SHARED_MAX and (type(val) is not str or len(val) <= 64):
        table[val] = val
    return val


class _Valued(Matches, gc=False):
    vals: list[Any] = msgspec.field(default_factory=list)  # type: ignore[misc]
    epoch: int = 0  # type: ignore[misc]
    moved: int = 0  # type: ignore[misc]
    moves: list[tuple[int, Any]] | None = None  # type: ignore[misc]


class _BySession(Matches, gc=False):
    by_sid: dict[str, Matches] = msgspec.field(default_factory=dict)  # type: ignore[misc]


class _ValuedBySession(_Valued, gc=False):
    by_sid: dict[str, Matches] = msgspec.field(default_factory=dict)  # type: ignore[misc]


_KINDS: dict[tuple[bool, bool], type[Matches]] = {
    (False, False): Matches, (True, False): _Valued, (False, True): _BySession,
    (True, True): _ValuedBySession}


def new_matches(with_vals: bool = False, with_sids: bool = False) -> Matches:
    """Empty ``Matches`` with room for values and per-session matches, if asked."""
    return _KINDS[with_vals, with_sids](array("q"))


EMPTY = new_matches()
_MOVES_KEPT = 32


class Ctx(Protocol):
    """What rules may read of one user."""

    def m(self, atom: int) -> Matches: ...

    def unanswered(self, pair: int) -> Sequence[int] | None: ...

    def session_cache(self, key: object) -> tuple[SessionState | None, str | None]: ...

    def profile(self, now: int, seen: bool = True) -> Mapping[str, Any]:
        """The profile at ``now``; with ``first_seen``/``last_seen`` only if ``seen``."""
        ...

    def agg_state(self, node: object) -> AggState | None: ...

    def member(self, segment: str) -> bool: ...

    def next_event_after(self, now: int) -> int: ...


def next_crossing(ts: Sequence[int], now: int, offsets: tuple[int, ...]) -> int:
    """The first instant after ``now`` at which some ``t + o`` (t in ts, o in offsets) is reached."""
    return crossing_from(ts, [bisect_right(ts, now - o) for o in offsets], offsets)


def crossing_from(ts: Sequence[int], bounds: Sequence[int], offsets: Sequence[int]) -> int:
    """``next_crossing`` from its bisections already made: ``bounds[k]`` is
    ``bisect_right(ts, now - offsets[k])``, the first event past that boundary."""
    best = NEVER
    n = len(ts)
    for i, o in zip(bounds, offsets):
        if i < n and ts[i] + o < best:
            best = ts[i] + o
    return best


class Window:
    """One of RULES.md's windows: sliding ``last``, fixed ``[lo, hi)``, or all time."""

    __slots__ = ("last", "lo", "hi", "offsets")

    def __init__(self, last: int | None = None, lo: int | None = None, hi: int | None = None):
        self.last, self.lo, self.hi = last, lo, hi
        self.offsets = (0, last) if last is not None else (0,)

    def span(self, ts: Sequence[int], now: int) -> tuple[int, int]:
        """Indices [i, j) of the visible events (ts <= now) inside the window. O(log n)."""
        if self.last is not None:
            return bisect_right(ts, now - self.last), bisect_right(ts, now)
        i = 0 if self.lo is None else bisect_left(ts, self.lo)
        top = now if self.hi is None else min(now, self.hi - 1)
        j = bisect_right(ts, top)
        return i, max(i, j)

    def span_next(self, ts: Sequence[int], now: int) -> tuple[int, int, int]:
        """``span`` and ``next`` at once: a sliding window's next crossing comes from the
        same two bisections (the first event past ``now``, the first inside the window)."""
        last = self.last
        if last is None:
            # Offsets (0,): the next crossing is the first event past now.
            j = bisect_right(ts, now)
            nxt = ts[j] if j < len(ts) else NEVER
            i = 0 if self.lo is None else bisect_left(ts, self.lo)
            if self.hi is not None and self.hi - 1 < now:
                j = bisect_right(ts, self.hi - 1)
            return i, max(i, j), nxt
        i = bisect_right(ts, now - last)
        j = bisect_right(ts, now)
        # crossing_from(ts, (j, i), (0, last)), spelled out: it runs on most evaluations.
        n = len(ts)
        nxt = ts[j] if j < n else NEVER
        if i < n and ts[i] + last < nxt:
            nxt = ts[i] + last
        return i, j, nxt

    def contains(self, t: int, now: int) -> bool:
        if t > now:
            return False
        if self.last is not None:
            return t > now - self.last
        return (self.lo is None or t >= self.lo) and (self.hi is None or t < self.hi)

    def next(self, ts: Sequence[int], now: int) -> int:
        return next_crossing(ts, now, self.offsets)


ALL_TIME = Window()
Result = tuple[bool, int]


class Node:
    __slots__ = ()

    def eval(self, ctx: Ctx, now: int) -> Result:
        raise NotImplementedError


class Always(Node):
    __slots__ = ()

    def eval(self, ctx: Ctx, now: int) -> Result:
        return True, NEVER


Cmp = Callable[[float], bool]


def compile_compare(op: str, value: float, to: float | None = None) -> Cmp:
    if op == "between":
        assert to is not None
        return lambda x: value <= x <= to
    return {
        "gt": lambda x: x > value, "gte": lambda x: x >= value, "lt": lambda x: x < value,
        "lte": lambda x: x <= value, "eq": lambda x: x == value, "neq": lambda x: x != value,
    }[op]


class Did(Node):
    __slots__ = ("atom", "win", "cmp", "include_absent", "past_zero")

    def __init__(self, atom: int, win: Window, cmp: Cmp, include_absent: bool,
                 past_zero: bool | None = None) -> None:
        self.atom, self.win, self.cmp, self.include_absent = atom, win, cmp, include_absent
        # What ``cmp`` says for every count from 1 up, when it says the same (else None).
        self.past_zero = past_zero

    def eval(self, ctx: Ctx, now: int) -> Result:
        i, j, nxt = self.win.span_next(ctx.m(self.atom).ts, now)
        n = j - i
        return (self.include_absent if n == 0 else self.cmp(n)), nxt


class DidNot(Node):
    __slots__ = ("atom", "win")

    def __init__(self, atom: int, win: Window) -> None:
        self.atom, self.win = atom, win

    def eval(self, ctx: Ctx, now: int) -> Result:
        i, j, nxt = self.win.span_next(ctx.m(self.atom).ts, now)
        return i == j, nxt


def _numbers(vals: list[Any]) -> list[float]:
    return [v for v in vals if type(v) is float or type(v) is int]


def _aggregate(fn: str, vals: list[Any]) -> float | None:
    """``fn`` over ``vals``: sums are exact, correctly rounded (``math.fsum``)."""
    if fn == "distinct":
        keys = {eq_key(v) for v in vals if v is not None}
        keys.discard(None)
        return float(len(keys)) if keys else None
    nums = _numbers(vals)
    if not nums:
        return None
    if fn == "sum":
        return math.fsum(nums)
    if fn == "avg":
        return math.fsum(nums) / len(nums)
    return min(nums) if fn == "min" else max(nums)


def _add_exact(partials: list[float], x: float) -> None:
    """Add ``x`` to the exact sum held as non-overlapping ``partials`` (Shewchuk)."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


_EXACT = 2 ** 53


_RUNNING_MIN = 16  # Values in a window above which an aggregate keeps a running state.


class AggState:
    """A running ``sum``/``avg``/``distinct`` over ``vals[i:j]`` of one ``Matches``: moving
    the range adds and removes only what entered and left, so a sliding window costs
    O(change), not O(window). Sums stay exact (the partials of an exact sum;
    removing is adding the negation), so the value equals ``_aggregate`` over the range."""

    __slots__ = ("m", "epoch", "moved", "i", "j", "partials", "n", "counts")

    def __init__(self) -> None:
        self.m: Matches | None = None
        self.epoch = self.moved = self.i = self.j = self.n = 0
        self.partials: list[float] = []
        self.counts: dict[Any, int] | None = None

    def _put(self, v: Any, d: int) -> bool:
        """Count ``v`` in (d=1) or out (d=-1). False when a sum could not stay exact."""
        counts = self.counts
        if counts is not None:
            k = eq_key(v)
            if k is not None:
                c = counts.get(k, 0) + d
                if c:
                    counts[k] = c
                else:
                    del counts[k]
        elif type(v) is float or type(v) is int:
            if type(v) is int and not -_EXACT <= v <= _EXACT:
                return False
            _add_exact(self.partials, v if d > 0 else -v)
            self.n += d
        return True

    def _follow(self, m: Matches) -> bool:
        """Replay the inserts before the end since the last read. False if too many."""
        behind = m.moved - self.moved
        moves = m.moves
        if moves is None or behind > len(moves):
            return False
        for k, v in moves[len(moves) - behind:]:
            if k <= self.i:
                self.i += 1  # Before the range: it shifts.
                self.j += 1
            elif k < self.j:
                self.j += 1  # Inside: one more value.
                if not self._put(v, 1):
                    return False
        self.moved = m.moved
        return True

    def value(self, fn: str, m: Matches, i: int, j: int) -> float | None:
        vals = m.vals
        assert vals is not None
        # Either edge may move either way (evaluations at slightly different instants
        # interleave): adjust by what changed, or start over when that is cheaper.
        if (self.m is not m or self.epoch != m.epoch
                or (self.moved != m.moved and not self._follow(m))
                or abs(i - self.i) + abs(j - self.j) > j - i):
            self.m, self.epoch, self.moved = m, m.epoch, m.moved
            self.i = self.j = i
            self.n = 0
            self.partials = []
            self.counts = {} if fn == "distinct" else None
        for lo, hi, d in self._moves(i, j):
            for v in vals[lo:hi]:
                if not self._put(v, d):
                    self.m = None  # Not exact as a float: computed directly.
                    return _aggregate(fn, vals[i:j])
        self.i, self.j = i, j
        if self.counts is not None:
            return float(len(self.counts)) if self.counts else None
        if not self.n:
            return None
        total = math.fsum(self.partials)
        return total if fn == "sum" else total / self.n

    def _moves(self, i: int, j: int) -> list[tuple[int, int, int]]:
        """The index ranges that enter (+1) and leave (-1) when [self.i, self.j) becomes
        [i, j)."""
        out = []
        if i > self.i:
            out.append((self.i, i, -1))
        elif i < self.i:
            out.append((i, self.i, 1))
        if j > self.j:
            out.append((self.j, j, 1))
        elif j < self.j:
            out.append((j, self.j, -1))
        return out

    def _check(self) -> None:
        m = self.m
        if m is None or m.vals is None or self.epoch != m.epoch or self.moved != m.moved:
            return
        fn = "distinct" if self.counts is not None else "sum"
        want = _aggregate(fn, m.vals[self.i:self.j])
        got = (float(len(self.counts)) if self.counts else None) if self.counts is not None \
            else (math.fsum(self.partials) if self.n else None)
        assert got == want, (got, want)


class Aggregate(Node):
    __slots__ = ("atom", "win", "fn", "cmp", "include_absent")

    def __init__(self, atom: int, win: Window, fn: str, cmp: Cmp, include_absent: bool) -> None:
        self.atom, self.win, self.fn, self.cmp = atom, win, fn, cmp
        self.include_absent = include_absent

    def eval(self, ctx: Ctx, now: int) -> Result:
        m = ctx.m(self.atom)
        i, j, nxt = self.win.span_next(m.ts, now)
        value = None
        if m.vals is not None and i < j:
            # A running state pays off over many values; a few are aggregated directly, and
            # then no state is kept (most users have few).
            state = (ctx.agg_state(self) if j - i > _RUNNING_MIN
                     and self.fn in ("sum", "avg", "distinct") else None)
            if state is not None:
                value = state.value(self.fn, m, i, j)
            else:
                value = _aggregate(self.fn, m.vals[i:j])
        holds = self.include_absent if value is None else self.cmp(value)
        return holds, nxt


class FirstDid(Node):
    __slots__ = ("atom", "win")

    def __init__(self, atom: int, win: Window) -> None:
        self.atom, self.win = atom, win

    def eval(self, ctx: Ctx, now: int) -> Result:
        ts = ctx.m(self.atom).ts
        if not ts:
            return False, NEVER
        first = ts[0]
        return self.win.contains(first, now), self.win.next(ts[:1], now)


def unanswered(a_ts: Sequence[int], not_ts: Sequence[int], within: int) -> list[int]:
    """The ``a`` timestamps with no ``not`` in ``(a, a + within]``. O(len(a) + len(not))."""
    out = []
    j, n = 0, len(not_ts)
    for a in a_ts:
        while j < n and not_ts[j] <= a:
            j += 1
        if j == n or not_ts[j] > a + within:
            out.append(a)
    return out


def unanswered_add_a(good: MutableSequence[int], not_ts: Sequence[int], t: int, within: int) -> None:
    """Keep ``good`` = unanswered(...) after an ``a`` at ``t`` arrives. O(log n)."""
    b = bisect_right(not_ts, t)
    if b == len(not_ts) or not_ts[b] > t + within:
        sorted_insert(good, t)


def unanswered_add_not(good: MutableSequence[int], t: int, within: int) -> None:
    """A ``not`` at ``t`` answers every ``a`` in ``[t - within, t)``. O(log n + removed)."""
    lo = bisect_left(good, t - within)
    hi = bisect_left(good, t, lo)
    del good[lo:hi]


class DidThenNot(Node):
    """Reads the maintained list of unanswered ``a`` events when the context keeps one
    (O(log n)); otherwise scans (O(min(a, not)) bisects, used for session scope)."""

    __slots__ = ("atom", "win", "then_not", "within", "pair", "offsets")

    def __init__(self, atom: int, win: Window, then_not: int, within: int, pair: int) -> None:
        self.atom, self.win, self.then_not, self.within = atom, win, then_not, within
        self.pair = pair
        self.offsets = win.offsets + (within,)

    def eval(self, ctx: Ctx, now: int) -> Result:
        within = self.within
        good = ctx.unanswered(self.pair)
        if good is not None:
            i, j = self.win.span(good, now)
            holds = min(j, bisect_right(good, now - within)) > i
            return holds, next_crossing(good, now, self.offsets)
        ts = ctx.m(self.atom).ts
        nots = ctx.m(self.then_not).ts
        i, j = self.win.span(ts, now)
        # Only an `a` with a.ts + within <= now can qualify: those are ts[i:k].
        k = max(i, min(j, bisect_right(ts, now - within)))
        holds = False
        n_nots = len(nots)
        while i < k:
            a = ts[i]
            b = bisect_right(nots, a)
            if b == n_nots or nots[b] > a + within:
                holds = True
                break
            # Every later `a` before nots[b] meets nots[b] within `within` too: skip them.
            i = bisect_left(ts, nots[b], i + 1, k)
        nxt = min(self.win.next(ts, now), next_crossing(ts, now, (within,)))
        return holds, nxt


def _chain_from(lists: list[tuple[Sequence[int], int, int]], start: int) -> int | None:
    """Greedy: the earliest last-step ts of a strictly increasing chain starting at ``start``."""
    t = start
    for ts, i, j in lists:
        k = bisect_right(ts, t, i, j)
        if k >= j:
            return None
        t = ts[k]
    return t


class Sequence(Node):
    __slots__ = ("atoms", "win", "within")

    def __init__(self, atoms: list[int], win: Window, within: int | None) -> None:
        self.atoms, self.win, self.within = atoms, win, within

    def eval(self, ctx: Ctx, now: int) -> Result:
        spans = []
        nxt = NEVER
        for atom in self.atoms:
            ts = ctx.m(atom).ts
            i, j, n = self.win.span_next(ts, now)
            spans.append((ts, i, j))
            if n < nxt:
                nxt = n
        first, i0, j0 = spans[0]
        rest = spans[1:]
        holds = False
        for k in range(i0, j0):
            end = _chain_from(rest, first[k])
            if end is None:
                break  # A later first step cannot find a chain either.
            if self.within is None or end - first[k] <= self.within:
                holds = True
                break
        return holds, nxt


SEEN = ("first_seen", "last_seen")


class Profile(Node):
    __slots__ = ("pred", "seen")

    def __init__(self, pred: Predicate, prop: str) -> None:
        self.pred, self.seen = pred, prop in SEEN

    def eval(self, ctx: Ctx, now: int) -> Result:
        nxt = ctx.next_event_after(now) if self.seen else NEVER
        return self.pred(ctx.profile(now, self.seen)), nxt


def profile_instant(v: object) -> float | None:
    """A profile value read as a timestamp: RFC 3339 string or integer epoch ms.

    As everywhere in RULES.md, a float is not a timestamp.
    """
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return parse_rfc3339(v)
        except ValueError:
            return None
    return None


class ProfileTime(Node):
    """``now + lo <= t < now + hi``: holds for ``now`` in ``(t - hi, t - lo]``."""

    __slots__ = ("prop", "lo", "hi", "seen")

    def __init__(self, prop: str, lo: int, hi: int) -> None:
        self.prop, self.lo, self.hi, self.seen = prop, lo, hi, prop in SEEN

    def eval(self, ctx: Ctx, now: int) -> Result:
        nxt = ctx.next_event_after(now) if self.seen else NEVER
        t = profile_instant(ctx.profile(now, self.seen).get(self.prop))
        if t is None:
            return False, nxt
        holds = now + self.lo <= t < now + self.hi
        # The answer flips at the first integer ms past t - hi, and past t - lo.
        for edge in (int(t - self.hi) + 1, int(t - self.lo) + 1):
            if now < edge < nxt:
                nxt = edge
        return holds, nxt


class InSegment(Node):
    __slots__ = ("segment", "negate")

    def __init__(self, segment: str, negate: bool) -> None:
        self.segment, self.negate = segment, negate

    def eval(self, ctx: Ctx, now: int) -> Result:
        return ctx.member(self.segment) != self.negate, NEVER


class Stopped(Node):
    __slots__ = ("atom", "before", "recent", "restarted")

    def __init__(self, atom: int, before: int, recent: int, restarted: bool) -> None:
        self.atom, self.before, self.recent, self.restarted = atom, before, recent, restarted

    def eval(self, ctx: Ctx, now: int) -> Result:
        ts = ctx.m(self.atom).ts
        t_, s_ = self.before, self.recent
        # One bisection per boundary; counts and the next crossing (offsets 0, s_, t_:
        # the first event past each boundary) come from them.
        b_t = bisect_right(ts, now - t_)
        b_s = bisect_right(ts, now - s_)
        b_0 = bisect_right(ts, now)
        middle = b_s - b_t if b_s > b_t else 0
        recent = b_0 - b_s if b_0 > b_s else 0
        if self.restarted:
            holds = b_t > 0 and middle == 0 and recent > 0
        else:
            holds = middle > 0 and recent == 0
        return holds, crossing_from(ts, (b_0, b_s, b_t), (0, s_, t_))


class Regularly(Node):
    __slots__ = ("atom", "period", "periods", "min_periods", "cmp", "offsets")

    def __init__(self, atom: int, period: int, periods: int, min_periods: int, cmp: Cmp):
        self.atom, self.period, self.periods = atom, period, periods
        self.min_periods, self.cmp = min_periods, cmp
        self.offsets = tuple(i * period for i in range(periods + 1))

    def eval(self, ctx: Ctx, now: int) -> Result:
        ts = ctx.m(self.atom).ts
        # One bisection per period boundary (offsets 0, p, 2p...): the counts per period
        # and the next crossing come from them.
        bounds = [bisect_right(ts, now - o) for o in self.offsets]
        cmp = self.cmp
        good = sum(1 for i in range(self.periods)
                   if cmp(max(0, bounds[i] - bounds[i + 1])))
        return good >= self.min_periods, crossing_from(ts, bounds, self.offsets)


class Group(Node):
    """``match``: need = n (all), 1 (any), 0 with none holding (none), or k (at_least)."""

    __slots__ = ("children", "need", "none", "decisive")

    def __init__(self, children: list[Node], need: int, none: bool) -> None:
        self.children, self.need, self.none = children, need, none
        # The child result that settles the group: one holding settles `none` and `any`
        # (need 1), one failing settles `all` (need every child).
        self.decisive: bool | None = (True if none or need == 1 else
                                      False if need == len(children) else None)

    def eval(self, ctx: Ctx, now: int) -> Result:
        held = 0
        nxt = NEVER
        # A child that settles the group, and cannot change with time alone, settles it
        # until the next event or update re-evaluates the segment: the rest is not read.
        # (Cheap children come first: see ``_Compiler.group``.)
        decisive = self.decisive
        for c in self.children:
            h, n = c.eval(ctx, now)
            if n == NEVER and h is decisive:
                return h != self.none, NEVER
            held += h
            if n < nxt:
                nxt = n
        return (held == 0 if self.none else held >= self.need), nxt


def needs_event(node: Node) -> bool:
    """Whether ``node`` can hold only while some event of one of its own atoms is kept:
    then, read on events none of which match its atoms (a session that has none of
    them), it fails at every instant and never changes by itself. Conservative: False
    where unsure."""
    if isinstance(node, (Did, Aggregate)):
        return not node.include_absent
    if isinstance(node, (FirstDid, DidThenNot, Sequence, Stopped)):
        return True
    if isinstance(node, Regularly):
        return node.min_periods >= 1 and not node.cmp(0)
    if isinstance(node, Group):
        free = sum(1 for c in node.children if not needs_event(c))
        return not node.none and free < node.need
    return False


Veto = tuple[int, int | None, int]


def _reach(win: Window) -> tuple[int | None] | None:
    """How far back ``win`` reaches from the instant it is read at: ``(last,)`` for a
    sliding window, ``(None,)`` for all time, None for a fixed one."""
    if win.last is not None:
        return (win.last,)
    return (None,) if win.lo is None and win.hi is None else None


def vetoes(node: Node) -> list[Veto]:
    """``(atom, lo, hi)`` each: ``node`` cannot hold at any instant ``t`` at which some event
    of ``atom`` lies in ``(t - lo, t - hi]`` (``lo`` None: at or before ``t - hi``).
    Conservative: none where unsure."""
    out: list[Veto] = []
    if isinstance(node, DidNot) or isinstance(node, Did) and node.past_zero is False:
        reach = _reach(node.win)  # Any event in the window fails it.
        if reach is not None:
            out.append((node.atom, reach[0], 0))
    elif isinstance(node, FirstDid) and node.win.last is not None:
        out.append((node.atom, None, node.win.last))  # The first is older than the window.
    elif isinstance(node, Stopped):
        if node.restarted:  # An event between `before` and `recent` ago.
            out.append((node.atom, node.before, node.recent))
        else:
            out.append((node.atom, node.recent, 0))
    elif isinstance(node, Group) and node.none:
        for c in node.children:  # Any child holding fails it.
            out += forcers(c)
    elif isinstance(node, Group) and node.need == len(node.children):
        for c in node.children:  # Every child must hold: any child's veto is the group's.
            out += vetoes(c)
    return sorted(set(out), key=repr)


def forcers(node: Node) -> list[Veto]:
    """``(atom, lo, hi)`` each: ``node`` holds at any instant ``t`` at which some event of
    ``atom`` lies in ``(t - lo, t - hi]``. Conservative: none where unsure."""
    out: list[Veto] = []
    if isinstance(node, Did) and node.past_zero is True:
        reach = _reach(node.win)  # Any event in the window makes it hold.
        if reach is not None:
            out.append((node.atom, reach[0], 0))
    elif isinstance(node, Group) and not node.none and node.need == 1:
        for c in node.children:  # Any child holding makes it hold.
            out += forcers(c)
    return out


class SessionCtx:
    """A user's context with every event rule limited to one session's events."""

    __slots__ = ("base", "sid")

    def __init__(self, base: Ctx, sid: str) -> None:
        self.base, self.sid = base, sid

    def m(self, atom: int) -> Matches:
        return self.base.m(atom).only_session(self.sid)

    def unanswered(self, pair: int) -> Sequence[int] | None:
        return None  # Session scope scans its own events.

    def agg_state(self, node: object) -> AggState | None:
        return None  # One node reads many sessions' lists: computed directly.

    def profile(self, now: int, seen: bool = True) -> Mapping[str, Any]:
        return self.base.profile(now, seen)

    def member(self, segment: str) -> bool:
        return self.base.member(segment)

    def next_event_after(self, now: int) -> int:
        return self.base.next_event_after(now)


ALL_SESSIONS = "\x00all"  # Session-state mode: anything may have changed.


class SessionState:
    """Per user and session-scope segment: the last (holds, next change) of each session
    that holds or will change by itself (a session that does neither is not kept), how
    many hold, a heap of their next changes (stale entries are skipped when popped), and
    the sessions to evaluate at the next evaluation once started (``later``): those met
    before they started, and those whose last events were not evaluated."""

    __slots__ = ("res", "holding", "heap", "later")

    def __init__(self) -> None:
        self.res: dict[str, Result] = {}
        self.holding = 0
        self.heap: list[tuple[int, str]] = []
        self.later: list[str] | None = None

    def set(self, sid: str, r: Result) -> None:
        old = self.res.get(sid)
        if old is not None and old[0]:
            self.holding -= 1
        if r[0] or r[1] < NEVER:
            self.res[sid] = r
        elif old is not None:
            del self.res[sid]
        if r[0]:
            self.holding += 1
        if r[1] < NEVER:
            heapq.heappush(self.heap, (r[1], sid))

    def wait(self, sid: str) -> None:
        """Evaluate ``sid`` at the next evaluation, or the first after it has started."""
        # Not searched (that cost more than it saved): a run of one session's events adds
        # it once, and a session listed twice is evaluated twice.
        later = self.later
        if later is None:
            self.later = [sid]
        elif later[-1] != sid:
            later.append(sid)

    def next(self) -> int:
        heap, res = self.heap, self.res
        while heap:
            t, sid = heap[0]
            r = res.get(sid)
            if r is not None and r[1] == t:
                return t
            heapq.heappop(heap)
        return NEVER

    def _check(self) -> None:
        assert self.holding == sum(1 for r in self.res.values() if r[0])
        assert all(r[0] or r[1] < NEVER for r in self.res.values())
        live = {(r[1], sid) for sid, r in self.res.items() if r[1] < NEVER}
        assert live <= set(self.heap)


def eval_sessions(root: Node, ctx: Ctx, sessions: dict[str, int], now: int,
                  state: SessionState | None = None, dirty: str | None = ALL_SESSIONS
                  ) -> Result:
    """Session scope: some session seen by ``now`` satisfies ``root`` on its own events.

    ``sessions`` maps each session id to the ts of its first event. With a kept ``state``,
    only the ``dirty`` session (None: none), the sessions whose next change is due and
    those that have started since they were met are evaluated: O(log sessions) besides
    those evaluations. Every session arrives as ``dirty`` with its first event, or is met
    by an ``ALL_SESSIONS`` evaluation (also without a kept state), which evaluates all.
    """
    if state is None or dirty == ALL_SESSIONS:
        state = state if state is not None else SessionState()
        state.res.clear()
        state.heap.clear()
        state.holding = 0
        state.later = None
        for sid, first in sessions.items():
            if first <= now:
                state.set(sid, root.eval(SessionCtx(ctx, sid), now))
            else:
                state.wait(sid)
    else:
        if dirty is not None:
            if sessions.get(dirty, NEVER) <= now:
                state.set(dirty, root.eval(SessionCtx(ctx, dirty), now))
            elif dirty in sessions:
                state.wait(dirty)
        heap, res = state.heap, state.res
        while heap and heap[0][0] <= now:
            t, sid = heapq.heappop(heap)
            r = res.get(sid)
            if r is not None and r[1] == t:
                state.set(sid, root.eval(SessionCtx(ctx, sid), now))
        if state.later is not None:
            waiting, state.later = state.later, None
            for sid in waiting:
                if sessions[sid] <= now:
                    state.set(sid, root.eval(SessionCtx(ctx, sid), now))
                else:
                    state.wait(sid)
        if len(heap) > 4 * len(res) + 16:
            state.heap = [(r[1], sid) for sid, r in res.items() if r[1] < NEVER]
            heapq.heapify(state.heap)
    # A new session can start at the user's next event.
    return state.holding > 0, min(ctx.next_event_after(now), state.next())


def seen_props(all_ts: Sequence[int], now: int) -> dict[str, str]:
    """``first_seen``/``last_seen`` at ``now`` from a user's sorted event timestamps."""
    k = bisect_right(all_ts, now)
    if k == 0:
        return {}
    return {"first_seen": format_ts(all_ts[0]), "last_seen": format_ts(all_ts[k - 1])}


def sorted_insert(ts: MutableSequence[int], t: int) -> None:
    if not ts or ts[-1] <= t:
        ts.append(t)
    else:
        insort(ts, t)
