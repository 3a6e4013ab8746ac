"""Hand-worked examples for the oracle; every expected set is reasoned from RULES.md."""

from __future__ import annotations

from typing import Any

from oracle import format_ts, oracle_members, parse_signed_duration, parse_ts

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SEC, MIN, HOUR, DAY = 1_000, 60_000, 3_600_000, 86_400_000


def ev(user: str, name: str, ts: int, session: str | None = None, **props: Any) -> dict:
    return {"user_id": user, "name": name, "ts": ts, "session_id": session, "props": props}


def members(
    events: list[dict],
    definition: dict,
    *,
    profiles: dict[str, dict] | None = None,
    users: set[str] | None = None,
    segments: dict[str, set[str]] | None = None,
    now: int = NOW,
) -> set[str]:
    profiles = profiles or {}
    if users is None:
        users = {e["user_id"] for e in events} | set(profiles)
    return oracle_members(events, profiles, users, definition, now, segments)


def seg(*rules: dict, **top: Any) -> dict:
    return {"rules": list(rules), **top}


def did(event: str, **fields: Any) -> dict:
    return {"kind": "did", "event": event, **fields}


def where_one(prop: str, op: str, *value: Any) -> dict:
    f = {"property": prop, "op": op}
    if value:
        f["value"] = value[0]
    return seg(did("e", where=[f]))


# --- timestamps and durations -----------------------------------------------------------


def test_timestamps_parse_strictly_and_truncate_fractions() -> None:
    assert parse_ts("2026-01-01T00:00:00Z") == NOW
    assert parse_ts("2026-01-01T01:00:00+01:00") == NOW
    assert parse_ts("2025-12-31T23:00:00-01:00") == NOW
    assert parse_ts("2026-01-01T00:00:00.9999Z") == NOW + 999  # truncated, not rounded
    assert parse_ts("2026-01-01T00:00:00.5Z") == NOW + 500
    assert parse_ts(NOW) == NOW
    for bad in ["2026-01-01t00:00:00Z", "2026-01-01T00:00:00z", "2026-01-01 00:00:00Z",
                "2026-02-30T00:00:00Z", "2026-01-01T00:00Z", "2026-01-01T00:00:00",
                float(NOW), True, None]:
        assert parse_ts(bad) is None, bad
    assert format_ts(NOW + 7) == "2026-01-01T00:00:00.007Z"
    assert parse_signed_duration("-30d") == -30 * DAY
    assert parse_signed_duration("+5m") == 5 * MIN


# --- windows ------------------------------------------------------------------------------


def test_event_exactly_window_length_ago_is_outside_last_window() -> None:
    # last 10s is (now - 10s, now]: now - 10s is out, one millisecond later is in.
    events = [ev("out", "e", NOW - 10 * SEC), ev("in", "e", NOW - 10 * SEC + 1)]
    assert members(events, seg(did("e", window={"last": "10s"}))) == {"in"}


def test_event_at_now_counts_and_future_events_are_invisible_everywhere() -> None:
    events = [ev("at_now", "e", NOW), ev("future", "e", NOW + 1)]
    assert members(events, seg(did("e"))) == {"at_now"}
    # The future user has not done it yet, so did_not holds for them.
    assert members(events, seg({"kind": "did_not", "event": "e"})) == {"future"}
    # ... and they have no first_seen yet.
    assert members(events, seg({"kind": "profile", "property": "first_seen", "op": "exists"})) == {
        "at_now"
    }


def test_fixed_window_includes_from_and_excludes_to() -> None:
    events = [
        ev("before_from", "e", NOW - DAY - 1),
        ev("at_from", "e", NOW - DAY),
        ev("at_to", "e", NOW),
    ]
    window = {"from": "2025-12-31T00:00:00Z", "to": NOW}  # [now - 1d, now)
    assert members(events, seg(did("e", window=window))) == {"at_from"}
    # An open window [from, +inf) with an offset timestamp naming the same instant.
    open_window = {"from": "2025-12-31T01:00:00+01:00"}
    assert members(events, seg(did("e", window=open_window))) == {"at_from", "at_to"}


