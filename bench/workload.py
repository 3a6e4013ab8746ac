"""A seeded, reproducible workload shaped like product analytics, and 20 segment definitions.

    python -m bench.workload [--users 10000] [--events 200000] [--days 90] [--seed 1]

prints a summary of the generated data (event mix, top-user share, sessions, time spread).

Shape
-----
- Users ``u0000000`` … with Zipf-distributed activity (exponent ``zipf``, default 1.1) over
  a shuffled rank, so ids carry no activity order. One user's share of all sessions is
  capped at ``max_share`` (default 1 %): the weights are water-filled, so no single user holds
  10 % of all events as a raw Zipf 1.1 over 10k users would.
- Activity comes in sessions (``session_id`` ``<user>-s<k>``) of about 30 minutes: a
  geometric number of events (mean ~6, at most 40) at sorted offsets within 30 min. 3 % of
  events (server-side purchases, say) carry no ``session_id``.
- Session starts: 85 % uniform over the last ``days`` days, 10 % over the last 7 days, 5 % over
  the last 2 hours, so minute windows have members; never after ``now``.
- Event mix: a session opens with ``app_launch`` (60 %) or ``page_view``; then ``page_view``
  55 %, ``search`` 15 %, ``add_to_cart`` 15 %, ``purchase`` 10 %, ``app_launch`` 5 %.
  Props: page_view ``url`` (and ``referrer`` on 70 %), add_to_cart ``sku`` and ``price``,
  purchase ``amount`` and ``currency``, search ``query``; app_launch none. Every property has
  one JSON type (the DuckDB peer relies on that).
- Profiles: one update per user: ``city`` (absent on 5 %), ``plan``, ``signup`` (RFC 3339,
  up to ``days`` + 60 days ago), ``test_user`` (true on 1 %, else false).
- Events are emitted in timestamp order (a replay of the stream), ids ``e<k>``, ``ts`` as
  integer epoch ms.
"""

from __future__ import annotations

import argparse
import random
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from itertools import accumulate
from typing import Any

import msgspec

MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR

CITIES = ["New York", "London", "Berlin", "Paris", "Tokyo", "São Paulo", "Lagos", "Mumbai",
          "Toronto", "Sydney"]
CITY_W = [18, 14, 10, 10, 9, 8, 6, 10, 8, 7]
PLANS = ["free", "pro", "enterprise"]
PLAN_W = [75, 20, 5]
URLS = ["/", "/pricing", "/pricing/enterprise", "/docs", "/docs/api", "/blog/launch",
        "/blog/segments", "/checkout", "/product/sku-1", "/product/sku-42"]
URL_W = [20, 8, 2, 10, 5, 4, 4, 6, 25, 16]
REFERRERS = ["https://www.google.com/", "https://google.co.uk/search", "https://t.co/x",
             "https://news.ycombinator.com/", "https://duckduckgo.com/", "https://www.bing.com/"]
QUERIES = ["shoes", "Red Shoes", "running shoe", "laptop", "Laptop stand", "desk", "coffee",
           "headphones", "SHOE rack", "gift card"]
CURRENCIES = ["USD", "EUR", "GBP"]
NEXT_NAMES = ["page_view", "search", "add_to_cart", "purchase", "app_launch"]
NEXT_W = list(accumulate([55, 15, 15, 10, 5]))
SESSION_SPAN = 30 * MIN
# Each property of the workload and its one JSON type (the peer's column types).
EVENT_SCHEMA = {"url": "str", "referrer": "str", "sku": "str", "price": "num",
                "amount": "num", "currency": "str", "query": "str"}
PROFILE_SCHEMA = {"city": "str", "plan": "str", "signup": "ts", "test_user": "bool"}


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> int:
    """The RFC 3339 strings this module writes (``YYYY-MM-DDTHH:MM:SSZ``) -> epoch ms."""
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1000


def capped_zipf(n: int, s: float, max_share: float) -> list[float]:
    """Zipf weights 1/(i+1)^s, water-filled so that none exceeds max_share of the total."""
    w = [(i + 1) ** -s for i in range(n)]
    if max_share * n <= 1:  # The cap cannot hold with fewer users than 1/max_share.
        return [1.0] * n
    capped = 0  # The first `capped` weights (the largest) sit at the cap.
    while True:
        rest = sum(w[capped:])
        # cap = max_share * (capped * cap + rest)  =>  cap = max_share * rest / (1 - k*ms)
        cap = max_share * rest / (1 - capped * max_share)
        if capped < n and w[capped] > cap:
            capped += 1
            continue
        return [cap] * capped + w[capped:]


