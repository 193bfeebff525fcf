"""Firing a timer trigger: the database side (DESIGN §7), without a scheduler loop.

`fire_due(database, trigger, now)` reads the trigger's last tick from the executions
table (`last_tick`), asks the pure core which ticks are due (`schedule.due_ticks`), and
creates one `timer` execution per tick under the key
`executions.timer_key(graph, trigger id, tick)`. The writing goes through a
`TickWriter`: the ticks of every trigger that wakes while one transaction commits are
written together in the next one (10,000 cron triggers spread over a minute wake ~170 at
the same second: one multi-row insert instead of ~170 transactions). The unique
constraint on that key is the whole coordination between replicas: any number of them
may fire the same tick at the same moment, exactly one insert wins, and the others read
back the winner's execution (`FireResult.created` is False for them). No lock is held
across replicas and no leader is elected.

Each transaction first takes a shared lock on the graphs' rows: pausing or deleting
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

from loom_common import ParamError, ParamSpec, format_instant, resolve_params
from loom_db import Database, NotFound, executions, graphs
from loom_db.executions import ExecutionRecord
from loom_db.graphs import TriggerRecord
from loom_db.models import graph_versions
from loom_runtime import GroupCommit
from loom_timer.schedule import (
    DEFAULT_LIMIT,
    DRIFT_WARNING,
    Schedule,
    delay_anchor,
    due_ticks,
    lateness,
)

__all__ = ["FireResult", "TickWriter", "fire_due", "last_tick", "read_delay_anchor"]

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
    database: Database,
    trigger: TriggerRecord,
    now: datetime,
    *,
    limit: int = DEFAULT_LIMIT,
    writer: TickWriter | None = None,
    known_last: datetime | None = None,
) -> list[FireResult]:
    """Create the executions of `trigger`'s ticks due at `now` (at most `limit`, oldest
    first: when the list is full, more may be due -- call again) and return them, in
    order. Fires nothing once the graph is paused, deleted or no longer holds the
    trigger. `writer` is the process's `TickWriter` (a service shares one, so that
    triggers waking together are written together); without one, a writer of its own.
    `known_last` is a tick known to be fired already (the caller's memory of its last
    call): the stored last tick is then not read, unless the trigger is a `delay` one.

    The execution: trigger type `timer`, `trigger_info` `{"fire_time", "trigger_id"}`,
    the graph's default params, the trigger's graph version. A tick fired later than
    `DRIFT_WARNING` is logged as a warning.

    Raises `loom_common.CronError` for a trigger that is not a timer or is invalid,
    `loom_common.ParamError` when the graph has a required param without a default,
    `DatabaseUnavailable` for a lost database.
    """
    since: datetime | None
    if known_last is not None and trigger.kind != "delay":
        schedule, since = Schedule.from_spec(trigger.spec), known_last
    else:
        schedule, since = await _schedule_and_last(database, trigger, now)
    ticks = due_ticks(schedule, since, now, limit=limit)
    if not ticks:
        return []
    fired = await (writer or TickWriter(database)).fire(trigger, ticks, now)
    _warn_if_late(trigger, [result for result in fired if result.created])
    return fired


async def _schedule_and_last(
    database: Database, trigger: TriggerRecord, now: datetime
) -> tuple[Schedule, datetime | None]:
    """The trigger's schedule (with a `delay` trigger's anchor) and what its due ticks
    count from, read from the database."""
    async with database.read() as conn:
        previous = await last_tick(conn, trigger.graph, trigger.id)
        anchor = (
            await read_delay_anchor(conn, trigger, previous) if trigger.kind == "delay" else None
        )
        since = previous
        if since is None and trigger.kind != "delay":
            # Never fired: nothing from before its graph version existed was missed
            # (else a new `every: 1s` would fire a whole `misfire_grace` of ticks at once).
            created = await _version_created(conn, trigger)
            since = created if created is not None and created <= now else None
    return Schedule.from_spec(trigger.spec, delay_anchor=anchor), since


@dataclass(slots=True)
class _Job:
    trigger: TriggerRecord
    ticks: list[datetime]
    now: datetime


class TickWriter:
    """Group commit of ticks (`loom_runtime.GroupCommit`): the ticks submitted while one
    transaction commits are written in the next, with one lock statement for their
    graphs and one multi-row insert (`executions.create_executions`). A trigger whose
    graph is paused, gone, or no longer holds it fires nothing; one whose graph has a
    required param without a default raises `ParamError` to its caller only."""

    def __init__(self, database: Database, *, max_batch: int = 1000) -> None:
        self._database = database
        self._group: GroupCommit[_Job, list[FireResult]] = GroupCommit(
            self._commit, max_weight=max_batch, weight=lambda job: len(job.ticks)
        )
        self._params: dict[tuple[str, int], dict[str, Any] | ParamError] = {}

    async def fire(
        self, trigger: TriggerRecord, ticks: list[datetime], now: datetime
    ) -> list[FireResult]:
        return await self._group.submit(_Job(trigger, ticks, now))

    async def _commit(self, batch: list[_Job]) -> list[list[FireResult] | Exception]:
        outcomes: list[list[FireResult] | Exception] = [[] for _ in batch]
        created_any = False
        async with self._database.transaction() as conn:
            states = await graphs.lock_states(conn, (job.trigger.graph for job in batch))
            new: list[executions.NewExecution] = []
            owners: list[tuple[int, datetime]] = []
            for index, job in enumerate(batch):
                trigger = job.trigger
                params = await self._params_if_active(conn, trigger, states.get(trigger.graph))
                if isinstance(params, Exception):
                    outcomes[index] = params
                    continue
                if params is None:
                    continue
                for tick in job.ticks:
                    new.append(
                        executions.NewExecution(
                            graph=trigger.graph,
                            graph_version=trigger.graph_version,
                            params=params,
                            trigger_type="timer",
                            trigger_info={
                                "fire_time": format_instant(tick),
                                "trigger_id": trigger.id,
                            },
                            idempotency_key=executions.timer_key(trigger.graph, trigger.id, tick),
                        )
                    )
                    owners.append((index, tick))
            answers = await executions.create_executions(conn, new)
        for (index, tick), (record, created) in zip(owners, answers, strict=True):
            results = outcomes[index]
            assert isinstance(results, list)
            results.append(FireResult(tick, record, created, lateness(tick, batch[index].now)))
            created_any = created_any or created
        if created_any:
            self._database.notify_committed()
        return outcomes

    async def _params_if_active(
        self,
        conn: AsyncConnection,
        trigger: TriggerRecord,
        state: tuple[int, bool] | None,
    ) -> dict[str, Any] | ParamError | None:
        """The params of an execution of `trigger` (the defaults of its graph version),
        None if its graph is paused or gone or no longer holds the trigger, or the
        `ParamError` of a graph with a required param and no default."""
        if state is None or not state[1]:
            return None
        key = (trigger.graph, trigger.graph_version)
        try:
            if key not in self._params:
                graph = await graphs.get_graph(conn, trigger.graph, trigger.graph_version)
                declared = {
                    name: ParamSpec.model_validate(param)
                    for name, param in graph.spec.get("params", {}).items()
                }
                try:
                    self._params[key] = resolve_params(declared, {})
                except ParamError as exc:
                    self._params[key] = exc
            if state[0] != trigger.graph_version:
                current = await graphs.get_graph(conn, trigger.graph)
                if trigger.id not in {held.id for held in current.triggers}:
                    return None
        except NotFound:  # the trigger's version was deleted with the graph
            return None
        return self._params[key]


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


async def read_delay_anchor(
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
