"""Compile a checked ``Definition`` into an evaluator tree over shared atoms.

An *atom* is (event name, filter, recorded property, session-aware): the unit of work done
once per event at ingestion. Segments that filter the same way share an atom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from msgspec import UnsetType

from segactors import definition as d
from segactors.rules import evaluate as ev
from segactors.rules.filters import Predicate, compile_filter, compile_where
from segactors.timefmt import parse_duration, parse_ts


@dataclass(eq=False)
class Atom:
    id: int
    event: str
    where: Predicate | None
    value_prop: str | None
    with_sids: bool
    # Byte strings one of which the stored props (msgspec JSON) must contain for ``where``
    # to pass; None when no such test is known. Lets a scan skip most decodes.
    needles: tuple[bytes, ...] | None = None

    def new_matches(self) -> ev.Matches:
        return ev.new_matches(self.value_prop is not None, self.with_sids)

    def record(self, m: ev.Matches, ts: int, props: dict[str, Any], sid: str | None) -> None:
        """Insert the event into ``m`` when it passes this atom's filter."""
        if self.where is None or self.where(props):
            val = props.get(self.value_prop) if self.value_prop is not None else None
            m.insert(ts, val, sid)


@dataclass(eq=False)
class Pair:
    """Derived state of ``did_then_not``: the ``a`` events no ``not`` answered in time."""

    id: int
    a: int
    not_: int
    within: int


Step = tuple[int, Predicate | None, str | None, tuple[Pair, ...]]


class AtomRegistry:
    """Atoms of one system, shared between segments, indexed by event name."""

    def __init__(self) -> None:
        self.by_key: dict[Any, Atom] = {}
        self.by_id: list[Any] = []  # Atoms and Pairs share one id space.
        self.by_event: dict[str, list[Atom]] = {}
        self.pairs: dict[tuple[int, int, int], Pair] = {}
        self.pairs_by_atom: dict[int, list[Pair]] = {}
        # Per event name, what recording an event reads of each of its atoms, spelled out:
        # (id, filter, value property, pairs it takes part in).
        self.steps: dict[str, tuple[Step, ...]] = {}

    def _restep(self, event: str) -> None:
        self.steps[event] = tuple(
            (a.id, a.where, a.value_prop, tuple(self.pairs_by_atom.get(a.id, ())))
            for a in self.by_event[event])

    def pair(self, a: int, not_: int, within: int) -> Pair:
        key = (a, not_, within)
        got = self.pairs.get(key)
        if got is None:
            got = self.pairs[key] = Pair(len(self.by_id), a, not_, within)
            self.by_id.append(got)
            self.pairs_by_atom.setdefault(a, []).append(got)
            if not_ != a:
                self.pairs_by_atom.setdefault(not_, []).append(got)
            for aid in (a, not_):
                self._restep(self.by_id[aid].event)
        return got

    def get(self, event: str, where: list[d.Filter], value_prop: str | None, sids: bool) -> Atom:
        key = (event, msgspec.json.encode(where), value_prop, sids)
        atom = self.by_key.get(key)
        if atom is None:
            plain = [(f.property, f.op, _value(f.value)) for f in where]
            atom = Atom(len(self.by_id), event, compile_where(plain), value_prop, sids,
                        _needles(plain))
            self.by_key[key] = atom
            self.by_id.append(atom)
            self.by_event.setdefault(event, []).append(atom)
            self._restep(event)
        return atom


def _needles(where: list[tuple[str, str, Any]]) -> tuple[bytes, ...] | None:
    """What the encoded props must contain for a string filter of ``where`` to pass: every
    filter must, and JSON escapes character by character, so the encoding of a string
    value (or of a part of it) appears in the encoding of any string holding it."""
    enc = msgspec.json.encode
    for _prop, op, value in where:
        if op == "eq" and isinstance(value, str):
            return (enc(value),)
        if op == "in" and value and all(isinstance(v, str) for v in value):
            return tuple(enc(v) for v in value)
        if op == "starts_with" and isinstance(value, str):
            return (enc(value)[:-1],)
        if op == "contains" and isinstance(value, str) and value:
            return (enc(value)[1:-1],)
    return None


def _value(v: Any) -> Any:
    return None if isinstance(v, UnsetType) else v