class Workload:
    """Users, profiles and events; `now` is the instant the newest event may reach."""

    def __init__(self, users: int = 10_000, events: int = 200_000, days: int = 90,
                 seed: int = 1, zipf: float = 1.1, max_share: float = 0.01,
                 now: int | None = None) -> None:
        self.n_users, self.n_events, self.days, self.seed = users, events, days, seed
        self.zipf, self.max_share = zipf, max_share
        self.now = int(time.time() * 1000) if now is None else now
        self.uids = [f"u{i:07d}" for i in range(users)]
        self._generate()

    # Users and profiles

    def profiles(self) -> list[dict[str, Any]]:
        rng = random.Random(self.seed * 7919 + 1)
        out = []
        for uid in self.uids:
            props: dict[str, Any] = {}
            if rng.random() >= 0.05:
                props["city"] = rng.choices(CITIES, CITY_W)[0]
            props["plan"] = rng.choices(PLANS, PLAN_W)[0]
            props["signup"] = rfc3339(self.now - rng.randrange(0, (self.days + 60) * DAY))
            props["test_user"] = rng.random() < 0.01
            out.append({"user_id": uid, "props": props})
        return out

    # Events

    def _generate(self) -> None:
        rng = random.Random(self.seed)
        weights = capped_zipf(self.n_users, self.zipf, self.max_share)
        order = list(range(self.n_users))
        rng.shuffle(order)  # rank -> user index
        cum = list(accumulate(weights))
        now, days = self.now, self.days
        rows: list[tuple[int, int, str, str | None, str]] = []  # ts, user, name, sid, props
        n = 0
        sessions_of: Counter[int] = Counter()
        batch_users: list[int] = []
        while n < self.n_events:
            if not batch_users:
                batch_users = rng.choices(range(self.n_users), cum_weights=cum, k=4096)
            user = order[batch_users.pop()]
            k = sessions_of[user]
            sessions_of[user] += 1
            length = 1
            while length < 40 and rng.random() < 0.83:
                length += 1
            length = min(length, self.n_events - n)
            offsets = sorted(rng.randrange(0, SESSION_SPAN) for _ in range(length))
            r = rng.random()
            if r < 0.85:
                start = now - rng.randrange(0, days * DAY)
            elif r < 0.95:
                start = now - rng.randrange(0, 7 * DAY)
            else:
                start = now - rng.randrange(0, 2 * HOUR)
            start = min(start, now - offsets[-1])
            sid: str | None = f"{self.uids[user]}-s{k}"
            for j, off in enumerate(offsets):
                if j == 0:
                    name = "app_launch" if rng.random() < 0.6 else "page_view"
                else:
                    name = NEXT_NAMES[bisect_left(NEXT_W, rng.random() * NEXT_W[-1] + 1e-9)]
                props = self._props(rng, name)
                rows.append((start + off, user, name,
                             None if rng.random() < 0.03 else sid, props))
            n += length
        rows.sort(key=lambda r: r[0])
        self.rows = rows
        self.sessions = sum(sessions_of.values())

    @staticmethod
    def _props(rng: random.Random, name: str) -> str:
        """The props object as JSON text (typed per EVENT_SCHEMA)."""
        if name == "page_view":
            url = rng.choices(URLS, URL_W)[0]
            if rng.random() < 0.7:
                return f'{{"url":"{url}","referrer":"{rng.choice(REFERRERS)}"}}'
            return f'{{"url":"{url}"}}'
        if name == "add_to_cart":
            sku = int(rng.paretovariate(1.2)) % 500
            return f'{{"sku":"sku-{sku}","price":{round(rng.uniform(3, 250), 2)}}}'
        if name == "purchase":
            amount = round(rng.lognormvariate(4, 0.9), 2)
            return f'{{"amount":{amount},"currency":"{rng.choice(CURRENCIES)}"}}'
        if name == "search":
            return f'{{"query":"{rng.choice(QUERIES)}"}}'
        return ""

    def event_lines(self, start: int = 0, stop: int | None = None, id_prefix: str = "e",
                    ts_of: Any = None) -> list[str]:
        """Events as JSON text, one per event, in ts order (``ts_of(k)`` overrides ts)."""
        out = []
        uids = self.uids
        for k in range(start, len(self.rows) if stop is None else stop):
            ts, user, name, sid, props = self.rows[k]
            if ts_of is not None:
                ts = ts_of(k)
            s = f',"session_id":"{sid}"' if sid else ""
            p = f',"props":{props}' if props else ""
            out.append(f'{{"id":"{id_prefix}{k}","user_id":"{uids[user]}","name":"{name}","ts":{ts}{s}{p}}}')
        return out

    def batches(self, batch: int = 5000) -> list[bytes]:
        """Request bodies (JSON arrays of at most `batch` events), in ts order."""
        return list(self.iter_batches(batch))

    def iter_batches(self, batch: int = 5000, id_prefix: str = "e",
                     ts_of: Any = None) -> Iterator[bytes]:
        """The same, encoded one at a time (for sizes that should not sit in memory)."""
        for i in range(0, len(self.rows), batch):
            lines = self.event_lines(i, min(len(self.rows), i + batch), id_prefix, ts_of)
            yield ("[" + ",".join(lines) + "]").encode()

    def write_ndjson(self, events_path: str, profiles_path: str) -> None:
        """The same events and profile updates, one JSON object a line (for the peer)."""
        with open(events_path, "w") as f:
            step = 200_000
            for i in range(0, len(self.rows), step):
                f.write("\n".join(self.event_lines(i, min(len(self.rows), i + step))))
                f.write("\n")
        enc = msgspec.json.Encoder()
        with open(profiles_path, "wb") as f:
            for p in self.profiles():
                f.write(enc.encode(p) + b"\n")

    def profile_batches(self, batch: int = 5000) -> list[bytes]:
        enc = msgspec.json.Encoder()
        ps = self.profiles()
        return [enc.encode(ps[i:i + batch]) for i in range(0, len(ps), batch)]

    def summary(self) -> dict[str, Any]:
        per_user = Counter(r[1] for r in self.rows)
        names = Counter(r[2] for r in self.rows)
        top = per_user.most_common(1)[0][1] if per_user else 0
        return {
            "users": self.n_users, "events": len(self.rows), "sessions": self.sessions,
            "users_with_events": len(per_user), "top_user_share": round(top / len(self.rows), 4),
            "mix": {k: round(v / len(self.rows), 3) for k, v in names.most_common()},
            "no_session": round(sum(r[3] is None for r in self.rows) / len(self.rows), 3),
            "oldest_days_ago": round((self.now - self.rows[0][0]) / DAY, 1),
            "last_hour_events": sum(r[0] > self.now - HOUR for r in self.rows),
        }


