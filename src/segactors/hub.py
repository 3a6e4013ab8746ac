"""Fan-out of changes to subscribers: encode once, bounded queues, drop who falls behind.

Publishing costs O(subscribers) queue puts per change and never awaits: a slow client
overflows its own queue and is dropped, it never stalls the loop or grows memory.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterable

import msgspec

from segactors.supervisor import Change
from segactors.timefmt import format_ts

_enc = msgspec.json.Encoder()


def encode_change(c: Change) -> bytes:
    return _enc.encode({"type": "change", "seq": c.seq, "segment": c.segment,
                        "user_id": c.user_id, "change": c.change, "at": format_ts(c.at)})


class SubState(enum.Enum):
    OPEN = "open"
    OVERFLOWED = "overflowed"
    CLOSED = "closed"


class Subscriber:
    """One connection's interest (segments, watched users) and its bounded outbox."""

    def __init__(self, system: str, maxsize: int) -> None:
        self.system = system
        self.segments: set[str] = set()
        self.all_segments = False
        # Live changes at or below a floor were already covered (replayed, or reflected in
        # the snapshot the client was sent), so they are not pushed again.
        self.floor = 0
        self.users: dict[str, int] = {}  # Watched user -> floor.
        self.queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self.maxsize = maxsize
        self.state = SubState.OPEN
        self.sent_seq = 0  # Highest change seq handed to the socket.

    def wants(self, c: Change) -> bool:
        if (self.all_segments or c.segment in self.segments) and c.seq > self.floor:
            return True
        floor = self.users.get(c.user_id)
        return floor is not None and c.seq > floor

    def put(self, msg: bytes, seq: int = 0) -> None:
        if self.state is not SubState.OPEN:
            return
        if self.queue.qsize() >= self.maxsize:
            self.state = SubState.OVERFLOWED
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)  # Tells the writer to send `overflow` and close.
            return
        self.queue.put_nowait((seq, msg))


class Hub:
    def __init__(self) -> None:
        self.subs: dict[str, set[Subscriber]] = {}

    def add(self, sub: Subscriber) -> None:
        self.subs.setdefault(sub.system, set()).add(sub)

    def remove(self, sub: Subscriber) -> None:
        self.subs.get(sub.system, set()).discard(sub)

    def publish(self, system: str, changes: Iterable[Change]) -> None:
        subs = self.subs.get(system)
        if not subs:
            return
        for c in changes:
            msg: bytes | None = None
            for sub in tuple(subs):
                if sub.wants(c):
                    if msg is None:
                        msg = encode_change(c)
                    sub.put(msg, c.seq)
