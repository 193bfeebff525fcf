"""Executions on SQLite and PostgreSQL: idempotent creation, listing, leases, admission,
finish, the reaper and cancel — each concurrent case raced through separate transactions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db.database import Database, create_database
from loom_db.errors import Conflict, NotFound
from loom_db.executions import (
    ExecutionRecord,
    OnOverlap,
    admit,
    claim,
    create_execution,
    finish,
    get_execution,
    last_timer_tick,
    list_executions,
    reap,
    release,
    renew,
    request_cancel,
    rest_key,
    timer_key,
    webhook_key,
)
from loom_db.models import executions, graphs, outbox
from loom_db.types import utcnow

T = TypeVar("T")
GRAPH = "build"
Message = tuple[str, str, str, dict[str, Any]]


# --- helpers ----------------------------------------------------------------------------


async def add_graph(db: Database, name: str = GRAPH) -> None:
    now = utcnow()
    async with db.transaction() as conn:
        await conn.execute(
            insert(graphs).values(
                name=name, version=1, enabled=True, created_at=now, updated_at=now
            )
        )


async def create(
    db: Database,
    *,
    graph: str = GRAPH,
    key: str | None = None,
    params: dict[str, Any] | None = None,
    trigger_type: str = "manual",
) -> ExecutionRecord:
    async with db.transaction() as conn:
        record, _ = await create_execution(
            conn,
            graph=graph,
            graph_version=1,
            params=params or {},
            trigger_type=trigger_type,
            trigger_info={"user": "alice"},
            idempotency_key=key,
        )
    return record


async def get(db: Database, execution_id: str) -> ExecutionRecord:
    async with db.read() as conn:
        return await get_execution(conn, execution_id)


async def messages(db: Database) -> list[Message]:
    """The outbox as (channel, key, type, data), in write order."""
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(outbox.c.channel, outbox.c.key, outbox.c.envelope).order_by(outbox.c.id)
            )
        ).all()
    decoded = [(row.channel, row.key, orjson.loads(row.envelope)) for row in rows]
    return [(channel, key, env["type"], env["data"]) for channel, key, env in decoded]


def requested(record: ExecutionRecord) -> Message:
    data = {"execution_id": record.id, "graph": record.graph}
    return ("queue", record.id, "execution.requested", data)


async def race(
    db: Database, n: int, body: Callable[[AsyncConnection, int], Awaitable[T]]
) -> list[T]:
    """Run `body` in `n` concurrent transactions, each on its own pooled connection.

    On PostgreSQL every transaction holds its connection before any statement runs; on
    SQLite they queue on BEGIN IMMEDIATE and the busy timeout (single writer)."""
    barrier = asyncio.Barrier(n) if db.is_postgres else None

    async def one(i: int) -> T:
        async with db.transaction() as conn:
            if barrier is not None:
                await barrier.wait()
            return await body(conn, i)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def run(db: Database, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    async with db.transaction() as conn:
        return await body(conn)


async def start(
    db: Database,
    record: ExecutionRecord,
    worker: str,
    now: datetime | None = None,
    *,
    concurrency: int | None = None,
    on_overlap: OnOverlap = "queue",
) -> str:
    """Claim and admit in one transaction, as a worker does."""

    async def body(conn: AsyncConnection) -> str:
        assert await claim(conn, record.id, worker, 30, now=now) is not None
        return await admit(
            conn, record.id, worker, 30, concurrency=concurrency, on_overlap=on_overlap, now=now
        )

    return await run(db, body)


# --- creation and idempotency -----------------------------------------------------------


async def test_create_writes_a_queued_execution_and_its_request_in_one_transaction(
    db: Database,
) -> None:
    record = await create(db, params={"branch": "main"}, trigger_type="webhook")
    stored = await get(db, record.id)
    assert stored == record
    assert stored.status == "queued" and stored.params == {"branch": "main"}
    assert stored.trigger_type == "webhook" and stored.trigger_info == {"user": "alice"}
    assert stored.created_at.tzinfo is UTC and abs(utcnow() - stored.created_at) < timedelta(
        seconds=5
    )
    assert stored.worker_id is None and stored.started_at is None and not stored.finished
    assert await messages(db) == [requested(record)]


async def test_a_failed_transaction_leaves_neither_execution_nor_message(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await create_execution(
                conn,
                graph=GRAPH,
                graph_version=1,
                params={},
                trigger_type="manual",
                trigger_info={},
            )
            raise RuntimeError("boom")
    async with db.read() as conn:
        assert (await list_executions(conn))[0] == []
    assert await messages(db) == []


async def test_a_duplicate_key_returns_the_existing_execution_without_a_second_row(
    db: Database,
) -> None:
    key = rest_key(GRAPH, "alice", "abc")
    first = await create(db, key=key, params={"n": 1})
    async with db.transaction() as conn:
        again, created = await create_execution(
            conn,
            graph=GRAPH,
            graph_version=1,
            params={"n": 2},
            trigger_type="manual",
            trigger_info={},
            idempotency_key=key,
        )
    assert created is False
    assert again == first and again.params == {"n": 1}
    assert await messages(db) == [requested(first)]


async def test_twenty_concurrent_inserts_of_one_key_make_exactly_one_row(db: Database) -> None:
    key = timer_key(GRAPH, "cron-1a2b3c4d5e6f", "2026-11-23T10:15:00Z")

    async def insert_one(conn: AsyncConnection, i: int) -> tuple[ExecutionRecord, bool]:
        return await create_execution(
            conn,
            graph=GRAPH,
            graph_version=1,
            params={"replica": i},
            trigger_type="timer",
            trigger_info={"fire_time": "2026-11-23T10:15:00Z"},
            idempotency_key=key,
        )

    results = await race(db, 20, insert_one)
    assert sum(created for _, created in results) == 1
    assert len({record.id for record, _ in results}) == 1
    async with db.read() as conn:
        count = (await conn.execute(select(func.count()).select_from(executions))).scalar()
    assert count == 1
    assert await messages(db) == [requested(results[0][0])]


async def test_key_namespaces_never_collide(db: Database) -> None:
    assert rest_key("g", "alice", "k1") == "rest:g:alice:k1"
    assert webhook_key("g", "default", "d-1") == "webhook:g:default:d-1"
    assert timer_key("g", "cron-x", datetime(2026, 11, 23, 10, 15, tzinfo=UTC)) == (
        "timer:g:cron-x:2026-11-23T10:15:00Z"
    )
    # A colon in a middle part cannot make two different triples spell one key.
    assert rest_key("g", "a:b", "c") != rest_key("g", "a", "b:c")
    keys = [rest_key("g", "x", "1"), webhook_key("g", "x", "1"), timer_key("g", "x", "1")]
    ids = {(await create(db, graph="g", key=key)).id for key in keys}
    assert len(ids) == 3


async def test_the_last_timer_tick_is_the_newest_fire_time_of_that_trigger(
    db: Database,
) -> None:
    """Newest by time, not by insertion order nor as text (`05Z` is before `05.25Z`)."""

    async def fire(graph: str, trigger_id: str, fire_time: str, kind: str = "timer") -> None:
        async with db.transaction() as conn:
            await create_execution(
                conn,
                graph=graph,
                graph_version=1,
                params={},
                trigger_type=kind,
                trigger_info={"fire_time": fire_time, "trigger_id": trigger_id},
                idempotency_key=f"{kind}:{graph}:{trigger_id}:{fire_time}",
            )

    async def last(graph: str, trigger_id: str) -> datetime | None:
        async with db.read() as conn:
            return await last_timer_tick(conn, graph, trigger_id)

    assert await last(GRAPH, "every-a") is None
    for fire_time in (
        "2026-11-23T10:15:05Z",
        "2026-11-23T10:15:05.250000Z",
        "2026-11-23T09:00:00Z",
    ):
        await fire(GRAPH, "every-a", fire_time)
    await fire(GRAPH, "every-b", "2026-11-23T11:00:00Z")  # another trigger
    await fire("other", "every-a", "2026-11-23T12:00:00Z")  # another graph
    await fire(GRAPH, "every-a", "2026-11-23T13:00:00Z", kind="manual")  # not a timer
    assert await last(GRAPH, "every-a") == datetime(2026, 11, 23, 10, 15, 5, 250000, tzinfo=UTC)
    assert await last(GRAPH, "every-b") == datetime(2026, 11, 23, 11, tzinfo=UTC)
    assert await last("other", "every-b") is None


async def test_bad_arguments_are_value_errors(db: Database) -> None:
    async with db.transaction() as conn:
        with pytest.raises(ValueError, match="trigger type"):
            await create_execution(
                conn, graph=GRAPH, graph_version=1, params={}, trigger_type="cron", trigger_info={}
            )
        with pytest.raises(ValueError, match="idempotency key"):
            await create_execution(
                conn,
                graph=GRAPH,
                graph_version=1,
                params={},
                trigger_type="manual",
                trigger_info={},
                idempotency_key="k" * 401,
            )


# --- reading and listing ----------------------------------------------------------------


async def test_an_unknown_execution_is_not_found(db: Database) -> None:
    async with db.read() as conn:
        with pytest.raises(NotFound):
            await get_execution(conn, "no-such-id")


async def test_list_is_newest_first_and_filters(db: Database) -> None:
    a = await create(db, graph="a")
    b = await create(db, graph="b", trigger_type="timer")
    c = await create(db, graph="a", trigger_type="webhook")
    async with db.transaction() as conn:
        await request_cancel(conn, c.id, "alice")
    async with db.read() as conn:
        assert [r.id for r in (await list_executions(conn))[0]] == [c.id, b.id, a.id]
        assert [r.id for r in (await list_executions(conn, graph="a"))[0]] == [c.id, a.id]
        assert [r.id for r in (await list_executions(conn, status="cancelled"))[0]] == [c.id]
        assert [r.id for r in (await list_executions(conn, trigger_type="timer"))[0]] == [b.id]
        assert (await list_executions(conn, graph="a", status="running"))[0] == []
        page, cursor = await list_executions(conn, limit=2)
        assert [r.id for r in page] == [c.id, b.id] and cursor is not None
        page, cursor = await list_executions(conn, limit=2, cursor=cursor)
        assert [r.id for r in page] == [a.id] and cursor is None
        for bad in ("garbage!", "", "W10"):
            with pytest.raises(ValueError, match="cursor"):
                await list_executions(conn, cursor=bad)
        with pytest.raises(ValueError, match="limit"):
            await list_executions(conn, limit=0)
        with pytest.raises(ValueError, match="status"):
            await list_executions(conn, status="done")


async def test_pages_neither_skip_nor_repeat_while_rows_are_inserted(db: Database) -> None:
    before = {(await create(db)).id for _ in range(40)}
    stop = asyncio.Event()

    async def writer() -> int:
        inserted = 0
        while not stop.is_set():
            await create(db)
            inserted += 1
            await asyncio.sleep(0.001)
        return inserted

    task = asyncio.create_task(writer())
    seen: list[ExecutionRecord] = []
    cursor: str | None = None
    await asyncio.sleep(0.01)
    while True:
        async with db.read() as conn:
            page, cursor = await list_executions(conn, limit=3, cursor=cursor)
        seen.extend(page)
        await asyncio.sleep(0.003)
        if cursor is None:
            break
    stop.set()
    assert await task > 0
    ids = [r.id for r in seen]
    assert len(ids) == len(set(ids)), "a row was repeated"
    assert before <= set(ids), "a row was skipped"
    positions = [(r.created_at, r.id) for r in seen]
    assert positions == sorted(positions, reverse=True)


# --- leases -----------------------------------------------------------------------------


async def test_of_two_claimers_on_two_engines_exactly_one_wins(db: Database) -> None:
    other = create_database(db.engine.url.render_as_string(hide_password=False))
    try:
        for _ in range(5):
            record = await create(db)
            barrier = asyncio.Barrier(2) if db.is_postgres else None

            async def attempt(
                database: Database,
                worker: str,
                record: ExecutionRecord = record,
                barrier: asyncio.Barrier | None = barrier,
            ) -> ExecutionRecord | None:
                async with database.transaction() as conn:
                    if barrier is not None:
                        await barrier.wait()
                    return await claim(conn, record.id, worker, 30)

            results = await asyncio.gather(attempt(db, "w1"), attempt(other, "w2"))
            winners = [r for r in results if r is not None]
            assert len(winners) == 1
            assert (await get(db, record.id)).worker_id == winners[0].worker_id
    finally:
        await other.dispose()


async def test_claim_respects_live_leases_and_finished_executions(db: Database) -> None:
    t0 = utcnow()
    record = await create(db)
    claimed = await run(db, lambda conn: claim(conn, record.id, "w1", 30, now=t0))
    assert claimed is not None and claimed.worker_id == "w1"
    assert claimed.lease_expires_at == t0 + timedelta(seconds=30)
    # Another worker is refused while the lease lives; the holder may claim again.
    assert (
        await run(db, lambda c: claim(c, record.id, "w2", 30, now=t0 + timedelta(seconds=29)))
        is None
    )
    assert await run(db, lambda c: claim(c, record.id, "w1", 30, now=t0 + timedelta(seconds=29)))
    # After it expired, anyone may take it over.
    later = t0 + timedelta(seconds=60)
    taken = await run(db, lambda c: claim(c, record.id, "w2", 30, now=later))
    assert taken is not None and taken.worker_id == "w2"
    await run(db, lambda c: finish(c, record.id, "succeeded"))
    assert (
        await run(db, lambda c: claim(c, record.id, "w3", 30, now=later + timedelta(hours=1)))
        is None
    )
    assert await run(db, lambda c: claim(c, "no-such-id", "w3", 30)) is None


async def test_renew_extends_only_the_holders_lease_and_release_gives_it_up(db: Database) -> None:
    record = await create(db)
    t0 = utcnow()
    await run(db, lambda c: claim(c, record.id, "w1", 30, now=t0))
    assert await run(db, lambda c: renew(c, record.id, "w1", 30, now=t0 + timedelta(seconds=10)))
    assert (await get(db, record.id)).lease_expires_at == t0 + timedelta(seconds=40)
    assert not await run(db, lambda c: renew(c, record.id, "w2", 30))
    await run(db, lambda c: release(c, record.id, "w2"))  # not the holder: nothing happens
    assert (await get(db, record.id)).worker_id == "w1"
    await run(db, lambda c: release(c, record.id, "w1"))
    stored = await get(db, record.id)
    assert stored.worker_id is None and stored.lease_expires_at is None
    assert not await run(db, lambda c: renew(c, record.id, "w1", 30))
    assert await messages(db) == [requested(record)]


async def test_release_with_requeue_writes_a_fresh_request(db: Database) -> None:
    await add_graph(db)
    record = await create(db)
    assert await start(db, record, "w1") == "running"
    await run(db, lambda c: release(c, record.id, "w1", requeue=True))
    stored = await get(db, record.id)
    assert stored.status == "running" and stored.worker_id is None
    assert await messages(db) == [requested(record), requested(record)]
    # The reaper does not double that request while it is pending.
    assert await run(db, lambda c: reap(c)) == []
    taken = await run(db, lambda c: claim(c, record.id, "w2", 30))
    assert taken is not None and taken.worker_id == "w2"


# --- admission and finish ---------------------------------------------------------------


@pytest.mark.parametrize("policy", ["queue", "skip", "cancel_running"])
async def test_ten_concurrent_admissions_with_concurrency_one(
    db: Database, policy: OnOverlap
) -> None:
    await add_graph(db)
    records = [await create(db) for _ in range(10)]

    async def claim_and_admit(conn: AsyncConnection, i: int) -> str:
        worker = f"w{i}"
        assert await claim(conn, records[i].id, worker, 30) is not None
        return await admit(conn, records[i].id, worker, 30, concurrency=1, on_overlap=policy)

    outcomes = await race(db, 10, claim_and_admit)
    other = "skipped" if policy == "skip" else "waiting"
    assert sorted(outcomes) == sorted(["running"] + [other] * 9)
    stored = [await get(db, r.id) for r in records]
    [running] = [r for r in stored if r.status == "running"]
    assert running.started_at is not None and running.worker_id is not None
    assert running.lease_expires_at is not None
    rest = [r for r in stored if r.id != running.id]
    assert {r.status for r in rest} == {other}
    assert all(r.worker_id is None and r.lease_expires_at is None for r in rest)
    if policy == "skip":
        assert all(r.finished_at is not None for r in rest)

    sent = await messages(db)
    cancels = [m for m in sent if m[2] == "execution.cancel"]
    if policy == "cancel_running":
        # Asked once, however many newcomers overlapped it.
        assert running.cancel_requested
        assert [(m[0], m[1], m[3]["execution_id"]) for m in cancels] == [
            ("control", running.id, running.id)
        ]
        assert cancels[0][3]["by"].startswith("on_overlap:")
    else:
        assert cancels == [] and not running.cancel_requested

    released = await run(db, lambda c: finish(c, running.id, "succeeded"))
    done = await get(db, running.id)
    assert done.status == "succeeded" and done.finished_at is not None and done.worker_id is None
    if policy == "skip":
        assert released is None
        assert await messages(db) == sent
    else:
        oldest = min(rest, key=lambda r: (r.created_at, r.id))
        assert released == oldest.id
        assert await messages(db) == [*sent, requested(oldest)]
    # Finishing twice changes nothing.
    assert await run(db, lambda c: finish(c, running.id, "failed")) is None
    assert (await get(db, running.id)).status == "succeeded"


async def test_each_finish_releases_a_different_waiting_execution(db: Database) -> None:
    await add_graph(db)
    a, b, c, d = [await create(db) for _ in range(4)]

    outcomes = [await start(db, r, f"w-{i}", concurrency=2) for i, r in enumerate((a, b, c, d))]
    assert outcomes == [
        "running",
        "running",
        "waiting",
        "waiting",
    ]
    assert await run(db, lambda conn: finish(conn, a.id, "succeeded")) == c.id
    assert await run(db, lambda conn: finish(conn, b.id, "failed", error="exit 1")) == d.id
    assert (await get(db, b.id)).error == "exit 1"
    assert await start(db, c, "w-c", concurrency=2) == "running"
    assert await start(db, d, "w-d", concurrency=2) == "running"


async def test_admitting_with_free_slots_also_requests_the_oldest_waiting(db: Database) -> None:
    """Raising a graph's concurrency drains its waiting executions."""
    await add_graph(db)
    a, b, c = [await create(db) for _ in range(3)]
    for i, record in enumerate((a, b)):
        await start(db, record, f"w{i}", concurrency=1)
    before = await messages(db)
    await run(db, lambda conn: claim(conn, c.id, "w2", 30))
    outcome = await run(
        db, lambda conn: admit(conn, c.id, "w2", 30, concurrency=3, on_overlap="queue")
    )
    assert outcome == "running"
    assert await messages(db) == [*before, requested(b)]


