"""Member lists as files (CSV, XLSX) and the segment report."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

import xlsxwriter

from segactors.changelog import ChangeLog
from segactors.supervisor import Segment
from segactors.timefmt import DAY, format_ts

HEADER = ("user_id",)


def members_csv(members: Iterable[str]) -> bytes:
    """A header row, then one user per row. O(members)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(HEADER)
    for uid in members:
        w.writerow((uid,))
    return buf.getvalue().encode()


def members_xlsx(members: Iterable[str], sheet: str = "members") -> bytes:
    """One worksheet: a header row, then one user per row. O(members)."""
    buf = io.BytesIO()
    book = xlsxwriter.Workbook(buf, {"in_memory": True, "strings_to_numbers": False,
                                     "strings_to_formulas": False, "strings_to_urls": False})
    ws = book.add_worksheet(sheet)
    ws.write_row(0, 0, HEADER)
    for i, uid in enumerate(members, start=1):
        ws.write_string(i, 0, uid)
    book.close()
    return buf.getvalue()


def report(seg: Segment, log: ChangeLog, now: int, recent: int = 20) -> dict[str, Any]:
    """Size now, a daily (UTC) series of size/entered/left over the retained log, and the
    most recent entrants. Sizes of past days are derived backwards from the size now."""
    changes = log.since(log.dropped_upto, None, {seg.id})
    days: dict[int, list[int]] = {}
    for c in changes:
        d = days.setdefault(c.at // DAY, [0, 0])
        d[0 if c.change == "enter" else 1] += 1
    today = now // DAY
    first = min(days, default=today)
    size = len(seg.members)
    series = []
    for day in range(today, first - 1, -1):
        entered, left = days.get(day, (0, 0))
        series.append({"date": format_ts(day * DAY)[:10], "size": size,
                       "entered": entered, "left": left})
        size -= entered - left
    series.reverse()
    entrants = [{"user_id": c.user_id, "at": format_ts(c.at)}
                for c in reversed(changes) if c.change == "enter"][:recent]
    return {"segment": seg.id, "size": len(seg.members), "daily": series,
            "recent_entrants": entrants}
