"""Forgetting events past retention never changes a live segment's membership."""

from __future__ import annotations

import random

import pytest

from segactors.definition import parse_definition, to_json
from segactors.rules.compile import compile_definition
from segactors.supervisor import Change, Segment, Status, System

H = 3_600_000
T0 = 1_767_225_600_000

BOUNDED = [
    {"kind": "did", "event": "a", "window": {"last": "6h"}, "count": {"op": "gte", "value": 2}},
    {"kind": "did_not", "event": "b", "window": {"last": "3h"}},
    {"kind": "first_did", "event": "a", "window": {"last": "1d"}},
    {"kind": "did_then_not", "event": "a", "then_not": {"event": "b"}, "within": "2h",
     "window": {"last": "5h"}},
    {"kind": "aggregate", "event": "b", "fn": "sum", "property": "v", "window": {"last": "4h"},
     "compare": {"op": "gt", "value": 5}},
    {"kind": "restarted", "event": "a", "before": "8h", "recent": "2h"},
    {"kind": "stopped", "event": "b", "before": "10h", "recent": "3h"},
    {"kind": "regularly", "event": "a", "period": "2h", "periods": 4, "min_periods": 2},
    {"kind": "sequence", "steps": [{"event": "a"}, {"event": "b"}], "window": {"last": "7h"}},
]


def build(rules: list[dict[str, object]]) -> tuple[System, list[Segment]]:
    system = System("s", "w", "k", T0)
    segs = []
    for i, rule in enumerate(rules):
        d = parse_definition({"name": f"r{i}", "rules": [rule]}, T0)
        seg = Segment(f"r{i}", 0, d.name, "", d, to_json(d), compile_definition(d, system.atoms),
                      T0, status=Status.ACTIVE)
        system.add_segment(seg)
        segs.append(seg)
    return system, segs


@pytest.mark.parametrize("seed", range(8))
def test_pruned_engine_keeps_the_same_members_as_one_that_keeps_everything(seed: int) -> None:
    rng = random.Random(seed)
    kept, kept_segs = build(BOUNDED)
    pruned, pruned_segs = build(BOUNDED)
    assert all(s.compiled.lookback is not None for s in pruned_segs)
    now = T0
    out: list[Change] = []
    for step in range(400):
        now += rng.randrange(0, H // 2)
        uid = f"u{rng.randrange(6)}"
        name = rng.choice("ab")
        ts = now - rng.randrange(0, 3 * H)  # Late events too.
        props = {"v": rng.randrange(5)}
        for system in (kept, pruned):
            system.tick(now)
            system.apply_event(uid, name, ts, props, None, now, out)
        if step % 25 == 24:
            cutoff = pruned.retention_cutoff(now, 0)
            assert cutoff is not None
            pruned.prune(list(pruned.users), cutoff)
        for a, b in zip(kept_segs, pruned_segs):
            assert list(a.members) == list(b.members), f"seed={seed} step={step} {a.name}"
    dropped = sum(len(kept.users[u].ts) - len(pruned.users[u].ts) for u in kept.users)
    assert dropped > 0, f"seed={seed}: nothing was pruned, the test proves nothing"


def test_an_all_time_segment_keeps_every_event() -> None:
    system, _ = build([{"kind": "did", "event": "a"}])
    assert system.retention_cutoff(T0, 0) is None
    system, _ = build([{"kind": "did", "event": "a", "window": {"last": "2d"}}])
    assert system.retention_cutoff(T0, 90 * 24 * H) == T0 - 90 * 24 * H
    assert system.retention_cutoff(T0, H) == T0 - 48 * H
