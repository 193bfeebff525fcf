"""The outbox's relay side: fetch and mark on both databases, SKIP LOCKED between relays,
and the wake-up after a commit (in-process, and LISTEN/NOTIFY across processes)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import orjson
import pytest
from sqlalchemy import text

from loom_db.database import Database, create_database
from loom_db.outbox import (
    LISTENER_APPLICATION_NAME,
    OutboxWaker,
    enqueue,
    fetch_unsent,
    mark_sent,
    purge_sent,
)
from loom_db.types import utcnow

postgres_only = pytest.mark.parametrize("db", ["postgres"], indirect=True)


async def enqueue_requests(db: Database, count: int) -> list[int]:
    async with db.transaction() as conn:
        return [
            await enqueue(conn, "execution.requested", f"x{i}", {"execution_id": f"x{i}"})
            for i in range(count)
        ]


async def test_unsent_messages_come_oldest_first_until_marked_sent(db: Database) -> None:
    async with db.transaction() as conn:
        first = await enqueue(conn, "execution.requested", "e1", {"execution_id": "e1"})
        second = await enqueue(conn, "execution.cancel", "e1", {"execution_id": "e1", "by": "u"})
        third = await enqueue(conn, "graph.changed", "g", {"graph": "g", "version": 2})
    async with db.transaction() as conn:
        batch = await fetch_unsent(conn, limit=2)
        assert [m.id for m in batch] == [first, second]
        assert [(m.channel, m.key) for m in batch] == [("queue", "e1"), ("control", "e1")]
        envelope = orjson.loads(batch[0].envelope)
        assert (envelope["type"], envelope["data"]) == (
            "execution.requested",
            {"execution_id": "e1"},
        )
        await mark_sent(conn, [m.id for m in batch])
    async with db.transaction() as conn:
        assert [m.id for m in await fetch_unsent(conn)] == [third]
        await mark_sent(conn, [])


async def test_purge_deletes_only_messages_sent_before_the_cutoff(db: Database) -> None:
    ids = await enqueue_requests(db, 3)
    async with db.transaction() as conn:
        await mark_sent(conn, ids[:2])
    async with db.transaction() as conn:
        assert await purge_sent(conn, utcnow() - timedelta(hours=1)) == 0
        assert await purge_sent(conn, utcnow() + timedelta(seconds=1)) == 2
    async with db.read() as conn:
        assert [m.id for m in await fetch_unsent(conn)] == [ids[2]]


@postgres_only
async def test_two_relays_fetching_at_once_get_disjoint_rows(db: Database) -> None:
    ids = await enqueue_requests(db, 10)
    async with db.transaction() as first:
        mine = await fetch_unsent(first, limit=4)
        async with db.transaction() as second:
            theirs = await fetch_unsent(second, limit=100)
        assert [m.id for m in mine] == ids[:4]
        assert [m.id for m in theirs] == ids[4:]


async def test_a_commit_in_this_process_wakes_the_relay(db: Database) -> None:
    waker = OutboxWaker()  # in-process only, whatever the database
    db.on_commit(waker.wake)
    assert await waker.wait(0.05) is False
    await enqueue_requests(db, 1)
    db.notify_committed()
    started = time.perf_counter()
    assert await waker.wait(5) is True
    assert time.perf_counter() - started < 0.05
    assert await waker.wait(0.05) is False  # one wake-up, consumed


async def listening_waker(db: Database) -> OutboxWaker:
    waker = OutboxWaker(db.engine.url.render_as_string(hide_password=False))
    await waker.start()
    assert await waker.wait_listening(10)
    assert await waker.wait(1)  # the wake-up every (re)connect gives
    return waker


@postgres_only
async def test_a_commit_in_another_process_wakes_the_relay_within_a_second(
    db: Database,
) -> None:
    waker = await listening_waker(db)
    other = create_database(db.engine.url.render_as_string(hide_password=False))
    try:
        async with other.transaction() as conn:
            await enqueue(conn, "execution.requested", "e1", {"execution_id": "e1"})
            assert await waker.wait(0.3) is False  # not before the commit
        started = time.perf_counter()
        assert await waker.wait(1.0) is True
        assert time.perf_counter() - started < 1.0
    finally:
        await waker.aclose()
        await other.dispose()


@postgres_only
async def test_the_listener_reconnects_after_its_connection_is_killed(db: Database) -> None:
    waker = await listening_waker(db)
    listener = text(
        "SELECT pid FROM pg_stat_activity WHERE application_name = :name "
        "AND datname = current_database() AND query LIKE 'LISTEN%'"
    ).bindparams(name=LISTENER_APPLICATION_NAME)
    try:
        async with db.transaction() as conn:
            [old] = (await conn.execute(listener)).scalars().all()
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": old})
        deadline = time.monotonic() + 10
        while waker.connects < 2:
            assert time.monotonic() < deadline, "the listener did not reconnect"
            await asyncio.sleep(0.05)
        assert await waker.wait(1)  # the reconnect's own wake-up
        async with db.transaction() as conn:
            assert (await conn.execute(listener)).scalars().all() != [old]
        await enqueue_requests(db, 1)  # no notify_committed: only NOTIFY can wake it
        assert await waker.wait(1.0) is True
    finally:
        await waker.aclose()


def test_listen_needs_a_postgres_url() -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        OutboxWaker("sqlite+aiosqlite:///x.db")