async def test_admission_refuses_what_the_worker_does_not_own(db: Database) -> None:
    await add_graph(db)
    record = await create(db)
    with pytest.raises(Conflict):
        await run(db, lambda c: admit(c, record.id, "w1", 30, concurrency=1, on_overlap="queue"))
    await run(db, lambda c: claim(c, record.id, "w1", 30))
    await run(db, lambda c: request_cancel(c, record.id, "alice"))
    with pytest.raises(Conflict, match="cancelled"):
        await run(db, lambda c: admit(c, record.id, "w1", 30, concurrency=1, on_overlap="queue"))
    orphan = await create(db, graph="deleted")
    await run(db, lambda c: claim(c, orphan.id, "w1", 30))
    with pytest.raises(NotFound, match="graph"):
        await run(db, lambda c: admit(c, orphan.id, "w1", 30, concurrency=1, on_overlap="queue"))
    with pytest.raises(NotFound):
        await run(db, lambda c: finish(c, "no-such-id", "succeeded"))
    with pytest.raises(ValueError):
        await run(db, lambda c: finish(c, record.id, "running"))


# --- the reaper -------------------------------------------------------------------------


async def test_the_reaper_requests_executions_whose_lease_expired(db: Database) -> None:
    await add_graph(db)
    t0 = utcnow()
    dead, alive, claimed, done = [await create(db) for _ in range(4)]
    assert await start(db, dead, "w1", now=t0) == "running"
    assert await start(db, alive, "w2", now=t0 + timedelta(seconds=50)) == "running"
    await run(db, lambda c: claim(c, claimed.id, "w3", 30, now=t0))  # never admitted
    assert await start(db, done, "w4", now=t0) == "running"
    await run(db, lambda c: finish(c, done.id, "succeeded"))
    before = await messages(db)

    reaped = await run(db, lambda c: reap(c, now=t0 + timedelta(seconds=60)))
    assert reaped == [dead.id, claimed.id]
    assert await messages(db) == [*before, requested(dead), requested(claimed)]
    # The next pass leaves them alone while their new message is pending.
    assert await run(db, lambda c: reap(c, now=t0 + timedelta(seconds=61))) == []

    # A reaped running execution stays running; its old worker lost the lease, and the
    # next claimer takes it over and resumes it.
    stored = await get(db, dead.id)
    assert stored.status == "running" and stored.worker_id is None
    assert not await run(db, lambda c: renew(c, dead.id, "w1", 30))
    assert await start(db, dead, "w9", now=t0 + timedelta(seconds=62)) == "running"
    assert (await get(db, dead.id)).worker_id == "w9"


async def test_the_reaper_requests_queued_executions_nobody_claimed(db: Database) -> None:
    record = await create(db)
    now = utcnow()
    assert await run(db, lambda c: reap(c, now=now)) == []
    later = now + timedelta(seconds=301)
    assert await run(db, lambda c: reap(c, now=later, queued_after_seconds=300)) == [record.id]
    assert await messages(db) == [requested(record), requested(record)]
    assert (await get(db, record.id)).status == "queued"


async def test_two_concurrent_reapers_request_each_execution_once(db: Database) -> None:
    t0 = utcnow()
    records = [await create(db) for _ in range(6)]
    async with db.transaction() as conn:
        for record in records:
            assert await claim(conn, record.id, "dead-worker", 30, now=t0) is not None
    before = await messages(db)
    results = await race(db, 2, lambda c, _i: reap(c, now=t0 + timedelta(seconds=60)))
    assert sorted(results[0] + results[1]) == sorted(r.id for r in records)
    assert not set(results[0]) & set(results[1])
    new = (await messages(db))[len(before) :]
    assert sorted(m[1] for m in new) == sorted(r.id for r in records)
    assert {m[2] for m in new} == {"execution.requested"}


# --- cancel -----------------------------------------------------------------------------


async def test_cancelling_a_queued_execution_ends_it_at_once(db: Database) -> None:
    record = await create(db)
    cancelled = await run(db, lambda c: request_cancel(c, record.id, "alice"))
    assert cancelled.status == "cancelled" and cancelled.cancel_requested
    assert cancelled.finished_at is not None
    assert await get(db, record.id) == cancelled
    assert await messages(db) == [requested(record)]


