"""Shared fixtures: an in-process server on a temporary data dir, with an injectable clock."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

import pytest
from starlette.testclient import TestClient

from segactors.app import create_app
from segactors.config import Config

ROOT = "test-root-token"
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

# Real-time waits in tests are multiples of this unit; raise it on slow machines.
MS = float(os.environ.get("SEGACTORS_TEST_MS", "1")) / 1000


def ok(r: httpx.Response, status: int = 200) -> Any:
    """The JSON body of a response that must have ``status``."""
    assert r.status_code == status, r.text
    return r.json() if r.content else None


def wait_until(pred: Any, timeout: float = 10.0, step: float = 0.02) -> Any:
    """Poll ``pred`` until it returns something truthy; bounded by ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


class FakeClock:
    """A clock the test moves by hand; the server reads it for `now`."""

    def __init__(self, now: int = BASE_MS) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> int:
        self.now += ms
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_client(data_dir: Path, clock: FakeClock | None = None, **cfg: object) -> TestClient:
    config = Config(data_dir=data_dir, root_token=ROOT, **cfg)  # type: ignore[arg-type]
    if clock is not None:
        config.clock = clock
    client = TestClient(create_app(config))
    client.headers["Authorization"] = f"Bearer {ROOT}"
    return client


@pytest.fixture
def client(tmp_path: Path, clock: FakeClock) -> Iterator[TestClient]:
    with make_client(tmp_path, clock) as c:
        yield c


@pytest.fixture
def shop(client: TestClient) -> dict[str, str]:
    r = client.post("/v1/systems", json={"id": "shop"})
    assert r.status_code == 201, r.text
    return r.json()
