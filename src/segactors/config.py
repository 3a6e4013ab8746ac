"""Settings and limits, each with the contract's default."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from segactors.definition import Limits

DAY_MS = 86_400_000


def wall_clock() -> int:
    """The server clock: epoch milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass
class Config:
    data_dir: Path = Path("./segactors-data")
    root_token: str | None = None
    max_body: int = 5 * 1024 * 1024
    max_batch: int = 10_000
    max_depth: int = 32
    future_horizon_ms: int = 7 * DAY_MS
    max_segments: int = 1000
    definition_limits: Limits = field(default_factory=Limits)
    change_retention_ms: int = 7 * DAY_MS
    change_retention_count: int | None = None
    synchronous: str = "FULL"
    webhook_hosts: tuple[str, ...] | None = None
    webhook_first_backoff: float = 1.0
    cors_origins: tuple[str, ...] = ("*",)
    subscriber_queue: int = 10_000
    clock: Callable[[], int] = wall_clock
    tick_interval: float = 0.05
    backfill_slice: int = 2000
    # Users brought up to date (every segment evaluated) between yields after a restart.
    recover_slice: int = 100
    # Events applied (or due users advanced) between yields to the loop while a request
    # of at most this many events is in flight: it waits at most about this much work of
    # a batch between two of its steps (one batch goes slice by slice at a time). 16 live
    # events are about half a millisecond.
    ingest_slice: int = 16
    # The slice while no such request is: fewer turns of the loop per batch.
    ingest_slice_alone: int = 64
    # Stored profiles, or events, loaded between yields to the loop after a restart: about
    # 20 ms of work, since a request takes several turns of the loop to be answered.
    load_slice: int = 5_000
    # Events stay in memory at least this long, and as long as any live segment looks back.
    event_retention_ms: int = 90 * DAY_MS
    prune_interval_ms: int = 600_000
    gc_threshold: tuple[int, int, int] = (20_000, 10, 100)
    # Seconds between moves of the surviving young objects out of the collector's reach
    # (see Server._freezer); 0 turns it off.
    gc_freeze_interval: float = 1.0

    @classmethod
    def from_env(cls, data_dir: str | Path, **overrides: object) -> Config:
        cfg = cls(data_dir=Path(data_dir), root_token=os.environ.get("SEGACTORS_ROOT_TOKEN"))
        env_ints = {
            "SEGACTORS_MAX_BODY": "max_body", "SEGACTORS_MAX_BATCH": "max_batch",
            "SEGACTORS_MAX_SEGMENTS": "max_segments",
            "SEGACTORS_CHANGE_RETENTION_MS": "change_retention_ms",
            "SEGACTORS_EVENT_RETENTION_MS": "event_retention_ms",
            "SEGACTORS_INGEST_SLICE": "ingest_slice",
            "SEGACTORS_INGEST_SLICE_ALONE": "ingest_slice_alone",
        }
        for var, attr in env_ints.items():
            if var in os.environ:
                setattr(cfg, attr, int(os.environ[var]))
        if "SEGACTORS_SYNCHRONOUS" in os.environ:
            cfg.synchronous = os.environ["SEGACTORS_SYNCHRONOUS"].upper()
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg
