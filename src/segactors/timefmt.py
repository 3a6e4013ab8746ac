"""Timestamps and durations of RULES.md, as integer epoch milliseconds.

Every instant inside the server is an ``int`` of milliseconds since the Unix epoch.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})\Z"
)
_DURATION = re.compile(r"([+-]?)(\d+)(ms|s|m|h|d|w)\Z")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

MS = 1
SECOND = 1000
DAY = 86_400_000
MIN_TS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
MAX_TS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def parse_rfc3339(text: str) -> int:
    """Parse an RFC 3339 timestamp (uppercase ``T``, ``Z`` or ``±HH:MM``) to epoch ms.

    The fraction is truncated to milliseconds. Raises ``ValueError`` otherwise.
    """
    m = _RFC3339.match(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second, frac, zone = m.groups()
    dt = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    ms = (frac or "0")[:3].ljust(3, "0")
    offset = 0
    if zone != "Z":
        oh, om = int(zone[1:3]), int(zone[4:6])
        if oh > 23 or om > 59:
            raise ValueError(f"bad offset in {text!r}")
        offset = (oh * 60 + om) * 60_000 * (1 if zone[0] == "+" else -1)
    delta = dt.replace(tzinfo=timezone.utc) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + int(ms) - offset


def parse_ts(value: object) -> int:
    """A timestamp as RULES.md accepts it: an RFC 3339 string or a JSON integer of epoch ms."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a timestamp")
    if isinstance(value, int):
        if not MIN_TS <= value <= MAX_TS:
            raise ValueError("epoch milliseconds out of range (years 1 to 9999)")
        return value
    if isinstance(value, str):
        return parse_rfc3339(value)
    raise ValueError("a timestamp is an RFC 3339 string or integer epoch milliseconds")


def format_ts(ms: int) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``."""
    seconds, millis = divmod(ms, 1000)
    dt = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}Z"


def parse_duration(text: object, signed: bool = False) -> int:
    """A duration such as ``"500ms"`` or ``"30d"`` in ms; ``signed`` admits ``"+5d"``/``"-30d"``.

    Unsigned durations must be positive. Raises ``ValueError`` otherwise.
    """
    if not isinstance(text, str):
        raise ValueError("a duration is a string such as '10m'")
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"not a duration: {text!r}")
    sign, amount, unit = m.groups()
    if sign and not signed:
        raise ValueError(f"a duration here takes no sign: {text!r}")
    value = int(amount) * _UNIT_MS[unit]
    if not signed and value <= 0:
        raise ValueError(f"a duration must be positive: {text!r}")
    return -value if sign == "-" else value
