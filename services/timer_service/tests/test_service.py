"""The timer service in-process, on SQLite and PostgreSQL, in real time: its jobs follow
`graph.changed` (apply, pause, resume, delete), a resync changes only what changed,
`delay` triggers wait for the end of their previous run, ticks missed while every
replica was down are caught up at start, and a database outage does not stop it.
Nothing here asserts a duration: every wait is for a condition, with a generous limit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from loom_common import format_instant
from loom_db import Database, create_database, graphs
from loom_db.migrate import upgrade
from loom_db.models import executions as execution_rows
from loom_db.testing import private_postgres
from loom_timer import TimerService, fire_due

StartTimer = Callable[..., AbstractAsyncContextManager[TimerService]]

SECOND = timedelta(seconds=1)
HOUR = timedelta(hours=1)
FAR = "0 0 1 1 *"  # once a year: a job that exists but does not fire during a test


def graph_yaml(name: str, trigger: str, trigger_id: str = "clock", description: str = "") -> str:
    return f"""\
name: {name}
description: "{description}"
triggers:
  - {{id: {trigger_id}, {trigger}}}
nodes:
  a: {{run: echo}}
"""


async def apply(db: Database, source: str) -> None:
    async with db.transaction() as conn:
        await graphs.apply_graph(conn, source)
    db.notify_committed()


async def set_enabled(db: Database, name: str, enabled: bool) -> None:
    async with db.transaction() as conn:
        await graphs.set_enabled(conn, name, enabled)
    db.notify_committed()


async def delete(db: Database, name: str) -> None:
    async with db.transaction() as conn:
        await graphs.delete_graph(conn, name)
    db.notify_committed()


async def fire_times(db: Database, graph: str) -> list[str]:
    """`trigger.fire_time` of the graph's timer executions, in time order (repeats kept)."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(execution_rows.c.trigger_info).where(
                execution_rows.c.graph == graph, execution_rows.c.trigger_type == "timer"
            )
        )
        return sorted(info["fire_time"] for (info,) in rows)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"not within {within:g}s: {what}"
        await asyncio.sleep(0.05)


async def fired_at_least(db: Database, graph: str, count: int) -> None:
    async def check() -> bool:
        return len(await fire_times(db, graph)) >= count

    await eventually(check, f"{graph} fired {count} tick(s)")


def parse(fire_time: str) -> datetime:
    return datetime.fromisoformat(fire_time.replace("Z", "+00:00"))


def consecutive_seconds(times: list[str]) -> bool:
    instants = [parse(t) for t in times]
    return all(b - a == SECOND for a, b in zip(instants, instants[1:], strict=False))


def ceil_second(instant: datetime) -> datetime:
    whole = instant.replace(microsecond=0)
    return whole + SECOND if instant.microsecond else whole


# --- following the graphs ----------------------------------------------------------------


async def test_jobs_follow_apply_pause_resume_and_delete_through_graph_changed(
    db: Database, start_timer: StartTimer
) -> None:
    """The periodic resync is off (an hour): only `graph.changed` can move the jobs."""
    await apply(db, graph_yaml("pulse", "every: 1s, misfire_grace: 2s"))
    async with start_timer(db) as service:
        await apply(db, graph_yaml("tick", "every: 1s, misfire_grace: 2s"))
        await fired_at_least(db, "tick", 2)

        await set_enabled(db, "tick", False)
        await eventually(
            async_true(lambda: service.job("tick", "clock") is None), "the paused job removed"
        )
        paused = await fire_times(db, "tick")
        pulse = len(await fire_times(db, "pulse"))
        await fired_at_least(db, "pulse", pulse + 2)  # two more seconds went by
        assert await fire_times(db, "tick") == paused

        await set_enabled(db, "tick", True)
        await fired_at_least(db, "tick", len(paused) + 1)

        await delete(db, "tick")
        await eventually(
            async_true(lambda: service.job("tick", "clock") is None), "the deleted job removed"
        )
        deleted = await fire_times(db, "tick")
        pulse = len(await fire_times(db, "pulse"))
        await fired_at_least(db, "pulse", pulse + 2)
        assert await fire_times(db, "tick") == deleted

    pulses = await fire_times(db, "pulse")
    assert len(set(pulses)) == len(pulses) and consecutive_seconds(pulses)
    # This timer, the only one, created every execution and timed each.
    metric = service.runtime.registry.get_sample_value
    assert metric("loom_timer_ticks_fired_total") == len(deleted) + len(pulses)
    assert metric("loom_timer_fire_delay_seconds_count") == len(deleted) + len(pulses)