def test_segment_window_is_the_default_for_event_rules_but_not_for_stopped() -> None:
    events = [ev("recent", "e", NOW - 30 * MIN), ev("old", "e", NOW - 3 * HOUR)]
    # Segment window last 1h applies to the did rule without its own window...
    assert members(events, seg(did("e"), window={"last": "1h"})) == {"recent"}
    # ... but a rule's own window wins.
    assert members(events, seg(did("e", window={"last": "1d"}), window={"last": "1h"})) == {
        "recent",
        "old",
    }
    # stopped ignores it: "old" did e in (now-1d, now-2h] and nothing since.
    stopped = {"kind": "stopped", "event": "e", "before": "1d", "recent": "2h"}
    assert members(events, seg(stopped, window={"last": "1h"})) == {"old"}


# --- filters ------------------------------------------------------------------------------


FILTER_EVENTS = [
    ev("int30", "e", NOW, v=30),
    ev("float30", "e", NOW, v=30.0),
    ev("str30", "e", NOW, v="30"),
    ev("true", "e", NOW, v=True),
    ev("one", "e", NOW, v=1),
    ev("null", "e", NOW, v=None),
    ev("absent", "e", NOW),
]


def test_eq_compares_numbers_numerically_and_never_across_types() -> None:
    assert members(FILTER_EVENTS, where_one("v", "eq", 30)) == {"int30", "float30"}
    assert members(FILTER_EVENTS, where_one("v", "eq", "30")) == {"str30"}
    assert members(FILTER_EVENTS, where_one("v", "eq", True)) == {"true"}  # 1 is not true
    assert members(FILTER_EVENTS, where_one("v", "eq", 1)) == {"one"}  # true is not 1
    # neq is the exact complement: absent, null and other types all hold.
    assert members(FILTER_EVENTS, where_one("v", "neq", 30)) == {
        "str30", "true", "one", "null", "absent"
    }


def test_ordering_ops_need_both_sides_of_one_type_and_use_code_point_order() -> None:
    events = [
        ev("ten", "e", NOW, v=10),
        ev("ten_str", "e", NOW, v="10"),
        ev("c", "e", NOW, v="c"),
        ev("upper_z", "e", NOW, v="Z"),
        ev("e_acute", "e", NOW, v="é"),
        ev("true", "e", NOW, v=True),
    ]
    assert members(events, where_one("v", "gt", 5)) == {"ten"}  # "10" and true are not numbers
    assert members(events, where_one("v", "gte", 10.0)) == {"ten"}
    # "10" < "b" ('1' < 'b'), "Z" < "b" (uppercase first), "é" (U+00E9) > "z".
    assert members(events, where_one("v", "gt", "b")) == {"c", "e_acute"}
    assert members(events, where_one("v", "lt", "a")) == {"ten_str", "upper_z"}
    assert members(events, where_one("v", "lte", "c")) == {"ten_str", "upper_z", "c"}


def test_string_ops_are_case_sensitive_and_icontains_lowers_both_sides() -> None:
    events = [
        ev("mixed", "e", NOW, url="/Checkout/Step"),
        ev("lower", "e", NOW, url="/checkout"),
        ev("german", "e", NOW, url="ÄRGER"),
        ev("number", "e", NOW, url=5),
    ]
    assert members(events, where_one("url", "contains", "Checkout")) == {"mixed"}
    assert members(events, where_one("url", "starts_with", "/check")) == {"lower"}
    assert members(events, where_one("url", "ends_with", "Step")) == {"mixed"}
    assert members(events, where_one("url", "icontains", "CHECKOUT")) == {"mixed", "lower"}
    assert members(events, where_one("url", "icontains", "ärg")) == {"german"}
    assert members(events, where_one("url", "not_contains", "Checkout")) == {
        "lower", "german", "number"
    }
    assert members(events, where_one("url", "not_icontains", "checkout")) == {"german", "number"}


