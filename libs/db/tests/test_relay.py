"""The outbox relay on both databases: order, marking sent, keeping rows through a broker
outage, the wake-up after a commit, and several relays at once on PostgreSQL.

The broker side of the relay is a plain function, so these tests hand it a recording
publisher (`Outlet`); the relay against real brokers is tests/test_relay_e2e.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

import orjson
import pytest
from sqlalchemy import func, select, update

from loom_db.database import Database, create_database
from loom_db.models import outbox
from loom_db.outbox import OutboxWaker, enqueue, fetch_unsent, mark_sent
from loom_db.relay import OutboxRelay, Publisher
from loom_db.types import utcnow

postgres_only = pytest.mark.parametrize("db", ["postgres"], indirect=True)


class Outlet:
    """A broker stand-in: records what each channel got, in order; can be broken."""

    def __init__(self, delay: float = 0.0) -> None:
        self.got: list[tuple[str, str, str]] = []  # (channel, type, key)
        self.calls = 0
        self.failures = 0
        self.broken: Exception | None = None
        self.broken_channels: set[str] = set()
        self.delay = delay
        self.gate: asyncio.Event | None = None

    def publishers(self) -> dict[str, Publisher]:
        return {channel: self._publisher(channel) for channel in ("queue", "control", "events")}

    def _publisher(self, channel: str) -> Publisher:
        async def publish(items: Sequence[tuple[bytes, str]]) -> None:
            self.calls += 1
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.broken is not None and (
                not self.broken_channels or channel in self.broken_channels
            ):
                self.failures += 1
                raise self.broken
            for body, key in items:
                self.got.append((channel, orjson.loads(body)["type"], key))

        return publish

    def keys(self) -> list[str]:
        return [key for _, _, key in self.got]


async def enqueue_requests(db: Database, count: int, start: int = 0) -> list[str]:
    keys = [f"x{i:05d}" for i in range(start, start + count)]
    async with db.transaction() as conn:
        for key in keys:
            await enqueue(conn, "execution.requested", key, {"execution_id": key, "graph": "g"})
    db.notify_committed()
    return keys


async def unsent(db: Database) -> int:
    async with db.read() as conn:
        return len(await fetch_unsent(conn, limit=100_000))


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_rows_are_published_in_order_to_their_channels_and_marked_sent(
    db: Database,
) -> None:
    async with db.transaction() as conn:
        await enqueue(conn, "execution.requested", "e1", {"execution_id": "e1", "graph": "g"})
        await enqueue(conn, "execution.requested", "e2", {"execution_id": "e2", "graph": "g"})
        await enqueue(conn, "execution.cancel", "e1", {"execution_id": "e1", "by": "ann"})
        await enqueue(conn, "graph.changed", "g", {"graph": "g", "version": 2})
        await enqueue(conn, "execution.requested", "e3", {"execution_id": "e3", "graph": "g"})
    outlet = Outlet()
    relay = OutboxRelay(db, outlet.publishers(), waker=OutboxWaker(), batch_size=2)

    assert await relay.drain() == 5

    assert outlet.got == [
        ("queue", "execution.requested", "e1"),
        ("queue", "execution.requested", "e2"),
        ("control", "execution.cancel", "e1"),
        ("control", "graph.changed", "g"),
        ("queue", "execution.requested", "e3"),
    ]
    assert outlet.calls == 3  # consecutive rows of one channel in one call, per batch
    assert await unsent(db) == 0
    assert await relay.drain() == 0
    assert relay.published == 5


async def test_a_running_relay_drains_many_rows_in_batches(db: Database) -> None:
    keys = await enqueue_requests(db, 1_050)
    outlet = Outlet()
    async with OutboxRelay(db, outlet.publishers(), batch_size=100, poll_interval=30):
        await eventually(lambda: _done(outlet, 1_050))
    assert outlet.keys() == keys
    assert await unsent(db) == 0


async def _done(outlet: Outlet, count: int) -> bool:
    return len(outlet.got) >= count


async def test_a_failing_publisher_keeps_the_rows_and_they_drain_after_it_recovers(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    outlet = Outlet()
    outlet.broken = ConnectionError("broker down")
    relay = OutboxRelay(db, outlet.publishers(), poll_interval=30, retry_backoff=(0.01, 0.05))
    caplog.set_level(logging.WARNING, logger="loom.db.relay")
    async with relay:
        first = await enqueue_requests(db, 5)
        await eventually(lambda: _failed_at_least(outlet, 4))
        assert relay.failing
        assert await unsent(db) == 5
        second = await enqueue_requests(db, 3, start=5)  # written during the outage

        outlet.broken = None
        await eventually(lambda: _done(outlet, 8))
        await eventually(lambda: _recovered(relay))  # noticed after the pass ends

    assert outlet.keys() == first + second
    assert await unsent(db) == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # once when the outage starts, once when it ends
    assert "ConnectionError: broker down" in warnings[0]
    assert "publishing again" in warnings[1]


async def _recovered(relay: OutboxRelay) -> bool:
    return not relay.failing


async def _failed_at_least(outlet: Outlet, count: int) -> bool:
    return outlet.failures >= count


async def test_drain_raises_the_publish_error_and_keeps_only_the_unpublished_rows(
    db: Database,
) -> None:
    async with db.transaction() as conn:
        await enqueue(conn, "execution.requested", "e1", {"execution_id": "e1", "graph": "g"})
        await enqueue(conn, "execution.cancel", "e1", {"execution_id": "e1", "by": "ann"})
        await enqueue(conn, "execution.requested", "e2", {"execution_id": "e2", "graph": "g"})
    outlet = Outlet()
    outlet.broken, outlet.broken_channels = OSError("control exchange gone"), {"control"}
    relay = OutboxRelay(db, outlet.publishers(), waker=OutboxWaker())

    with pytest.raises(OSError, match="control exchange gone"):
        await relay.drain()

    assert outlet.keys() == ["e1"]  # published before the failure: marked sent
    async with db.read() as conn:
        assert [m.key for m in await fetch_unsent(conn)] == ["e1", "e2"]  # cancel, then e2
    outlet.broken = None
    assert await relay.drain() == 2
    assert outlet.got[1:] == [
        ("control", "execution.cancel", "e1"),
        ("queue", "execution.requested", "e2"),
    ]


async def test_a_publisher_that_hangs_counts_as_a_failure(db: Database) -> None:
    await enqueue_requests(db, 2)
    outlet = Outlet()
    outlet.gate = asyncio.Event()  # never set: the broker never confirms
    relay = OutboxRelay(db, outlet.publishers(), waker=OutboxWaker(), publish_timeout=0.1)

    with pytest.raises(TimeoutError):
        await relay.drain()

    assert await unsent(db) == 2


async def test_a_wake_right_after_the_commit_publishes_without_waiting_for_the_poll(
    db: Database,
) -> None:
    waker = OutboxWaker()  # in-process only, on both databases
    db.on_commit(waker.wake)
    outlet = Outlet()
    async with OutboxRelay(db, outlet.publishers(), waker=waker, poll_interval=60):
        await asyncio.sleep(0.05)  # the first pass (nothing to do) and now waiting
        [key] = await enqueue_requests(db, 1)  # commit + notify_committed
        started = time.perf_counter()
        await eventually(lambda: _done(outlet, 1), within=2)
        assert time.perf_counter() - started < 0.5
    assert outlet.keys() == [key]


async def test_publishing_does_not_block_writers(db: Database) -> None:
    """A relay waiting for a slow broker leaves the database writable (on SQLite it
    holds no transaction while publishing)."""
    await enqueue_requests(db, 1)
    outlet = Outlet()
    outlet.gate = asyncio.Event()
    relay = OutboxRelay(db, outlet.publishers(), waker=OutboxWaker())
    draining = asyncio.create_task(relay.drain())
    await eventually(lambda: _called(outlet))

    started = time.perf_counter()
    await enqueue_requests(db, 1, start=1)
    assert time.perf_counter() - started < 1.0

    outlet.gate.set()
    assert await draining == 1
    assert await relay.drain() == 1
    assert outlet.keys() == ["x00000", "x00001"]


async def _called(outlet: Outlet) -> bool:
    return outlet.calls > 0


async def test_closing_finishes_the_batch_being_published_and_keeps_the_rest(
    db: Database,
) -> None:
    """A clean shutdown neither duplicates the batch in flight nor starts another."""
    keys = await enqueue_requests(db, 30)
    outlet = Outlet()
    outlet.gate = asyncio.Event()
    relay = OutboxRelay(db, outlet.publishers(), waker=OutboxWaker(), batch_size=10)
    await relay.start()
    await eventually(lambda: _called(outlet))

    closing = asyncio.create_task(relay.aclose())
    await asyncio.sleep(0.05)
    assert not closing.done()  # waiting for the batch in flight
    outlet.gate.set()
    await closing

    assert outlet.keys() == keys[:10]
    assert await unsent(db) == 20
    assert await relay.drain() == 20  # what the next relay (or a final drain) picks up
    assert outlet.keys() == keys


@postgres_only
async def test_a_commit_in_another_process_wakes_the_relay_through_notify(db: Database) -> None:
    outlet = Outlet()
    other = create_database(db.engine.url.render_as_string(hide_password=False))
    relay = OutboxRelay(db, outlet.publishers(), poll_interval=60)  # its own LISTEN waker
    try:
        async with relay:
            assert await relay._waker.wait_listening(10)
            await asyncio.sleep(0.1)  # the connect's own wake-up pass
            async with other.transaction() as conn:  # no notify_committed in this process
                await enqueue(conn, "execution.requested", "e1", {"execution_id": "e1"})
            await eventually(lambda: _done(outlet, 1), within=2)
    finally:
        await other.dispose()
    assert outlet.keys() == ["e1"]


@postgres_only
async def test_two_relays_never_publish_the_same_row_twice(db: Database) -> None:
    keys = await enqueue_requests(db, 1_000)
    outlets = [Outlet(delay=0.002), Outlet(delay=0.002)]
    other = create_database(db.engine.url.render_as_string(hide_password=False))
    try:
        relays = [
            OutboxRelay(database, outlet.publishers(), waker=OutboxWaker(), batch_size=25)
            for database, outlet in zip((db, other), outlets, strict=True)
        ]
        counts = await asyncio.gather(*(relay.drain() for relay in relays))
    finally:
        await other.dispose()

    delivered = outlets[0].keys() + outlets[1].keys()
    assert sorted(delivered) == keys  # every row exactly once
    assert all(count > 0 for count in counts), counts  # both relays really took part
    for outlet in outlets:
        assert outlet.keys() == sorted(outlet.keys())  # each relay publishes oldest first
    assert await unsent(db) == 0


async def test_sent_rows_older_than_a_day_are_purged(db: Database) -> None:
    await enqueue_requests(db, 3)
    async with db.transaction() as conn:
        ids = [m.id for m in await fetch_unsent(conn)]
        await mark_sent(conn, ids)
        await conn.execute(
            update(outbox).where(outbox.c.id == ids[0]).values(sent_at=utcnow() - timedelta(days=2))
        )
    outlet = Outlet()
    async with OutboxRelay(db, outlet.publishers(), poll_interval=0.01, purge_interval=0.01):
        await eventually(lambda: _rows_left(db, 2))
        await asyncio.sleep(0.05)
        assert await _rows_left(db, 2)  # a row sent an hour ago, or unsent, is kept


async def _rows_left(db: Database, count: int) -> bool:
    async with db.read() as conn:
        return (await conn.execute(select(func.count()).select_from(outbox))).scalar_one() == count


async def test_every_channel_needs_a_publisher(db: Database) -> None:
    outlet = Outlet()
    publishers = outlet.publishers()
    del publishers["control"]
    with pytest.raises(ValueError, match="control"):
        OutboxRelay(db, publishers, waker=OutboxWaker())
    with pytest.raises(ValueError, match="retry_backoff"):
        OutboxRelay(db, outlet.publishers(), waker=OutboxWaker(), retry_backoff=(2, 1))