def async_true(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return predicate()

    return check


async def test_a_resync_replaces_only_the_jobs_of_changed_triggers(
    db: Database, start_timer: StartTimer
) -> None:
    for name in ("same", "edited", "gone", "redescribed"):
        await apply(db, graph_yaml(name, f"cron: '{FAR}'"))
    # Only the explicit resyncs below may change the jobs.
    async with start_timer(db, timer_change_debounce_seconds=3600) as service:
        before = {name: service.job(name, "clock") for name in ("same", "edited", "redescribed")}
        assert all(job is not None for job in before.values())

        await apply(db, graph_yaml("same", f"cron: '{FAR}'"))  # identical: no new version
        await apply(db, graph_yaml("edited", "cron: '0 0 1 7 *'"))
        await apply(db, graph_yaml("redescribed", f"cron: '{FAR}'", description="v2"))
        await delete(db, "gone")
        await apply(db, graph_yaml("new", f"cron: '{FAR}'"))
        report = await service.resync()

        assert (report.added, report.replaced, report.removed, report.unchanged) == (1, 2, 1, 1)
        assert service.job("same", "clock") is before["same"]
        assert service.scheduler.get_job("same/clock") is before["same"]
        edited = service.job("edited", "clock")
        assert edited is not before["edited"] and edited.next_run_time.month == 7
        # Same schedule, new graph version: executions must name the version they ran.
        assert service.job("redescribed", "clock") is not before["redescribed"]
        assert (
            service.job("gone", "clock") is None and service.scheduler.get_job("gone/clock") is None
        )
        assert service.job("new", "clock") is not None

        current = {job.id: job for job in service.scheduler.get_jobs()}
        again = await service.resync()
        assert (again.added, again.replaced, again.removed, again.unchanged) == (0, 0, 0, 4)
        jobs = service.scheduler.get_jobs()
        assert sorted(job.id for job in jobs) == sorted(current)
        assert all(current[job.id] is job for job in jobs)


# --- delay triggers ------------------------------------------------------------------------


async def test_a_delay_trigger_fires_d_after_the_end_of_its_previous_run(
    postgres_db: Database, start_timer: StartTimer
) -> None:
    """`delay: 1s`: the first run 1 s after the trigger's graph version was stored (or on
    a later multiple if the timer started late); none while it runs; the next 1 s after
    it ended (on the whole second). The database side is `fire_due`'s, tested on both
    databases in test_firing.py."""
    db = postgres_db
    await apply(db, graph_yaml("chain", "delay: 1s"))
    async with db.read() as conn:
        (version,) = await graphs.list_versions(conn, "chain")
    async with start_timer(db) as service:
        await fired_at_least(db, "chain", 1)
        (first,) = await fire_times(db, "chain")
        assert parse(first) - ceil_second(version.created_at) >= SECOND
        # While the run is not over there is nothing to wake up for.
        await eventually(
            async_true(lambda: service.job("chain", "clock") is None), "the job parked"
        )
        end = datetime.now(UTC)
        async with db.transaction() as conn:
            await conn.execute(
                update(execution_rows)
                .where(execution_rows.c.graph == "chain")
                .values(status="succeeded", finished_at=end)
            )
        await fired_at_least(db, "chain", 2)
    assert (await fire_times(db, "chain"))[1] == format_instant(ceil_second(end) + SECOND)


# --- catch-up --------------------------------------------------------------------------------


async def test_ticks_missed_while_every_replica_was_down_fire_at_start(
    db: Database, start_timer: StartTimer
) -> None:
    """An hourly trigger last fired five hours ago: with `catch_up: all` the five missed
    ticks fire as the timer starts, not at the next hour."""
    await apply(db, graph_yaml("hourly", "every: 1h, catch_up: all"))
    async with db.read() as conn:
        (trigger,) = [t for t in await graphs.list_triggers(conn) if t.graph == "hourly"]
    now = datetime.now(UTC)
    this_hour = now.replace(minute=0, second=0, microsecond=0)
    (last,) = await fire_due(db, trigger, this_hour - 5 * HOUR + SECOND)
    assert last.tick == this_hour - 5 * HOUR

    async with start_timer(db) as service:
        await asyncio.wait_for(service.caught_up.wait(), timeout=20)
    hours = (datetime.now(UTC) - (this_hour - 5 * HOUR)) // HOUR
    expected = [format_instant(this_hour - 5 * HOUR + k * HOUR) for k in range(hours + 1)]
    assert len(expected) >= 6
    assert await fire_times(db, "hourly") == expected


# --- a database outage -----------------------------------------------------------------------


async def test_a_database_outage_does_not_stop_the_timer(start_timer: StartTimer) -> None:
    """The timer's own PostgreSQL is stopped and started again: the failed wake-ups are
    logged and counted, the loop goes on, and once the server is back the seconds missed
    meanwhile (within `misfire_grace`) are fired: no gap."""
    with private_postgres() as server:
        await upgrade(server.url)
        db = create_database(server.url)
        try:
            await apply(db, graph_yaml("beat", "every: 1s, misfire_grace: 60s"))
            async with start_timer(db, timer_resync_seconds=0.5) as service:
                await fired_at_least(db, "beat", 1)
                await asyncio.to_thread(server.stop)

                def failed() -> float:
                    metric = service.runtime.registry.get_sample_value
                    return metric("loom_timer_errors_total", {"operation": "fire"}) or 0.0

                await eventually(async_true(lambda: failed() >= 2), "failed wake-ups counted")
                await asyncio.to_thread(server.start)
                before = len(await fire_times(db, "beat"))
                await fired_at_least(db, "beat", before + 3)
                # It still follows the graphs too: its background tasks survived.
                await apply(db, graph_yaml("after", "every: 1s, misfire_grace: 2s"))
                await fired_at_least(db, "after", 1)
                times = await fire_times(db, "beat")
        finally:
            await db.dispose()
    assert len(set(times)) == len(times) and consecutive_seconds(times)
