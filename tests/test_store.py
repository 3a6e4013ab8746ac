"""The store's writer process: the WAL is copied into the database beside commits, and
stays bounded while commits never stop."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from segactors import store
from segactors.store import INSERT_EVENT, Store


async def test_the_wal_is_checkpointed_beside_commits_and_stays_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commit after commit with no pause (~16 MB in all, against a restart threshold of
    256 KB): the WAL file never holds a quarter of what was written (about 0.7 MB at most
    here; without the writer's own pass it grows with the writes), the database file
    takes the rows, and every row is there."""
    monkeypatch.setattr(store, "WAL_RESTART_PAGES", 64)
    monkeypatch.setattr(store, "CHECKPOINT_EVERY", 0.005)
    st = Store(tmp_path)
    await st.open()  # The writer is forked with the values above.
    wal = tmp_path / "segactors.db-wal"
    props = b'{"p":"' + b"x" * 400 + b'"}'
    commits, per = 400, 100
    biggest = 0
    try:
        for c in range(commits):
            await st.write([(INSERT_EVENT, [("s", f"u{i % 7}", "e", c * per + i, f"id{c}-{i}",
                                             None, props) for i in range(per)])])
            biggest = max(biggest, os.path.getsize(wal) if wal.exists() else 0)
    finally:
        await st.close()
    total = commits * per * len(props)
    assert biggest < total / 4, (biggest, total)
    assert os.path.getsize(tmp_path / "segactors.db") > total / 2  # Checkpointed.
    con = sqlite3.connect(tmp_path / "segactors.db")
    try:
        n, distinct = con.execute(
            "SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
    finally:
        con.close()
    assert n == distinct == commits * per
