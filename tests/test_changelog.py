"""The change log answers as a plain list of every change would, filtered by hand."""

from __future__ import annotations

import random

import pytest

from segactors.changelog import ChangeLog
from segactors.errors import Gone
from segactors.supervisor import Change


@pytest.mark.parametrize("seed", range(8))
def test_since_trim_and_gone_match_a_list_of_every_change(seed: int) -> None:
    rng = random.Random(seed)
    retention, count = rng.choice([(50, None), (10**9, 30), (200, 100)])
    log = ChangeLog(retention, count)
    every: list[Change] = []
    now, seq, dropped = 1_000, 0, 0
    first = rng.randrange(0, 5)
    if first:  # A log restored from a store whose first changes are gone.
        seqs = [first, first + 1, first + 2]
        if rng.random() < 0.5:  # One whose commit failed is missing.
            seqs = [first, first + 2, first + 3]
        got = [Change(s, "g0", "u0", "enter", now) for s in seqs]
        log.restore(got)
        every += got
        seq = seqs[-1]
        dropped = first - 1 if seqs[1] == first + 1 else first + 1
    for step in range(600):
        r = rng.random()
        now += rng.randrange(0, 5)
        if r < 0.4:
            if every and rng.random() < 0.03:
                # Changes whose commit failed are not stored: after a restart, their seqs
                # are missing; what came before them is gone to readers.
                seq += rng.randint(1, 3)
                dropped = seq
            batch = [Change(seq + k + 1, f"g{rng.randrange(3)}", f"u{rng.randrange(9)}",
                            rng.choice(["enter", "leave"]), now)
                     for k in range(rng.randrange(1, 6 if seed % 2 else 80))]
            seq += len(batch)
            log.extend(batch)
            every += batch
            if rng.random() < 0.7:
                log.mark_published(seq)
        elif r < 0.55:
            got_drop = log.trim(now)
            if got_drop:
                dropped = got_drop
            kept = [c for c in every if c.seq > dropped]
            assert not every or kept[-1].seq == seq  # The newest is always kept.
            assert all(c.at >= now - retention for c in kept[:-1])
            if count is not None:
                assert len(kept) <= count
            assert len(log) == len(kept)
        else:
            since = rng.randrange(max(0, dropped - 3), seq + 2)
            limit = rng.choice([None, 1, 3])
            segs = rng.choice([None, {"g1"}, {"g0", "g2"}])
            if since < dropped:
                with pytest.raises(Gone):
                    log.since(since, limit, segs)
                continue
            want = [c for c in every if since < c.seq <= log.published
                    and (segs is None or c.segment in segs)]
            assert log.since(since, limit, segs) == want[:limit], (seed, step)
    assert log.last_seq == seq
