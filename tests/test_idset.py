"""The compact set of event ids answers exactly as a Python set of the same strings."""

from __future__ import annotations

import random

import pytest

from segactors.idset import IdSet


def gen_id(rng: random.Random, pool: list[str]) -> str:
    """Mostly short ASCII ids; some reused, empty, prefixes of others, non-ASCII, holding a
    NUL or a lone surrogate (which UTF-8 cannot encode)."""
    r = rng.random()
    if pool and r < 0.3:
        return rng.choice(pool)
    if pool and r < 0.35:
        base = rng.choice(pool)
        return base[: rng.randrange(len(base) + 1)]  # A prefix: must not match inside.
    if r < 0.37:
        return rng.choice(["", "\0", "a\0b", "\ud800", "x\udfff", "é", "日本", "a b"])
    if r < 0.4:
        return "".join(rng.choice("ab\0é") for _ in range(rng.randrange(4)))
    return f"e{rng.randrange(10**rng.randrange(1, 9))}"


def same_answer(got: IdSet, want: set[str], op: str, eid: str, where: object) -> None:
    """Do ``op`` ("add", "discard" or "in") with ``eid`` on both; they must answer alike."""
    if op == "add":
        assert got.add(eid) is (eid not in want), where
        want.add(eid)
    elif op == "discard":
        got.discard(eid)
        want.discard(eid)
    else:
        assert (eid in got) is (eid in want), where
    assert len(got) == len(want), where


@pytest.mark.parametrize("seed", range(6))
def test_adds_discards_and_lookups_match_a_set(seed: int) -> None:
    rng = random.Random(seed)
    got, want = IdSet(), set[str]()
    pool: list[str] = []
    for step in range(20_000):
        eid = gen_id(rng, pool)
        pool.append(eid)
        op = rng.choices(["add", "discard", "in"], [75, 10, 15])[0]
        same_answer(got, want, op, eid, (seed, step, eid))
        if step % 2_000 == 0:
            got._check()
    got._check()
    assert got._level > 256 or got._split > 0  # Buckets were split along the way.
    for eid in pool:
        assert (eid in got) is (eid in want)
    assert 5 not in got


@pytest.mark.parametrize("seed", range(3))
def test_a_bulk_load_then_adds_match_a_set(seed: int) -> None:
    rng = random.Random(100 + seed)
    stored = list(dict.fromkeys(f"id-{rng.randrange(10**7)}" for _ in range(30_000)))
    stored.append("")
    got = IdSet(expect=len(stored) // rng.choice([1, 4, 50]))  # Too small: it splits.
    for k in range(0, len(stored), 7_000):
        got.load([s.encode() for s in stored[k:k + 7_000]])
    got._check()
    want = set(stored)
    assert len(got) == len(want)
    for _ in range(10_000):
        eid = rng.choice(stored) if rng.random() < 0.5 else f"id-{rng.randrange(10**7)}"
        assert got.add(eid) is (eid not in want)
        want.add(eid)
    got._check()
    assert len(got) == len(want)


def test_room_for_the_expected_ids_means_no_split_while_they_come() -> None:
    got = IdSet(expect=100_000)
    level = got._level
    got.load([b"%d" % i for i in range(100_000)])
    assert (got._level, got._split) == (level, 0)
    got._check()


@pytest.mark.parametrize("seed", range(4))
def test_staged_ids_count_at_once_and_move_into_buckets_between_other_calls(seed: int) -> None:
    rng = random.Random(200 + seed)
    pool: list[str] = []
    stored = list(dict.fromkeys(gen_id(rng, pool) for _ in range(3_000)))
    got = IdSet(expect=len(stored) // rng.choice([1, 8]))
    got.stage(stored[:1_000])
    got.stage(stored[1_000:])
    want = set(stored)
    assert len(got) == len(want)
    done = False
    for step in range(8_000):
        eid = gen_id(rng, stored)
        op = rng.choices(["add", "discard", "in", "unstage"], [50, 10, 20, 20])[0]
        if op != "unstage":
            same_answer(got, want, op, eid, (seed, step, eid))
        elif not done:
            done = got.unstage(rng.choice([1, 50, 400]))
        if step % 500 == 0:
            got._check()
    assert done and got._staged is None
    got._check()
    assert all((eid in got) is (eid in want) for eid in stored)