def test_in_matches_any_eq_element_and_empty_in_never_holds() -> None:
    assert members(FILTER_EVENTS, where_one("v", "in", [30, "x"])) == {"int30", "float30"}
    assert members(FILTER_EVENTS, where_one("v", "in", [True, "30"])) == {"true", "str30"}
    assert members(FILTER_EVENTS, where_one("v", "in", [])) == set()
    everyone = {e["user_id"] for e in FILTER_EVENTS}
    assert members(FILTER_EVENTS, where_one("v", "not_in", [])) == everyone
    assert members(FILTER_EVENTS, where_one("v", "not_in", [1, 30])) == everyone - {
        "int30", "float30", "one"
    }


def test_exists_fails_on_null_and_not_exists_is_its_complement() -> None:
    present = {"int30", "float30", "str30", "true", "one"}
    assert members(FILTER_EVENTS, where_one("v", "exists")) == present
    assert members(FILTER_EVENTS, where_one("v", "not_exists")) == {"null", "absent"}


def test_all_filters_of_a_where_must_hold_on_the_same_event() -> None:
    events = [
        ev("split", "e", NOW - 1, a=1),
        ev("split", "e", NOW, b=2),
        ev("both", "e", NOW, a=1, b=2),
    ]
    rule = did("e", where=[{"property": "a", "op": "eq", "value": 1},
                           {"property": "b", "op": "eq", "value": 2}])
    assert members(events, seg(rule)) == {"both"}


# --- event rules --------------------------------------------------------------------------


def test_did_count_excludes_users_without_events_unless_include_absent() -> None:
    events = [ev("one", "buy", NOW - 1)] + [ev("three", "buy", NOW - i) for i in range(3)]
    events.append(ev("none", "view", NOW))
    profiles = {"profile_only": {}}

    def count(op: str, value: int, **extra: Any) -> dict:
        return {"op": op, "value": value, **extra}

    def run(rule: dict) -> set[str]:
        return members(events, seg(rule), profiles=profiles)

    assert run(did("buy")) == {"one", "three"}
    assert run(did("buy", count=count(op="gte", value=2))) == {"three"}
    assert run(did("buy", count=count(op="lt", value=2))) == {"one"}  # zero is "absent"
    assert run(did("buy", count=count(op="lt", value=2), include_absent=True)) == {
        "one", "none", "profile_only"
    }
    assert run(did("buy", count=count(op="eq", value=0))) == set()
    assert run(did("buy", count=count(op="eq", value=0), include_absent=True)) == {
        "none", "profile_only"
    }
    assert run(did("buy", count=count(op="between", value=1, to=3))) == {"one", "three"}
    assert run(did("buy", count=count(op="neq", value=3))) == {"one"}


def test_did_not_holds_for_users_without_matching_events_in_window() -> None:
    events = [ev("long_ago", "buy", NOW - 2 * DAY), ev("lately", "buy", NOW - 10 * MIN)]
    rule = {"kind": "did_not", "event": "buy", "window": {"last": "1d"}}
    assert members(events, seg(rule), profiles={"never": {}}) == {"long_ago", "never"}


def test_aggregates_use_only_numbers_and_ignore_booleans() -> None:
    events = [
        ev("u1", "buy", NOW - 3, amount=10),
        ev("u1", "buy", NOW - 2, amount=20.0),
        ev("u1", "buy", NOW - 1, amount=True),  # not a number
        ev("u1", "buy", NOW, amount="5"),  # not a number
        ev("u2", "buy", NOW, amount=7.5),
        ev("u2", "view", NOW, amount=100),  # another event name
    ]

    def agg(fn: str, op: str, value: float, **extra: Any) -> dict:
        return {"kind": "aggregate", "event": "buy", "property": "amount", "fn": fn,
                "compare": {"op": op, "value": value, **extra}}

    assert members(events, seg(agg("sum", "eq", 30))) == {"u1"}
    assert members(events, seg(agg("avg", "eq", 15))) == {"u1"}  # (10 + 20) / 2
    assert members(events, seg(agg("min", "lt", 10))) == {"u2"}
    assert members(events, seg(agg("max", "gte", 20))) == {"u1"}
    assert members(events, seg(agg("avg", "between", 7.5, to=7.5))) == {"u2"}