def segments(now: int) -> list[dict[str, Any]]:
    """The 20 segment definitions. ``"@name"`` in an ``in_segment`` refers to another of
    these by name (resolved to its id when created). Windows run from 5 minutes to 90 days;
    every rule kind of RULES.md occurs, plus include_absent, a fixed window, every `match`
    and a session-scope segment."""
    d = lambda s: {"last": s}  # noqa: E731
    return [
        {"name": "buyers 30d", "rules": [{"kind": "did", "event": "purchase", "window": d("30d")}]},
        {"name": "3+ carts 7d", "rules": [{"kind": "did", "event": "add_to_cart",
                                           "count": {"op": "gte", "value": 3}, "window": d("7d")}]},
        {"name": "pricing visitors 1h", "rules": [
            {"kind": "did", "event": "page_view", "window": d("1h"),
             "where": [{"property": "url", "op": "starts_with", "value": "/pricing"}]}]},
        {"name": "lapsed launchers", "rules": [
            {"kind": "did", "event": "app_launch", "window": d("90d")},
            {"kind": "did_not", "event": "app_launch", "window": d("7d")}]},
        {"name": "big spenders 90d", "window": d("90d"), "rules": [
            {"kind": "aggregate", "event": "purchase", "fn": "sum", "property": "amount",
             "compare": {"op": "gt", "value": 500}}]},
        {"name": "pricey carts 30d", "rules": [
            {"kind": "aggregate", "event": "add_to_cart", "fn": "avg", "property": "price",
             "compare": {"op": "between", "value": 100, "to": 200}, "window": d("30d")}]},
        {"name": "diverse shoppers", "rules": [
            {"kind": "aggregate", "event": "add_to_cart", "fn": "distinct", "property": "sku",
             "compare": {"op": "gte", "value": 5},
             "window": {"from": rfc3339(now - 60 * DAY)}}]},
        {"name": "new app users, no purchase", "rules": [
            {"kind": "first_did", "event": "app_launch", "window": d("7d")},
            {"kind": "did", "event": "purchase", "count": {"op": "eq", "value": 0},
             "include_absent": True}]},
        {"name": "cart abandoners", "rules": [
            {"kind": "did_then_not", "event": "add_to_cart", "then_not": {"event": "purchase"},
             "within": "30m", "window": d("1d")}]},
        {"name": "search-cart-buy 1h", "window": d("14d"), "rules": [
            {"kind": "sequence", "within": "1h", "steps": [
                {"event": "search"}, {"event": "add_to_cart"},
                {"event": "purchase", "where": [{"property": "currency", "op": "in",
                                                 "value": ["USD", "EUR"]}]}]}]},
        {"name": "NY paid plans", "rules": [
            {"kind": "profile", "property": "city", "op": "eq", "value": "New York"},
            {"kind": "profile", "property": "plan", "op": "in", "value": ["pro", "enterprise"]}]},
        {"name": "signed up 7-30d ago", "rules": [
            {"kind": "profile_time", "property": "signup", "from": "-30d", "to": "-7d"}]},
        {"name": "NY paid buyers, not test", "rules": [
            {"kind": "in_segment", "segment": "@NY paid plans"},
            {"kind": "in_segment", "segment": "@buyers 30d"},
            {"kind": "not_in_segment", "segment": "test-users"}]},
        {"name": "stopped browsing", "rules": [
            {"kind": "stopped", "event": "page_view", "before": "30d", "recent": "7d"}]},
        {"name": "came back", "rules": [
            {"kind": "restarted", "event": "app_launch", "before": "30d", "recent": "3d"}]},
        {"name": "daily regulars", "rules": [
            {"kind": "regularly", "event": "app_launch", "period": "1d", "periods": 7,
             "min_periods": 3}]},
        {"name": "engaged 2 of 4", "match": {"at_least": 2}, "rules": [
            {"kind": "did", "event": "search", "window": d("1d")},
            {"kind": "did", "event": "page_view", "count": {"op": "gte", "value": 10},
             "window": d("1d")},
            {"kind": "did", "event": "add_to_cart", "window": d("1d")},
            {"kind": "did", "event": "purchase", "window": d("7d")}]},
        {"name": "pricing then cart, same session", "scope": "session", "rules": [
            {"kind": "did", "event": "page_view",
             "where": [{"property": "url", "op": "contains", "value": "pricing"}]},
            {"kind": "did", "event": "add_to_cart"}]},
        {"name": "online now", "match": "any", "rules": [
            {"kind": "did", "event": "page_view", "window": d("5m")},
            {"kind": "did", "event": "app_launch", "window": d("5m")}]},
        {"name": "google shoe searchers, no buy", "window": d("2h"), "rules": [
            {"kind": "did", "event": "page_view",
             "where": [{"property": "referrer", "op": "icontains", "value": "GOOGLE"}]},
            {"kind": "did", "event": "search",
             "where": [{"property": "query", "op": "icontains", "value": "shoe"}]},
            {"kind": "group", "match": "none", "rules": [
                {"kind": "did", "event": "purchase"},
                {"kind": "did", "event": "page_view",
                 "where": [{"property": "url", "op": "eq", "value": "/checkout"}]}]}]},
    ]


def resolve_refs(defn: Any, ids: dict[str, str]) -> Any:
    """Replace ``"@name"`` segment references with ids."""
    if isinstance(defn, dict):
        return {k: (ids[v[1:]] if k == "segment" and isinstance(v, str) and v.startswith("@")
                    else resolve_refs(v, ids)) for k, v in defn.items()}
    if isinstance(defn, list):
        return [resolve_refs(x, ids) for x in defn]
    return defn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--max-share", type=float, default=0.01)
    p.add_argument("--quick", action="store_true", help="10k users, 100k events")
    a = p.parse_args()
    if a.quick:
        a.users, a.events = 10_000, 100_000
    t0 = time.perf_counter()
    w = Workload(a.users, a.events, a.days, a.seed, a.zipf, a.max_share)
    gen = time.perf_counter() - t0
    s = w.summary()
    s["generate_s"] = round(gen, 2)
    s["segments"] = len(segments(w.now))
    print(msgspec.json.format(msgspec.json.encode(s)).decode())


if __name__ == "__main__":
    main()
