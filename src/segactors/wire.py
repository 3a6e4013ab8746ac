"""Wire types and body decoding: JSON in, typed values or the contract's 400/422 out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta, Struct

from segactors.errors import BadJSON, Invalid

PropValue = Union[str, int, float, bool, None]
NonEmpty = Annotated[str, Meta(min_length=1)]


class EventIn(Struct, forbid_unknown_fields=True, gc=False):
    user_id: NonEmpty
    name: NonEmpty
    ts: Union[int, str]
    id: Union[NonEmpty, None] = None
    session_id: Union[str, None] = None
    props: dict[str, PropValue] = {}


class ProfileIn(Struct, forbid_unknown_fields=True, gc=False):
    user_id: NonEmpty
    props: dict[str, PropValue]


class SystemIn(Struct, forbid_unknown_fields=True):
    id: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]


class SegmentPatch(Struct, forbid_unknown_fields=True):
    name: Union[str, msgspec.UnsetType] = msgspec.UNSET
    description: Union[str, msgspec.UnsetType] = msgspec.UNSET


class WebhookIn(Struct, forbid_unknown_fields=True):
    url: str
    segments: Union[list[str], str] = "*"


_EVENTS = msgspec.json.Decoder(Union[EventIn, list[EventIn]])
_PROFILES = msgspec.json.Decoder(Union[ProfileIn, list[ProfileIn]])
_ANY = msgspec.json.Decoder()


def depth(obj: Any) -> int:
    """Nesting depth: the outermost array/object is level 1; scalars do not count."""
    best = 0
    stack = [(obj, 1)] if isinstance(obj, (list, dict)) else []
    while stack:
        o, d = stack.pop()
        if d > best:
            best = d
        children = o.values() if isinstance(o, dict) else o
        for c in children:
            if isinstance(c, (list, dict)):
                stack.append((c, d + 1))
    return best


def decode_any(body: bytes, max_depth: int) -> Any:
    """Decode untyped JSON, enforcing the nesting limit (400 past it)."""
    try:
        obj = _ANY.decode(body)
    except RecursionError:
        raise BadJSON(f"JSON nests deeper than {max_depth} levels") from None
    except msgspec.DecodeError as e:
        raise BadJSON(f"body is not valid JSON: {e}") from None
    if depth(obj) > max_depth:
        raise BadJSON(f"JSON nests deeper than {max_depth} levels")
    return obj


def decode_items(body: bytes, kind: type[Struct], max_depth: int, max_items: int,
                 check: Callable[[Any], str | None] | None = None) -> tuple[list[Any], bool]:
    """A single item or a batch, typed. Returns (items, was_batch).

    The fast path is one typed decode. When it fails, the body is decoded untyped to tell
    400 from 422 and to name every bad index: ``check`` (why a well-typed item breaks the
    contract, or None) runs on the items that decode, so their problems are named too.
    """
    decoder = _EVENTS if kind is EventIn else _PROFILES
    try:
        got = decoder.decode(body)
    except RecursionError:
        raise BadJSON(f"JSON nests deeper than {max_depth} levels") from None
    except msgspec.ValidationError:
        got = None
    except msgspec.DecodeError as e:
        raise BadJSON(f"body is not valid JSON: {e}") from None
    if got is not None:
        items = got if isinstance(got, list) else [got]
        if len(items) > max_items:
            raise Invalid(f"a batch holds at most {max_items} items")
        return items, isinstance(got, list)
    obj = decode_any(body, max_depth)
    if isinstance(obj, list) and len(obj) > max_items:
        raise Invalid(f"a batch holds at most {max_items} items")
    if not isinstance(obj, (list, dict)):
        raise Invalid("expected an object or an array of objects")
    batch = isinstance(obj, list)
    details = []
    for i, item in enumerate(obj if batch else [obj]):
        try:
            typed = msgspec.convert(item, kind)
        except msgspec.ValidationError as e:
            details.append({"index": i, "message": str(e)})
            continue
        problem = check(typed) if check is not None else None
        if problem is not None:
            details.append({"index": i, "message": problem})
    raise Invalid("invalid item(s); nothing was accepted", details)