def test_distinct_counts_values_equal_under_eq_once() -> None:
    events = [
        ev("u1", "e", NOW - 5, plan=1),
        ev("u1", "e", NOW - 4, plan=1.0),  # same as 1
        ev("u1", "e", NOW - 3, plan=True),  # not 1
        ev("u1", "e", NOW - 2, plan="1"),  # not 1 either
        ev("u1", "e", NOW - 1, plan=None),  # not counted
        ev("u1", "e", NOW),  # absent
        ev("u2", "e", NOW - 1, plan="a"),
        ev("u2", "e", NOW, plan="a"),
        ev("u3", "e", NOW - 1, plan=0),
        ev("u3", "e", NOW, plan=-0.0),  # 0 == -0.0
    ]

    def distinct(value: int) -> dict:
        return seg({"kind": "aggregate", "event": "e", "property": "plan", "fn": "distinct",
                    "compare": {"op": "eq", "value": value}})

    assert members(events, distinct(3)) == {"u1"}
    assert members(events, distinct(1)) == {"u2", "u3"}


def test_aggregate_include_absent_holds_when_no_usable_value() -> None:
    events = [
        ev("unusable", "buy", NOW, amount=True),
        ev("unusable", "buy", NOW, amount="x"),
        ev("unusable", "buy", NOW, amount=None),
        ev("big", "buy", NOW, amount=100),
        ev("no_buy", "view", NOW),
    ]

    def total(op: str, include_absent: bool) -> dict:
        return seg({"kind": "aggregate", "event": "buy", "property": "amount", "fn": "sum",
                    "compare": {"op": op, "value": 50}, "include_absent": include_absent})

    assert members(events, total("gt", False)) == {"big"}
    assert members(events, total("gt", True)) == {"big", "unusable", "no_buy"}
    assert members(events, total("lt", False)) == set()
    assert members(events, total("lt", True)) == {"unusable", "no_buy"}


def test_first_did_looks_at_the_first_ever_event_not_the_first_in_window() -> None:
    events = [
        ev("returning", "signup", NOW - 40 * DAY, plan="basic"),
        ev("returning", "signup", NOW - DAY, plan="pro"),
        ev("new", "signup", NOW - DAY, plan="pro"),
        ev("future", "signup", NOW + 1, plan="pro"),
    ]
    week = {"last": "7d"}
    assert members(events, seg({"kind": "first_did", "event": "signup", "window": week})) == {
        "new"
    }
    # With a where, "first" is the first event passing it: returning's first pro signup is 1d ago.
    pro = [{"property": "plan", "op": "eq", "value": "pro"}]
    rule = {"kind": "first_did", "event": "signup", "where": pro, "window": week}
    assert members(events, seg(rule)) == {"returning", "new"}
    # Without any window it holds for whoever ever did it (the future one has not yet).
    assert members(events, seg({"kind": "first_did", "event": "signup"})) == {"returning", "new"}


def test_did_then_not_needs_the_full_wait_and_no_follow_up_inside_it() -> None:
    events = [
        ev("bought_soon", "cart", NOW - 30 * MIN), ev("bought_soon", "buy", NOW - 25 * MIN),
        # a.ts + within = now - 20m: a buy exactly then is inside (a.ts, a.ts + within].
        ev("bought_at_limit", "cart", NOW - 30 * MIN), ev("bought_at_limit", "buy", NOW - 20 * MIN),
        ev("bought_late", "cart", NOW - 30 * MIN), ev("bought_late", "buy", NOW - 20 * MIN + 1),
        ev("still_waiting", "cart", NOW - 5 * MIN),
        ev("wait_just_over", "cart", NOW - 10 * MIN),  # a.ts + within == now
        ev("same_instant", "cart", NOW - 30 * MIN), ev("same_instant", "buy", NOW - 30 * MIN),
        # A second cart whose wait is over without a buy: the rule only needs one such a.
        ev("second_cart", "cart", NOW - 50 * MIN), ev("second_cart", "buy", NOW - 45 * MIN),
        ev("second_cart", "cart", NOW - 40 * MIN),
    ]
    rule = {"kind": "did_then_not", "event": "cart", "then_not": {"event": "buy"},
            "within": "10m"}
    assert members(events, seg(rule)) == {
        "bought_late", "wait_just_over", "same_instant", "second_cart"
    }
    # The window limits a only: with last 35m, second_cart's carts are too old.
    windowed = {**rule, "window": {"last": "35m"}}
    assert members(events, seg(windowed)) == {"bought_late", "wait_just_over", "same_instant"}


