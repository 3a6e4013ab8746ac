"""An independent oracle for segment membership, written from RULES.md alone.

`oracle_members(events, profiles, users, definition, now, segments)` answers which known
users are members of a segment at `now`. It shares no code with the engine: the event work
is done by DuckDB SQL (one query per leaf rule, each returning the keys for which the leaf
holds), and groups and `match` are plain Python set logic over those keys. A key is
`(user_id, session)`, where `session` is `""` under `scope: "user"` and the session id under
`scope: "session"`. One in-memory DuckDB connection per call; ~2000 events cost a few ms to
load and a few ms per leaf.

Decisions (where RULES.md is silent or ambiguous)
-------------------------------------------------
- `ends_at` is ignored: the caller freezes membership at expiry.
- Events with `ts > now` are dropped before any rule looks (also for `first_seen`/`last_seen`
  and for which sessions exist). Events of users outside `users` are ignored.
- Numbers (event props, profile values, filter values, comparison values) are compared as
  IEEE doubles: `30 == 30.0`, `-0.0 == 0.0`; integers beyond 2**53 may compare equal.
- String `gt/gte/lt/lte` use code point order (DuckDB compares UTF-8 bytes, which is the
  same). `icontains` lowers both sides with Python's `str.lower()` (not `casefold()`, so
  "ß" does not match "SS"). `contains ""`, `starts_with ""`, `ends_with ""` hold on any string.
- `did` with `count`: count 0 holds iff `include_absent`, whatever `count` says; count >= 1
  holds iff the count satisfies `count`. Comparison values may be non-integers.
- `aggregate`: usable values are numbers (booleans excluded) for sum/avg/min/max and any
  non-null value for `distinct`. No usable value: holds iff `include_absent`. `avg` is
  sum/count of the usable values. `distinct` counts `eq`-classes: 1 and 1.0 are one value;
  true, 1 and "1" are three. Sums are DuckDB double sums (exact for integer values).
- `first_did`: the earliest visible event with that name passing `where` (the window does
  not limit the search) must lie inside the window; with no window it holds iff the user
  ever did it.
- `did_then_not`: `a` is visible, inside the window and `a.ts + within <= now`; any event
  of `then_not` (passing its `where`) with ts in `(a.ts, a.ts + within]` spoils that `a`.
- `sequence`: strictly increasing timestamps, so two steps can never use events with the
  same ts; all steps inside the window; `within` bounds last-minus-first (trivially true
  for one step).
- `stopped`, `restarted`, `regularly` ignore both the rule's and the segment's window.
  `regularly` buckets are `(now-(i+1)P, now-iP]`; an empty bucket counts when 0 satisfies
  `count` (so `{"op": "eq", "value": 0}` counts idle periods).
- `profile`: the filter table applied to the profile, plus `first_seen`/`last_seen` as
  RFC 3339 strings `YYYY-MM-DDTHH:MM:SS.mmmZ` (absent when no visible event); they replace
  any same-named entries in `profiles`.
- `profile_time`: the value must be a timestamp as RFC 3339 defines one for this API: an
  integer (not bool, not float, so `1767225600000.0` is not one) or a strict RFC 3339 string
  (uppercase `T`, `Z` or `±HH:MM`, seconds required, no leap second). Anything else: the
  rule does not hold. `from`/`to` without a sign are taken as positive.
- `in_segment`/`not_in_segment` read `segments` (caller-supplied ids win over the computed
  built-ins `all-users` and `test-users`); an unknown id raises KeyError.
- `scope: "session"`: the sessions are the distinct non-null `session_id`s of visible
  events. Every event rule (including `then_not`, every `sequence` step, `stopped`,
  `restarted`, `regularly`, `did_not` and `include_absent`) sees only that session's events;
  `profile`, `profile_time`, `in_segment`, `not_in_segment` hold for every session of a user
  for whom they hold. A user without a session is never a member.
- A window or `where` given as `null` is treated as absent.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import duckdb

Key = tuple[str, str]
Scalar = str | int | float | bool | None

__all__ = ["oracle_members", "parse_duration", "parse_signed_duration", "parse_ts", "format_ts"]

_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"([+-]?)([0-9]+)(ms|s|m|h|d|w)")
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"(Z|([+-])([0-9]{2}):([0-9]{2}))"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NEGATIONS = {
    "neq": "eq",
    "not_contains": "contains",
    "not_icontains": "icontains",
    "not_in": "in",
    "not_exists": "exists",
}
_SQL_CMP = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "=", "neq": "<>"}
_STRING_FNS = {"contains": "contains", "starts_with": "starts_with", "ends_with": "ends_with"}


# --- durations and timestamps -----------------------------------------------------------


def parse_duration(text: str) -> int:
    """`"500ms"`, `"10m"`, `"30d"` -> milliseconds."""
    m = _DURATION.fullmatch(text)
    if m is None or m.group(1):
        raise ValueError(f"not a duration: {text!r}")
    return int(m.group(2)) * _UNIT_MS[m.group(3)]


def parse_signed_duration(text: str) -> int:
    """`"+5d"`, `"-30d"` (or unsigned, taken as positive) -> signed milliseconds."""
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ValueError(f"not a signed duration: {text!r}")
    ms = int(m.group(2)) * _UNIT_MS[m.group(3)]
    return -ms if m.group(1) == "-" else ms


def parse_ts(value: object) -> int | None:
    """A timestamp (RFC 3339 string or integer epoch ms) -> epoch ms; None if not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    m = _RFC3339.fullmatch(value)
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    try:
        dt = datetime(y, mo, d, h, mi, s, tzinfo=timezone.utc)
    except ValueError:
        return None
    ms = (dt - _EPOCH) // timedelta(milliseconds=1)
    if m.group(7):
        ms += int((m.group(7)[1:] + "00")[:3])  # truncated, never rounded
    if m.group(8) != "Z":
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            return None
        ms -= (1 if m.group(9) == "+" else -1) * (oh * 60 + om) * 60_000
    return ms


