"""The timer service (DESIGN §7): one APScheduler job per timer trigger, kept equal to the
trigger index by difference; the lease reaper and retention beside it.

**Following the graphs.** The trigger index (the `triggers` table: the triggers of the
enabled graphs) is the truth. `resync()` reads it -- graph, trigger id, kind, graph
version and the spec as stored *text*, so an unchanged trigger costs a string comparison,
not a JSON decoding (10,000 triggers: ~15 ms instead of ~200 ms) -- and only adds,
replaces or removes the jobs whose (graph version, spec) changed; the others keep their
APScheduler job untouched (replacing 10,000 jobs would block the loop for about a
second). It runs

* soon after a `graph.changed` on the control channel (after `timer_change_debounce_seconds`,
  so applying fifty graphs costs one read, not fifty);
* every `timer_resync_seconds` anyway: control messages are hints, and a replica that was
  not subscribed when one went by -- or, with `memory://` brokers, any replica other than
  the one whose relay published it -- never sees it;
* sooner again after a failed one (1 s, doubling up to `timer_resync_seconds`).

A paused or deleted graph leaves the index, so its jobs go at the next resync; until then
a wake-up fires nothing (`fire_due` checks the graph row under a lock), so a pause is
never late by the resync's delay.

**Firing.** A job's wake-up calls `fire_due`, which reads the trigger's last tick and
creates each due tick's execution exactly once across replicas; the delay from the
scheduled time to the execution's creation goes to the histogram
`loom_timer_fire_delay_seconds` (ticks this replica created), past `DRIFT_WARNING` also
to a warning. A database outage never stops the loop: the wake-up is logged, counted in
`loom_timer_errors_total` and fired again after the next successful resync, where
`catch_up` / `misfire_grace` decide about the ticks missed meanwhile. At start, once the
first resync succeeded, every trigger that has fired before (and every `delay` trigger)
is fired once, so ticks missed while every replica was down are caught up at once rather
than at the trigger's next tick (`caught_up` is set when that is done). A trigger that
never fired missed nothing, so it waits for its next tick.

**Load.** At most `LOOM_DATABASE_POOL_SIZE - 1` fires run at once; the other wake-ups
wait for a slot here rather than in the connection pool, whose 30 s timeout would turn
a burst (10,000 triggers at the same second) into failures. A timer that cannot keep up
fires late, never wrongly: each fire decides what is due when it gets its slot. Each
tick costs a few milliseconds of CPU (`fire_due`'s own statements); B6
(`benchmarks/timers.py`) measures where that ends.

**Delay triggers** (`delay: D`) count from the end of their previous run, which the
timer learns from the executions table: after each of its wake-ups, at each resync, and
every `timer_delay_poll_seconds` while its previous run has not ended, the trigger's
anchor is read again and its job rescheduled when it moved. So a `delay` trigger fires at
D after the end of its previous run -- when D is shorter than `timer_delay_poll_seconds`,
on the first multiple of D after the end that follows the poll noticing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from apscheduler.job import Job  # type: ignore[import-untyped]
from apscheduler.jobstores.base import JobLookupError  # type: ignore[import-untyped]
from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import Text, cast, select
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_common import CronError, LoomError
from loom_db import DatabaseUnavailable, TransactionConflict, retention
from loom_db.graphs import TriggerRecord
from loom_db.models import triggers as trigger_rows
from loom_messaging import MessagingError
from loom_runtime import Runtime
from loom_timer.aps import JOB_OPTIONS, ScheduleTrigger
from loom_timer.firing import FireResult, TickWriter, fire_due, last_tick, read_delay_anchor
from loom_timer.reaper import reap_lost
from loom_timer.schedule import DEFAULT_LIMIT, Schedule
from loom_timer.settings import TimerSettings

__all__ = ["TIMER_KINDS", "SyncReport", "TimerMetrics", "TimerService"]

_log = logging.getLogger("loom.timer")

TIMER_KINDS = ("cron", "every", "delay", "at")
"""The trigger kinds the timer schedules (the index also holds `webhook` ones)."""

TriggerKey = tuple[str, str]
"""(graph, trigger id)."""

_TRANSIENT = (DatabaseUnavailable, TransactionConflict)
_CHUNK = 200
"""Jobs added or removed between two yields to the loop: a mass change never blocks the
wake-ups due meanwhile for more than a few milliseconds."""
_CATCH_UP_CONCURRENCY = 2
"""Start-up catch-up and retries fire this many triggers at once, leaving the rest of
the fire slots to the wake-ups due meanwhile."""
_BACKOFF_START = 1.0
_FIRE_DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0)


@dataclass(frozen=True, slots=True)
class TimerMetrics:
    """The timer's Prometheus metrics, registered in the runtime's registry."""

    fire_delay: Histogram
    fired: Counter
    triggers: Gauge
    changes: Counter
    caught_up: Gauge
    reaped: Counter
    deleted: Counter
    errors: Counter

    @classmethod
    def register(cls, registry: CollectorRegistry) -> TimerMetrics:
        """Raises `ValueError` if the registry already holds them (one service per
        registry)."""
        return cls(
            fire_delay=Histogram(
                "loom_timer_fire_delay_seconds",
                "From a tick's scheduled time to the creation of its execution (ticks this "
                "replica created)",
                buckets=_FIRE_DELAY_BUCKETS,
                registry=registry,
            ),
            fired=Counter(
                "loom_timer_ticks_fired",
                "Ticks whose execution this replica created",
                registry=registry,
            ),
            triggers=Gauge(
                "loom_timer_triggers", "Timer triggers this replica follows", registry=registry
            ),
            changes=Counter(
                "loom_timer_job_changes",
                "Jobs a resync added, replaced (a new graph version or spec) or removed",
                ["change"],
                registry=registry,
            ),
            caught_up=Gauge(
                "loom_timer_caught_up",
                "1 once the start-up catch-up has fired what every replica missed, else 0",
                registry=registry,
            ),
            reaped=Counter(
                "loom_timer_reaped_executions",
                "Executions the lease reaper of this replica requested again",
                registry=registry,
            ),
            deleted=Counter(
                "loom_timer_retention_deleted_executions",
                "Executions retention deleted (with their node runs and logs)",
                registry=registry,
            ),
            errors=Counter(
                "loom_timer_errors",
                "Operations that failed on a transient database error and will be retried",
                ["operation"],
                registry=registry,
            ),
        )


@dataclass(slots=True)
class SyncReport:
    """What one `resync()` changed."""

    added: int = 0
    replaced: int = 0
    removed: int = 0
    unchanged: int = 0


@dataclass(eq=False, slots=True)
class _Entry:
    """One followed trigger and its job."""

    trigger: TriggerRecord
    stored: tuple[int, str]
    """(graph version, spec text) as the index held them: what a resync compares."""
    schedule: Schedule | None
    """None: the stored spec is not a valid timer (logged once, never scheduled)."""
    anchor: datetime | None = None
    """`delay` only: the end of the previous run, or what the first run counts from;
    None while the previous run has not ended (no job meanwhile)."""
    job: Job | None = None
    last_fired: datetime | None = None
    """The newest tick this replica fired or found fired: where the next wake-up counts
    from without reading the executions table (a tick another replica fired meanwhile is
    found by its unique key, not fired twice)."""


class TimerService:
    """The timer of DESIGN §7 over a `Runtime`: `async with TimerService(runtime,
    settings) as service:` starts it, leaving the block stops it (in-flight fires get up
    to `shutdown_grace` to finish). `wait()` raises the error of a background task that
    died of something other than a database outage (a bug): the process should then exit.
    """

    def __init__(self, runtime: Runtime, settings: TimerSettings) -> None:
        self.runtime = runtime
        self._database = runtime.database
        self._settings = settings
        self.metrics = TimerMetrics.register(runtime.registry)
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.caught_up = asyncio.Event()
        """Set once the start-up catch-up has fired what every replica missed."""
        self._entries: dict[TriggerKey, _Entry] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._synced = asyncio.Event()
        self._retry: set[TriggerKey] = set()
        self._firing: set[asyncio.Task[Any]] = set()
        # Fires wait here, not in the connection pool: a burst of wake-ups larger than the
        # pool (10,000 triggers, 167 a second) queues without the pool's 30 s timeout
        # turning lateness into failures; the rest of the pool stays free for the relay,
        # the resync and the health checks.
        self._fire_slots = asyncio.Semaphore(max(1, settings.database_pool_size - 1))
        self._writer = TickWriter(self._database)
        self._tasks: list[asyncio.Task[None]] = []
        # APScheduler logs every job added and every run at INFO: 10,000 lines at start
        # and one per tick. Ours are the lines that matter; an explicit level stays.
        aps_logger = logging.getLogger("apscheduler")
        if aps_logger.level == logging.NOTSET:
            aps_logger.setLevel(logging.WARNING)

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> TimerService:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the scheduler, subscribe to graph changes, read the triggers (a database
        outage is logged and retried: the service starts anyway) and start the background
        tasks."""
        self.scheduler.start()
        self._spawn("follow-changes", self._follow_changes())
        await self._subscribed.wait()  # first, so no change between read and subscribe is lost
        synced = await self._guarded("resync", self.resync)
        if synced:
            self._synced.set()
        settings = self._settings
        self._spawn("resync", self._resync_loop(failing=not synced))
        self._spawn("catch-up", self._catch_up())
        for name, seconds, work in (
            ("delay-poll", settings.timer_delay_poll_seconds, self._poll_delays),
            ("reaper", settings.timer_reap_seconds, self._reap),
            ("retention", settings.timer_retention_seconds, self._retain),
        ):
            self._spawn(name, self._every(name, seconds, work))
        _log.info("timer started: %d trigger(s)", len(self._entries))

    async def stop(self) -> None:
        """Stop the background tasks and the scheduler; fires in flight get up to
        `shutdown_grace` seconds to finish (a tick cut short is fired again by a replica
        or at the next start: its key makes that safe)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # errors: see _spawn
        self._tasks.clear()
        if not self.scheduler.running:
            return
        self.scheduler.pause()
        if self._firing:
            await asyncio.wait(set(self._firing), timeout=self._settings.shutdown_grace)
        self.scheduler.shutdown(wait=False)
        await asyncio.sleep(0)  # AsyncIOScheduler shuts down in a loop callback
        _log.info("timer stopped")

    async def wait(self) -> None:
        """Return when every background task ended; raise the error of the first one that
        failed (they run until `stop()` otherwise)."""
        if not self._tasks:
            return
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                task.result()

    def job(self, graph: str, trigger_id: str) -> Job | None:
        """The APScheduler job of a trigger (None: not followed, invalid, or a `delay`
        trigger waiting for the end of its previous run)."""
        entry = self._entries.get((graph, trigger_id))
        return None if entry is None else entry.job

    def _spawn(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        async def logged() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except BaseException:
                _log.exception("timer task %s failed", name)
                raise

        self._tasks.append(asyncio.create_task(logged(), name=f"loom-timer-{name}"))

    async def _guarded(self, operation: str, work: Callable[[], Awaitable[object]]) -> bool:
        """Run `work`; a transient database error is logged and counted (False)."""
        try:
            await work()
        except _TRANSIENT as exc:
            self.metrics.errors.labels(operation).inc()
            _log.warning("timer %s failed, will retry: %s", operation, exc)
            return False
        return True

    async def _every(
        self, operation: str, seconds: float, work: Callable[[], Awaitable[object]]
    ) -> None:
        while True:
            await self._guarded(operation, work)
            await asyncio.sleep(seconds)

    # --- following the trigger index ----------------------------------------------------

    async def resync(self) -> SyncReport:
        """Make the jobs match the trigger index, by difference (see the module
        docstring). Raises `DatabaseUnavailable` / `TransactionConflict` (what it changed
        before stays changed; the next resync finishes)."""
        report = SyncReport()
        async with self._lock:
            async with self._database.read() as conn:
                index = await _read_index(conn)
            steps = 0
            for key in [key for key in self._entries if key not in index]:
                self._unschedule(self._entries.pop(key))
                report.removed += 1
                steps += 1
                if steps % _CHUNK == 0:
                    await asyncio.sleep(0)
            for key, (kind, stored) in index.items():
                entry = self._entries.get(key)
                if entry is not None and entry.stored == stored:
                    report.unchanged += 1
                    continue
                if entry is None:
                    report.added += 1
                else:
                    self._unschedule(entry)
                    report.replaced += 1
                entry = self._entries[key] = _new_entry(key, kind, stored)
                if kind != "delay":
                    self._schedule(entry)
                steps += 1
                if steps % _CHUNK == 0:
                    await asyncio.sleep(0)
            delays = [key for key, entry in self._entries.items() if entry.trigger.kind == "delay"]
            await self._reanchor(delays)
            self.metrics.triggers.set(len(self._entries))
        for change, count in (
            ("added", report.added),
            ("replaced", report.replaced),
            ("removed", report.removed),
        ):
            self.metrics.changes.labels(change).inc(count)
        if report.added or report.replaced or report.removed:
            _log.info(
                "timer triggers: %d added, %d replaced, %d removed, %d unchanged",
                report.added,
                report.replaced,
                report.removed,
                report.unchanged,
            )
        return report

    async def _resync_loop(self, *, failing: bool) -> None:
        backoff = _BACKOFF_START if failing else None
        while True:
            wait = self._settings.timer_resync_seconds
            if backoff is not None:
                wait = min(backoff, wait)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._changed.wait()
                    await asyncio.sleep(self._settings.timer_change_debounce_seconds)
            self._changed.clear()
            if await self._guarded("resync", self.resync):
                backoff = None
                self._synced.set()
                await self._fire_retries()
            else:
                backoff = _BACKOFF_START if backoff is None else backoff * 2

    async def _follow_changes(self) -> None:
        """Set `_changed` on every `graph.changed`; resubscribe when the subscription
        fails or ends (a resync follows each resubscription: messages were missed)."""
        backoff = _BACKOFF_START
        first = True
        while True:
            try:
                async with self.runtime.broker.control.subscribe() as messages:
                    self._subscribed.set()
                    backoff = _BACKOFF_START
                    if not first:
                        self._changed.set()
                    first = False
                    async for envelope in messages:
                        if envelope.type == "graph.changed":
                            self._changed.set()
                _log.warning("the control channel subscription ended; subscribing again")
            except MessagingError as exc:
                self.metrics.errors.labels("follow-changes").inc()
                _log.warning(
                    "cannot follow graph changes (retrying in %gs; resync every %gs meanwhile): %s",
                    backoff,
                    self._settings.timer_resync_seconds,
                    exc,
                )
            self._subscribed.set()  # tried: start() need not wait for the broker
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._settings.timer_resync_seconds)

    # --- jobs -------------------------------------------------------------------------------

    def _schedule(self, entry: _Entry) -> None:
        """Add the entry's job (none for an invalid spec or an unanchored delay)."""
        schedule = entry.schedule
        if schedule is None:
            return
        options: dict[str, Any] = {}
        if entry.trigger.kind == "delay":
            if entry.anchor is None:
                return
            schedule = schedule.anchored(entry.anchor)
            assert schedule.anchor is not None
            # The first wake-up is the first tick even when it has passed (the anchor
            # was learned late): `fire_due` decides whether it still fires.
            options["next_run_time"] = schedule.next_after(schedule.anchor)
        key = (entry.trigger.graph, entry.trigger.id)
        entry.job = self.scheduler.add_job(
            self._wake,
            ScheduleTrigger(schedule),
            args=[key],
            id=f"{key[0]}/{key[1]}",
            name=f"{key[0]}/{key[1]}",
            replace_existing=True,
            **JOB_OPTIONS,
            **options,
        )

    def _unschedule(self, entry: _Entry) -> None:
        if entry.job is not None:
            # Gone already when APScheduler removed it after its last tick (`at`).
            with contextlib.suppress(JobLookupError):
                entry.job.remove()
            entry.job = None

    async def _reanchor(self, keys: Iterable[TriggerKey]) -> None:
        """Read the anchors of these `delay` triggers again; reschedule those that moved.
        The caller holds `_lock`."""
        anchors: dict[TriggerKey, datetime | None] = {}
        async with self._database.read() as conn:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.schedule is not None:
                    previous = await last_tick(conn, *key)
                    anchors[key] = await read_delay_anchor(conn, entry.trigger, previous)
        for key, anchor in anchors.items():
            entry = self._entries.get(key)
            if entry is None:
                continue
            if entry.anchor == anchor and (entry.job is None) == (anchor is None):
                continue  # unchanged (a job exactly when there is an anchor)
            self._unschedule(entry)
            entry.anchor = anchor
            self._schedule(entry)

    async def _poll_delays(self) -> None:
        if waiting := [
            key
            for key, entry in self._entries.items()
            if entry.trigger.kind == "delay" and entry.schedule is not None and entry.job is None
        ]:
            async with self._lock:
                await self._reanchor(waiting)

    # --- firing -----------------------------------------------------------------------------

    async def _wake(self, key: TriggerKey) -> None:
        """The job of every trigger: fire what is due now."""
        entry = self._entries.get(key)
        task = asyncio.current_task()
        if entry is None or task is None:
            return
        self._firing.add(task)
        try:
            await self._fire(entry)
        finally:
            self._firing.discard(task)

    async def _fire(self, entry: _Entry, *, only_if_fired_before: bool = False) -> None:
        """Fire the trigger's due ticks (in pages of `DEFAULT_LIMIT`). A database outage
        puts it on the retry list; an invalid trigger (a bad stored spec, a graph with a
        required param and no default) is logged as an error."""
        trigger = entry.trigger
        key = (trigger.graph, trigger.id)
        try:
            if only_if_fired_before:
                async with self._database.read() as conn:
                    if await last_tick(conn, *key) is None:
                        return
            while True:
                async with self._fire_slots:
                    results = await fire_due(
                        self._database,
                        trigger,
                        datetime.now(UTC),
                        writer=self._writer,
                        known_last=entry.last_fired,
                    )
                if results:
                    entry.last_fired = max(entry.last_fired or results[-1].tick, results[-1].tick)
                self._observe(results)
                if len(results) < DEFAULT_LIMIT:
                    break
            if trigger.kind == "delay":
                async with self._lock:
                    await self._reanchor([key])
        except _TRANSIENT as exc:
            self.metrics.errors.labels("fire").inc()
            if not self._retry:  # one line per outage, not one per trigger and tick
                _log.warning(
                    "timer %s/%s could not fire (it and the triggers failing after it are "
                    "fired again after the next successful resync; loom_timer_errors_total "
                    "counts them): %s",
                    trigger.graph,
                    trigger.id,
                    exc,
                )
            self._retry.add(key)
            return
        except LoomError as exc:
            _log.error("timer %s/%s cannot fire: %s", trigger.graph, trigger.id, exc)
            return
        self._retry.discard(key)

    def _observe(self, results: list[FireResult]) -> None:
        for result in results:
            if result.created:
                delay = (result.execution.created_at - result.tick).total_seconds()
                self.metrics.fire_delay.observe(max(delay, 0.0))
                self.metrics.fired.inc()

    async def _fire_retries(self) -> None:
        """Fire again the triggers whose last wake-up failed on the database."""
        retries, self._retry = self._retry, set()
        if retries:
            _log.info("timer: firing %d trigger(s) whose wake-up had failed", len(retries))
            await self._fire_all([self._entries[k] for k in retries if k in self._entries])

    async def _catch_up(self) -> None:
        """Once, after the first successful resync: fire every trigger that fired before
        (and every `delay` trigger, whose first run counts from a stored instant), so the
        ticks every replica missed are decided now, not at each trigger's next tick."""
        await self._synced.wait()
        entries = [entry for entry in self._entries.values() if entry.schedule is not None]
        await self._fire_all(entries, only_if_fired_before=True)
        self.caught_up.set()
        self.metrics.caught_up.set(1)

    async def _fire_all(self, entries: list[_Entry], *, only_if_fired_before: bool = False) -> None:
        """`_fire` each, a few at a time (the wake-ups due meanwhile need connections)."""
        semaphore = asyncio.Semaphore(_CATCH_UP_CONCURRENCY)

        async def one(entry: _Entry) -> None:
            async with semaphore:
                # A `delay` trigger that never fired still has a first run to catch up.
                only_fired = only_if_fired_before and entry.trigger.kind != "delay"
                await self._fire(entry, only_if_fired_before=only_fired)

        await asyncio.gather(*(one(entry) for entry in entries))

    # --- housekeeping -------------------------------------------------------------------

    async def _reap(self) -> None:
        reaped = await reap_lost(
            self._database, queued_after_seconds=self._settings.timer_queued_after_seconds
        )
        if reaped:
            self.metrics.reaped.inc(len(reaped))
            _log.info("reaper: requested %d execution(s) again", len(reaped))

    async def _retain(self) -> None:
        days = self._settings.retention_days
        deleted = await retention.delete_older_than(self._database, days)
        if deleted:
            self.metrics.deleted.inc(deleted)
            _log.info("retention: deleted %d execution(s) finished over %d days ago", deleted, days)


async def _read_index(conn: AsyncConnection) -> dict[TriggerKey, tuple[str, tuple[int, str]]]:
    """The timer triggers of the index: (graph, id) -> (kind, (graph version, spec text))."""
    c = trigger_rows.c
    rows = await conn.execute(
        select(c.graph, c.trigger_id, c.kind, c.graph_version, cast(c.spec, Text)).where(
            c.kind.in_(TIMER_KINDS)
        )
    )
    return {(graph, id_): (kind, (version, spec)) for graph, id_, kind, version, spec in rows}


def _new_entry(key: TriggerKey, kind: str, stored: tuple[int, str]) -> _Entry:
    version, text = stored
    spec = orjson.loads(text)
    trigger = TriggerRecord(
        graph=key[0], id=key[1], kind=kind, graph_version=version, webhook_name=None, spec=spec
    )
    try:
        schedule: Schedule | None = Schedule.from_spec(spec)
    except CronError as exc:
        _log.error("timer %s/%s cannot be scheduled: %s", key[0], key[1], exc)
        schedule = None
    return _Entry(trigger, stored, schedule)