def test_sequence_needs_strictly_increasing_timestamps_within_the_limit() -> None:
    t0 = NOW - 30 * MIN
    events = [
        ev("in_order", "view", t0), ev("in_order", "cart", t0 + MIN),
        ev("in_order", "buy", t0 + 2 * MIN),
        ev("tie", "view", t0), ev("tie", "cart", t0), ev("tie", "buy", t0 + MIN),
        ev("too_slow", "view", t0), ev("too_slow", "cart", t0 + 5 * MIN),
        ev("too_slow", "buy", t0 + 10 * MIN + 1),
        # A later view starts a chain that fits: 9m + 1ms.
        ev("later_start", "view", t0), ev("later_start", "view", t0 + MIN),
        ev("later_start", "cart", t0 + 5 * MIN), ev("later_start", "buy", t0 + 10 * MIN + 1),
        ev("reversed", "buy", t0), ev("reversed", "cart", t0 + MIN),
        ev("reversed", "view", t0 + 2 * MIN),
        ev("old_view", "view", NOW - 2 * HOUR), ev("old_view", "cart", NOW - 10 * MIN),
        ev("old_view", "buy", NOW - 5 * MIN),
    ]
    steps = [{"event": "view"}, {"event": "cart"}, {"event": "buy"}]
    rule = {"kind": "sequence", "steps": steps, "within": "10m"}
    assert members(events, seg(rule)) == {"in_order", "later_start"}
    no_limit = {"kind": "sequence", "steps": steps}
    assert members(events, seg(no_limit)) == {"in_order", "too_slow", "later_start", "old_view"}
    # Every step must be inside the window: old_view's view is 2h ago.
    in_hour = {**no_limit, "window": {"last": "1h"}}
    assert members(events, seg(in_hour)) == {"in_order", "too_slow", "later_start"}


def test_stopped_and_restarted_use_their_own_half_open_ranges() -> None:
    events = [
        ev("lapsed", "e", NOW - 10 * DAY),
        ev("active", "e", NOW - 10 * DAY), ev("active", "e", NOW - DAY),
        ev("at_recent_edge", "e", NOW - 7 * DAY),  # in (now-30d, now-7d]
        ev("at_before_edge", "e", NOW - 30 * DAY),  # not in (now-30d, now-7d]
        ev("just_recent", "e", NOW - 7 * DAY + 1),
        ev("came_back", "e", NOW - 40 * DAY), ev("came_back", "e", NOW - DAY),
        ev("never_left", "e", NOW - 40 * DAY), ev("never_left", "e", NOW - 10 * DAY),
        ev("never_left", "e", NOW - DAY),
        ev("came_back_at_edges", "e", NOW - 30 * DAY),
        ev("came_back_at_edges", "e", NOW - 7 * DAY + 1),
        ev("gap_at_edge", "e", NOW - 30 * DAY), ev("gap_at_edge", "e", NOW - 7 * DAY),
    ]
    fields = {"event": "e", "before": "30d", "recent": "7d"}
    assert members(events, seg({"kind": "stopped", **fields})) == {
        "lapsed", "at_recent_edge", "gap_at_edge"
    }
    assert members(events, seg({"kind": "restarted", **fields})) == {
        "came_back", "came_back_at_edges"
    }


