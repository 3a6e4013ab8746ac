"""The peer: DuckDB computing the same segments with SQL, as a warehouse refresh would.

    python -m bench.peer [--quick] [--users N] [--events N]

Standalone it runs the ingest scenario with the check on (bench/ingest.py): the server
ingests the workload, its members are read, and this module loads the same events natively
(``read_json`` over newline-delimited JSON, timed apart from the refresh), computes all 20
segments at the instants the server was read, and compares.

The SQL is written from RULES.md (after tests/oracle.py) but over typed columns: the
workload gives each property exactly one JSON type (bench/workload.py EVENT_SCHEMA,
PROFILE_SCHEMA), so a filter on a column of another type, or on an absent property (NULL),
does not hold and its negation does. A leaf rule is a query returning keys ``(user_id, sk)``
(``sk`` is ``''`` under user scope, the session id under session scope); ``match`` and groups
combine them with INTERSECT / UNION / EXCEPT / GROUP BY … HAVING count(*) >= k, so a segment is
one SQL statement. A refresh materialises the 20 segments as tables in creation order
(``in_segment`` reads the referred table); the check inlines references so that each segment
can be evaluated at its own instant.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

import duckdb

from bench.workload import EVENT_SCHEMA, PROFILE_SCHEMA

_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DUR = re.compile(r"([+-]?)([0-9]+)(ms|s|m|h|d|w)")
_CMP = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "=", "neq": "<>"}
_NEG = {"neq": "eq", "not_contains": "contains", "not_icontains": "icontains", "not_in": "in",
        "not_exists": "exists"}


def dur(text: str) -> int:
    m = _DUR.fullmatch(text)
    assert m, text
    ms = int(m.group(2)) * _UNIT_MS[m.group(3)]
    return -ms if m.group(1) == "-" else ms


def ts_ms(value: Any) -> int:
    if isinstance(value, int):
        return value
    from bench.workload import parse_rfc3339
    return parse_rfc3339(value)


def lit(v: Any) -> str:
    """A SQL literal of a scalar."""
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, (int, float)):
        return repr(float(v))
    assert isinstance(v, str)
    return "'" + v.replace("'", "''") + "'"


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "num"
    return "str"


def _positive(col: str, typ: str | None, op: str, v: Any) -> str:
    """SQL (possibly NULL) for a positive filter op on a typed column."""
    if typ is None:
        return "FALSE"
    if op == "exists":
        return f"{col} IS NOT NULL"
    if op == "in":
        return "(" + " OR ".join(_positive(col, typ, "eq", x) for x in v) + ")" if v else "FALSE"
    vt = _kind(v)
    ctyp = "str" if typ == "ts" else typ
    if vt != ctyp:
        return "FALSE"
    if op in _CMP:
        if vt == "bool" and op != "eq":
            return "FALSE"
        return f"{col} {_CMP[op]} {lit(v)}"
    if vt != "str":
        return "FALSE"
    if op in ("contains", "starts_with", "ends_with"):
        return f"{op}({col}, {lit(v)})"
    if op == "icontains":
        return f"contains(lower({col}), {lit(v.lower())})"
    raise ValueError(op)


def filter_sql(f: dict[str, Any], schema: dict[str, str], prefix: str) -> str:
    op = f["op"]
    prop = f["property"]
    typ = schema.get(prop)
    col = f"{prefix}\"{prop}\""
    pos = _positive(col, typ, _NEG.get(op, op), f.get("value"))
    return f"NOT coalesce({pos}, FALSE)" if op in _NEG else f"coalesce({pos}, FALSE)"


def cmp_sql(expr: str, c: dict[str, Any]) -> str:
    if c["op"] == "between":
        return f"({expr} BETWEEN {float(c['value'])} AND {float(c['to'])})"
    return f"({expr} {_CMP[c['op']]} {float(c['value'])})"


class Compiler:
    """One definition at one `now` -> one SQL query of keys ``(user_id, sk)``."""

    def __init__(self, defn: dict[str, Any], now: int, ref: Callable[[str], str]) -> None:
        self.defn, self.now, self.ref = defn, now, ref
        self.session = defn.get("scope", "user") == "session"
        self.default_window = defn.get("window")
        sk = "session_id" if self.session else "''"
        only = " AND session_id IS NOT NULL" if self.session else ""
        # The visible timeline: future events do not exist yet.
        self.ev = (f"(SELECT user_id, {sk} AS sk, name, ts, url, referrer, sku, price, amount,"
                   f" currency, query FROM events WHERE ts <= {now}{only})")
        self.universe = (f"(SELECT DISTINCT user_id, sk FROM {self.ev})" if self.session
                         else "(SELECT user_id, '' AS sk FROM users)")

    def query(self) -> str:
        return self.combine(self.defn.get("match", "all"), self.defn["rules"])

    # combining

    def combine(self, match: Any, rules: list[dict[str, Any]]) -> str:
        leaves = [self.holds(r) for r in rules]
        u = f"SELECT user_id, sk FROM {self.universe}"
        if match == "all":
            return "(" + " INTERSECT ".join([u] + [f"SELECT * FROM ({x})" for x in leaves]) + ")"
        union = " UNION ".join(f"SELECT * FROM ({x})" for x in leaves)
        if match == "any":
            return f"({u} INTERSECT ({union}))"
        if match == "none":
            return f"({u} EXCEPT ({union}))"
        k = int(match["at_least"])
        tally = " UNION ALL ".join(f"SELECT * FROM ({x})" for x in leaves)
        return (f"({u} INTERSECT SELECT user_id, sk FROM ({tally}) GROUP BY ALL"
                f" HAVING count(*) >= {k})")

    def holds(self, rule: dict[str, Any]) -> str:
        if rule["kind"] == "group":
            return self.combine(rule.get("match", "all"), rule["rules"])
        return getattr(self, "_" + rule["kind"])(rule)

    # building blocks

    def window(self, col: str, w: dict[str, Any] | None) -> str:
        if w is None:
            return "TRUE"
        if "last" in w:
            return f"{col} > {self.now - dur(w['last'])}"
        parts = [f"{col} >= {ts_ms(w['from'])}"]
        if w.get("to") is not None:
            parts.append(f"{col} < {ts_ms(w['to'])}")
        return " AND ".join(parts)

    def match(self, spec: dict[str, Any], w: dict[str, Any] | None, a: str = "") -> str:
        parts = [f"{a}name = {lit(spec['event'])}", self.window(f"{a}ts", w)]
        parts += [filter_sql(f, EVENT_SCHEMA, a) for f in spec.get("where") or []]
        return " AND ".join(parts)

    def win(self, rule: dict[str, Any]) -> dict[str, Any] | None:
        return rule.get("window") or self.default_window

    def keys_with(self, rule: dict[str, Any], extra: str = "TRUE",
                  w: dict[str, Any] | None = None) -> str:
        return f"SELECT DISTINCT user_id, sk FROM {self.ev} e WHERE {self.match(rule, w)} AND {extra}"

    def _all_minus(self, q: str) -> str:
        return f"SELECT user_id, sk FROM {self.universe} EXCEPT ({q})"

    # leaves

    def _did(self, r: dict[str, Any]) -> str:
        count = r.get("count") or {"op": "gte", "value": 1}
        q = (f"SELECT user_id, sk FROM {self.ev} e WHERE {self.match(r, self.win(r))}"
             f" GROUP BY ALL HAVING {cmp_sql('count(*)', count)}")
        if r.get("include_absent"):
            q = f"({q}) UNION ({self._all_minus(self.keys_with(r, w=self.win(r)))})"
        return q

    def _did_not(self, r: dict[str, Any]) -> str:
        return self._all_minus(self.keys_with(r, w=self.win(r)))

    def _aggregate(self, r: dict[str, Any]) -> str:
        prop, fn = r["property"], r["fn"]
        typ = EVENT_SCHEMA.get(prop)
        col = f'"{prop}"'
        if fn == "distinct":
            usable, value = f"{col} IS NOT NULL" if typ else "FALSE", f"count(DISTINCT {col})"
        else:
            usable = f"{col} IS NOT NULL" if typ == "num" else "FALSE"
            value = {"sum": f"sum({col})", "avg": f"sum({col}) / count(*)"}.get(fn, f"{fn}({col})")
        base = f"FROM {self.ev} e WHERE {self.match(r, self.win(r))} AND {usable} GROUP BY ALL"
        q = f"SELECT user_id, sk {base} HAVING {cmp_sql(value, r['compare'])}"
        if r.get("include_absent"):
            q = f"({q}) UNION ({self._all_minus(f'SELECT user_id, sk {base}')})"
        return q

    def _first_did(self, r: dict[str, Any]) -> str:
        return (f"SELECT user_id, sk FROM (SELECT user_id, sk, min(ts) AS first FROM {self.ev} e"
                f" WHERE {self.match(r, None)} GROUP BY ALL) f"
                f" WHERE {self.window('f.first', self.win(r))}")

    def _did_then_not(self, r: dict[str, Any]) -> str:
        within = dur(r["within"])
        # For each candidate `a`, the first `then_not` event after it (ASOF join); `a`
        # counts when there is none within `within`.
        a = f"SELECT user_id, sk, ts FROM {self.ev} e WHERE {self.match(r, self.win(r))}" \
            f" AND ts + {within} <= {self.now}"
        b = f"SELECT user_id, sk, ts FROM {self.ev} e WHERE {self.match(r['then_not'], None)}"
        return (f"SELECT DISTINCT a.user_id, a.sk FROM ({a}) a ASOF LEFT JOIN ({b}) b"
                f" ON a.user_id = b.user_id AND a.sk = b.sk AND b.ts > a.ts"
                f" WHERE b.ts IS NULL OR b.ts > a.ts + {within}")

    def _sequence(self, r: dict[str, Any]) -> str:
        # From each candidate first event, take the earliest later event of each next step
        # (ASOF join): that minimises every later timestamp, so if any chain from that start
        # fits `within`, the greedy one does.
        w = self.win(r)
        steps = r["steps"]
        ctes = [f"s0 AS (SELECT user_id, sk, ts AS start, ts AS cur FROM {self.ev} e"
                f" WHERE {self.match(steps[0], w)})"]
        for i, step in enumerate(steps[1:], start=1):
            ctes.append(
                f"t{i} AS (SELECT user_id, sk, ts FROM {self.ev} e WHERE {self.match(step, w)}),"
                f" s{i} AS (SELECT c.user_id, c.sk, c.start, t.ts AS cur FROM s{i - 1} c"
                f" ASOF JOIN t{i} t ON t.user_id = c.user_id AND t.sk = c.sk AND t.ts > c.cur)")
        cond = f"cur - start <= {dur(r['within'])}" if r.get("within") else "TRUE"
        return (f"WITH {', '.join(ctes)} SELECT DISTINCT user_id, sk FROM s{len(steps) - 1}"
                f" WHERE {cond}")

    def _profile(self, r: dict[str, Any]) -> str:
        return (f"SELECT k.user_id, k.sk FROM {self.universe} k JOIN profiles p USING (user_id)"
                f" WHERE {filter_sql(r, PROFILE_SCHEMA, 'p.')}")

    def _profile_time(self, r: dict[str, Any]) -> str:
        assert PROFILE_SCHEMA.get(r["property"]) == "ts", r
        lo, hi = self.now + dur(r["from"]), self.now + dur(r["to"])
        col = f'p."{r["property"]}_ms"'
        return (f"SELECT k.user_id, k.sk FROM {self.universe} k JOIN profiles p USING (user_id)"
                f" WHERE {col} >= {lo} AND {col} < {hi}")

    def _in_segment(self, r: dict[str, Any]) -> str:
        return (f"SELECT user_id, sk FROM {self.universe} WHERE user_id IN"
                f" (SELECT user_id FROM {self.ref(r['segment'])})")

    def _not_in_segment(self, r: dict[str, Any]) -> str:
        return self._all_minus(self._in_segment(r))

    def _stopped(self, r: dict[str, Any]) -> str:
        t, s, now = dur(r["before"]), dur(r["recent"]), self.now
        return (f"({self.keys_with(r, f'ts > {now - t} AND ts <= {now - s}')}) EXCEPT"
                f" ({self.keys_with(r, f'ts > {now - s}')})")

    def _restarted(self, r: dict[str, Any]) -> str:
        t, s, now = dur(r["before"]), dur(r["recent"]), self.now
        return (f"(({self.keys_with(r, f'ts <= {now - t}')}) EXCEPT"
                f" ({self.keys_with(r, f'ts > {now - t} AND ts <= {now - s}')})) INTERSECT"
                f" ({self.keys_with(r, f'ts > {now - s}')})")

    def _regularly(self, r: dict[str, Any]) -> str:
        period, n = dur(r["period"]), int(r["periods"])
        count = r.get("count") or {"op": "gte", "value": 1}
        b = (f"SELECT user_id, sk, ({self.now} - ts) // {period} AS i, count(*) AS n"
             f" FROM {self.ev} e WHERE {self.match(r, None)} AND ts > {self.now - n * period}"
             f" GROUP BY ALL")
        if not eval_cmp(0, count):  # Only buckets with events can count: no cross join.
            return (f"SELECT user_id, sk FROM ({b}) WHERE {cmp_sql('n', count)} GROUP BY ALL"
                    f" HAVING count(*) >= {int(r['min_periods'])}")
        return (f"WITH b AS ({b}) SELECT k.user_id, k.sk FROM {self.universe} k"
                f" CROSS JOIN range({n}) r(i) LEFT JOIN b ON b.user_id = k.user_id"
                f" AND b.sk = k.sk AND b.i = r.i GROUP BY ALL HAVING count(*) FILTER"
                f" (WHERE {cmp_sql('coalesce(b.n, 0)', count)}) >= {int(r['min_periods'])}")


def eval_cmp(x: float, c: dict[str, Any]) -> bool:
    v = float(c["value"])
    return {"gt": x > v, "gte": x >= v, "lt": x < v, "lte": x <= v, "eq": x == v, "neq": x != v,
            "between": v <= x <= float(c.get("to", 0))}[c["op"]]


BUILTIN = {"all-users": "(SELECT user_id FROM users)",
           "test-users": "(SELECT user_id FROM profiles WHERE test_user IS TRUE)"}


class Peer:
    """An in-process DuckDB holding the workload's events and profiles."""

    def __init__(self, threads: int | None = None) -> None:
        self.con = duckdb.connect()
        if threads:
            self.con.execute(f"SET threads = {threads}")

    def load(self, events_path: str, profiles_path: str) -> dict[str, float]:
        """Load the NDJSON files natively; returns wall and CPU seconds."""
        t0, c0 = time.perf_counter(), time.process_time()
        ecols = {"id": "VARCHAR", "user_id": "VARCHAR", "name": "VARCHAR", "ts": "BIGINT",
                 "session_id": "VARCHAR",
                 "props": "STRUCT(" + ", ".join(
                     f'"{k}" {"DOUBLE" if t == "num" else "VARCHAR"}'
                     for k, t in EVENT_SCHEMA.items()) + ")"}
        cols = ", ".join(f'props."{k}" AS "{k}"' for k in EVENT_SCHEMA)
        self.con.execute(
            f"CREATE OR REPLACE TABLE events AS SELECT user_id, name, ts, session_id, {cols}"
            f" FROM read_json('{events_path}', format='newline_delimited', columns={ecols!r})")
        pcols = {"user_id": "VARCHAR", "props": "STRUCT(city VARCHAR, plan VARCHAR,"
                 " signup VARCHAR, test_user BOOLEAN)"}
        # One update per user in this workload; with several, the last one per property
        # would win (arrival order), which this load does not model.
        self.con.execute(
            "CREATE OR REPLACE TABLE profiles AS SELECT user_id, props.city AS city,"
            " props.plan AS plan, props.signup AS signup, props.test_user AS test_user,"
            " epoch_ms(strptime(props.signup, '%Y-%m-%dT%H:%M:%SZ')) AS signup_ms"
            f" FROM read_json('{profiles_path}', format='newline_delimited', columns={pcols!r})")
        self.con.execute("CREATE OR REPLACE TABLE users AS SELECT user_id FROM profiles"
                         " UNION SELECT DISTINCT user_id FROM events")
        n = self.con.execute("SELECT count(*) FROM events").fetchone()[0]  # type: ignore[index]
        return {"load_s": time.perf_counter() - t0, "load_cpu_s": time.process_time() - c0,
                "rows": n}

    def refresh(self, defs: list[tuple[str, dict[str, Any]]], now: int) -> dict[str, float]:
        """The warehouse job: every segment materialised as a table, in order."""
        table = {sid: f"seg_{i}" for i, (sid, _) in enumerate(defs)}
        ref = lambda s: BUILTIN.get(s) or table[s]  # noqa: E731
        t0, c0 = time.perf_counter(), time.process_time()
        for sid, d in defs:
            q = Compiler(d, now, ref).query()
            self.con.execute(f"CREATE OR REPLACE TABLE {table[sid]} AS"
                             f" SELECT DISTINCT user_id FROM ({q})")
        return {"refresh_s": time.perf_counter() - t0, "refresh_cpu_s": time.process_time() - c0}

    def members(self, defs: dict[str, dict[str, Any]], sid: str, now: int,
                users: list[str] | None = None) -> set[str]:
        """Members of segment `sid` at `now` (references inlined, at the same `now`)."""
        def ref(s: str) -> str:
            if s in BUILTIN:
                return BUILTIN[s]
            return f"(SELECT DISTINCT user_id FROM ({Compiler(defs[s], now, ref).query()}))"
        q = f"SELECT DISTINCT user_id FROM ({Compiler(defs[sid], now, ref).query()})"
        if users is not None:
            self.con.execute("CREATE OR REPLACE TEMP TABLE probe AS SELECT unnest($u) AS user_id",
                             {"u": users})
            q += " WHERE user_id IN (SELECT user_id FROM probe)"
        return {u for (u,) in self.con.execute(q).fetchall()}

    def close(self) -> None:
        self.con.close()