def _window(w: d.Window | UnsetType) -> ev.Window:
    if isinstance(w, UnsetType):
        return ev.ALL_TIME
    if not isinstance(w.last, UnsetType):
        return ev.Window(last=parse_duration(w.last))
    assert not isinstance(w.from_, UnsetType)
    hi = None if isinstance(w.to, UnsetType) else parse_ts(w.to)
    return ev.Window(lo=parse_ts(w.from_), hi=hi)


def _cmp(c: d.Compare | UnsetType) -> ev.Cmp:
    if isinstance(c, UnsetType):
        return lambda n: n >= 1
    return ev.compile_compare(c.op, c.value, None if isinstance(c.to, UnsetType) else c.to)


def _counts(holds: Callable[[int], bool], c: d.Compare | UnsetType) -> list[bool] | None:
    """``holds(n)`` for the counts ``n`` = 0, 1, 2... up to past the comparison's largest
    bound, after which every comparison is constant; None when that is too far to list."""
    top = 1.0 if isinstance(c, UnsetType) else max(
        c.value, 0.0 if isinstance(c.to, UnsetType) else c.to)
    if top > 1000:
        return None
    return [holds(n) for n in range(int(top) + 3)]


def _count_sign(holds: Callable[[int], bool], c: d.Compare | UnsetType) -> int:
    """How ``holds(n)`` moves as a count ``n`` = 0, 1, 2... grows: +1 never down, -1 never
    up, 0 either way (or too far to tell)."""
    seen = _counts(holds, c)
    if seen is None:
        return 0
    if all(a <= b for a, b in zip(seen, seen[1:])):
        return 1
    if all(a >= b for a, b in zip(seen, seen[1:])):
        return -1
    return 0


def _past_zero(holds: Callable[[int], bool], c: d.Compare | UnsetType) -> bool | None:
    """What ``holds(n)`` is for every count ``n`` >= 1, when it is the same for all (else
    None)."""
    seen = _counts(holds, c)
    past = set(seen[1:]) if seen is not None else set()
    return past.pop() if len(past) == 1 else None


def _aggregate_sign(fn: str, op: str, absent: bool, cmp: ev.Cmp, c: d.Compare) -> int:
    """An aggregate rule's sign (see ``_Compiler.atom``). More events can only add distinct
    values, raise a max, lower a min, and raise a sum when each adds a non-negative number
    or none (``SUM_SIGN``, checked per event); averages move either way. The value before
    any (``absent``) must be where the rule starts from: failing if more can only make it
    hold, holding if more can only make it fail."""
    if fn == "distinct":
        return _count_sign(lambda n: absent if n == 0 else cmp(n), c)
    if fn == "avg" or op not in ("gt", "gte", "lt", "lte"):
        return 0
    more = (op in ("gt", "gte")) == (fn != "min")  # Whether more events can only help.
    if absent == more:
        return 0
    sign = 1 if more else -1
    return sign * SUM_SIGN if fn == "sum" else sign


# A sign times this: only for an event whose value is a non-negative number or none.
SUM_SIGN = 2


def _reads_events(node: ev.Node) -> bool:
    return not isinstance(node, (ev.Profile, ev.ProfileTime, ev.InSegment, ev.Always))


def _need(match: d.Match, n: int) -> tuple[int, bool]:
    if isinstance(match, d.AtLeast):
        return match.at_least, False
    return {"all": (n, False), "any": (1, False), "none": (0, True)}[match]