def test_regularly_counts_buckets_satisfying_count() -> None:
    events = [
        ev("two_days", "e", NOW - HOUR), ev("two_days", "e", NOW - DAY - HOUR),
        ev("one_day", "e", NOW - HOUR), ev("one_day", "e", NOW - 2 * HOUR),
        # now - 1d is in bucket 1 (now-2d, now-1d]; now - 2d in bucket 2.
        ev("edges", "e", NOW - DAY), ev("edges", "e", NOW - 2 * DAY),
        ev("too_old", "e", NOW - 3 * DAY), ev("too_old", "e", NOW - HOUR),
        ev("busy", "e", NOW - HOUR), ev("busy", "e", NOW - 2 * HOUR),
        ev("busy", "e", NOW - DAY - HOUR),
        ev("idle", "e", NOW - 5 * DAY),
    ]
    profiles = {"no_events": {}}

    def regularly(min_periods: int, **extra: Any) -> dict:
        return seg({"kind": "regularly", "event": "e", "period": "1d", "periods": 3,
                    "min_periods": min_periods, **extra})

    assert members(events, regularly(2), profiles=profiles) == {"two_days", "edges", "busy"}
    twice = {"count": {"op": "gte", "value": 2}}
    assert members(events, regularly(1, **twice), profiles=profiles) == {"one_day", "busy"}
    assert members(events, regularly(2, **twice), profiles=profiles) == set()
    # Empty buckets count when 0 satisfies count: three idle days.
    quiet = {"count": {"op": "eq", "value": 0}}
    assert members(events, regularly(3, **quiet), profiles=profiles) == {"idle", "no_events"}


# --- profile rules ------------------------------------------------------------------------


def test_profile_rules_use_the_filter_table_and_builtin_seen_times() -> None:
    events = [ev("u1", "e", NOW - DAY), ev("u1", "e", NOW - HOUR), ev("u1", "e", NOW + HOUR)]
    profiles = {"u1": {"plan": "pro"}, "u2": {"plan": "free", "age": 30}, "u3": {}}

    def profile(prop: str, op: str, value: Any) -> dict:
        return seg({"kind": "profile", "property": prop, "op": op, "value": value})

    assert members(events, profile("plan", "eq", "pro"), profiles=profiles) == {"u1"}
    assert members(events, profile("plan", "neq", "pro"), profiles=profiles) == {"u2", "u3"}
    assert members(events, profile("age", "eq", 30.0), profiles=profiles) == {"u2"}
    assert members(
        events, profile("first_seen", "eq", "2025-12-31T00:00:00.000Z"), profiles=profiles
    ) == {"u1"}
    # last_seen ignores the event at now + 1h.
    assert members(
        events, profile("last_seen", "eq", "2025-12-31T23:00:00.000Z"), profiles=profiles
    ) == {"u1"}


def test_profile_time_accepts_rfc3339_strings_and_integer_epoch_ms_only() -> None:
    five_days = NOW + 5 * DAY
    profiles = {
        "string": {"appt": "2026-01-06T00:00:00Z"},  # now + 5d: in [now+5d, now+6d)
        "offset": {"appt": "2026-01-06T01:00:00+01:00"},  # the same instant
        "epoch_last_ms": {"appt": five_days + DAY - 1},
        "epoch_at_to": {"appt": five_days + DAY},  # to is exclusive
        "epoch_before": {"appt": five_days - 1},
        "float": {"appt": float(five_days)},  # a float is not a timestamp
        "lowercase": {"appt": "2026-01-06t00:00:00z"},
        "text": {"appt": "next week"},
        "bool": {"appt": True},
    }
    rule = {"kind": "profile_time", "property": "appt", "from": "+5d", "to": "+6d"}
    assert members([], seg(rule), profiles=profiles) == {"string", "offset", "epoch_last_ms"}
    # New users: first seen within the last 7 days (now - 7d <= first_seen < now + 1ms).
    events = [ev("new", "e", NOW - DAY), ev("old", "e", NOW - 8 * DAY), ev("old", "e", NOW)]
    new_users = {"kind": "profile_time", "property": "first_seen", "from": "-7d", "to": "+1ms"}
    assert members(events, seg(new_users)) == {"new"}


