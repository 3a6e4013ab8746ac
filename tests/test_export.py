"""Member export (CSV, XLSX) and the segment report."""

from __future__ import annotations

import csv
import io

import openpyxl
from starlette.testclient import TestClient

from conftest import FakeClock
from test_time import new_segment, send

DAY = 86_400_000


def test_member_export_has_a_header_and_one_user_per_row_in_both_formats(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    users = ["b", "a", "=1+1", "zé"]
    send(client, *({"user_id": u, "name": "buy", "ts": clock.now} for u in users))
    seg = new_segment(client, {"name": "b", "rules": [{"kind": "did", "event": "buy"}]})
    r = client.get(f"/v1/systems/shop/segments/{seg}/export", params={"format": "csv"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(r.content.decode())))
    assert rows == [["user_id"]] + [[u] for u in sorted(users)]
    r = client.get(f"/v1/systems/shop/segments/{seg}/export", params={"format": "xlsx"})
    assert r.status_code == 200
    sheet = openpyxl.load_workbook(io.BytesIO(r.content)).active
    assert [row[0] for row in sheet.iter_rows(values_only=True)] == ["user_id"] + sorted(users)
    r = client.get(f"/v1/systems/shop/segments/{seg}/export", params={"format": "pdf"})
    assert r.status_code == 422


def test_report_gives_size_daily_series_and_recent_entrants(
        client: TestClient, shop: dict[str, str], clock: FakeClock) -> None:
    seg = new_segment(client, {"name": "w", "rules": [
        {"kind": "did", "event": "buy", "window": {"last": "1d"}}]})
    day0 = clock.now
    send(client, {"user_id": "a", "name": "buy", "ts": day0},
         {"user_id": "b", "name": "buy", "ts": day0})
    clock.now = day0 + DAY + 1000  # a and b have left; c enters on day 1.
    client.get("/healthz")
    from test_time import wait_for
    wait_for(lambda: client.get(f"/v1/systems/shop/segments/{seg}").json()["size"] == 0)
    send(client, {"user_id": "c", "name": "buy", "ts": clock.now})
    rep = client.get(f"/v1/systems/shop/segments/{seg}/report").json()
    assert rep["size"] == 1
    assert [(d["size"], d["entered"], d["left"]) for d in rep["daily"]] == [(2, 2, 0), (1, 1, 2)]
    assert [e["user_id"] for e in rep["recent_entrants"]] == ["c", "b", "a"]
