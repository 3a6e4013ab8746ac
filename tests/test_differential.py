"""Differential tests: the engine against the DuckDB oracle, on seeded random data.

Each random test is parametrized by a seed; the seed is in the test id and in every failure
message, so ``pytest tests/test_differential.py -k "batch and seed-17"`` replays one case.

What is compared, at every checkpoint ``now`` (after ``tick(now)``):
- every segment's ``members`` with ``oracle_members`` over the events and profile updates
  that had arrived by ``now``. ``in_segment`` references are given the *oracle's* answer for
  the referenced segment at the same instant, so the two sides stay independent;
- the built-ins against their definition;
- the membership replayed from the change stream (from the snapshot taken right after each
  segment's activation) against ``members``, with ``seq`` increasing by one per change and
  every change a real flip (no enter of a member, no leave of a non-member).
After time-only steps, a sample of tick changes is also checked to happen at their exact
instant: the oracle agrees with the change at ``at`` and disagrees one millisecond before.

A segment with ``ends_at`` is frozen from then on: its expected membership at ``t`` is the
oracle's at ``min(t, ends_at - 1)`` over what had arrived by then. Once every segment
exists, some runs also forget old events as the server does (``System.prune`` with
``retention_cutoff``, a short retention so it bites): no answer may change because of it.

Scenarios: ``batch`` (segments first, all data at T in random order, then the clock moves
through regular steps and exact edges), ``stream`` (backfill over part of the data, the
rest arriving late, out of order and future-dated with the clock running, one segment
created mid-stream), ``single`` (one segment per rule kind on few events packed on a
handful of instants, so ties decide). Then hand-worked cases for ties and edges, and the
engine bugs found, as strict xfails.

Cost: each oracle call is ~40-60 ms (a fresh DuckDB connection and load), which sets
the number of seeds; the file runs in about 70 s on one core.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from gen import (
    ALL_KINDS,
    DAY,
    HOUR,
    MIN,
    SEC,
    T,
    DefGen,
    count_rules,
    dur_ms,
    durations_of,
    gen_world,
    max_depth,
    walk_rules,
)
from oracle import format_ts, oracle_members
from oracle import parse_ts as oracle_parse_ts

from segactors.definition import parse_definition, to_json
from segactors.rules.compile import compile_definition
from segactors.supervisor import BUILTINS, Change, Segment, Status, System

BATCH_SEEDS = range(24)
STREAM_SEEDS = range(16)
SINGLE_SEEDS = range(10)


# --- the harness -------------------------------------------------------------------------


@dataclass
class Arrival:
    now: int
    kind: str  # "event" | "profile"
    payload: Any


@dataclass
class Harness:
    """One System driven step by step, with everything that arrived kept for the oracle."""

    seed: int
    scenario: str
    sys_: System = field(default_factory=lambda: System("shop", "wk", "secret", created_at=0))
    history: list[Arrival] = field(default_factory=list)
    defs: dict[str, dict] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    ends: dict[str, int] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    tick_changes: list[tuple[int, Change]] = field(default_factory=list)
    replay: dict[str, set[str]] = field(default_factory=lambda: {b: set() for b in BUILTINS})
    last_seq: int = 0
    clock: int = -(1 << 62)
    _states: dict[int, tuple] = field(default_factory=dict)
    _expected: dict[tuple[str, int], set[str]] = field(default_factory=dict)

    # driving the engine

    def _time(self, now: int) -> None:
        assert now >= self.clock, "the harness clock never goes back"
        self.clock = now

    def _arrive(self, a: Arrival) -> None:
        self._time(a.now)
        self.history.append(a)
        # What the oracle saw at instants >= now is stale now (same-instant arrivals).
        self._states = {t: s for t, s in self._states.items() if t < a.now}
        self._expected = {k: v for k, v in self._expected.items() if k[1] < a.now}

    def _record(self, out: list[Change], now: int) -> None:
        for c in out:
            where = f"{self.tag()} change {c}"
            assert c.seq == self.last_seq + 1, f"{where}: seq does not follow {self.last_seq}"
            self.last_seq = c.seq
            assert c.at <= now, f"{where}: dated after now={now}"
            assert c.segment in self.replay, f"{where}: change of a segment not yet active"
            members = self.replay[c.segment]
            if c.change == "enter":
                assert c.user_id not in members, f"{where}: enter of a member"
                members.add(c.user_id)
            else:
                assert c.change == "leave", where
                assert c.user_id in members, f"{where}: leave of a non-member"
                members.discard(c.user_id)
            self.changes.append(c)

    def event(self, e: dict, now: int) -> None:
        self._arrive(Arrival(now, "event", e))
        out: list[Change] = []
        self.sys_.apply_event(e["user_id"], e["name"], e["ts"], dict(e["props"]),
                              e["session_id"], now, out)
        self._record(out, now)

    def profile(self, uid: str, props: dict, now: int) -> None:
        self._arrive(Arrival(now, "profile", (uid, props)))
        out: list[Change] = []
        self.sys_.apply_profile(uid, dict(props), now, out)
        self._record(out, now)

    def all_at(self, rng: random.Random, events: list[dict], updates: list[tuple[str, dict]],
               now: int) -> None:
        """Every event and profile update arriving at ``now``, in a random order."""
        items = [("event", e) for e in events] + [("profile", u) for u in updates]
        rng.shuffle(items)
        for kind, x in items:
            if kind == "event":
                self.event(x, now)
            else:
                self.profile(x[0], x[1], now)

    def create(self, sid: str, d: dict, now: int) -> Segment:
        self._time(now)
        sys_ = self.sys_
        assert count_rules(d["rules"]) <= 20 and max_depth(d["rules"]) <= 3, d
        defn = parse_definition(d, now, segment_exists=lambda s: s in sys_.segments)
        seg = Segment(id=sid, idx=0, name=defn.name, description="", definition=defn,
                      definition_json=to_json(defn),
                      compiled=compile_definition(defn, sys_.atoms), created_at=now)
        if "ends_at" in d:
            seg.ends_at = self.ends[sid] = oracle_parse_ts(d["ends_at"])
        sys_.add_segment(seg)
        out: list[Change] = []
        sys_.backfill(seg, list(sys_.users), now, out)
        self._record(out, now)
        seg.status = Status.ACTIVE
        self.replay[sid] = set(seg.members)
        self.defs[sid] = d
        self.order.append(sid)
        return seg

    def prune(self, now: int, minimum: int) -> None:
        """Forget events as the server does past retention (``minimum`` stands for the
        configured setting). Done only once every segment exists, since a segment created
        later may by design miss forgotten events: from then on no answer may change."""
        # Before ticking, as the server does: overdue deadlines then run over what is left.
        cutoff = self.sys_.retention_cutoff(now, minimum)
        if cutoff is not None:
            self.sys_.prune(list(self.sys_.users), cutoff)

    def tick(self, now: int) -> list[Change]:
        self._time(now)
        changes, more = self.sys_.tick(now)
        assert not more
        self._record(changes, now)
        self.tick_changes += [(now, c) for c in changes]
        return changes

    # the oracle's side

    def state(self, t: int) -> tuple[list[dict], dict[str, dict], set[str]]:
        """Events, profiles and known users from everything that arrived by ``t``."""
        got = self._states.get(t)
        if got is None:
            events: list[dict] = []
            profiles: dict[str, dict] = {}
            users: set[str] = set()
            for a in self.history:
                if a.now > t:
                    continue
                if a.kind == "event":
                    events.append(a.payload)
                    users.add(a.payload["user_id"])
                else:
                    uid, props = a.payload
                    users.add(uid)
                    prof = profiles.setdefault(uid, {})
                    for k, v in props.items():
                        if v is None:
                            prof.pop(k, None)
                        else:
                            prof[k] = v
            got = self._states[t] = (events, profiles, users)
        return got

    def expected(self, sid: str, t: int) -> set[str]:
        events, profiles, users = self.state(t)
        if sid == "all-users":
            return set(users)
        if sid == "test-users":
            return {u for u in users if profiles.get(u, {}).get("test_user") is True}
        if sid in self.ends:
            t = min(t, self.ends[sid] - 1)
            events, profiles, users = self.state(t)
        key = (sid, t)
        if key not in self._expected:
            d = self.defs[sid]
            refs = {r["segment"] for r in walk_rules(d["rules"])
                    if r["kind"] in ("in_segment", "not_in_segment")}
            segments = {ref: self.expected(ref, t) for ref in refs}
            self._expected[key] = oracle_members(events, profiles, users, d, t, segments)
        return self._expected[key]

    # checks

    def tag(self) -> str:
        return f"seed={self.seed} scenario={self.scenario}"

    def compare(self, now: int) -> None:
        """Tick to ``now``, then hold every segment against the oracle and the replay."""
        self.tick(now)
        self.sys_._check()
        for sid in [*BUILTINS, *self.order]:
            seg = self.sys_.segments[sid]
            engine = set(seg.members)
            oracle = self.expected(sid, now)
            if engine != oracle:
                pytest.fail(self.mismatch(sid, now, engine, oracle))
            assert self.replay[sid] == engine, (
                f"{self.tag()} segment={sid} now={now}: the change stream replays to "
                f"{sorted(self.replay[sid])}, members are {sorted(engine)}"
            )

    def check_change_instants(self, since: int, sample: int, rng: random.Random) -> None:
        """Tick changes after ``since`` (no arrival later) happen at their exact instant."""
        candidates = [c for now, c in self.tick_changes
                      if c.at - 1 >= since and c.segment not in BUILTINS
                      and (c.segment not in self.ends or c.at < self.ends[c.segment])]
        for c in rng.sample(candidates, min(sample, len(candidates))):
            member_at = c.user_id in self.expected(c.segment, c.at)
            member_before = c.user_id in self.expected(c.segment, c.at - 1)
            ok = member_at == (c.change == "enter") and member_before != member_at
            if not ok:
                pytest.fail(
                    f"{self.tag()}: {c} is not at its instant: the oracle has the user "
                    f"{'in' if member_before else 'out'} at at-1 and "
                    f"{'in' if member_at else 'out'} at at={c.at} ({format_ts(c.at)})\n"
                    + self.describe(c.segment, c.at, c.user_id)
                )

    def mismatch(self, sid: str, now: int, engine: set[str], oracle: set[str]) -> str:
        only_e, only_o = sorted(engine - oracle), sorted(oracle - engine)
        user = (only_e or only_o)[0]
        return (
            f"{self.tag()} segment={sid} now={now} ({format_ts(now)})\n"
            f"only in engine: {only_e}\nonly in oracle: {only_o}\n"
            + self.describe(sid, now, user)
        )

    def describe(self, sid: str, now: int, user: str) -> str:
        d = self.defs.get(sid)
        lines = [f"definition {sid}: {json.dumps(d, ensure_ascii=False)}"]
        if sid in self.ends:
            lines.append(f"ends_at: {self.ends[sid]}")
        refs = sorted({r["segment"] for r in walk_rules(d["rules"])
                       if r["kind"] in ("in_segment", "not_in_segment")}) if d else []
        for ref in refs:
            in_oracle = user in self.expected(ref, now)
            in_engine = user in self.sys_.segments[ref].members
            lines.append(f"  {ref}: oracle {'has' if in_oracle else 'lacks'} {user}, engine "
                         f"{'has' if in_engine else 'lacks'} (definition "
                         f"{json.dumps(self.defs.get(ref), ensure_ascii=False)})")
        _, profiles, _ = self.state(now)
        lines.append(f"user {user}: profile {profiles.get(user, {})}")
        lines.append("  events (sorted by ts; ts-now in s; arrival now-T in s):")
        evs = [(a.payload, a.now) for a in self.history
               if a.kind == "event" and a.payload["user_id"] == user and a.now <= now]
        for e, arrived in sorted(evs, key=lambda x: x[0]["ts"]):
            lines.append(
                f"    ts={e['ts']} ({(e['ts'] - now) / 1000:+}s) {e['name']!r} "
                f"sid={e['session_id']!r} props={e['props']} arrived={(arrived - T) / 1000:+}s"
            )
        profs = [(a.payload[1], a.now) for a in self.history
                 if a.kind == "profile" and a.payload[0] == user and a.now <= now]
        for p, arrived in profs:
            lines.append(f"    profile update {p} arrived={(arrived - T) / 1000:+}s")
        return "\n".join(lines)


# --- instants worth looking at ---------------------------------------------------------------


def edge_instants(h: Harness, after: int, until: int, rng: random.Random, n: int) -> list[int]:
    """About ``n`` instants in (after, until] where answers flip, drawn evenly from three
    kinds: an event's ts plus a duration of some definition (and one ms either side), a
    future event becoming visible, and a profile date entering or leaving a profile_time
    range (at ``t - to`` it has just left, one ms later it is in; likewise ``t - from``)."""
    events, profiles, _ = h.state(h.clock)
    durs = sorted({x for sid in h.order for x in durations_of(h.defs[sid])})
    kinds: list[set[int]] = [set(), set(), set()]
    for e in events:
        kinds[1].add(e["ts"])
        for dms in rng.sample(durs, min(3, len(durs))):
            base = e["ts"] + dms
            kinds[0].update((base - 1, base, base + 1))
    for sid in h.order:
        for r in walk_rules(h.defs[sid]["rules"]):
            if r["kind"] != "profile_time":
                continue
            lo, hi = dur_ms(r["from"]), dur_ms(r["to"])
            for prof in profiles.values():
                v = prof.get(r["property"])
                t = oracle_parse_ts(v) if v is not None else None
                if t is not None:
                    kinds[2].update((t - hi, t - hi + 1, t - lo, t - lo + 1))
    pools = [sorted(c for c in k if after < c <= until) for k in kinds]
    picked: set[int] = set()
    for i in range(n):
        pool = pools[i % 3] or pools[0]
        if pool:
            picked.add(rng.choice(pool))
    return sorted(picked)


def new_definitions(rng: random.Random, h: Harness, now: int, k: int, first: int) -> None:
    """Create ``k`` random segments at ``now``, one by one, so each may refer to any earlier
    one (or a built-in); about one in eight gets an ``ends_at`` within three days."""
    for i in range(first, first + k):
        ends_at = now + rng.randrange(HOUR, 3 * DAY) if rng.random() < 0.12 else None
        d = DefGen(rng, now, [*BUILTINS, *h.order]).definition(f"seg {i}", ends_at)
        h.create(f"s{i}", d, now)


# --- random scenarios ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", BATCH_SEEDS, ids=lambda s: f"seed-{s}")
def test_batch_then_time_moves_matches_oracle(seed: int) -> None:
    """Segments exist before any data; everything arrives at T in random order; then only
    the clock moves, through regular steps and exact window edges."""
    rng = random.Random(seed)
    h = Harness(seed, "batch")
    new_definitions(rng, h, T, rng.randint(3, 4), 0)
    users, events, updates = gen_world(rng, T, rng.randint(20, 40), rng.randint(250, 500))
    h.all_at(rng, events, updates, T)
    h.compare(T)
    step = rng.choice([7 * MIN, 3 * HOUR, 11 * HOUR])
    steps = [T + step, T + rng.choice([2, 6]) * DAY]
    instants = sorted(set(steps + edge_instants(h, T, T + 6 * DAY, rng, 4)))
    prune = rng.random() < 0.5
    for t in instants:
        if prune:
            h.prune(t, rng.choice([HOUR, DAY, 2 * DAY]))
        h.compare(t)
    h.check_change_instants(T, 3, rng)


@pytest.mark.parametrize("seed", STREAM_SEEDS, ids=lambda s: f"seed-{s}")
def test_backfill_then_stream_matches_oracle(seed: int) -> None:
    """Part of the data exists first; segments are created over it (backfill); the rest
    arrives with the clock running (late, out-of-order and future-dated events); another
    segment is created mid-stream; then only the clock moves."""
    rng = random.Random(seed)
    t0 = T
    t_end = t0 + DAY
    h = Harness(seed, "stream")
    users, events, updates = gen_world(rng, t_end, rng.randint(20, 40), rng.randint(150, 400),
                                       spread=5 * DAY)
    arrivals: list[tuple[int, int, str, Any]] = []
    for i, e in enumerate(events):
        r = rng.random()
        if r < 0.75:
            delay = rng.randrange(0, 5 * MIN)
        elif r < 0.9:
            delay = rng.randrange(HOUR, 2 * DAY)  # late
        else:
            delay = -rng.randrange(0, 3 * HOUR)  # future-dated when it arrives
        a = min(max(e["ts"] + delay, t0), t_end)
        arrivals.append((a, rng.random(), "event", e))
    for u in updates:
        a = rng.choice([t0, t0, rng.randrange(t0, t_end)])
        arrivals.append((a, rng.random(), "profile", u))
    arrivals.sort(key=lambda x: (x[0], x[1]))
    pre = [x for x in arrivals if x[0] == t0]
    rest = [x for x in arrivals if x[0] > t0]

    def arrive(x: tuple) -> None:
        now, _, kind, payload = x
        if kind == "event":
            h.event(payload, now)
        else:
            h.profile(payload[0], payload[1], now)

    for x in pre:
        arrive(x)
    new_definitions(rng, h, t0, rng.randint(2, 3), 0)
    h.compare(t0)
    checkpoints = set(rng.sample(range(len(rest)), min(3, len(rest))))
    mid = rng.randrange(len(rest)) if rest else -1
    for i, x in enumerate(rest):
        arrive(x)
        if rng.random() < 0.2:
            h.tick(x[0])
        if i == mid:
            new_definitions(rng, h, x[0], 1, len(h.order))
        if i > mid and rng.random() < 0.05:
            h.prune(x[0], rng.choice([HOUR, DAY, 2 * DAY]))
        if i in checkpoints or i == mid:
            h.compare(x[0])
    last = h.clock
    h.compare(t_end)
    instants = sorted(set([t_end + rng.choice([5 * HOUR, 3 * DAY])]
                          + edge_instants(h, t_end, t_end + 3 * DAY, rng, 2)))
    for t in instants:
        h.prune(t, DAY)
        h.compare(t)
    h.check_change_instants(max(last, t_end), 2, rng)


@pytest.mark.parametrize("seed", SINGLE_SEEDS, ids=lambda s: f"seed-{s}")
def test_each_rule_kind_alone_on_tie_heavy_data_matches_oracle(seed: int) -> None:
    """One segment per rule kind (sequence, did_then_not, aggregate twice), over few events per
    user packed on a handful of instants, so ties and edges decide: a mismatch here points
    at one rule kind."""
    rng = random.Random(seed)
    h = Harness(seed, "single")
    kinds = [k for k in ALL_KINDS if "segment" not in k] + ["sequence", "did_then_not",
                                                              "aggregate"]
    rng.shuffle(kinds)
    for i, kind in enumerate([*kinds, "in_segment", "not_in_segment"]):
        refs = [*BUILTINS, *h.order]
        h.create(f"s{i}", DefGen(rng, T, refs).single(f"{kind} {i}", kind), T)
    users, events, updates = gen_world(rng, T, rng.randint(12, 20), rng.randint(60, 120),
                                       spread=2 * DAY, ties=True)
    h.all_at(rng, events, updates, T)
    h.compare(T)
    for t in edge_instants(h, T, T + 3 * DAY, rng, 1):
        h.prune(t, HOUR)
        h.compare(t)


@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed-{s}")
def test_aggregates_over_many_values_a_user_match_oracle(seed: int) -> None:
    """Aggregates only, over a few users with hundreds of events each, arriving late and out
    of order with the clock moving and old events pruned: windows hold enough values for
    the running sums and counts the engine keeps (beyond a few values) to be what decides."""
    rng = random.Random(1000 + seed)
    h = Harness(seed, "aggregates")
    for i in range(6):
        h.create(f"s{i}", DefGen(rng, T, []).single(f"aggregate {i}", "aggregate"), T)
    users, events, updates = gen_world(rng, T + DAY, rng.randint(2, 4), rng.randint(500, 800),
                                       spread=4 * DAY)
    for uid, props in updates:
        h.profile(uid, props, T)
    arrivals = sorted(((max(T, min(T + DAY, e["ts"] + rng.choice(
        [0, 0, 0, rng.randrange(HOUR, DAY), -rng.randrange(0, HOUR)]))), rng.random(), e)
        for e in events), key=lambda x: (x[0], x[1]))
    for i, (now, _, e) in enumerate(arrivals):
        h.event(e, now)
        if rng.random() < 0.1:
            h.tick(now)
        if rng.random() < 0.01:
            h.prune(now, rng.choice([HOUR, DAY]))
        if rng.random() < 0.02:
            h.compare(now)
    for t in sorted(set([T + DAY, T + 2 * DAY] + edge_instants(h, T + DAY, T + 4 * DAY, rng, 3))):
        h.compare(t)


# --- targeted cases: ties and exact edges ----------------------------------------------------


def ev(user: str, name: str, ts: int, sid: str | None = "s1", **props: Any) -> dict:
    return {"user_id": user, "name": name, "ts": ts, "session_id": sid, "props": props}


def run_case(events: list[dict], d: dict, checks: list[tuple[int, set[str]]],
             profiles: dict[str, dict] | None = None, name: str = "case") -> None:
    """Segment first, data at T (or at the first check if earlier), then each (now, expected)
    in time order: the engine, the oracle and the expectation worked out by hand from
    RULES.md must all agree."""
    h = Harness(0, name)
    start = min(T, checks[0][0])
    h.create("s0", {"name": name, **d}, start)
    for uid, props in (profiles or {}).items():
        h.profile(uid, props, start)
    for e in events:
        h.event(e, start)
    for now, want in checks:
        h.compare(now)  # engine == oracle
        assert set(h.sys_.segments["s0"].members) == want, f"{name} at now-T={now - T}"


def test_ties_do_not_make_a_sequence_but_count_every_event() -> None:
    t = T - HOUR
    events = [ev("tie", "view", t), ev("tie", "buy", t),
              ev("ok", "view", t), ev("ok", "buy", t + 1),
              ev("three", "view", t), ev("three", "view", t), ev("three", "view", t)]
    seq = {"rules": [{"kind": "sequence", "steps": [{"event": "view"}, {"event": "buy"}]}]}
    run_case(events, seq, [(T, {"ok"})], name="sequence ties")
    count = {"rules": [{"kind": "did", "event": "view", "count": {"op": "eq", "value": 3}}]}
    run_case(events, count, [(T, {"three"})], name="count ties")
    # A follow-up at the same instant as `a` is not in (a.ts, a.ts + within].
    dtn = {"rules": [{"kind": "did_then_not", "event": "view", "then_not": {"event": "buy"},
                      "within": "10m"}]}
    run_case(events, dtn, [(T, {"tie", "three"})], name="then_not tie")


def test_last_window_edge_is_exclusive_to_the_millisecond() -> None:
    e = T - 5 * SEC
    events = [ev("a", "view", e), ev("b", "view", e + 1)]
    d = {"rules": [{"kind": "did", "event": "view", "window": {"last": "10s"}}]}
    run_case(events, d, [(T, {"a", "b"}), (e + 10 * SEC - 1, {"a", "b"}),
                         (e + 10 * SEC, {"b"}), (e + 10 * SEC + 1, set())], name="last edge")


def test_fixed_window_includes_from_and_excludes_to() -> None:
    lo, hi = T - DAY, T - HOUR
    events = [ev("at_from", "buy", lo), ev("before", "buy", lo - 1), ev("at_to", "buy", hi),
              ev("last_ms", "buy", hi - 1)]
    d = {"window": {"from": "2025-12-31T00:00:00Z", "to": hi},
         "rules": [{"kind": "did", "event": "buy"}]}
    run_case(events, d, [(T, {"at_from", "last_ms"}), (T + 9 * DAY, {"at_from", "last_ms"})],
             name="fixed edge")


def test_future_event_counts_from_its_own_instant() -> None:
    events = [ev("f", "buy", T + HOUR)]
    d = {"rules": [{"kind": "did", "event": "buy"}]}
    run_case(events, d, [(T, set()), (T + HOUR - 1, set()), (T + HOUR, {"f"})], name="future")
    d = {"rules": [{"kind": "did_not", "event": "buy"}]}
    run_case(events, d, [(T, {"f"}), (T + HOUR, set())], name="future did_not")


def test_did_then_not_qualifies_exactly_at_a_plus_within() -> None:
    a = T
    events = [ev("clean", "cart", a), ev("spoiled", "cart", a), ev("spoiled", "buy", a + 10 * MIN),
              ev("late_buy", "cart", a), ev("late_buy", "buy", a + 10 * MIN + 1)]
    d = {"rules": [{"kind": "did_then_not", "event": "cart", "then_not": {"event": "buy"},
                    "within": "10m"}]}
    run_case(events, d, [(T, set()), (a + 10 * MIN - 1, set()),
                         (a + 10 * MIN, {"clean", "late_buy"}),
                         (a + 10 * MIN + 1, {"clean", "late_buy"})],
             name="then_not edge")


def test_stopped_restarted_and_regularly_bucket_edges() -> None:
    s, t_ = HOUR, DAY
    events = [ev("stop", "view", T - s),  # in (now-T, now-S]
              ev("recent", "view", T - s + 1),  # in (now-S, now]
              ev("back", "view", T - t_), ev("back", "view", T)]
    stopped = {"rules": [{"kind": "stopped", "event": "view", "before": "1d", "recent": "1h"}]}
    run_case(events, stopped, [(T, {"stop"}), (T + 1, {"stop", "recent"}),
                               (T + s, {"stop", "recent", "back"}),
                               (T + t_ - s, {"recent", "back"}), (T + t_ - s + 1, {"back"})],
             name="stopped edges")
    restarted = {"rules": [{"kind": "restarted", "event": "view", "before": "1d", "recent": "1h"}]}
    # "back" came back at T; at T + 1h that event leaves (now-S, now] for the middle range.
    run_case(events, restarted, [(T, {"back"}), (T + s - 1, {"back"}), (T + s, set())],
             name="restarted edges")
    regularly = {"rules": [{"kind": "regularly", "event": "view", "period": "1h", "periods": 2,
                            "min_periods": 2}]}
    # Buckets (now-1h, now] and (now-2h, now-1h]. At T: T-1 in the first, T-1h in the
    # second. At T+1h-1 the event at T-1 crosses into the second bucket: the first is empty.
    events2 = [ev("r", "view", T - HOUR), ev("r", "view", T - 1)]
    run_case(events2, regularly, [(T, {"r"}), (T + HOUR - 2, {"r"}), (T + HOUR - 1, set())],
             name="regularly edges")


def test_profile_time_range_is_half_open() -> None:
    appt = T + 5 * DAY
    profiles = {"at_lo": {"appt": appt}, "str": {"appt": "2026-01-06T00:00:00Z"},
                "float": {"appt": float(appt)}}
    d = {"rules": [{"kind": "profile_time", "property": "appt", "from": "+5d", "to": "+6d"}]}
    run_case([], d, [(T - DAY, set()), (T - DAY + 1, {"at_lo", "str"}), (T, {"at_lo", "str"}),
                     (T + 1, set())], profiles=profiles, name="profile_time edges")


def test_expired_segment_keeps_its_membership_frozen() -> None:
    # ends_at = T + 1h. "a" would leave the 2h window exactly at ends_at, "b" one ms later:
    # from ends_at on the membership is frozen, so neither leaves.
    events = [ev("a", "view", T - HOUR), ev("b", "view", T - HOUR + 1)]
    d = {"ends_at": T + HOUR, "rules": [{"kind": "did", "event": "view", "window": {"last": "2h"}}]}
    run_case(events, d, [(T, {"a", "b"}), (T + HOUR - 1, {"a", "b"}), (T + HOUR, {"a", "b"}),
                         (T + 5 * HOUR, {"a", "b"})], name="ends_at")


# --- session scope: regressions ---------------------------------------------------------


def test_session_segment_sees_a_new_session_of_an_unrelated_event() -> None:
    # Regression (found by the random tests, fixed in 41d5b47): a session-scope segment was
    # re-evaluated only for events matching one of its atoms.
    h = Harness(0, "new session")
    h.event(ev("u1", "view", T - 1000, sid=None), T)  # known, no session: not a member
    h.create("s0", {"name": "x", "scope": "session",
                    "rules": [{"kind": "did_not", "event": "buy"}]}, T)
    h.event(ev("u1", "view", T - 500, sid="a"), T)  # session "a" has no buy: member
    h.compare(T)
    assert set(h.sys_.segments["s0"].members) == {"u1"}


def test_session_segment_sees_a_future_session_open_at_its_instant() -> None:
    # Same cause: no deadline was set for the future session's first instant.
    h = Harness(0, "future session")
    h.profile("u1", {"city": "Paris"}, T)
    h.create("s0", {"name": "x", "scope": "session",
                    "rules": [{"kind": "profile", "property": "city", "op": "eq",
                               "value": "Paris"}]}, T)
    h.event(ev("u1", "view", T + HOUR, sid="a"), T)
    h.compare(T)  # no session visible yet: not a member (both agree)
    h.compare(T + HOUR)  # session "a" exists now: member
    assert set(h.sys_.segments["s0"].members) == {"u1"}


def test_filters_and_distinct_never_coerce_types() -> None:
    t = T - HOUR
    events = [ev("mixed", "buy", t, flag=True), ev("mixed", "buy", t + 1, flag=1),
              ev("mixed", "buy", t + 2, flag="1"), ev("mixed", "buy", t + 3, flag=1.0),
              ev("same", "buy", t, flag=1), ev("same", "buy", t + 1, flag=1.0),
              ev("same", "buy", t + 2, flag=None), ev("none", "buy", t, flag=None)]
    distinct = {"rules": [{"kind": "aggregate", "event": "buy", "fn": "distinct",
                           "property": "flag", "compare": {"op": "eq", "value": 3}}]}
    run_case(events, distinct, [(T, {"mixed"})], name="distinct types")
    distinct1 = {"rules": [{"kind": "aggregate", "event": "buy", "fn": "distinct",
                            "property": "flag", "compare": {"op": "eq", "value": 1},
                            "include_absent": True}]}
    run_case(events, distinct1, [(T, {"same", "none"})], name="distinct one")
    sum_ = {"rules": [{"kind": "aggregate", "event": "buy", "fn": "sum", "property": "flag",
                       "compare": {"op": "eq", "value": 2}}]}
    run_case(events, sum_, [(T, {"mixed", "same"})], name="sum skips booleans")
    in_ = {"rules": [{"kind": "did", "event": "buy", "count": {"op": "eq", "value": 1},
                      "where": [{"property": "flag", "op": "in", "value": [True, "x"]}]}]}
    run_case(events, in_, [(T, {"mixed"})], name="in is eq per element")
    names = [ev("a", "view", t, url="/Product/42"), ev("b", "view", t, url="/product/42"),
             ev("c", "view", t, url="STRASSE"), ev("d", "view", t, url=42)]
    icontains = {"rules": [{"kind": "did", "event": "view",
                            "where": [{"property": "url", "op": "icontains",
                                       "value": "PRODUCT"}]}]}
    run_case(names, icontains, [(T, {"a", "b"})], name="icontains lowers both")
    not_icontains = {"rules": [{"kind": "did", "event": "view",
                                "where": [{"property": "url", "op": "not_icontains",
                                           "value": "PRODUCT"}]}]}
    run_case(names, not_icontains, [(T, {"c", "d"})], name="not_icontains complements")
    # "ß".lower() is "ß", not "ss": no casefolding.
    strasse = {"rules": [{"kind": "did", "event": "view",
                          "where": [{"property": "url", "op": "icontains", "value": "ß"}]}]}
    run_case(names, strasse, [(T, set())], name="icontains does not casefold")


# --- retention (System.prune): regressions, and the bug still open ---------------------

RETENTION = 90 * DAY  # the default event_retention_ms


def prune(h: Harness, now: int) -> None:
    h.sys_.prune(list(h.sys_.users), h.sys_.retention_cutoff(now, RETENTION))


def test_pruning_old_events_keeps_last_seen() -> None:
    # Regression (a strict xfail here until b6f4437): prune dropped all_ts[1:k], so a user
    # whose events were all older than retention got last_seen = their first event.
    h = Harness(0, "prune last_seen")
    h.create("s0", {"name": "x", "rules": [{"kind": "profile_time", "property": "last_seen",
                                            "from": "-96d", "to": "-94d"}]}, T)
    h.event(ev("u", "view", T - 99 * DAY), T)
    h.event(ev("u", "view", T - 95 * DAY), T)  # last_seen = T - 95d: in range
    h.compare(T)
    prune(h, T)  # cutoff T - 90d: both events are older
    h.event(ev("u", "launch", T + HOUR), T)  # future-dated: last_seen at T is unchanged
    h.compare(T)  # last_seen is still T - 95d
    assert set(h.sys_.segments["s0"].members) == {"u"}


def test_pruning_keeps_the_first_event_a_later_first_did_with_where_needs() -> None:
    # Regression: prune kept only the first raw event of each NAME, so a first_did with a
    # `where`, created after a prune, missed the first event passing the filter.
    h = Harness(0, "prune first_did")
    h.event(ev("u", "buy", T - 100 * DAY, plan="basic"), T)
    h.event(ev("u", "buy", T - 99 * DAY, plan="pro"), T)
    prune(h, T)  # no segment yet: cutoff T - 90d
    h.create("s0", {"name": "x", "rules": [{
        "kind": "first_did", "event": "buy", "window": {"last": "200d"},
        "where": [{"property": "plan", "op": "eq", "value": "pro"}]}]}, T)
    h.compare(T)  # the first "pro" buy (T - 99d) is in the last 200d; engine: not a member


def test_pruning_while_deadlines_are_overdue_keeps_what_they_read() -> None:
    # Regression (a strict xfail here until b6f4437): retention_cutoff judged from `now`
    # while overdue deadlines were still to run at earlier instants, over pruned events.
    h = Harness(0, "prune overdue")
    h.create("s0", {"name": "x", "ends_at": T + 2 * HOUR,
                    "rules": [{"kind": "did", "event": "view",
                               "count": {"op": "gte", "value": 3}}]}, T)
    h.event(ev("u", "view", T - 100 * DAY), T)
    h.event(ev("u", "view", T - 99 * DAY), T)
    h.event(ev("u", "view", T + HOUR), T)  # the third view counts from T + 1h: enter then
    h.compare(T)
    later = T + 3 * HOUR  # s0 expired at T + 2h, its deadline at T + 1h not yet run
    prune(h, later)  # judged from `later`, s0 is expired and the view at T - 99d would go
    h.compare(later)  # frozen with u in: it entered at T + 1h, before ends_at
    assert set(h.sys_.segments["s0"].members) == {"u"}