def test_in_segment_reads_given_segments_and_builtins() -> None:
    profiles = {"vip": {}, "tester": {"test_user": True}, "string_true": {"test_user": "true"}}
    segments = {"seg-vip": {"vip"}}

    def run(kind: str, segment: str) -> set[str]:
        rule = {"kind": kind, "segment": segment}
        return members([], seg(rule), profiles=profiles, segments=segments)

    assert run("in_segment", "seg-vip") == {"vip"}
    assert run("not_in_segment", "seg-vip") == {"tester", "string_true"}
    assert run("in_segment", "test-users") == {"tester"}
    assert run("in_segment", "all-users") == set(profiles)


# --- combining and scope ------------------------------------------------------------------


def test_match_modes_combine_rules_and_at_least_above_rule_count_never_holds() -> None:
    events = [
        ev("a", "a", NOW),
        ev("ab", "a", NOW), ev("ab", "b", NOW),
        ev("abc", "a", NOW), ev("abc", "b", NOW), ev("abc", "c", NOW),
        ev("none", "x", NOW),
    ]
    rules = [did("a"), did("b"), did("c")]
    assert members(events, seg(*rules)) == {"abc"}  # match defaults to all
    assert members(events, seg(*rules, match="any")) == {"a", "ab", "abc"}
    assert members(events, seg(*rules, match="none")) == {"none"}
    assert members(events, seg(*rules, match={"at_least": 2})) == {"ab", "abc"}
    assert members(events, seg(*rules, match={"at_least": 4})) == set()
    nested = {"kind": "group", "match": "none", "rules": [did("c")]}
    assert members(events, seg(did("a"), nested)) == {"a", "ab"}
    any_two = {"kind": "group", "match": {"at_least": 2}, "rules": rules}
    assert members(events, seg(any_two, match="none")) == {"a", "none"}


def test_session_scope_needs_one_session_where_the_whole_definition_holds() -> None:
    events = [
        ev("split", "view", NOW - 2, "s1"), ev("split", "buy", NOW - 1, "s2"),
        ev("together", "view", NOW - 2, "s1"), ev("together", "buy", NOW - 1, "s1"),
        ev("no_session", "view", NOW - 2), ev("no_session", "buy", NOW - 1),
        ev("future_session", "view", NOW + 1, "s1"),
    ]
    profiles = {"together": {"plan": "pro"}, "future_session": {"plan": "pro"},
                "profile_only": {"plan": "pro"}}
    both = seg(did("view"), did("buy"))
    assert members(events, both, profiles=profiles) == {"split", "together", "no_session"}
    assert members(events, {**both, "scope": "session"}, profiles=profiles) == {"together"}
    # split's s1 has no buy; users without a (visible) session are never members.
    no_buy = seg({"kind": "did_not", "event": "buy"}, scope="session")
    assert members(events, no_buy, profiles=profiles) == {"split"}
    # Profile rules hold as usual, but still need a session to hold in.
    pro = seg({"kind": "profile", "property": "plan", "op": "eq", "value": "pro"},
              scope="session")
    assert members(events, pro, profiles=profiles) == {"together"}


def test_session_scope_first_did_means_first_in_that_session() -> None:
    events = [ev("u", "buy", NOW - 2 * DAY, "s1"), ev("u", "buy", NOW - HOUR, "s2")]
    rule = seg({"kind": "first_did", "event": "buy", "window": {"last": "1d"}})
    assert members(events, rule) == set()  # first ever buy was 2 days ago
    assert members(events, {**rule, "scope": "session"}) == {"u"}  # s2's first is 1h ago


def test_session_scope_then_not_only_looks_in_the_same_session() -> None:
    events = [ev("u", "cart", NOW - HOUR, "s1"), ev("u", "buy", NOW - HOUR + MIN, "s2")]
    rule = seg({"kind": "did_then_not", "event": "cart", "then_not": {"event": "buy"},
                "within": "10m"})
    assert members(events, rule) == set()
    assert members(events, {**rule, "scope": "session"}) == {"u"}


def test_only_given_users_are_answered() -> None:
    events = [ev("known", "e", NOW), ev("stranger", "e", NOW)]
    assert members(events, seg(did("e")), users={"known", "quiet"}) == {"known"}
    assert members(events, seg({"kind": "did_not", "event": "e"}), users={"known", "quiet"}) == {
        "quiet"
    }