@dataclass(eq=False)
class CompiledSegment:
    """A segment ready to evaluate: ``eval(ctx, now, sessions)`` → (holds, next change)."""

    root: ev.Node
    session_scope: bool
    # Each atom it reads, with its horizon: an event of that atom at ``ts`` can change the
    # segment only at instants before ``ts + horizon`` (None: at any later instant).
    atoms: dict[int, int | None] = field(default_factory=dict)
    # Each atom's sign: +1 when more events of it can only make the segment hold (at every
    # instant), -1 when they can only make it fail, 0 when either (or unknown); +-SUM_SIGN
    # as +-1, for an event that adds a non-negative number or none to its sums.
    signs: dict[int, int] = field(default_factory=dict)
    profile_props: set[str] = field(default_factory=set)
    refs: set[str] = field(default_factory=set)
    # How far back its event rules look (ms), beyond the first matching event of each atom,
    # which is always kept; None when unbounded (an all-time or fixed window).
    lookback: int | None = 0
    # Events that keep it from holding, as ``(atom, lo, hi)``: it fails at every instant
    # ``t`` at which an event of ``atom`` lies in ``(t - lo, t - hi]`` (``lo`` None: at or
    # before ``t - hi``). See ``evaluate.vetoes``; user scope only.
    vetoes: tuple[ev.Veto, ...] = ()
    # Atoms read only as steps before the last of sequences, each with the atoms of those
    # last steps: an event at ``ts`` of such an atom joins no chain (so changes nothing)
    # unless one of them has a match after ``ts``.
    after: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def eval(self, ctx: ev.Ctx, now: int, sessions: Callable[[], dict[str, int]]) -> ev.Result:
        if self.session_scope:
            cache, dirty = ctx.session_cache(self)
            return ev.eval_sessions(self.root, ctx, sessions(), now, cache, dirty)
        return self.root.eval(ctx, now)


