"""Seeded random data and segment definitions for the differential tests.

Everything takes a ``random.Random``, so a seed reproduces a case exactly. Values are drawn
from small pools on purpose: filters must hit often, timestamps must tie, and numbers must
come as both ``30`` and ``30.0``. Floats are binary fractions (``2.5``, ``0.25``), so sums
and averages are exact in any summation order and the engine (Python) and the oracle
(DuckDB) cannot differ by rounding.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any

T = 1_767_225_600_000  # 2026-01-01T00:00:00Z, the "now" of the batch scenarios
SEC, MIN, HOUR, DAY = 1_000, 60_000, 3_600_000, 86_400_000
UNITS = {"ms": 1, "s": SEC, "m": MIN, "h": HOUR, "d": DAY, "w": 7 * DAY}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

NAMES = ["view", "cart", "buy", "launch"]
EVENT_PROPS = ["price", "plan", "url", "flag", "qty"]
PROFILE_PROPS = ["city", "age", "test_user", "signup", "renewal", "tier"]
TIME_PROPS = ["signup", "renewal", "first_seen", "last_seen"]

STRINGS = ["basic", "Pro", "pro", "PRO plan", "", "1", "30", "/home", "/cart?x=1",
           "https://shop.example/Product/42", "Straße", "STRASSE", "İstanbul", "istanbul",
           "café", "zeta", "Zeta"]
NUMBERS: list[Any] = [0, 1, 2, 3, 30, 30.0, 2.5, 0.25, -5, -0.0, 100, 7.75, 12]
BOOLS = [True, False]
VALUE_POOLS: dict[str, list[Any]] = {
    "price": NUMBERS * 3 + ["30", True, None],
    "plan": ["basic", "Pro", "pro", "PRO plan", "", 1, None],
    "url": ["/home", "/cart?x=1", "https://shop.example/Product/42", "/Home", "café", None],
    "flag": [True, False, True, 1, 0, "true", None],
    "qty": [0, 1, 2, 3, 1.0, 2.5, 12, None, "2"],
    "city": ["Paris", "paris", "Straße", "İstanbul", "Berlin", "", "NYC", 1],
    "age": [18, 30, 30.0, 45, 61.5, "30", True],
    "tier": ["gold", "Gold", "silver", 1, 2.5, False],
    "test_user": [True, True, False, 1, "true"],
}


# --- timestamps and durations ------------------------------------------------------------


def rfc3339(ms: int, rng: random.Random) -> str:
    """``ms`` as an RFC 3339 string, in a random but exact spelling (offset, fraction)."""
    offset_min = rng.choice([0, 0, 0, 60, -90, 330, -600])
    dt = _EPOCH + timedelta(milliseconds=ms) + timedelta(minutes=offset_min)
    base = (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
            f"T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}")
    frac_ms = dt.microsecond // 1000
    style = rng.randrange(3)
    if style == 0 and frac_ms == 0:
        frac = ""
    elif style == 1:
        frac = f".{frac_ms:03d}{rng.randrange(1000):03d}"  # sub-ms digits are truncated
    else:
        frac = f".{frac_ms:03d}"
    if offset_min == 0:
        zone = "Z"
    else:
        sign = "+" if offset_min > 0 else "-"
        zone = f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    return base + frac + zone


def ts_value(ms: int, rng: random.Random) -> str | int:
    """A timestamp as a definition may give it: RFC 3339 string or integer epoch ms."""
    return ms if rng.random() < 0.4 else rfc3339(ms, rng)


def duration(rng: random.Random, lo: int, hi: int) -> str:
    """A duration between about ``lo`` and ``hi`` ms, spelled in a random fitting unit."""
    target = int(rng.uniform(lo, hi))
    units = [u for u, ms in UNITS.items() if ms <= target] or ["ms"]
    unit = rng.choice(units)
    amount = max(1, target // UNITS[unit])
    return f"{amount}{unit}"


def dur_ms(text: str) -> int:
    """An (optionally signed) duration string back to milliseconds."""
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    for unit in ("ms", "s", "m", "h", "d", "w"):
        if body.endswith(unit) and body[: -len(unit)].isdigit():
            return sign * int(body[: -len(unit)]) * UNITS[unit]
    raise ValueError(text)


# --- data ----------------------------------------------------------------------------------


def gen_props(rng: random.Random) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for key in EVENT_PROPS:
        if rng.random() < 0.55:
            props[key] = rng.choice(VALUE_POOLS[key])
    return props


def gen_event_ts(rng: random.Random, now: int, anchors: list[int], spread: int) -> int:
    r = rng.random()
    if r < 0.25 and anchors:
        return rng.choice(anchors)  # ties, across and within users
    if r < 0.32:
        return now + rng.randrange(1, 3 * HOUR)  # future-dated
    if r < 0.36:
        return now - rng.choice([0, 0, 1, SEC, HOUR, DAY])  # exactly on common edges
    ts = now - rng.randrange(0, spread)
    if rng.random() < 0.3:
        ts -= ts % MIN  # round instants make ties with window edges likelier
    return ts


def gen_profile_value(rng: random.Random, key: str, now: int) -> Any:
    if rng.random() < 0.12:
        return None  # removes the property
    if key in ("signup", "renewal"):
        center = now - 30 * DAY if key == "signup" else now + 2 * DAY
        ms = center + rng.randrange(-3 * DAY, 3 * DAY)
        if rng.random() < 0.3:
            ms -= ms % HOUR
        r = rng.random()
        if r < 0.45:
            return rfc3339(ms, rng)
        if r < 0.85:
            return ms
        return rng.choice([float(ms), "2026-01-01 00:00:00Z", "2026-02-30T00:00:00Z",
                           "2026-01-01T00:00:00z", True, "soon"])  # not timestamps
    return rng.choice(VALUE_POOLS[key])


def gen_world(rng: random.Random, now: int, n_users: int, n_events: int,
              spread: int = 4 * DAY, ties: bool = False,
              ) -> tuple[list[str], list[dict], list[tuple[str, dict]]]:
    """Users, events (arrival order) and profile updates (arrival order).

    ``ties``: few events per user on a handful of instants, so that ties decide rules
    (a sequence needs strictly increasing ts; then_not looks after ``a.ts``)."""
    users = [f"u{i:02d}" for i in range(n_users)]
    weights = [rng.choice([1, 1, 2, 4, 8]) for _ in users]
    anchors = [now - rng.randrange(0, spread) for _ in range(max(2, n_events // 25))]
    if ties:
        anchors = [now - rng.randrange(0, spread // 2) for _ in range(4)]
        anchors += [a + 1 for a in anchors[:2]]
    events: list[dict] = []
    for i in range(n_events):
        uid = rng.choices(users, weights)[0]
        sid = None if rng.random() < 0.2 else f"s{rng.randrange(4)}"
        ts = rng.choice(anchors) if ties and rng.random() < 0.7 else gen_event_ts(
            rng, now, anchors, spread)
        if events and rng.random() < (0.3 if ties else 0.12):
            # A burst: another event of the same user at the same instant (ties inside one
            # user's timeline, for sequence and then_not).
            prev = rng.choice(events[-5:])
            uid, ts = prev["user_id"], prev["ts"]
            sid = prev["session_id"] if rng.random() < 0.7 else sid
        events.append({
            "id": f"e{i}", "user_id": uid, "name": rng.choices(NAMES, [5, 3, 2, 2])[0],
            "ts": ts, "session_id": sid, "props": gen_props(rng),
        })
    updates: list[tuple[str, dict]] = []
    for uid in users:
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            keys = rng.sample(PROFILE_PROPS, rng.randint(1, 3))
            updates.append((uid, {k: gen_profile_value(rng, k, now) for k in keys}))
    rng.shuffle(updates)
    # A few users known only from an (possibly empty) profile update.
    updates.append((f"p{rng.randrange(3)}", {}))
    updates.append((f"p{rng.randrange(3)}", {"city": "Paris", "test_user": True}))
    return users, events, updates


# --- definitions -----------------------------------------------------------------------------

FILTER_OPS = ["eq", "neq", "gt", "gte", "lt", "lte", "contains", "not_contains",
              "starts_with", "ends_with", "icontains", "not_icontains", "in", "not_in",
              "exists", "not_exists"]
COMPARE_OPS = ["gt", "gte", "lt", "lte", "eq", "neq", "between"]
ALL_KINDS = ["did", "did_not", "aggregate", "first_did", "did_then_not", "sequence", "stopped",
             "restarted", "regularly", "profile", "profile_time", "in_segment",
             "not_in_segment", "group"]
EVENT_KINDS = ["did", "did", "did_not", "aggregate", "first_did", "did_then_not", "sequence",
               "stopped", "restarted", "regularly"]
OTHER_KINDS = ["profile", "profile_time", "in_segment", "not_in_segment"]


def filter_value(rng: random.Random, op: str, pool: list[Any]) -> Any:
    nonnull = [v for v in pool if v is not None]
    if op in ("eq", "neq"):
        return rng.choice(nonnull + [rng.choice(NUMBERS), rng.choice(STRINGS)])
    if op in ("gt", "gte", "lt", "lte"):
        return rng.choice([v for v in nonnull if not isinstance(v, bool)] + [rng.choice(STRINGS)])
    if op in ("in", "not_in"):
        return [rng.choice(nonnull + NUMBERS[:4] + BOOLS) for _ in range(rng.choice([0, 1, 2, 3]))]
    own = [v for v in nonnull if isinstance(v, str) and v]
    v = rng.choice(own if own and rng.random() < 0.75 else STRINGS)
    if v and rng.random() < 0.5:  # a substring, so contains/starts_with/ends_with hit
        i = rng.randrange(len(v))
        v = v[i: i + rng.randint(1, 4)]
    if op in ("icontains", "not_icontains") and rng.random() < 0.5:
        v = v.upper() if rng.random() < 0.5 else v.lower()
    return v


STRING_OPS = ["contains", "not_contains", "starts_with", "ends_with", "icontains",
              "not_icontains", "eq", "neq", "in", "not_in", "gt", "lt"]
NUMBER_OPS = ["gt", "gte", "lt", "lte", "eq", "neq", "in", "not_in"]
STRING_PROPS = {"plan", "url", "city", "tier", "first_seen", "last_seen"}
NUMBER_PROPS = {"price", "qty", "age"}


def gen_filter(rng: random.Random, keys: list[str]) -> dict[str, Any]:
    prop = rng.choice(keys) if rng.random() < 0.9 else "missing"
    r = rng.random()
    if prop in STRING_PROPS and r < 0.6:
        op = rng.choice(STRING_OPS)  # ops that fit the property's usual type hit more
    elif prop in NUMBER_PROPS and r < 0.6:
        op = rng.choice(NUMBER_OPS)
    else:
        op = rng.choice(FILTER_OPS)
    f: dict[str, Any] = {"property": prop, "op": op}
    if op not in ("exists", "not_exists"):
        f["value"] = filter_value(rng, op, VALUE_POOLS.get(prop, STRINGS))
    return f


def gen_where(rng: random.Random, dense: bool = False) -> list[dict]:
    n = rng.choices([0, 1, 2, 3], [3, 6, 2, 0] if dense else [8, 4, 1, 1])[0]
    return [gen_filter(rng, EVENT_PROPS) for _ in range(n)]


def gen_compare(rng: random.Random, scale: float) -> dict[str, Any]:
    op = rng.choice(COMPARE_OPS)
    v = rng.choice([0, 1, 2, 3, 1.5, 0.5, 5]) * scale
    v = int(v) if rng.random() < 0.7 else v
    if op == "between":
        return {"op": op, "value": v, "to": v + rng.choice([0, 1, 2, 2.5, 10]) * scale}
    return {"op": op, "value": v}


def gen_window(rng: random.Random, now: int) -> dict[str, Any] | None:
    r = rng.random()
    if r < 0.35:
        return None
    if r < 0.75:
        return {"last": duration(rng, 10 * SEC, 8 * DAY)}
    lo = now - rng.randrange(0, 5 * DAY)
    if r < 0.9:
        return {"from": ts_value(lo, rng), "to": ts_value(lo + rng.randrange(1, 4 * DAY), rng)}
    return {"from": ts_value(lo, rng)}


class DefGen:
    """Random valid definitions: every rule kind, filter op and compare op, at most 20 rule
    objects, groups at most 3 deep. ``refs`` are the segment ids ``in_segment`` may name."""

    def __init__(self, rng: random.Random, now: int, refs: list[str]) -> None:
        self.rng, self.now, self.refs = rng, now, refs
        self.left = 0
        self.dense = False  # more filters per rule

    def definition(self, name: str, ends_at: int | None = None) -> dict[str, Any]:
        rng = self.rng
        self.left = rng.choice([1, 1, 2, 2, 3, 4, 6, 10, 20])
        d: dict[str, Any] = {"name": name}
        if rng.random() < 0.3:
            d["window"] = gen_window(rng, self.now) or {"last": "2d"}
        if rng.random() < 0.3:
            d["scope"] = "session"
        elif rng.random() < 0.2:
            d["scope"] = "user"
        rules = self.rules(0)
        if m := self.match(len(rules)):
            d["match"] = m
        d["rules"] = rules
        if ends_at is not None:
            d["ends_at"] = ts_value(ends_at, rng)
        return d

    def single(self, name: str, kind: str) -> dict[str, Any]:
        """A definition of one rule of ``kind`` (a group: of a few random rules)."""
        d: dict[str, Any] = {"name": name}
        self.dense = True
        if self.rng.random() < 0.2:
            d["window"] = gen_window(self.rng, self.now) or {"last": "1d"}
        if self.rng.random() < 0.3:
            d["scope"] = "session"
        if kind == "group":
            self.left = 6
            d["rules"] = [self._group(0)]
        else:
            d["rules"] = [getattr(self, "_" + kind)()]
        return d

    def _group(self, depth: int) -> dict[str, Any]:
        g: dict[str, Any] = {"kind": "group"}
        rules = self.rules(depth + 1)
        if m := self.match(len(rules)):
            g["match"] = m
        g["rules"] = rules
        return g

    def match(self, n: int) -> Any:
        r = self.rng.random()
        if n > 2:  # "all" of many random rules is rarely anyone: lean to "any"/"at_least"
            r = r * 0.6 + 0.4
        if r < 0.2:
            return None  # default "all"
        if r < 0.4:
            return "all"
        if r < 0.65:
            return "any"
        if r < 0.77:
            return "none"
        return {"at_least": self.rng.choice([1, 1, 2, 2, n, n + 1])}

    def rules(self, depth: int) -> list[dict]:
        n = self.rng.choice([k for k in (1, 1, 2, 2, 3, 4) if k <= self.left])
        self.left -= n
        return [self.rule(depth) for _ in range(n)]

    def rule(self, depth: int) -> dict[str, Any]:
        rng = self.rng
        if depth < 3 and self.left >= 1 and rng.random() < 0.25:
            return self._group(depth)
        kind = rng.choice(EVENT_KINDS if rng.random() < 0.7 else OTHER_KINDS)
        return getattr(self, "_" + kind)()

    # event rules

    def _event_rule(self, kind: str) -> dict[str, Any]:
        r: dict[str, Any] = {"kind": kind, "event": self.rng.choice(NAMES)}
        if w := gen_where(self.rng, self.dense):
            r["where"] = w
        if w := gen_window(self.rng, self.now):
            r["window"] = w
        return r

    def _did(self) -> dict[str, Any]:
        r = self._event_rule("did")
        if self.rng.random() < 0.6:
            r["count"] = gen_compare(self.rng, 1)
        if self.rng.random() < 0.3:
            r["include_absent"] = self.rng.random() < 0.8
        return r

    def _did_not(self) -> dict[str, Any]:
        return self._event_rule("did_not")

    def _aggregate(self) -> dict[str, Any]:
        r = self._event_rule("aggregate")
        r["fn"] = self.rng.choice(["sum", "avg", "min", "max", "distinct"])
        if r["fn"] == "distinct":  # mixed types: true/1/"1", 1/1.0 must count right
            r["property"] = self.rng.choice(["flag", "qty", "plan", "price"])
        else:
            r["property"] = self.rng.choice(["price", "price", "qty", "plan", "flag", "missing"])
        scale = 1 if r["fn"] == "distinct" else self.rng.choice([1, 1, 10])
        r["compare"] = gen_compare(self.rng, scale)
        if self.rng.random() < 0.3:
            r["include_absent"] = True
        return r

    def _first_did(self) -> dict[str, Any]:
        return self._event_rule("first_did")

    def _step(self) -> dict[str, Any]:
        s: dict[str, Any] = {"event": self.rng.choice(NAMES)}
        if w := gen_where(self.rng, self.dense):
            s["where"] = w
        return s

    def _did_then_not(self) -> dict[str, Any]:
        r = self._event_rule("did_then_not")
        r["then_not"] = self._step()
        r["within"] = duration(self.rng, 1 * SEC, 2 * DAY)
        return r

    def _sequence(self) -> dict[str, Any]:
        r: dict[str, Any] = {"kind": "sequence",
                             "steps": [self._step() for _ in range(self.rng.randint(1, 3))]}
        if w := gen_window(self.rng, self.now):
            r["window"] = w
        if self.rng.random() < 0.5:
            r["within"] = duration(self.rng, 1 * MIN, 3 * DAY)
        return r

    def _stopped(self, kind: str = "stopped") -> dict[str, Any]:
        recent = duration(self.rng, 1 * MIN, 2 * DAY)
        before = duration(self.rng, dur_ms(recent), dur_ms(recent) + 3 * DAY)
        if dur_ms(before) <= dur_ms(recent):  # a coarse unit rounded it down
            before = f"{dur_ms(recent) + self.rng.randrange(1, DAY)}ms"
        r: dict[str, Any] = {"kind": kind, "event": self.rng.choice(NAMES),
                             "before": before, "recent": recent}
        if w := gen_where(self.rng):
            r["where"] = w
        return r

    def _restarted(self) -> dict[str, Any]:
        return self._stopped("restarted")

    def _regularly(self) -> dict[str, Any]:
        n = self.rng.randint(1, 5)
        r: dict[str, Any] = {"kind": "regularly", "event": self.rng.choice(NAMES),
                             "period": duration(self.rng, 1 * HOUR, 2 * DAY), "periods": n,
                             "min_periods": self.rng.randint(1, n)}
        if self.rng.random() < 0.4:
            r["count"] = gen_compare(self.rng, 1)
        if w := gen_where(self.rng):
            r["where"] = w
        return r

    # other rules

    def _profile(self) -> dict[str, Any]:
        f = gen_filter(self.rng, PROFILE_PROPS + ["first_seen", "last_seen"])
        return {"kind": "profile", **f}

    def _profile_time(self) -> dict[str, Any]:
        prop = self.rng.choice(TIME_PROPS)
        # Aim near where that property's values lie (relative to now), so ranges often hit.
        center = {"signup": -30 * DAY, "renewal": 2 * DAY, "first_seen": -3 * DAY,
                  "last_seen": -DAY}[prop]
        a = center + self.rng.randrange(-4 * DAY, 2 * DAY)
        b = a + self.rng.randrange(1, 5 * DAY)
        if self.rng.random() < 0.5:
            a -= a % HOUR
            b -= b % HOUR
            b = max(b, a + HOUR)

        def signed(ms: int) -> str:
            unit = self.rng.choice([u for u, v in UNITS.items() if ms % v == 0 and v <= 2 * DAY]
                                   or ["ms"])
            text = f"{abs(ms) // UNITS[unit]}{unit}"
            if ms < 0:
                return "-" + text
            return ("+" + text) if self.rng.random() < 0.7 else text

        return {"kind": "profile_time", "property": prop, "from": signed(a), "to": signed(b)}

    def _in_segment(self) -> dict[str, Any]:
        return {"kind": "in_segment", "segment": self.rng.choice(self.refs)}

    def _not_in_segment(self) -> dict[str, Any]:
        return {"kind": "not_in_segment", "segment": self.rng.choice(self.refs)}


def walk_rules(rules: list[dict]):
    for r in rules:
        yield r
        if r["kind"] == "group":
            yield from walk_rules(r["rules"])


def count_rules(rules: list[dict]) -> int:
    return sum(1 for _ in walk_rules(rules))


def max_depth(rules: list[dict], depth: int = 0) -> int:
    return max((max_depth(r["rules"], depth + 1) if r["kind"] == "group" else depth)
               for r in rules)


def durations_of(d: dict) -> list[int]:
    """Every duration a definition uses, and multiples where a rule steps by one."""
    out: list[int] = []
    if d.get("window") and "last" in d["window"]:
        out.append(dur_ms(d["window"]["last"]))
    for r in walk_rules(d["rules"]):
        w = r.get("window")
        if w and "last" in w:
            out.append(dur_ms(w["last"]))
        for key in ("within", "before", "recent"):
            if key in r:
                out.append(dur_ms(r[key]))
        if r["kind"] == "regularly":
            p = dur_ms(r["period"])
            out += [p * i for i in range(1, r["periods"] + 1)]
    return out
