"""Filters of RULES.md (`where` and `profile`) compiled to plain predicates.

A predicate takes a property map and answers in O(1) (``in``: O(len(value))).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

Props = Mapping[str, Any]
Predicate = Callable[[Props], bool]

_MISSING = object()
_ORDER = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


def _kind(v: object) -> str | None:
    """The comparison family of a value: 'b'ool, 'n'umber, 's'tring, or None."""
    if isinstance(v, bool):
        return "b"
    if isinstance(v, (int, float)):
        return "n"
    if isinstance(v, str):
        return "s"
    return None


def value_eq(a: object, b: object) -> bool:
    """`eq` of RULES.md: same family and equal (numbers numerically), no coercion."""
    ka = _kind(a)
    return ka is not None and ka == _kind(b) and a == b


def eq_key(v: object) -> tuple[str, object] | None:
    """A hashable key under which two values are the same exactly when `value_eq` holds."""
    k = _kind(v)
    return None if k is None else (k, v)


def _positive(op: str, value: Any) -> Callable[[object], bool]:
    """The test of a non-negated op on a property value that is present (maybe null)."""
    if op == "exists":
        return lambda p: p is not None
    if op == "eq":
        if type(value) is str:  # The common case, without the family dispatch.
            return lambda p: type(p) is str and p == value
        return lambda p: value_eq(p, value)
    if op == "in":
        if all(type(v) is str for v in value):
            strings = frozenset(value)
            return lambda p: type(p) is str and p in strings
        keys = {eq_key(v) for v in value}
        return lambda p: _kind(p) is not None and eq_key(p) in keys
    if op in _ORDER:
        cmp, family = _ORDER[op], _kind(value)
        return lambda p: _kind(p) == family and cmp(p, value)
    if op == "contains":
        return lambda p: isinstance(p, str) and value in p
    if op == "starts_with":
        return lambda p: isinstance(p, str) and p.startswith(value)
    if op == "ends_with":
        return lambda p: isinstance(p, str) and p.endswith(value)
    if op == "icontains":
        low = value.lower()
        return lambda p: isinstance(p, str) and low in p.lower()
    raise ValueError(f"unknown filter op {op!r}")


_NEGATIONS = {
    "neq": "eq", "not_contains": "contains", "not_icontains": "icontains",
    "not_in": "in", "not_exists": "exists",
}


def compile_filter(prop: str, op: str, value: Any) -> Predicate:
    """A predicate on a property map; negations are exact complements of their op."""
    positive_op = _NEGATIONS.get(op)
    test = _positive(positive_op or op, value)
    if positive_op:
        return lambda props: not test(props.get(prop, None))
    return lambda props: (v := props.get(prop, _MISSING)) is not _MISSING and test(v)


def compile_where(filters: list[tuple[str, str, Any]]) -> Predicate | None:
    """All filters must hold; None when there are none (every event passes)."""
    preds = [compile_filter(p, op, v) for p, op, v in filters]
    if not preds:
        return None
    if len(preds) == 1:
        return preds[0]
    return lambda props: all(p(props) for p in preds)
