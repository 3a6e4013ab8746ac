"""The change log of one system: ``seq`` order, retained for a time (and optionally a count).

Appends are O(1); ``since`` is O(1) to find the start (seqs are contiguous) plus the length
of what it returns. The newest change is always kept, so ``seq`` survives trimming.
"""

from __future__ import annotations

from segactors.errors import Gone
from segactors.supervisor import Change


class ChangeLog:
    def __init__(self, retention_ms: int, retention_count: int | None = None) -> None:
        self.retention_ms = retention_ms
        self.retention_count = retention_count
        self._items: list[Change] = []
        self._start = 0  # Index in _items of the oldest retained change.
        self.dropped_upto = 0  # Every seq <= this is gone.
        self.last_seq = 0  # Highest seq assigned.
        self.published = 0  # Highest seq durable and pushed; readers see up to here.

    def restore(self, changes: list[Change]) -> None:
        """Append stored changes (in ``seq`` order, contiguous) at start-up."""
        if not changes:
            return
        if not self._items and not self._start:
            self.dropped_upto = changes[0].seq - 1
        self._items.extend(changes)
        self.last_seq = self.published = changes[-1].seq

    def extend(self, changes: list[Change]) -> None:
        self._items.extend(changes)
        if changes:
            self.last_seq = changes[-1].seq

    def mark_published(self, seq: int) -> None:
        if seq > self.published:
            self.published = seq

    def __len__(self) -> int:
        return len(self._items) - self._start

    def trim(self, now: int) -> int:
        """Drop changes past retention; return the highest seq dropped (0 if none)."""
        items, start = self._items, self._start
        keep_from = len(items) - 1  # Always keep the newest.
        cutoff = now - self.retention_ms
        while start < keep_from and items[start].at < cutoff:
            start += 1
        if self.retention_count is not None:
            start = max(start, min(keep_from, len(items) - self.retention_count))
        if start == self._start:
            return 0
        self.dropped_upto = items[start - 1].seq
        self._start = start
        if start > 4096 and start > len(items) // 2:
            self._items = items[start:]
            self._start = 0
        return self.dropped_upto

    def since(self, seq: int, limit: int | None = None,
              segments: set[str] | None = None) -> list[Change]:
        """Published changes with ``seq > since``, in order; ``Gone`` if some were dropped.

        A change assigned but not yet durable is not shown: it is pushed once it is.
        """
        if seq < self.dropped_upto:
            raise Gone(f"changes after seq {seq} are no longer retained; re-list members")
        top = self.published
        if seq >= top:
            return []
        first = self._items[self._start].seq if len(self) else self.last_seq + 1
        i = self._start + max(0, seq + 1 - first)
        out: list[Change] = []
        items = self._items
        while i < len(items) and (limit is None or len(out) < limit):
            c = items[i]
            if c.seq > top:
                break
            if segments is None or c.segment in segments:
                out.append(c)
            i += 1
        return out