def format_ts(ms: int) -> str:
    """Epoch ms -> `YYYY-MM-DDTHH:MM:SS.mmmZ`."""
    dt = _EPOCH + timedelta(milliseconds=ms)
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


# --- loading ------------------------------------------------------------------------------

_PROPS_COLUMNS = "key VARCHAR, kind VARCHAR, num DOUBLE, s VARCHAR, ls VARCHAR, b BOOLEAN, t BIGINT"


def _typed(value: Scalar) -> tuple[str, float | None, str | None, str | None, bool | None]:
    """(kind, num, s, lowered s, b): one column per type, so SQL never coerces."""
    if value is None:
        return ("null", None, None, None, None)
    if isinstance(value, bool):
        return ("bool", None, None, None, value)
    if isinstance(value, (int, float)):
        return ("num", float(value) + 0.0, None, None, None)  # + 0.0 folds -0.0 into 0.0
    if isinstance(value, str):
        return ("str", None, value, value.lower(), None)
    raise TypeError(f"not a scalar: {value!r}")


def _insert(
    con: duckdb.DuckDBPyConnection, table: str, types: list[str], rows: list[tuple]
) -> None:
    """Bulk insert through list parameters (one statement, no per-row round trips)."""
    columns = list(zip(*rows)) if rows else [() for _ in types]
    select = ", ".join(f"unnest($c{i}::{t}[])" for i, t in enumerate(types))
    con.execute(
        f"INSERT INTO {table} SELECT {select}",
        {f"c{i}": list(col) for i, col in enumerate(columns)},
    )


def _props_rows(owner: object, props: dict[str, Scalar], with_ts: bool) -> list[tuple]:
    return [(owner, k, *_typed(v), parse_ts(v) if with_ts else None) for k, v in props.items()]


# --- evaluation ---------------------------------------------------------------------------