class _Compiler:
    def __init__(self, atoms: AtomRegistry, default_window: d.Window | UnsetType, sids: bool):
        self.registry = atoms
        self.default = default_window
        self.sids = sids
        self.out = CompiledSegment(ev.Always(), sids)
        self.polarity = 1  # -1 under an odd number of `none` groups.
        self.uses: dict[int, int] = {}  # How many rules (or sequence steps) read each atom.
        self.sequences: list[list[int]] = []  # Each sequence's atoms, step by step.

    def atom(self, event: str, where: list[d.Filter], horizon: int | None, sign: int,
             value_prop: str | None = None) -> int:
        """The atom's id. ``horizon``: how long after its ``ts`` an event of it can still
        change this rule (None: forever); ``sign``: +1 when more of its events can only
        make the rule hold, -1 only fail, 0 either."""
        a = self.registry.get(event, where, value_prop, self.sids)
        self.uses[a.id] = self.uses.get(a.id, 0) + 1
        atoms, signs = self.out.atoms, self.out.signs
        sign *= self.polarity
        if a.id in atoms:
            have = atoms[a.id]
            atoms[a.id] = None if have is None or horizon is None else max(have, horizon)
            if signs[a.id] != sign:
                signs[a.id] = 0
        else:
            atoms[a.id] = horizon
            signs[a.id] = sign
        return a.id

    def before_last(self) -> dict[int, tuple[int, ...]]:
        """``CompiledSegment.after``: each atom read only as a step before the last of
        sequences, with the last steps' atoms (none of them that atom)."""
        steps: dict[int, int] = {}
        lasts: dict[int, set[int]] = {}
        for seq in self.sequences:
            for a in seq[:-1]:
                steps[a] = steps.get(a, 0) + 1
                lasts.setdefault(a, set()).add(seq[-1])
        return {a: tuple(sorted(lasts[a])) for a, n in steps.items()
                if n == self.uses[a] and a not in lasts[a]}

    def win(self, w: d.Window | UnsetType, extra: int = 0) -> ev.Window:
        win = _window(self.default if isinstance(w, UnsetType) else w)
        self.needs(None if win.last is None else win.last + extra)
        return win

    def needs(self, ms: int | None) -> None:
        have = self.out.lookback
        self.out.lookback = None if ms is None or have is None else max(have, ms)

    def group(self, rules: list[d.Rule], match: d.Match) -> ev.Node:
        need, none = _need(match, len(rules))
        if none:
            self.polarity = -self.polarity  # `none` holds when no child does.
        children = [self.rule(r) for r in rules]
        if none:
            self.polarity = -self.polarity
        if len(children) == 1 and need == 1 and not none:
            return children[0]  # "all"/"any"/at_least 1 of one rule is that rule.
        # Rules that read no events first: they are cheap, and often settle the group.
        children.sort(key=_reads_events)
        return ev.Group(children, need, none)

    def rule(self, r: d.Rule) -> ev.Node:  # noqa: C901 - one branch per rule kind
        if isinstance(r, d.Group):
            return self.group(r.rules, r.match)
        if isinstance(r, d.Did):
            win = self.win(r.window)
            cmp = _cmp(r.count)
            absent = r.include_absent
            sign = _count_sign(lambda n: absent if n == 0 else cmp(n), r.count)
            return ev.Did(self.atom(r.event, r.where, win.last, sign), win, cmp, absent,
                          _past_zero(cmp, r.count))
        if isinstance(r, d.DidNot):
            win = self.win(r.window)
            return ev.DidNot(self.atom(r.event, r.where, win.last, -1), win)
        if isinstance(r, d.Aggregate):
            c = r.compare
            cmp = ev.compile_compare(c.op, c.value, None if isinstance(c.to, UnsetType) else c.to)
            win = self.win(r.window)
            absent = r.include_absent
            sign = _aggregate_sign(r.fn, c.op, absent, cmp, c)
            return ev.Aggregate(self.atom(r.event, r.where, win.last, sign, r.property), win,
                                r.fn, cmp, absent)
        if isinstance(r, d.FirstDid):
            # Reads only the first matching event, which is always kept.
            win = _window(self.default if isinstance(r.window, UnsetType) else r.window)
            return ev.FirstDid(self.atom(r.event, r.where, None, 0), win)
        if isinstance(r, d.DidThenNot):
            within = parse_duration(r.within)
            win = self.win(r.window, within)
            horizon = None if win.last is None else win.last + within
            a = self.atom(r.event, r.where, horizon, 1)
            not_ = self.atom(r.then_not.event, r.then_not.where, horizon, -1)
            pair = self.registry.pair(a, not_, within)
            return ev.DidThenNot(a, win, not_, within, pair.id)
        if isinstance(r, d.Sequence):
            within = None if isinstance(r.within, UnsetType) else parse_duration(r.within)
            win = self.win(r.window)
            steps = [self.atom(s.event, s.where, win.last, 1) for s in r.steps]
            self.sequences.append(steps)
            return ev.Sequence(steps, win, within)
        if isinstance(r, d.Profile):
            self.out.profile_props.add(r.property)
            return ev.Profile(compile_filter(r.property, r.op, _value(r.value)), r.property)
        if isinstance(r, d.ProfileTime):
            self.out.profile_props.add(r.property)
            return ev.ProfileTime(r.property, parse_duration(r.from_, signed=True),
                                  parse_duration(r.to, signed=True))
        if isinstance(r, (d.InSegment, d.NotInSegment)):
            self.out.refs.add(r.segment)
            return ev.InSegment(r.segment, isinstance(r, d.NotInSegment))
        if isinstance(r, (d.Stopped, d.Restarted)):
            # `restarted` also asks for an event at or before now - before: the first one is
            # kept, and any old event can be it.
            before = parse_duration(r.before)
            self.needs(before)
            restarted = isinstance(r, d.Restarted)
            return ev.Stopped(self.atom(r.event, r.where, None if restarted else before, 0),
                              before,
                              parse_duration(r.recent), restarted)
        if isinstance(r, d.Regularly):
            period = parse_duration(r.period)
            self.needs(period * r.periods)
            cmp = _cmp(r.count)
            sign = _count_sign(cmp, r.count)  # Per period; then "at least min_periods".
            return ev.Regularly(self.atom(r.event, r.where, period * r.periods, sign), period,
                                r.periods, r.min_periods, cmp)
        raise TypeError(f"unknown rule {r!r}")


def compile_definition(defn: d.Definition, atoms: AtomRegistry) -> CompiledSegment:
    c = _Compiler(atoms, defn.window, defn.scope == "session")
    c.out.root = c.group(defn.rules, defn.match)
    if c.sids:
        c.out.lookback = None  # A session's first event may be older than any window.
    else:
        c.out.vetoes = tuple(ev.vetoes(c.out.root))
    c.out.after = c.before_last()
    return c.out


def compile_builtin(segment_id: str) -> CompiledSegment:
    """``all-users`` holds for every known user; ``test-users`` for ``test_user`` = true."""
    if segment_id == "all-users":
        return CompiledSegment(ev.Always(), False)
    assert segment_id == "test-users"
    pred = compile_filter("test_user", "eq", True)
    return CompiledSegment(ev.Profile(pred, "test_user"), False, profile_props={"test_user"})