async def test_cancelling_a_running_execution_asks_its_worker(db: Database) -> None:
    await add_graph(db)
    record = await create(db)
    await start(db, record, "w1")
    flagged = await run(db, lambda c: request_cancel(c, record.id, "alice"))
    assert flagged.status == "running" and flagged.cancel_requested
    cancel = ("control", record.id, "execution.cancel", {"execution_id": record.id, "by": "alice"})
    assert await messages(db) == [requested(record), cancel]
    # Once it ended, a cancel returns it as it is and sends nothing.
    await run(db, lambda c: finish(c, record.id, "cancelled"))
    again = await run(db, lambda c: request_cancel(c, record.id, "bob"))
    assert again.status == "cancelled"
    assert await messages(db) == [requested(record), cancel]
    with pytest.raises(NotFound):
        await run(db, lambda c: request_cancel(c, "no-such-id", "alice"))


async def test_cancelling_a_released_waiting_execution_passes_the_wake_up_on(db: Database) -> None:
    await add_graph(db)
    a, b, c = [await create(db) for _ in range(3)]
    for i, record in enumerate((a, b, c)):
        await start(db, record, f"w{i}", concurrency=1)
    assert await run(db, lambda conn: finish(conn, a.id, "succeeded")) == b.id
    before = await messages(db)
    await run(db, lambda conn: request_cancel(conn, b.id, "alice"))
    assert await messages(db) == [*before, requested(c)]