class _Params:
    """Named DuckDB parameters, so fragments can be composed in any order."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def __call__(self, value: Any) -> str:
        name = f"p{len(self.values)}"
        self.values[name] = value
        return "$" + name


class _Evaluator:
    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        now: int,
        universe: set[Key],
        default_window: dict | None,
        segments: dict[str, set[str]],
    ) -> None:
        self.con = con
        self.now = now
        self.universe = universe
        self.default_window = default_window
        self.segments = segments

    # SQL building blocks ------------------------------------------------------------------

    def _query(self, sql: str, params: _Params) -> set[Key]:
        # DuckDB rejects unused parameters, and two queries may share one _Params.
        used = {name: params.values[name] for name in re.findall(r"\$(p[0-9]+)", sql)}
        return {(u, s) for u, s in self.con.execute(sql, used).fetchall()}

    def _window_sql(self, col: str, window: dict | None) -> str:
        if window is None:
            return "TRUE"
        if "last" in window:
            return f"{col} > {self.now - parse_duration(window['last'])}"
        parts = [f"{col} >= {_ts(window['from'])}"]
        if window.get("to") is not None:
            parts.append(f"{col} < {_ts(window['to'])}")
        return " AND ".join(parts)

    def _value_cond(self, op: str, value: Any, p: _Params) -> str:
        """SQL over props row `p` for a positive op (not a negation)."""
        if op == "exists":
            return "p.kind <> 'null'"
        if op == "in":
            conds = [self._value_cond("eq", v, p) for v in value]
            return "(" + " OR ".join(conds) + ")" if conds else "FALSE"
        if isinstance(value, bool):
            return f"(p.kind = 'bool' AND p.b = {p(value)})" if op == "eq" else "FALSE"
        if isinstance(value, (int, float)):
            if op == "eq" or op in _SQL_CMP:
                return f"(p.kind = 'num' AND p.num {_SQL_CMP[op]} {p(float(value))})"
            return "FALSE"
        assert isinstance(value, str), value
        if op == "eq" or op in _SQL_CMP:
            return f"(p.kind = 'str' AND p.s {_SQL_CMP[op]} {p(value)})"
        if op in _STRING_FNS:
            return f"(p.kind = 'str' AND {_STRING_FNS[op]}(p.s, {p(value)}))"
        if op == "icontains":
            return f"(p.kind = 'str' AND contains(p.ls, {p(value.lower())}))"
        raise ValueError(f"unknown filter op {op!r}")

    def _filter_sql(self, table: str, owner: str, f: dict, p: _Params) -> str:
        op = f["op"]
        cond = self._value_cond(_NEGATIONS.get(op, op), f.get("value"), p)
        exists = (
            f"EXISTS (SELECT 1 FROM {table} p WHERE p.owner = {owner}"
            f" AND p.key = {p(f['property'])} AND {cond})"
        )
        return f"NOT {exists}" if op in _NEGATIONS else exists

    def _match_sql(self, a: str, spec: dict, window: dict | None, p: _Params) -> str:
        """Event `a` has the spec's name, passes its `where` and lies in `window`."""
        parts = [f"{a}.name = {p(spec['event'])}", self._window_sql(f"{a}.ts", window)]
        parts += [self._filter_sql("eprops", f"{a}.eid", f, p) for f in spec.get("where") or []]
        return " AND ".join(parts)

    @staticmethod
    def _cmp_sql(expr: str, cmp: dict, p: _Params) -> str:
        if cmp["op"] == "between":
            return f"({expr} BETWEEN {p(float(cmp['value']))} AND {p(float(cmp['to']))})"
        return f"({expr} {_SQL_CMP[cmp['op']]} {p(float(cmp['value']))})"

    def _keys_with(self, rule: dict, extra: str = "TRUE", window: dict | None = None) -> set[Key]:
        """Keys having at least one event matching `rule` (in `window`) and `extra`."""
        p = _Params()
        m = self._match_sql("e", rule, window, p)
        return self._query(f"SELECT DISTINCT user_id, sk FROM ev e WHERE {m} AND {extra}", p)

    def _window_of(self, rule: dict) -> dict | None:
        return rule.get("window") or self.default_window

    # combining ------------------------------------------------------------------------------

    def combine(self, match: str | dict, rules: list[dict]) -> set[Key]:
        held = [self.holds(r) for r in rules]
        if match == "all":
            return self.universe.intersection(*held)
        if match == "any":
            return self.universe & set().union(*held)
        if match == "none":
            return self.universe - set().union(*held)
        k = match["at_least"]
        tally = Counter(key for keys in held for key in keys)
        return {key for key in self.universe if tally[key] >= k}

    def holds(self, rule: dict) -> set[Key]:
        kind = rule["kind"]
        if kind == "group":
            return self.combine(rule.get("match", "all"), rule["rules"])
        return self.universe & getattr(self, "_" + kind)(rule)

    # leaf rules -----------------------------------------------------------------------------

    def _did(self, rule: dict) -> set[Key]:
        p = _Params()
        m = self._match_sql("e", rule, self._window_of(rule), p)
        count = rule.get("count") or {"op": "gte", "value": 1}
        held = self._query(
            f"SELECT user_id, sk FROM ev e WHERE {m} GROUP BY ALL"
            f" HAVING {self._cmp_sql('count(*)', count, p)}",
            p,
        )
        if rule.get("include_absent"):
            held |= self.universe - self._keys_with(rule, window=self._window_of(rule))
        return held

    def _did_not(self, rule: dict) -> set[Key]:
        return self.universe - self._keys_with(rule, window=self._window_of(rule))

    def _aggregate(self, rule: dict) -> set[Key]:
        fn = rule["fn"]
        p = _Params()
        m = self._match_sql("e", rule, self._window_of(rule), p)
        if fn == "distinct":
            usable = "p.kind <> 'null'"
            value = (
                "(count(DISTINCT CASE WHEN p.kind = 'num' THEN p.num END)"
                " + count(DISTINCT CASE WHEN p.kind = 'str' THEN p.s END)"
                " + count(DISTINCT CASE WHEN p.kind = 'bool' THEN p.b END))"
            )
        else:
            usable = "p.kind = 'num'"
            value = {"sum": "sum(p.num)", "avg": "sum(p.num) / count(*)"}.get(fn, f"{fn}(p.num)")
        base = (
            f"FROM ev e JOIN eprops p ON p.owner = e.eid AND p.key = {p(rule['property'])}"
            f" AND {usable} WHERE {m} GROUP BY ALL"
        )
        held = self._query(
            f"SELECT e.user_id, e.sk {base} HAVING {self._cmp_sql(value, rule['compare'], p)}", p
        )
        if rule.get("include_absent"):
            held |= self.universe - self._query(f"SELECT e.user_id, e.sk {base}", p)
        return held

    def _first_did(self, rule: dict) -> set[Key]:
        p = _Params()
        m = self._match_sql("e", rule, None, p)
        w = self._window_sql("f.first", self._window_of(rule))
        return self._query(
            f"SELECT user_id, sk FROM (SELECT user_id, sk, min(ts) AS first FROM ev e"
            f" WHERE {m} GROUP BY ALL) f WHERE {w}",
            p,
        )

    def _did_then_not(self, rule: dict) -> set[Key]:
        p = _Params()
        within = parse_duration(rule["within"])
        a = self._match_sql("a", rule, self._window_of(rule), p)
        b = self._match_sql("b", rule["then_not"], None, p)
        return self._query(
            f"SELECT DISTINCT a.user_id, a.sk FROM ev a WHERE {a} AND a.ts + {within} <= {self.now}"
            f" AND NOT EXISTS (SELECT 1 FROM ev b WHERE b.user_id = a.user_id AND b.sk = a.sk"
            f" AND {b} AND b.ts > a.ts AND b.ts <= a.ts + {within})",
            p,
        )

    def _sequence(self, rule: dict) -> set[Key]:
        # For each candidate first event, greedily take the earliest later event for each
        # next step: that minimises every later timestamp, so if any chain from that start
        # fits `within`, the greedy one does.
        p = _Params()
        window = self._window_of(rule)
        steps = rule["steps"]
        ctes = [f"s0 AS (SELECT user_id, sk, ts AS start, ts AS cur FROM ev e"
                f" WHERE {self._match_sql('e', steps[0], window, p)})"]
        for i, step in enumerate(steps[1:], start=1):
            ctes.append(
                f"s{i} AS (SELECT c.user_id, c.sk, c.start, min(e.ts) AS cur FROM s{i - 1} c"
                f" JOIN ev e ON e.user_id = c.user_id AND e.sk = c.sk AND e.ts > c.cur"
                f" WHERE {self._match_sql('e', step, window, p)} GROUP BY ALL)"
            )
        last = f"s{len(steps) - 1}"
        cond = f"cur - start <= {parse_duration(rule['within'])}" if rule.get("within") else "TRUE"
        return self._query(
            f"WITH {', '.join(ctes)} SELECT DISTINCT user_id, sk FROM {last} WHERE {cond}", p
        )

    def _profile(self, rule: dict) -> set[Key]:
        p = _Params()
        cond = self._filter_sql("pprops", "k.user_id", rule, p)
        return self._query(f"SELECT user_id, sk FROM keys k WHERE {cond}", p)

    def _profile_time(self, rule: dict) -> set[Key]:
        p = _Params()
        lo = self.now + parse_signed_duration(rule["from"])
        hi = self.now + parse_signed_duration(rule["to"])
        return self._query(
            f"SELECT k.user_id, k.sk FROM keys k JOIN pprops p ON p.owner = k.user_id"
            f" AND p.key = {p(rule['property'])} WHERE p.t >= {lo} AND p.t < {hi}",
            p,
        )

    def _in_segment(self, rule: dict) -> set[Key]:
        members = self.segments[rule["segment"]]
        return {key for key in self.universe if key[0] in members}

    def _not_in_segment(self, rule: dict) -> set[Key]:
        return self.universe - self._in_segment(rule)

    def _stopped(self, rule: dict) -> set[Key]:
        t, s = parse_duration(rule["before"]), parse_duration(rule["recent"])
        now = self.now
        used_to = self._keys_with(rule, f"e.ts > {now - t} AND e.ts <= {now - s}")
        return used_to - self._keys_with(rule, f"e.ts > {now - s}")

    def _restarted(self, rule: dict) -> set[Key]:
        t, s = parse_duration(rule["before"]), parse_duration(rule["recent"])
        now = self.now
        long_ago = self._keys_with(rule, f"e.ts <= {now - t}")
        gap = self._keys_with(rule, f"e.ts > {now - t} AND e.ts <= {now - s}")
        return (long_ago - gap) & self._keys_with(rule, f"e.ts > {now - s}")

    def _regularly(self, rule: dict) -> set[Key]:
        p = _Params()
        period, n = parse_duration(rule["period"]), int(rule["periods"])
        m = self._match_sql("e", rule, None, p)
        count = rule.get("count") or {"op": "gte", "value": 1}
        return self._query(
            f"WITH b AS (SELECT user_id, sk, ({self.now} - ts) // {period} AS i, count(*) AS n"
            f" FROM ev e WHERE {m} AND e.ts > {self.now - n * period} GROUP BY ALL)"
            f" SELECT k.user_id, k.sk FROM keys k CROSS JOIN range({n}) r(i)"
            f" LEFT JOIN b ON b.user_id = k.user_id AND b.sk = k.sk AND b.i = r.i GROUP BY ALL"
            f" HAVING count(*) FILTER (WHERE {self._cmp_sql('coalesce(b.n, 0)', count, p)})"
            f" >= {int(rule['min_periods'])}",
            p,
        )


