"""Fixtures of the timer service's tests: real databases (SQLite and PostgreSQL) from
`loom_db.testing`, and `start_timer`: a `TimerService` on a runtime of its own (memory
broker, an outbox relay, its own metrics registry) over a given database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from loom_db import Database
from loom_db.keys import derive_keys
from loom_db.relay import OutboxRelay
from loom_db.testing import (  # noqa: F401  (fixtures, found by pytest by name)
    _postgres_schema,
    _sqlite_template,
    postgres_db,
    postgres_url,
)
from loom_db.testing import db as db  # the fixture, re-exported under its own name
from loom_messaging import open_broker
from loom_runtime import Runtime
from loom_timer import TimerService, TimerSettings

SECRET_KEY = "timer-test-secret-key-" + "t" * 32

StartTimer = Callable[..., AbstractAsyncContextManager[TimerService]]


def timer_settings(**overrides: Any) -> TimerSettings:
    """Settings for an in-process timer: nothing periodic unless a test asks for it (a
    test that wants `graph.changed` to move the jobs cannot be helped by a resync)."""
    values: dict[str, Any] = {
        "secret_key": SECRET_KEY,
        "broker_prefix": f"test-{uuid.uuid4().hex[:8]}",
        "timer_resync_seconds": 3600,
        "timer_change_debounce_seconds": 0.05,
        "timer_delay_poll_seconds": 0.1,
        "timer_reap_seconds": 3600,
        "timer_retention_seconds": 3600,
        "shutdown_grace": 5,
    }
    values.update(overrides)
    return TimerSettings(**values)


@asynccontextmanager
async def _running_timer(database: Database, **overrides: Any) -> AsyncIterator[TimerService]:
    settings = timer_settings(**overrides)
    broker = open_broker(f"memory://timer-{uuid.uuid4().hex}", prefix=settings.broker_prefix)
    async with broker, OutboxRelay(database, broker.publishers()):
        runtime = Runtime(
            settings=settings, database=database, broker=broker, keys=derive_keys(SECRET_KEY)
        )
        async with TimerService(runtime, settings) as service:
            yield service


@pytest.fixture
def start_timer() -> StartTimer:
    """`async with start_timer(database, timer_reap_seconds=0.1) as service:`"""
    return _running_timer
