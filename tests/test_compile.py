"""What the compiler tells the supervisor about each atom: its horizon and its sign.

An event of an atom is not evaluated against a segment past the atom's horizon, nor when
its sign says it cannot flip the user's membership; the differential tests check that the
members stay exact, these check that the skips are the ones intended.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from segactors.actor import ActorCtx, UserActor
from segactors.definition import parse_definition
from segactors.rules.compile import AtomRegistry, CompiledSegment, compile_definition
from segactors.rules.evaluate import needs_event, shared
from segactors.supervisor import System
from gen import NAMES, PROFILE_PROPS, DefGen, gen_profile_value, gen_props

MIN = 60_000
DAY = 24 * 60 * MIN
NOW = 1_800_000_000_000


def compiled(rules: list[dict[str, Any]], **extra: Any) -> tuple[dict[str, tuple[Any, int]],
                                                               bool]:
    """Per event name (each rule here reads its own): (horizon, sign)."""
    reg = AtomRegistry()
    defn = parse_definition({"name": "s", "rules": rules, **extra}, NOW, lambda s: True)
    c = compile_definition(defn, reg)
    return {reg.by_id[a].event: (h, c.signs[a]) for a, h in c.atoms.items()}, c.session_scope


@pytest.mark.parametrize("rule, want", [
    ({"kind": "did", "event": "e", "window": {"last": "7d"}}, (7 * DAY, 1)),
    ({"kind": "did", "event": "e", "count": {"op": "gte", "value": 3}}, (None, 1)),
    ({"kind": "did", "event": "e", "count": {"op": "lt", "value": 3}}, (None, 0)),
    ({"kind": "did", "event": "e", "count": {"op": "lt", "value": 3}, "include_absent": True},
     (None, -1)),
    ({"kind": "did", "event": "e", "count": {"op": "eq", "value": 0}, "include_absent": True},
     (None, -1)),
    ({"kind": "did", "event": "e", "count": {"op": "between", "value": 2, "to": 4}}, (None, 0)),
    ({"kind": "did", "event": "e", "count": {"op": "gte", "value": 3}, "include_absent": True},
     (None, 0)),
    ({"kind": "did_not", "event": "e", "window": {"last": "5m"}}, (5 * MIN, -1)),
    ({"kind": "first_did", "event": "e", "window": {"last": "7d"}}, (None, 0)),
    ({"kind": "aggregate", "event": "e", "fn": "distinct", "property": "p",
      "compare": {"op": "gte", "value": 5}, "window": {"last": "1d"}}, (DAY, 1)),
    ({"kind": "aggregate", "event": "e", "fn": "sum", "property": "p",
      "compare": {"op": "gte", "value": 5}}, (None, 2)),  # SUM_SIGN: per event's value
    ({"kind": "aggregate", "event": "e", "fn": "sum", "property": "p",
      "compare": {"op": "gte", "value": 5}, "include_absent": True}, (None, 0)),
    ({"kind": "aggregate", "event": "e", "fn": "avg", "property": "p",
      "compare": {"op": "gte", "value": 5}}, (None, 0)),
    ({"kind": "aggregate", "event": "e", "fn": "max", "property": "p",
      "compare": {"op": "lt", "value": 5}, "include_absent": True}, (None, -1)),
    ({"kind": "aggregate", "event": "e", "fn": "min", "property": "p",
      "compare": {"op": "lt", "value": 5}}, (None, 1)),
    ({"kind": "aggregate", "event": "e", "fn": "min", "property": "p",
      "compare": {"op": "between", "value": 1, "to": 5}}, (None, 0)),
    ({"kind": "stopped", "event": "e", "before": "30d", "recent": "7d"}, (30 * DAY, 0)),
    ({"kind": "restarted", "event": "e", "before": "30d", "recent": "7d"}, (None, 0)),
    ({"kind": "regularly", "event": "e", "period": "1d", "periods": 7, "min_periods": 3},
     (7 * DAY, 1)),
    ({"kind": "did", "event": "e", "window": {"from": "2020-01-01T00:00:00Z"}}, (None, 1)),
])
def test_horizon_and_sign_of_each_rule_kind(rule: dict[str, Any], want: tuple[Any, int]) -> None:
    got, _ = compiled([rule])
    assert got["e"] == want


def test_did_then_not_and_sequence_signs() -> None:
    got, _ = compiled([
        {"kind": "did_then_not", "event": "a", "then_not": {"event": "b"}, "within": "30m",
         "window": {"last": "1d"}},
        {"kind": "sequence", "steps": [{"event": "x"}, {"event": "y"}], "within": "1h",
         "window": {"last": "2h"}},
    ])
    assert got["a"] == (DAY + 30 * MIN, 1)
    assert got["b"] == (DAY + 30 * MIN, -1)
    assert got["x"] == got["y"] == (2 * 60 * MIN, 1)


def test_none_flips_signs_and_mixed_uses_cancel() -> None:
    got, _ = compiled([
        {"kind": "group", "match": "none", "rules": [
            {"kind": "did", "event": "a"},
            {"kind": "group", "match": "none", "rules": [{"kind": "did", "event": "b"}]}]},
        {"kind": "did", "event": "c", "window": {"last": "1h"}},
        {"kind": "did_not", "event": "c", "window": {"last": "2h"}},
    ])
    assert got["a"][1] == -1
    assert got["b"][1] == 1
    assert got["c"] == (2 * 60 * MIN, 0)  # The longer horizon; both signs: either way.


# Values JSON escapes (quote, backslash, control character), non-ASCII, and near misses.
URLS = {"u0": "/pricing", "u1": "/pricing/team", "u2": 'say "/pricing"', "u3": "a\\b/pricing",
        "u4": "Zürich\n/pricing", "u5": "/Pricing", "u6": "/docs", "u7": 42}
FILTERS = [
    ("eq", "/pricing", {"u0"}),
    ("eq", 'say "/pricing"', {"u2"}),
    ("starts_with", "/pricing", {"u0", "u1"}),
    ("starts_with", "a\\b", {"u3"}),
    ("contains", '"/pricing"', {"u2"}),
    ("contains", "ch\n/p", {"u4"}),
    ("in", ["/docs", "Zürich\n/pricing"], {"u4", "u6"}),
    ("eq", "42", set()),
]


@pytest.mark.parametrize("op, value, want", FILTERS)
def test_a_filter_built_from_stored_events_matches_the_one_seen_live(
        op: str, value: Any, want: set[str]) -> None:
    """A segment created after the events builds its atom from the stored props (skipping
    payloads that cannot match without decoding them): same members as live."""
    from segactors.definition import to_json
    from segactors.supervisor import Segment, Status, System

    rule = {"kind": "did", "event": "view", "where": [
        {"property": "url", "op": op, "value": value}]}

    def segment(system: System) -> Segment:
        d = parse_definition({"name": "s", "rules": [rule]}, NOW, lambda s: True)
        seg = Segment("s", 0, "s", "", d, to_json(d), compile_definition(d, system.atoms),
                      NOW, status=Status.ACTIVE)
        system.add_segment(seg)
        return seg

    live, later = System("a", "w", "k", NOW), System("b", "w", "k", NOW)
    seg_live = segment(live)
    for system in (live, later):
        for uid, url in URLS.items():
            system.apply_event(uid, "view", NOW - MIN, {"url": url, "n": 1}, None, NOW, [])
            system.apply_event(uid, "other", NOW - MIN, {"url": url}, None, NOW, [])
    seg_later = segment(later)
    later.backfill(seg_later, list(later.users), NOW, [])
    assert set(seg_live.members) == want
    assert set(seg_later.members) == want


@pytest.mark.parametrize("seed", range(20))
def test_running_aggregates_equal_a_direct_computation_over_any_ranges(seed: int) -> None:
    """AggState over ranges that move both ways, jump and shrink, while values arrive out
    of order (some before the range, some inside, some after): the same value as
    computing over the range directly (sums exact), for sum, avg and distinct."""
    import random

    from segactors.rules.evaluate import AggState, _aggregate, new_matches

    rng = random.Random(seed)
    m = new_matches(True)
    pool = [0.1, 0.2, 0.3, 1e16, -1e16, 3, 7, "a", "b", True, None, 2.5, -0.1]
    for t in range(200):
        m.insert(10 * t, rng.choice(pool), None)
    states = {fn: AggState() for fn in ("sum", "avg", "distinct")}
    i, j = 0, 0
    for _ in range(300):
        n = len(m.ts)
        i = max(0, min(n, i + rng.randint(-5, 8)))
        j = max(i, min(n, j + rng.randint(-5, 8)))
        if rng.random() < 0.05:
            i, j = sorted(rng.sample(range(n + 1), 2))
        for _ in range(rng.choice([0, 0, 1, 3, 40])):
            m.insert(rng.randrange(2000), rng.choice(pool), None)
        for fn, state in states.items():
            assert m.vals is not None
            want = _aggregate(fn, m.vals[i:j]) if i < j else None
            got = state.value(fn, m, i, j) if i < j else None
            assert got == want, (seed, fn, i, j)


def random_cases(seed: int, n: int) -> Iterator[tuple[random.Random, System, Any,
                                                    CompiledSegment, UserActor]]:
    """``n`` random definitions, each compiled in a system of its own, with a user of random
    profile and no events yet (atoms are built from the user's events when first read)."""
    rng = random.Random(seed)
    gen = DefGen(rng, NOW, ["other"])
    for k in range(n):
        system = System("s", "k", "s", NOW)
        defn = parse_definition(gen.definition(f"d{k}"), NOW, lambda s: True)
        c = compile_definition(defn, system.atoms)
        u = UserActor("u")
        u.set_props({key: gen_profile_value(rng, key, NOW) for key in PROFILE_PROPS})
        yield rng, system, defn, c, u


@pytest.mark.parametrize("seed", range(4))
def test_a_rule_said_to_need_an_event_never_holds_for_a_user_without_events(seed: int) -> None:
    # The supervisor does not evaluate such a session-scope segment when a new session
    # opens with an event none of its atoms match: on that session's events (none of its
    # atoms') it must fail at every instant, as it does on no events at all.
    flagged = unflagged_holding = 0
    for _, system, defn, c, u in random_cases(seed, 150):
        holds = [c.root.eval(ActorCtx(u, system), NOW + dt)[0]
                 for dt in (-100 * DAY, -DAY, 0, 3_600_000, DAY, 40 * DAY, 400 * DAY)]
        if needs_event(c.root):
            flagged += 1
            assert not any(holds), defn
        elif any(holds):
            unflagged_holding += 1
    assert flagged >= 30 and unflagged_holding >= 5, (flagged, unflagged_holding)


@pytest.mark.parametrize("seed", range(4))
def test_a_rule_fails_while_its_vetoes_hold_and_until_the_instant_given_for_them(
        seed: int) -> None:
    # The supervisor does not evaluate a segment for a non-member while one of its vetoes
    # holds, and comes back at the instant `vetoed_until` gives: the rule must fail at
    # every instant t with an event of the veto's atom in (t - lo, t - hi], and at every
    # instant from then until that one.
    from segactors.rules.evaluate import NEVER
    kinds = {"recent": 0, "between": 0, "at or before": 0}
    untils = 0
    for rng, system, defn, c, u in random_cases(seed, 600):
        if not c.vetoes:
            continue
        instants = [NOW + rng.randrange(-10 * DAY, 2 * DAY) for _ in range(8)]
        span = rng.choice([3, 20, 60]) * DAY  # So that a first match is recent at times.
        stamps = [NOW - rng.randrange(span) for _ in range(rng.choice([5, 30]))]
        stamps += [t - rng.randrange(3 * 3_600_000) for t in instants for _ in range(2)]
        for ts in stamps:
            props = gen_props(rng)
            u.add_event(system, ts, rng.choice(NAMES), props,
                        msgspec.json.encode(props) if props else None, None)
        ctx = ActorCtx(u, system)
        holds = lambda t: c.root.eval(ActorCtx(u, system), t)[0]  # noqa: E731
        for a, lo, hi in c.vetoes:  # And where a veto starts and ends, for some events.
            for x in rng.sample(list(ctx.m(a).ts), min(3, len(ctx.m(a).ts))):
                instants += [x + hi] if lo is None else [x + hi, x + lo - 1]
        for t in instants:
            for a, lo, hi in c.vetoes:
                if any((lo is None or t - lo < x) and x <= t - hi for x in ctx.m(a).ts):
                    kinds["at or before" if lo is None else "between" if hi else "recent"] += 1
                    assert not holds(t), (defn, a, lo, hi, t)
            until = u.vetoed_until(c.vetoes, t)  # Every atom is built by now (ctx.m).
            if until is not None:
                untils += 1
                end = t + 400 * DAY if until == NEVER else until
                assert end > t, (defn, t, until)
                for x in {t, end - 1, *(rng.randrange(t, end) for _ in range(3))}:
                    assert not holds(x), (defn, t, until, x)
    assert min(kinds.values()) >= 20 and untils >= 60, (kinds, untils)


@pytest.mark.parametrize("seed", range(4))
def test_an_event_of_a_step_before_the_last_with_no_last_step_after_it_changes_nothing(
        seed: int) -> None:
    # The supervisor does not evaluate a segment on such an event (`matched_after` False
    # for every atom of the segment the event matches): the rule must hold at the same
    # instants with it as without it, events out of order included. (A segment reading
    # first_seen or last_seen is evaluated on every event.)
    checked = 0
    for rng, system, defn, c, u in random_cases(seed, 600):
        if not c.after or c.profile_props & {"first_seen", "last_seen"}:
            continue
        instants = [NOW + rng.randrange(-3 * DAY, DAY) for _ in range(6)]
        ctx = ActorCtx(u, system)
        for a in c.atoms:
            ctx.m(a)  # Built now, then kept current by add_event.
        for _ in range(40):
            ts = NOW - rng.randrange(3 * DAY)
            near = [x for a in c.atoms for x in ctx.m(a).ts]
            if near and rng.random() < 0.5:  # Just before a step matched: out of order.
                ts = rng.choice(near) - rng.choice([0, 1, rng.randrange(30 * MIN)])
            props = gen_props(rng)
            raw = msgspec.json.encode(props) if props else None
            name = rng.choice(NAMES)
            before = [c.root.eval(ActorCtx(u, system), t)[0] for t in instants + [ts, ts + 1]]
            changed = [a for a in u.add_event(system, ts, name, props, raw, None)
                       if a in c.atoms]
            if changed and all(a in c.after and not u.matched_after(c.after[a], ts)
                               for a in changed):
                checked += 1
                after = [c.root.eval(ActorCtx(u, system), t)[0]
                         for t in instants + [ts, ts + 1]]
                assert after == before, (defn, name, ts)
    assert checked >= 100, checked


@pytest.mark.parametrize("seed", range(4))
def test_an_event_of_an_atom_with_a_sign_moves_the_rule_only_that_way(seed: int) -> None:
    # The supervisor does not evaluate a segment for a member on an event of an atom with
    # sign +1, or for a non-member with -1 (for +-SUM_SIGN: when the event adds a
    # non-negative number or none). Such an event must only add instants at which the
    # rule holds (+1), or only remove some (-1).
    from segactors.rules.compile import SUM_SIGN
    checked = {1: 0, -1: 0, "sum": 0}
    for rng, system, defn, c, u in random_cases(seed, 2500):
        if (not any(c.signs.values()) or c.session_scope
                or c.profile_props & {"first_seen", "last_seen"}):
            continue
        instants = [NOW + rng.randrange(-3 * DAY, 2 * DAY) for _ in range(6)]
        ctx = ActorCtx(u, system)
        for a in c.atoms:
            ctx.m(a)  # Built now, then kept current by add_event.
        for _ in range(30):
            ts = NOW - rng.randrange(4 * DAY)
            props = gen_props(rng)
            at = instants + [ts, ts + 1]
            before = [c.root.eval(ActorCtx(u, system), t)[0] for t in at]
            changed = [a for a in u.add_event(system, ts, rng.choice(NAMES), props,
                                              msgspec.json.encode(props) if props else None,
                                              None) if a in c.atoms]
            signs = set()
            for a in changed:
                sign = c.signs[a]
                if abs(sign) == SUM_SIGN:
                    v = props.get(system.atoms.by_id[a].value_prop)
                    negative = (type(v) is int or type(v) is float) and v < 0
                    sign = 0 if negative else sign // SUM_SIGN
                    checked["sum"] += sign != 0
                signs.add(sign)
            if len(signs) != 1 or not (sign := signs.pop()):
                continue
            checked[sign] += 1
            after = [c.root.eval(ActorCtx(u, system), t)[0] for t in at]
            for b, a_ in zip(before, after):
                assert (a_ >= b) if sign > 0 else (a_ <= b), (defn, sign, props)
    assert checked[1] >= 1000 and checked[-1] >= 500 and checked["sum"] >= 20, checked


@pytest.mark.parametrize("fn", ["sum", "avg", "min", "max", "distinct"])
def test_an_aggregate_with_a_sign_moves_only_that_way_whatever_its_values(fn: str) -> None:
    # Each comparison, with and without include_absent, on values of every kind (negative
    # ones too): where the aggregate's atom has a sign, an event that it covers (for
    # +-SUM_SIGN: adding a non-negative number or none) only moves the rule its way.
    from segactors.rules.compile import SUM_SIGN
    rng = random.Random(fn)
    pool = [-7, -0.5, 0, 0.5, 3, 10, 40, "a", "b", True, None]
    signed = checked = 0
    for op, value, to in [("gt", 9, None), ("gte", 0, None), ("lt", 5, None),
                          ("lte", 0, None), ("eq", 3, None), ("between", 1, 20),
                          ("gt", -3, None), ("lt", -1, None)]:
        for absent in (False, True):
            compare = {"op": op, "value": value, **({"to": to} if to is not None else {})}
            body = {"name": "a", "rules": [{
                "kind": "aggregate", "event": "buy", "fn": fn, "property": "price",
                "compare": compare, "include_absent": absent, "window": {"last": "2d"}}]}
            for _ in range(15):
                system = System("s", "k", "s", NOW)
                c = compile_definition(parse_definition(body, NOW, lambda s: True),
                                       system.atoms)
                (a, sign), = c.signs.items()
                if not sign:
                    break
                signed += 1
                u = UserActor("u")
                ActorCtx(u, system).m(a)
                instants = [NOW + rng.randrange(-3 * DAY, 2 * DAY) for _ in range(6)]
                for _ in range(12):
                    ts = NOW - rng.randrange(4 * DAY)
                    props = {"price": rng.choice(pool)}
                    at = instants + [ts, ts + 1]
                    before = [c.root.eval(ActorCtx(u, system), t)[0] for t in at]
                    u.add_event(system, ts, "buy", props, msgspec.json.encode(props), None)
                    v, s = props["price"], sign
                    if abs(s) == SUM_SIGN:
                        negative = (type(v) is int or type(v) is float) and v < 0
                        s = 0 if negative else s // SUM_SIGN
                    if s:
                        checked += 1
                        after = [c.root.eval(ActorCtx(u, system), t)[0] for t in at]
                        for b, a_ in zip(before, after):
                            assert (a_ >= b) if s > 0 else (a_ <= b), (fn, compare, absent, v)
    assert fn == "avg" or checked >= 200, (signed, checked)


@pytest.mark.parametrize("seed", range(3))
def test_a_windows_span_and_next_crossing_at_once_equal_each_apart(seed: int) -> None:
    # `span_next` makes each bisection once; `span` and `next` make them apart.
    from array import array

    from segactors.rules.evaluate import Window
    rng = random.Random(seed)
    for _ in range(300):
        ts = array("q", sorted(rng.randrange(0, 50) * MIN for _ in range(rng.randrange(8))))
        lo, hi = sorted(rng.sample(range(0, 50 * MIN, MIN), 2))
        for w in (Window(last=rng.randrange(1, 20) * MIN), Window(), Window(lo=lo),
                  Window(hi=hi), Window(lo=lo, hi=hi)):
            for now in (rng.randrange(-5, 55) * MIN, *ts[:2]):
                assert w.span_next(ts, now) == (*w.span(ts, now), w.next(ts, now)), (
                    list(ts), w.last, w.lo, w.hi, now)


@pytest.mark.parametrize("seed", range(3))
def test_kept_values_are_shared_only_with_equal_values_of_the_same_type(seed: int) -> None:
    rng = random.Random(seed)
    pool: list[Any] = [0, 0.0, -0.0, 1, 1.0, True, False, "", "1", 2**70, -(2**70), 1e300,
                       "x" * 65, None, [1], {"a": 1}]
    seen: dict[tuple[type, str], Any] = {}
    for _ in range(5_000):
        r = rng.random()
        v = (rng.choice(pool) if r < 0.3 else
             rng.randrange(-5, 5) if r < 0.5 else
             round(rng.uniform(-3, 3), 1) if r < 0.7 else
             rng.choice(["EUR", "USD", "sku-1"]) + "".join(rng.choice("ab") for _ in range(2)))
        # A fresh object equal to v, as decoding another event's props would give.
        fresh = msgspec.json.decode(msgspec.json.encode(v))
        got = shared(fresh)
        assert type(got) is type(v) and got == v and repr(got) == repr(v), (seed, v, got)
        key = (type(v), repr(v))
        if key in seen and isinstance(v, (int, float, str)) and v and len(repr(v)) < 60:
            assert got is seen[key], (seed, v)  # One copy of a common value.
        seen.setdefault(key, got)


def test_the_table_of_shared_values_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import segactors.rules.evaluate as ev
    monkeypatch.setattr(ev, "_SHARED", {float: {}, int: {}, str: {}})
    monkeypatch.setattr(ev, "_SHARED_MAX", 100)
    for i in range(1_000):
        shared(i + 0.5)
    assert len(ev._SHARED[float]) == 100
    late = float("5000.5")
    assert shared(late) is late and shared(float("5000.5")) is not late  # Not kept.
