"""Firing timer ticks into the executions table, on SQLite and PostgreSQL: exactly once
across replicas, catch-up after an outage, paused and deleted graphs, the outbox row of
each execution, the drift warning. Time is simulated: `now` is driven, nothing waits."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import select

from loom_db import Database, create_database, executions, graphs
from loom_db.graphs import TriggerRecord
from loom_db.models import executions as execution_rows
from loom_db.models import outbox
from loom_timer import FireResult, fire_due, last_tick

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)


def graph_yaml(trigger: str, name: str = "tick") -> str:
    return f"""\
name: {name}
params:
  target: {{type: string, default: linux}}
  count: {{type: integer, default: 3}}
triggers:
  - {{id: clock, {trigger}}}
nodes:
  a: {{run: echo}}
"""


async def add_graph(db: Database, trigger: str, name: str = "tick") -> TriggerRecord:
    async with db.transaction() as conn:
        await graphs.apply_graph(conn, graph_yaml(trigger, name))
        (record,) = [t for t in await graphs.list_triggers(conn) if t.graph == name]
    return record


async def fired_times(db: Database) -> list[str]:
    """`trigger.fire_time` of every timer execution, in time order (repeats kept)."""
    async with db.read() as conn:
        records, _ = await executions.list_executions(conn, trigger_type="timer", limit=1000)
    return sorted(record.trigger_info["fire_time"] for record in records)


async def requested_ids(db: Database) -> list[str]:
    """The execution ids of the `execution.requested` messages in the outbox."""
    async with db.read() as conn:
        rows = (await conn.execute(select(outbox.c.envelope).order_by(outbox.c.id))).all()
    envelopes = [orjson.loads(row.envelope) for row in rows]
    return [e["data"]["execution_id"] for e in envelopes if e["type"] == "execution.requested"]


def iso(tick: datetime) -> str:
    return tick.strftime("%Y-%m-%dT%H:%M:%SZ")


def ticks(results: list[FireResult]) -> list[datetime]:
    return [result.tick for result in results]


# --- exactly once across replicas ---------------------------------------------------------


async def test_every_second_fires_once_across_three_replicas(
    postgres_db: Database, postgres_url: str
) -> None:
    """Three timers on one PostgreSQL, an `every: 1s` trigger driven over 20 s in steps
    of 250 ms: each second is stored once, and exactly one replica says it created it."""
    trigger = await add_graph(postgres_db, "every: 1s, misfire_grace: 0s")
    replicas = [postgres_db, create_database(postgres_url), create_database(postgres_url)]
    created: Counter[datetime] = Counter()
    reported: Counter[datetime] = Counter()
    try:
        for step in range(81):
            now = T0 + step * timedelta(milliseconds=250)
            rounds = await asyncio.gather(*(fire_due(db, trigger, now) for db in replicas))
            for results in rounds:
                created.update(result.tick for result in results if result.created)
                reported.update(ticks(results))
    finally:
        for db in replicas[1:]:
            await db.dispose()
    expected = [T0 + n * SECOND for n in range(21)]
    assert await fired_times(postgres_db) == [iso(tick) for tick in expected]
    assert sorted(created) == expected and set(created.values()) == {1}
    assert sorted(reported) == expected
    # The replicas did race: the losers read the winner's execution back.
    assert sum(reported.values()) > len(expected), reported
    async with postgres_db.read() as conn:
        assert await last_tick(conn, "tick", "clock") == T0 + 20 * SECOND
        records, _ = await executions.list_executions(conn, limit=100)
    assert sorted(await requested_ids(postgres_db)) == sorted(record.id for record in records)


async def test_a_fired_tick_is_reported_not_created_by_a_second_call(db: Database) -> None:
    trigger = await add_graph(db, "every: 1m, misfire_grace: 10s")
    (first,) = await fire_due(db, trigger, T0)
    async with db.transaction() as conn:  # a replica that read the last tick too early
        record, created = await executions.create_execution(
            conn,
            graph="tick",
            graph_version=1,
            params={},
            trigger_type="timer",
            trigger_info={"fire_time": iso(T0), "trigger_id": "clock"},
            idempotency_key=executions.timer_key("tick", "clock", T0),
        )
    assert first.created and not created and record == first.execution
    assert await fire_due(db, trigger, T0 + SECOND) == []  # the last tick is T0


# --- what an execution holds --------------------------------------------------------------


async def test_a_tick_creates_a_queued_timer_execution_and_its_request(db: Database) -> None:
    trigger = await add_graph(db, "cron: '*/5 * * * *', misfire_grace: 10s")
    (result,) = await fire_due(db, trigger, T0 + 10 * SECOND)
    record = result.execution
    assert result.created and result.tick == T0 and result.lateness == 10 * SECOND
    assert record.status == "queued" and record.graph == "tick" and record.graph_version == 1
    assert record.trigger_type == "timer"
    assert record.trigger_info == {"fire_time": "2026-11-23T10:00:00Z", "trigger_id": "clock"}
    assert record.params == {"target": "linux", "count": 3}
    assert record.idempotency_key == "timer:tick:clock:2026-11-23T10:00:00Z"
    assert await requested_ids(db) == [record.id]


# --- catch-up after an outage -------------------------------------------------------------

OUTAGE_END = T0 + 10 * MINUTE + 30 * SECOND
"""Every replica was down from just after T0 until here: ticks 10:01 ... 10:10 missed,
all later than the 10 s grace."""


@pytest.mark.parametrize(
    ("catch_up", "expected"),
    [
        ("none", []),
        ("latest", [T0 + 10 * MINUTE]),
        ("all", [T0 + n * MINUTE for n in range(1, 11)]),
    ],
)
async def test_catch_up_after_an_outage(
    db: Database, catch_up: str, expected: list[datetime]
) -> None:
    trigger = await add_graph(db, f"every: 1m, misfire_grace: 10s, catch_up: {catch_up}")
    assert ticks(await fire_due(db, trigger, T0)) == [T0]
    results = await fire_due(db, trigger, OUTAGE_END)
    assert ticks(results) == expected and all(result.created for result in results)
    assert await fired_times(db) == [iso(tick) for tick in [T0, *expected]]
    # Whatever was dropped stays dropped: the next on-time tick fires alone.
    assert ticks(await fire_due(db, trigger, T0 + 11 * MINUTE)) == [T0 + 11 * MINUTE]
    assert len(await requested_ids(db)) == len(expected) + 2


async def test_catch_up_all_is_fired_in_bounded_batches_oldest_first(db: Database) -> None:
    trigger = await add_graph(db, "every: 1m, misfire_grace: 10s, catch_up: all")
    await fire_due(db, trigger, T0)
    batches = []
    while batch := await fire_due(db, trigger, OUTAGE_END, limit=4):
        batches.append(ticks(batch))
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert sum(batches, []) == [T0 + n * MINUTE for n in range(1, 11)]


async def test_a_new_trigger_fires_only_on_time_ticks(db: Database) -> None:
    """Nothing stored: no tick counts as missed (a new trigger has missed nothing)."""
    trigger = await add_graph(db, "every: 1m, misfire_grace: 10s, catch_up: all")
    assert await fire_due(db, trigger, T0 + 30 * SECOND) == []
    assert ticks(await fire_due(db, trigger, T0 + MINUTE + 5 * SECOND)) == [T0 + MINUTE]


# --- paused, deleted, changed -------------------------------------------------------------


async def test_a_paused_graph_fires_nothing(db: Database) -> None:
    trigger = await add_graph(db, "every: 1s")
    async with db.transaction() as conn:
        await graphs.set_enabled(conn, "tick", False)
    assert await fire_due(db, trigger, T0) == []
    assert await fired_times(db) == [] and await requested_ids(db) == []


async def test_a_deleted_graph_fires_nothing(db: Database) -> None:
    trigger = await add_graph(db, "every: 1s")
    async with db.transaction() as conn:
        await graphs.delete_graph(conn, "tick")
    assert await fire_due(db, trigger, T0) == []
    assert await fired_times(db) == []


async def test_a_trigger_removed_from_the_graph_fires_nothing(db: Database) -> None:
    trigger = await add_graph(db, "every: 1s")
    async with db.transaction() as conn:
        await graphs.apply_graph(conn, "name: tick\nnodes:\n  a: {run: echo}\n")
    assert await fire_due(db, trigger, T0) == []


# --- delay triggers -----------------------------------------------------------------------


async def test_a_delay_trigger_waits_for_the_end_of_its_previous_run(db: Database) -> None:
    """First run 10 s after the trigger's graph version was stored, then 10 s after the
    end of the previous run -- never while it is still queued or running."""
    trigger = await add_graph(db, "delay: 10s")
    async with db.read() as conn:
        (version,) = await graphs.list_versions(conn, "tick")
    created = version.created_at
    anchor = created.replace(microsecond=0) + (SECOND if created.microsecond else timedelta(0))
    (first,) = await fire_due(db, trigger, anchor + 10 * SECOND)
    assert first.tick == anchor + 10 * SECOND
    assert await fire_due(db, trigger, first.tick + MINUTE) == []  # not ended yet
    end = first.tick + 30 * SECOND
    async with db.transaction() as conn:
        await conn.execute(
            execution_rows.update()
            .where(execution_rows.c.id == first.execution.id)
            .values(status="succeeded", finished_at=end)
        )
    (second,) = await fire_due(db, trigger, end + 10 * SECOND)
    assert second.tick == end + 10 * SECOND


# --- drift ----------------------------------------------------------------------------------


async def test_a_late_tick_is_logged_as_a_warning(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    trigger = await add_graph(db, "every: 1m, misfire_grace: 10s")
    with caplog.at_level(logging.WARNING, logger="loom.timer"):
        await fire_due(db, trigger, T0 + timedelta(milliseconds=50))
        assert caplog.records == []
        await fire_due(db, trigger, T0 + MINUTE + 5 * SECOND)
    (line,) = caplog.records
    assert "tick/clock" in line.getMessage() and "2026-11-23T10:01:00Z" in line.getMessage()
    assert "by 5.000s" in line.getMessage()


async def test_a_new_trigger_does_not_fire_ticks_from_before_its_graph_existed(
    db: Database,
) -> None:
    """`every: 1s` with the default 60 s misfire grace, first woken 3.5 s after the graph
    was applied: the ticks since then, not the minute before."""
    trigger = await add_graph(db, "every: 1s")
    async with db.read() as conn:
        created = (await graphs.get_graph(conn, "tick")).created_at

    fired = await fire_due(db, trigger, created + timedelta(seconds=3.5))

    assert 3 <= len(fired) <= 4
    assert all(result.tick > created for result in fired)


async def test_a_remembered_last_tick_skips_the_read_and_never_fires_twice(
    db: Database,
) -> None:
    """Replica A remembers its last tick; replica B fired the next one meanwhile: A's
    wake-up finds it by its key and creates nothing."""
    trigger = await add_graph(db, "every: 1m, misfire_grace: 10s")
    (first,) = await fire_due(db, trigger, T0 + MINUTE + SECOND)
    (by_b,) = await fire_due(db, trigger, T0 + 2 * MINUTE + SECOND)

    (by_a,) = await fire_due(db, trigger, T0 + 2 * MINUTE + 2 * SECOND, known_last=first.tick)

    assert by_b.created and not by_a.created and by_a.execution == by_b.execution
    assert await fired_times(db) == sorted(set(await fired_times(db)))
    assert len(await fired_times(db)) == 2
