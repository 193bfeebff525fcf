"""Firing a timer trigger: the database side (DESIGN §7), without a scheduler loop.

`fire_due(database, trigger, now)` reads the trigger's last tick from the executions
table (`last_tick`), asks the pure core which ticks are due (`schedule.due_ticks`), and
creates one `timer` execution per tick, each in its own transaction, under the key
`executions.timer_key(graph, trigger id, tick)`. The unique constraint on that key is
the whole coordination between replicas: any number of them may fire the same tick at
the same moment, exactly one insert wins, and the others read back the winner's
execution (`FireResult.created` is False for them). No lock is held across replicas and
no leader is elected.

Each tick's transaction first takes a shared lock on the graph's row: pausing or deleting
a graph locks that row for update (`loom_db.graphs`), so a tick either commits before the
pause or sees the graph paused or gone and fires nothing -- a timer never starts an
execution after the pause that should have stopped it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_common import ParamSpec, format_instant, resolve_params
from loom_db import Database, NotFound, executions, graphs
from loom_db.executions import ExecutionRecord
from loom_db.graphs import TriggerRecord
from loom_db.models import graph_versions
from loom_db.models import graphs as graph_rows
from loom_timer.schedule import (
    DEFAULT_LIMIT,
    DRIFT_WARNING,
    Schedule,
    delay_anchor,
    due_ticks,
    lateness,
)

__all__ = ["FireResult", "fire_due", "last_tick"]

_log = logging.getLogger("loom.timer")


@dataclass(frozen=True, slots=True)
class FireResult:
    """One due tick and its execution."""

    tick: datetime
    """The scheduled time (aware UTC): the execution's `trigger.fire_time`."""
    execution: ExecutionRecord
    created: bool
    """True if THIS call created the execution; False if another replica already had."""
    lateness: timedelta
    """`now - tick`: the drift of this fire."""


async def last_tick(conn: AsyncConnection, graph: str, trigger_id: str) -> datetime | None:
    """The newest scheduled time already fired for the trigger (aware UTC), or None if
    it never fired. Raises `loom_common.CronError` for a stored `fire_time` that is not
    an instant."""
    return await executions.last_timer_tick(conn, graph, trigger_id)


async def fire_due(
    database: Database, trigger: TriggerRecord, now: datetime, *, limit: int = DEFAULT_LIMIT
) -> list[FireResult]:
    """Create the executions of `trigger`'s ticks due at `now` (at most `limit`, oldest
    first: when the list is full, more may be due -- call again) and return them, in
    order. Fires nothing (returns what it fired so far) once the graph is paused, deleted
    or no longer holds the trigger.

    The execution: trigger type `timer`, `trigger_info` `{"fire_time", "trigger_id"}`,
    the graph's default params, the trigger's graph version. A tick fired later than
    `DRIFT_WARNING` is logged as a warning.

    Raises `loom_common.CronError` for a trigger that is not a timer or is invalid,
    `loom_common.ParamError` when the graph has a required param without a default,
    `DatabaseUnavailable` for a lost database.
    """
    async with database.read() as conn:
        previous = await last_tick(conn, trigger.graph, trigger.id)
        anchor = await _delay_anchor(conn, trigger, previous) if trigger.kind == "delay" else None
        since = previous
        if since is None and trigger.kind != "delay":
            # Never fired: nothing from before its graph version existed was missed
            # (else a new `every: 1s` would fire a whole `misfire_grace` of ticks at once).
            created = await _version_created(conn, trigger)
            since = created if created is not None and created <= now else None
    schedule = Schedule.from_spec(trigger.spec, delay_anchor=anchor)
    fired: list[FireResult] = []
    for tick in due_ticks(schedule, since, now, limit=limit):
        async with database.transaction() as conn:
            params = await _params_if_active(conn, trigger)
            if params is None:
                break
            record, created = await executions.create_execution(
                conn,
                graph=trigger.graph,
                graph_version=trigger.graph_version,
                params=params,
                trigger_type="timer",
                trigger_info={"fire_time": format_instant(tick), "trigger_id": trigger.id},
                idempotency_key=executions.timer_key(trigger.graph, trigger.id, tick),
            )
        if created:
            database.notify_committed()
        fired.append(FireResult(tick, record, created, lateness(tick, now)))
    _warn_if_late(trigger, [result for result in fired if result.created])
    return fired


async def _version_created(conn: AsyncConnection, trigger: TriggerRecord) -> datetime | None:
    created: datetime | None = (
        await conn.execute(
            select(graph_versions.c.created_at).where(
                graph_versions.c.graph == trigger.graph,
                graph_versions.c.version == trigger.graph_version,
            )
        )
    ).scalar()
    return created


async def _params_if_active(conn: AsyncConnection, trigger: TriggerRecord) -> dict[str, Any] | None:
    """The params of an execution of `trigger` (the defaults of its graph version), or
    None if the graph is paused or gone or no longer holds the trigger. Locks the graph's
    row (shared) for the rest of the transaction."""
    locked = (
        await conn.execute(
            select(graph_rows.c.version, graph_rows.c.enabled)
            .where(graph_rows.c.name == trigger.graph)
            .with_for_update(read=True)  # SQLite: its writers are serialized anyway
        )
    ).first()
    if locked is None or not locked.enabled:
        return None
    try:
        graph = await graphs.get_graph(conn, trigger.graph, trigger.graph_version)
        if locked.version != trigger.graph_version:
            current = await graphs.get_graph(conn, trigger.graph)
            if trigger.id not in {held.id for held in current.triggers}:
                return None
    except NotFound:  # the trigger's version was deleted with the graph
        return None
    declared = {
        name: ParamSpec.model_validate(param)
        for name, param in graph.spec.get("params", {}).items()
    }
    return resolve_params(declared, {})


async def _delay_anchor(
    conn: AsyncConnection, trigger: TriggerRecord, previous: datetime | None
) -> datetime | None:
    """What a `delay` trigger counts from: the end of its last execution, or, if it
    never fired, the creation of the graph version the trigger record names (a stored
    instant, the same on every replica)."""
    last_end = None
    if previous is not None:
        key = executions.timer_key(trigger.graph, trigger.id, previous)
        record = await executions.find_by_key(conn, key)
        last_end = None if record is None else record.finished_at
    try:
        versions = await graphs.list_versions(conn, trigger.graph)
    except NotFound:
        return None
    created = [v.created_at for v in versions if v.version == trigger.graph_version]
    if not created:
        return None
    return delay_anchor(active_since=created[0], last_tick=previous, last_end=last_end)


def _warn_if_late(trigger: TriggerRecord, created: list[FireResult]) -> None:
    """One line per call, however many ticks a catch-up fired late."""
    late = [result for result in created if result.lateness > DRIFT_WARNING]
    if late:
        newest = late[-1]
        _log.warning(
            "timer %s/%s fired %d tick(s) late; newest %s by %.3fs (threshold %.3fs)",
            trigger.graph,
            trigger.id,
            len(late),
            format_instant(newest.tick),
            newest.lateness.total_seconds(),
            DRIFT_WARNING.total_seconds(),
        )