def compare(peer: Peer, defs: dict[str, dict[str, Any]], names: dict[str, str],
            reads: dict[str, tuple[set[str], int, int]], lag_ms: int = 1000,
            probes: int = 12) -> list[dict[str, Any]]:
    """Check the server's members of each segment against the peer.

    ``reads[sid] = (members, t_first_request_ms, t_last_response_ms)``. The server applies a
    time-driven change within ``lag_ms`` of its instant (RULES.md allows 1 s), and pages are
    read over an interval, so the server's answer for a user must equal the peer's at some
    instant of ``[t_first - lag_ms, t_last]``. The peer is evaluated at both ends; users
    whose answer differs from both are re-checked at ``probes`` instants in between; those
    still differing are mismatches. ``in_flux`` counts users whose true membership changes
    within the interval (either answer accepted).
    """
    out = []
    for sid, (got, t_a, t_b) in reads.items():
        lo, hi = t_a - lag_ms, t_b
        at_lo = peer.members(defs, sid, lo)
        at_hi = peer.members(defs, sid, hi)
        suspects = (got ^ at_lo) & (got ^ at_hi)
        if suspects:
            users = sorted(suspects)
            for k in range(1, probes + 1):
                mid = lo + (hi - lo) * k // (probes + 1)
                at_mid = peer.members(defs, sid, mid, users)
                users = [u for u in users if (u in got) != (u in at_mid)]
                if not users:
                    break
            suspects = set(users)
        out.append({
            "segment": sid, "name": names[sid], "server": len(got), "peer_at_lo": len(at_lo),
            "peer_at_hi": len(at_hi), "in_flux": len(at_lo ^ at_hi),
            "window_ms": hi - lo,
            "only_server": sorted(u for u in suspects if u in got),
            "only_peer": sorted(u for u in suspects if u not in got),
        })
    return out


def main() -> None:
    import sys

    from bench import ingest

    sys.argv.insert(1, "--peer")
    ingest.main()


if __name__ == "__main__":
    main()
