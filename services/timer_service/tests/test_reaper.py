"""The lease reaper and retention, on SQLite and PostgreSQL: a lost execution is requested
again exactly once however many reapers run, and retention deletes only finished
executions past `LOOM_RETENTION_DAYS` -- both directly and as the timer's background
tasks."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta

import orjson
from sqlalchemy import select, update

from loom_db import Database, create_database, executions, graphs
from loom_db.models import executions as execution_rows
from loom_db.models import outbox
from loom_timer import TimerService, reap_lost

StartTimer = Callable[..., AbstractAsyncContextManager[TimerService]]

GRAPH = """\
name: work
nodes:
  a: {run: echo}
"""
DAY = timedelta(days=1)


async def new_execution(db: Database) -> str:
    async with db.transaction() as conn:
        await graphs.apply_graph(conn, GRAPH)  # "unchanged" after the first time
        record, _ = await executions.create_execution(
            conn,
            graph="work",
            graph_version=1,
            params={},
            trigger_type="manual",
            trigger_info={},
        )
    return record.id


async def lose_lease(db: Database, execution_id: str) -> None:
    """A worker claimed it a minute ago with a 30 s lease, then died."""
    async with db.transaction() as conn:
        claimed = await executions.claim(
            conn, execution_id, "dead-worker", 30, now=datetime.now(UTC) - timedelta(minutes=1)
        )
    assert claimed is not None


async def requests(db: Database) -> Counter[str]:
    """How many `execution.requested` the outbox holds per execution id."""
    async with db.read() as conn:
        rows = (await conn.execute(select(outbox.c.envelope))).all()
    envelopes = [orjson.loads(row.envelope) for row in rows]
    return Counter(
        e["data"]["execution_id"] for e in envelopes if e["type"] == "execution.requested"
    )


def second_connection(db: Database) -> Database:
    """Another process's view of the same database (its own pool)."""
    return create_database(db.engine.url.render_as_string(hide_password=False))


async def test_two_reapers_request_an_expired_lease_once(db: Database) -> None:
    lost = await new_execution(db)
    await lose_lease(db, lost)
    other = second_connection(db)
    try:
        first, second = await asyncio.gather(
            reap_lost(db, queued_after_seconds=300), reap_lost(other, queued_after_seconds=300)
        )
        assert sorted(first + second) == [lost]
        assert await reap_lost(other, queued_after_seconds=300) == []
    finally:
        await other.dispose()
    assert (await requests(db))[lost] == 2  # its creation's request, and the reaper's


async def test_a_reaper_pass_takes_every_lost_execution_batch_by_batch(db: Database) -> None:
    lost = [await new_execution(db) for _ in range(5)]
    for execution_id in lost:
        await lose_lease(db, execution_id)
    assert sorted(await reap_lost(db, queued_after_seconds=300, batch=2)) == sorted(lost)
    requested = await requests(db)
    assert [requested[execution_id] for execution_id in lost] == [2] * 5


async def test_the_reapers_of_two_timers_request_each_lost_execution_once(
    postgres_db: Database, start_timer: StartTimer
) -> None:
    """Two timer replicas reaping every 50 ms: two executions lost one after the other are
    each requested again once, and the replicas' counters add up to two."""
    other = second_connection(postgres_db)
    try:
        async with (
            start_timer(postgres_db, timer_reap_seconds=0.05) as one,
            start_timer(other, timer_reap_seconds=0.05) as two,
        ):
            for _ in range(2):
                lost = await new_execution(postgres_db)
                await lose_lease(postgres_db, lost)
                await wait_for_requests(postgres_db, lost, 2)
            metrics = [one.runtime.registry, two.runtime.registry]
            reaped = sum(
                r.get_sample_value("loom_timer_reaped_executions_total") or 0 for r in metrics
            )
    finally:
        await other.dispose()
    assert reaped == 2
    assert sorted((await requests(postgres_db)).values()) == [2, 2]


async def wait_for_requests(db: Database, execution_id: str, count: int) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while (await requests(db))[execution_id] < count:
        assert asyncio.get_running_loop().time() < deadline, f"{execution_id} not requested"
        await asyncio.sleep(0.05)


async def test_retention_deletes_finished_executions_older_than_the_retention_days(
    db: Database, start_timer: StartTimer
) -> None:
    now = datetime.now(UTC)
    ages = {"old finished": 40 * DAY, "old running": 40 * DAY, "recent finished": 2 * DAY}
    ids = {name: await new_execution(db) for name in ages}
    async with db.transaction() as conn:
        for name, age in ages.items():
            finished = {"status": "succeeded", "finished_at": now - age + timedelta(minutes=5)}
            await conn.execute(
                update(execution_rows)
                .where(execution_rows.c.id == ids[name])
                .values(
                    created_at=now - age,
                    **(finished if "finished" in name else {"status": "running"}),
                )
            )
    async with start_timer(db, retention_days=30) as service:  # retention runs at start
        deadline = asyncio.get_running_loop().time() + 20
        while await remaining(db) != {ids["old running"], ids["recent finished"]}:
            assert asyncio.get_running_loop().time() < deadline, "nothing deleted"
            await asyncio.sleep(0.05)
        deleted = service.runtime.registry.get_sample_value(
            "loom_timer_retention_deleted_executions_total"
        )
    assert deleted == 1


async def remaining(db: Database) -> set[str]:
    async with db.read() as conn:
        return set((await conn.execute(select(execution_rows.c.id))).scalars())