def _ts(value: object) -> int:
    ms = parse_ts(value)
    if ms is None:
        raise ValueError(f"not a timestamp: {value!r}")
    return ms


def oracle_members(
    events: list[dict],
    profiles: dict[str, dict],
    users: set[str],
    definition: dict,
    now: int,
    segments: dict[str, set[str]] | None = None,
) -> set[str]:
    """The members of `definition` among `users` at `now`, per RULES.md (see Decisions)."""
    session_scope = definition.get("scope", "user") == "session"
    con = duckdb.connect()
    try:
        con.execute(
            "CREATE TABLE events (eid BIGINT, user_id VARCHAR, name VARCHAR, ts BIGINT,"
            " session_id VARCHAR)"
        )
        con.execute(f"CREATE TABLE eprops (owner BIGINT, {_PROPS_COLUMNS})")
        con.execute(f"CREATE TABLE pprops (owner VARCHAR, {_PROPS_COLUMNS})")
        con.execute("CREATE TABLE keys (user_id VARCHAR, sk VARCHAR)")
        prop_types = ["VARCHAR", "VARCHAR", "DOUBLE", "VARCHAR", "VARCHAR", "BOOLEAN", "BIGINT"]
        _insert(
            con,
            "events",
            ["BIGINT", "VARCHAR", "VARCHAR", "BIGINT", "VARCHAR"],
            [(i, e["user_id"], e["name"], e["ts"], e.get("session_id"))
             for i, e in enumerate(events)],
        )
        _insert(
            con,
            "eprops",
            ["BIGINT", *prop_types],
            [
                row
                for i, e in enumerate(events)
                for row in _props_rows(i, e.get("props") or {}, with_ts=False)
            ],
        )
        # The visible timeline: future events do not exist yet; in session scope the
        # session id is the key, and events outside any session are invisible.
        sk = "session_id" if session_scope else "''"
        only_sessions = " AND session_id IS NOT NULL" if session_scope else ""
        con.execute(
            f"CREATE VIEW ev AS SELECT eid, user_id, {sk} AS sk, name, ts FROM events"
            f" WHERE ts <= {int(now)}{only_sessions}"
        )

        seen = con.execute(
            f"SELECT user_id, min(ts), max(ts) FROM events WHERE ts <= {int(now)} GROUP BY 1"
        ).fetchall()
        profile_of = {u: dict(profiles.get(u) or {}) for u in users}
        for u, first, last in seen:
            if u in profile_of:
                profile_of[u].update(first_seen=format_ts(first), last_seen=format_ts(last))
        _insert(
            con,
            "pprops",
            ["VARCHAR", *prop_types],
            [row for u, props in profile_of.items() for row in _props_rows(u, props, with_ts=True)],
        )

        if session_scope:
            rows = con.execute("SELECT DISTINCT user_id, sk FROM ev").fetchall()
            universe = {(u, s) for u, s in rows if u in users}
        else:
            universe = {(u, "") for u in users}
        _insert(con, "keys", ["VARCHAR", "VARCHAR"], sorted(universe))

        all_segments = {
            "all-users": set(users),
            "test-users": {u for u in users if (profiles.get(u) or {}).get("test_user") is True},
            **(segments or {}),
        }
        evaluator = _Evaluator(con, int(now), universe, definition.get("window"), all_segments)
        held = evaluator.combine(definition.get("match", "all"), definition["rules"])
        return {u for u, _ in held}
    finally:
        con.close()
