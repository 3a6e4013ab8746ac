"""The change log of one system: ``seq`` order, retained for a time (and optionally a count).

Appends are O(1); ``since`` is O(1) to find the start (seqs are contiguous) plus the length
of what it returns. The newest change is always kept, so ``seq`` survives trimming.

Changes are kept as columns (segment and user id shared with the rest of the server, the
kind as a byte, the instant as 8 bytes; ``seq`` implied by the position): ~25 bytes a
change rather than ~110 for a ``Change`` and its integers. ``since`` builds the ``Change``
objects it returns.
"""

from __future__ import annotations

from array import array

from segactors.errors import Gone
from segactors.supervisor import Change

_KINDS = ("leave", "enter")


class ChangeLog:
    def __init__(self, retention_ms: int, retention_count: int | None = None) -> None:
        self.retention_ms = retention_ms
        self.retention_count = retention_count
        # Change k of the columns has seq `_first + k`.
        self._first = 1
        self._segs: list[str] = []
        self._uids: list[str] = []
        self._enter = bytearray()
        self._at: array[int] = array("q")
        self._start = 0  # Index in the columns of the oldest retained change.
        self.dropped_upto = 0  # Every seq <= this is gone.
        self.last_seq = 0  # Highest seq assigned.
        self.published = 0  # Highest seq durable and pushed; readers see up to here.

    def restore(self, changes: list[Change]) -> None:
        """Append stored changes (in ``seq`` order) at start-up."""
        if not changes:
            return
        if not self._segs and not self._start:
            self.dropped_upto = changes[0].seq - 1
        self.extend(changes)
        self.published = self.last_seq

    def extend(self, changes: list[Change]) -> None:
        """Append changes (in ``seq`` order). Seqs follow one another; where they do not
        (changes whose commit failed were never stored), what came before the gap is
        dropped: a reader from before it is told to re-list (``Gone``)."""
        if not changes:
            return
        first = changes[0].seq
        if changes[-1].seq - first != len(changes) - 1:  # A gap inside: keep what follows.
            k = len(changes) - 1
            while changes[k - 1].seq == changes[k].seq - 1:
                k -= 1
            first, changes = changes[k].seq, changes[k:]
            self._drop_all(first)
        elif not self._segs:
            self._first = first
        elif first != self._first + len(self._segs):
            self._drop_all(first)
        self._segs.extend([c.segment for c in changes])
        self._uids.extend([c.user_id for c in changes])
        self._enter.extend([c.change == "enter" for c in changes])
        self._at.extend([c.at for c in changes])
        self.last_seq = changes[-1].seq

    def _drop_all(self, first: int) -> None:
        """Forget every change kept; the next one appended has seq ``first``."""
        del self._segs[:], self._uids[:], self._enter[:], self._at[:]
        self._start = 0
        self._first = first
        self.dropped_upto = max(self.dropped_upto, first - 1)

    def mark_published(self, seq: int) -> None:
        if seq > self.published:
            self.published = seq

    def __len__(self) -> int:
        return len(self._segs) - self._start

    def trim(self, now: int) -> int:
        """Drop changes past retention; return the highest seq dropped (0 if none)."""
        at, start = self._at, self._start
        keep_from = len(at) - 1  # Always keep the newest.
        cutoff = now - self.retention_ms
        while start < keep_from and at[start] < cutoff:
            start += 1
        if self.retention_count is not None:
            start = max(start, min(keep_from, len(at) - self.retention_count))
        if start == self._start:
            return 0
        self.dropped_upto = self._first + start - 1
        self._start = start
        if start > 4096 and start > len(at) // 2:
            del self._segs[:start], self._uids[:start], self._enter[:start], self._at[:start]
            self._first += start
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
        first = self._first
        i = max(self._start, seq + 1 - first)
        end = min(len(self._segs), top + 1 - first)  # Past `published`: not shown yet.
        segs, uids, enter, at = self._segs, self._uids, self._enter, self._at
        out: list[Change] = []
        while i < end and (limit is None or len(out) < limit):
            g = segs[i]
            if segments is None or g in segments:
                out.append(Change(first + i, g, uids[i], _KINDS[enter[i]], at[i]))
            i += 1
        return out