# --- lock order (found in review: deadlocks on PostgreSQL) -------------------------------


async def test_a_worker_finishing_after_writing_node_runs_does_not_deadlock_with_a_cancel(
    db: Database,
) -> None:
    from loom_db.node_runs import record_node

    await add_graph(db)
    record = await create(db)
    assert await start(db, record, "w1") == "running"

    async def worker() -> None:
        async with db.transaction() as conn:
            await record_node(
                conn, record.id, node="a", name="a", index=None, attempt=1, status="succeeded"
            )
            await asyncio.sleep(0.5)
            await finish(conn, record.id, "succeeded")

    async def canceller() -> None:
        await asyncio.sleep(0.2)
        async with db.transaction() as conn:
            await request_cancel(conn, record.id, "alice")

    await asyncio.gather(worker(), canceller())
    assert (await get(db, record.id)).status == "succeeded"


async def test_claim_and_admit_in_one_transaction_do_not_deadlock_with_a_cancel(
    db: Database,
) -> None:
    await add_graph(db)
    record = await create(db)

    async def worker() -> str:
        async with db.transaction() as conn:
            assert await claim(conn, record.id, "w1", 30) is not None
            await asyncio.sleep(0.5)
            return await admit(conn, record.id, "w1", 30, concurrency=1, on_overlap="queue")

    async def canceller() -> None:
        await asyncio.sleep(0.2)
        async with db.transaction() as conn:
            await request_cancel(conn, record.id, "alice")

    results = await asyncio.gather(worker(), canceller(), return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)], results


async def test_a_woken_waiting_execution_is_not_overtaken_by_a_newcomer(db: Database) -> None:
    await add_graph(db)
    first, second = await create(db), await create(db)
    assert await start(db, first, "w1", concurrency=1) == "running"
    assert await start(db, second, "w2", concurrency=1) == "waiting"
    await run(db, lambda conn: finish(conn, first.id, "succeeded"))  # wakes `second`
    newcomer = await create(db)
    assert await start(db, newcomer, "w3", concurrency=1) == "waiting"
    assert await start(db, second, "w2", concurrency=1) == "running"
