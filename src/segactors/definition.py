"""Segment definitions (RULES.md) as msgspec tagged unions, with validation and limits.

``parse_definition`` turns decoded JSON into a checked ``Definition`` or raises ``Invalid``
with one detail per problem. Nothing here evaluates anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

import msgspec
from msgspec import UNSET, Struct, UnsetType, field

from segactors.errors import Invalid
from segactors.timefmt import parse_duration, parse_ts

Scalar = Union[str, int, float, bool]

FilterOp = Literal[
    "eq", "neq", "gt", "gte", "lt", "lte", "contains", "not_contains", "starts_with",
    "ends_with", "icontains", "not_icontains", "in", "not_in", "exists", "not_exists",
]
CompareOp = Literal["gt", "gte", "lt", "lte", "eq", "neq", "between"]
MatchWord = Literal["all", "any", "none"]


class _S(Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


class Filter(_S):
    property: str
    op: FilterOp
    value: Any = UNSET


class Compare(_S):
    op: CompareOp
    value: Union[int, float]
    to: Union[int, float, UnsetType] = UNSET


class Window(_S):
    last: Union[str, UnsetType] = UNSET
    from_: Union[str, int, UnsetType] = field(default=UNSET, name="from")
    to: Union[str, int, UnsetType] = UNSET


class AtLeast(_S):
    at_least: int


Match = Union[MatchWord, AtLeast]


class Step(_S):
    event: str
    where: list[Filter] = []


class _EventRule(_S, tag_field="kind"):
    event: str
    where: list[Filter] = []
    window: Union[Window, UnsetType] = UNSET


class Did(_EventRule, tag="did"):
    count: Union[Compare, UnsetType] = UNSET
    include_absent: bool = False


class DidNot(_EventRule, tag="did_not"):
    pass


class Aggregate(_EventRule, tag="aggregate", kw_only=True):
    fn: Literal["sum", "avg", "min", "max", "distinct"]
    property: str
    compare: Compare
    include_absent: bool = False


class FirstDid(_EventRule, tag="first_did"):
    pass


class DidThenNot(_EventRule, tag="did_then_not", kw_only=True):
    then_not: Step
    within: str


class Sequence(_S, tag_field="kind", tag="sequence"):
    steps: list[Step]
    window: Union[Window, UnsetType] = UNSET
    within: Union[str, UnsetType] = UNSET


class Profile(_S, tag_field="kind", tag="profile"):
    property: str
    op: FilterOp
    value: Any = UNSET


class ProfileTime(_S, tag_field="kind", tag="profile_time"):
    property: str
    from_: str = field(name="from")
    to: str


class InSegment(_S, tag_field="kind", tag="in_segment"):
    segment: str


class NotInSegment(_S, tag_field="kind", tag="not_in_segment"):
    segment: str


class Stopped(_S, tag_field="kind", tag="stopped"):
    event: str
    before: str
    recent: str
    where: list[Filter] = []


class Restarted(_S, tag_field="kind", tag="restarted"):
    event: str
    before: str
    recent: str
    where: list[Filter] = []


class Regularly(_S, tag_field="kind", tag="regularly"):
    event: str
    period: str
    periods: int
    min_periods: int
    where: list[Filter] = []
    count: Union[Compare, UnsetType] = UNSET


class Group(_S, tag_field="kind", tag="group"):
    rules: list["Rule"]
    match: Match = "all"


Rule = Union[
    Did, DidNot, Aggregate, FirstDid, DidThenNot, Sequence, Profile, ProfileTime, InSegment,
    NotInSegment, Stopped, Restarted, Regularly, Group,
]


class Definition(_S):
    name: str
    rules: list[Rule]
    description: Union[str, UnsetType] = UNSET
    window: Union[Window, UnsetType] = UNSET
    ends_at: Union[str, int, UnsetType] = UNSET
    scope: Literal["user", "session"] = "user"
    match: Match = "all"


@dataclass(frozen=True)
class Limits:
    """Definition limits of RULES.md; each is configurable."""

    rules: int = 20
    depth: int = 4
    filters: int = 20


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_scalar(v: object) -> bool:
    return isinstance(v, (str, int, float, bool))


def filter_value_problem(op: str, value: object) -> str | None:
    """Why ``value`` has the wrong shape for ``op``, or None when it is fine."""
    if op in ("exists", "not_exists"):
        return None if value is UNSET else f"'{op}' takes no value"
    if value is UNSET:
        return f"'{op}' needs a value"
    if op in ("in", "not_in"):
        if not isinstance(value, list) or not all(_is_scalar(v) for v in value):
            return f"'{op}' needs a list of non-null scalars"
        return None
    if op in ("eq", "neq"):
        return None if _is_scalar(value) else f"'{op}' needs a non-null scalar"
    if op in ("gt", "gte", "lt", "lte"):
        ok = _is_number(value) or isinstance(value, str)
        return None if ok else f"'{op}' needs a number or a string"
    return None if isinstance(value, str) else f"'{op}' needs a string"


def _check_compare(c: Compare | UnsetType, path: str, out: list[dict[str, str]]) -> None:
    if isinstance(c, UnsetType):
        return
    if c.op == "between":
        if isinstance(c.to, UnsetType):
            out.append({"path": path, "message": "'between' needs 'to'"})
        elif c.to < c.value:
            out.append({"path": path, "message": "'between' needs value <= to"})
    elif not isinstance(c.to, UnsetType):
        out.append({"path": path, "message": "'to' is only for 'between'"})


class _Checker:
    def __init__(self, limits: Limits, segment_exists: Any) -> None:
        self.limits = limits
        self.segment_exists = segment_exists
        self.problems: list[dict[str, str]] = []
        self.rule_objects = 0

    def bad(self, path: str, message: str) -> None:
        self.problems.append({"path": path, "message": message})

    def duration(self, text: str, path: str, signed: bool = False) -> int | None:
        try:
            return parse_duration(text, signed=signed)
        except ValueError as e:
            self.bad(path, str(e))
            return None

    def window(self, w: Window | UnsetType, path: str) -> None:
        if isinstance(w, UnsetType):
            return
        if not isinstance(w.last, UnsetType):
            if not isinstance(w.from_, UnsetType) or not isinstance(w.to, UnsetType):
                self.bad(path, "a window is either {'last'} or {'from', 'to'?}")
            self.duration(w.last, path + ".last")
            return
        if isinstance(w.from_, UnsetType):
            self.bad(path, "a window needs 'last' or 'from'")
            return
        try:
            lo = parse_ts(w.from_)
            hi = None if isinstance(w.to, UnsetType) else parse_ts(w.to)
        except ValueError as e:
            self.bad(path, str(e))
            return
        if hi is not None and not lo < hi:
            self.bad(path, "'from' must be before 'to'")

    def where(self, filters: list[Filter], path: str) -> None:
        if len(filters) > self.limits.filters:
            self.bad(path, f"at most {self.limits.filters} filters per 'where'")
        for i, f in enumerate(filters):
            problem = filter_value_problem(f.op, f.value)
            if problem:
                self.bad(f"{path}[{i}]", problem)

    def rules(self, rules: list[Rule], path: str, depth: int) -> None:
        if not rules:
            self.bad(path, "at least one rule")
        for i, r in enumerate(rules):
            self.rule_objects += 1
            self.rule(r, f"{path}[{i}]", depth)

    def match(self, m: Match, path: str) -> None:
        if isinstance(m, AtLeast) and m.at_least < 1:
            self.bad(path, "'at_least' is an integer >= 1")

    def rule(self, r: Rule, path: str, depth: int) -> None:
        if isinstance(r, Group):
            if depth + 1 > self.limits.depth:
                self.bad(path, f"groups nest at most {self.limits.depth} deep")
            self.match(r.match, path + ".match")
            self.rules(r.rules, path + ".rules", depth + 1)
            return
        if isinstance(r, (_EventRule, Sequence)):
            self.window(r.window, path + ".window")
        if isinstance(r, (_EventRule, Stopped, Restarted, Regularly)):
            self.where(r.where, path + ".where")
        if isinstance(r, Did):
            _check_compare(r.count, path + ".count", self.problems)
        elif isinstance(r, Aggregate):
            _check_compare(r.compare, path + ".compare", self.problems)
        elif isinstance(r, DidThenNot):
            self.where(r.then_not.where, path + ".then_not.where")
            self.duration(r.within, path + ".within")
        elif isinstance(r, Sequence):
            if not r.steps:
                self.bad(path + ".steps", "at least one step")
            for i, s in enumerate(r.steps):
                self.where(s.where, f"{path}.steps[{i}].where")
            if not isinstance(r.within, UnsetType):
                self.duration(r.within, path + ".within")
        elif isinstance(r, Profile):
            problem = filter_value_problem(r.op, r.value)
            if problem:
                self.bad(path, problem)
        elif isinstance(r, ProfileTime):
            lo = self.duration(r.from_, path + ".from", signed=True)
            hi = self.duration(r.to, path + ".to", signed=True)
            if lo is not None and hi is not None and not lo < hi:
                self.bad(path, "'from' must be before 'to'")
        elif isinstance(r, (InSegment, NotInSegment)):
            if not self.segment_exists(r.segment):
                self.bad(path + ".segment", f"unknown segment {r.segment!r}")
        elif isinstance(r, (Stopped, Restarted)):
            t = self.duration(r.before, path + ".before")
            s = self.duration(r.recent, path + ".recent")
            if t is not None and s is not None and not t > s:
                self.bad(path, "'before' must be longer than 'recent'")
        elif isinstance(r, Regularly):
            self.duration(r.period, path + ".period")
            if r.periods < 1:
                self.bad(path + ".periods", "'periods' is an integer >= 1")
            if not 1 <= r.min_periods <= max(r.periods, 1):
                self.bad(path + ".min_periods", "1 <= min_periods <= periods")
            _check_compare(r.count, path + ".count", self.problems)


def parse_definition(
    obj: Any,
    now: int,
    segment_exists: Any = lambda _id: False,
    limits: Limits = Limits(),
) -> Definition:
    """Decode and check a definition; raise ``Invalid`` naming every problem found."""
    try:
        d = msgspec.convert(obj, Definition)
    except msgspec.ValidationError as e:
        raise Invalid(f"invalid segment definition: {e}", [{"message": str(e)}]) from None
    c = _Checker(limits, segment_exists)
    if not 1 <= len(d.name) <= 200:
        c.bad("$.name", "a name is 1 to 200 characters")
    c.window(d.window, "$.window")
    c.match(d.match, "$.match")
    c.rules(d.rules, "$.rules", 0)
    if c.rule_objects > limits.rules:
        c.bad("$.rules", f"at most {limits.rules} rule objects per definition")
    if not isinstance(d.ends_at, UnsetType):
        try:
            if parse_ts(d.ends_at) <= now:
                c.bad("$.ends_at", "'ends_at' is already past")
        except ValueError as e:
            c.bad("$.ends_at", str(e))
    if c.problems:
        raise Invalid("invalid segment definition", c.problems)
    return d


def to_json(d: Definition) -> Any:
    """The definition as plain JSON values, as it was given (defaults omitted)."""
    return msgspec.to_builtins(d)


def referenced_segments(rules: list[Rule]) -> set[str]:
    """Ids of every segment an ``in_segment``/``not_in_segment`` rule names, at any depth."""
    out: set[str] = set()
    for r in rules:
        if isinstance(r, (InSegment, NotInSegment)):
            out.add(r.segment)
        elif isinstance(r, Group):
            out |= referenced_segments(r.rules)
    return out
