"""Running executions: lease (claim, renew, release), admission (DESIGN §4), finish,
the reaper (DESIGN §7) and cancel — what a worker and the reaper do to a stored
execution. Re-exported by `loom_db.executions`.

Plain async functions over an `AsyncConnection` in the caller's transaction, as in
`loom_db.executions`; messages they write go to the outbox in that same transaction.

The lease (DESIGN §8): `worker_id` and `lease_expires_at`. A worker `claim`s with a
compare-and-set, `admit`s (DESIGN §4), `renew`s every lease/3 and `finish`es. A row with
NO worker but a `lease_expires_at` is a pending requeue: an `execution.requested` was
written for it, and the reaper leaves it alone until that time has passed.

Locks: operations that touch several executions of a graph (`admit`, `finish`,
`request_cancel`, and `claim`) lock the graph's row first, then the execution's (on
PostgreSQL, READ COMMITTED, both `FOR NO KEY UPDATE`, so that the FOR KEY SHARE locks taken
by log and node-run inserts do not conflict), always in that order so they cannot
deadlock one another;
SQLite has one writer at a time (`BEGIN IMMEDIATE`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final, Literal, get_args

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db.errors import Conflict, NotFound
from loom_db.executions import (
    _COLUMNS,
    ACTIVE_STATUSES,
    FINISHED_STATUSES,
    ExecutionRecord,
    _record,
)
from loom_db.models import executions, graphs
from loom_db.outbox import enqueue
from loom_db.types import utcnow

__all__ = [
    "REQUEUE_GRACE_SECONDS",
    "Admission",
    "OnOverlap",
    "admit",
    "claim",
    "finish",
    "reap",
    "release",
    "renew",
    "request_cancel",
]

OnOverlap = Literal["queue", "skip", "cancel_running"]
Admission = Literal["running", "waiting", "skipped"]

_ON_OVERLAP: Final = frozenset[str](get_args(OnOverlap))

REQUEUE_GRACE_SECONDS: Final = 300
"""How long a waiting execution released by `finish` or `release(requeue=True)` is left
to its message before the reaper requests it again."""

_c = executions.c


# --- leases -----------------------------------------------------------------------------


def _lease(now: datetime, seconds: float) -> datetime:
    if seconds <= 0:
        raise ValueError("lease_seconds must be positive")
    return now + timedelta(seconds=seconds)


async def claim(
    conn: AsyncConnection,
    execution_id: str,
    worker_id: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> ExecutionRecord | None:
    """Take the execution's lease (compare-and-set): succeeds only if it is not finished
    and has no worker, an expired lease, or this worker. Returns the claimed execution,
    or None (missing, finished, or leased by a live worker: ack the message and drop it).

    Of concurrent claimers exactly one wins. Raises `ValueError` for a lease <= 0.
    """
    now = now or utcnow()
    if conn.dialect.name == "postgresql":
        # Graph row first, as `_lock` does: a claim followed by `admit` in one transaction
        # must take locks in the same order as `request_cancel` and `finish`.
        graph = select(_c.graph).where(_c.id == execution_id).scalar_subquery()
        await conn.execute(
            select(graphs.c.name).where(graphs.c.name == graph).with_for_update(key_share=True)
        )
    statement = (
        update(executions)
        .where(
            _c.id == execution_id,
            _c.status.in_(ACTIVE_STATUSES),
            or_(
                _c.worker_id.is_(None),
                _c.worker_id == worker_id,
                _c.lease_expires_at.is_(None),
                _c.lease_expires_at <= now,
            ),
        )
        .values(worker_id=worker_id, lease_expires_at=_lease(now, lease_seconds))
        .returning(*_COLUMNS)
    )
    row = (await conn.execute(statement)).first()
    return None if row is None else _record(row)


async def renew(
    conn: AsyncConnection,
    execution_id: str,
    worker_id: str,
    lease_seconds: float,
    *,
    now: datetime | None = None,
) -> bool:
    """Extend this worker's lease. False if the lease was lost (another worker or the
    reaper took it, or the execution ended): the worker must stop running it.

    Raises `ValueError` for a lease <= 0.
    """
    now = now or utcnow()
    result = await conn.execute(
        update(executions)
        .where(
            _c.id == execution_id,
            _c.worker_id == worker_id,
            _c.status.in_(ACTIVE_STATUSES),
        )
        .values(lease_expires_at=_lease(now, lease_seconds))
    )
    return result.rowcount == 1


async def release(
    conn: AsyncConnection,
    execution_id: str,
    worker_id: str,
    *,
    requeue: bool = False,
    now: datetime | None = None,
) -> None:
    """Give up this worker's lease (nothing happens if it does not hold it).

    With `requeue` (a worker shutting down, DESIGN §8) an `execution.requested` is written
    to the outbox so another worker resumes it; without, a released `running` execution
    is found by the next `reap`.
    """
    now = now or utcnow()
    pending = now + timedelta(seconds=REQUEUE_GRACE_SECONDS) if requeue else None
    row = (
        await conn.execute(
            update(executions)
            .where(
                _c.id == execution_id,
                _c.worker_id == worker_id,
                _c.status.in_(ACTIVE_STATUSES),
            )
            .values(worker_id=None, lease_expires_at=pending)
            .returning(_c.graph)
        )
    ).first()
    if row is not None and requeue:
        await _request(conn, execution_id, row.graph)


# --- admission and finish (DESIGN §4) ---------------------------------------------------


async def admit(
    conn: AsyncConnection,
    execution_id: str,
    worker_id: str,
    lease_seconds: float,
    *,
    concurrency: int | None,
    on_overlap: OnOverlap,
    now: datetime | None = None,
) -> Admission:
    """Decide whether the claimed execution runs now, in the caller's transaction, with
    the graph's row locked. `concurrency=None` means no limit.

    Fewer than `concurrency` executions of the graph running → `running` (started_at, a
    fresh lease). Else `skip` → `skipped` (finished); `queue` → `waiting` (lease cleared;
    a `finish` requests it again); `cancel_running` → each running execution not yet
    asked is flagged `cancel_requested` and gets an `execution.cancel` message, and this
    one is `waiting`. An execution already `running` (resumed after a crash) stays
    `running`. If slots remain after admitting, the oldest waiting one is requested too
    (so raising or removing a graph's concurrency drains its waiting executions).

    Raises `NotFound` (no such execution or graph), `Conflict` (this worker does not hold
    the lease, or the execution already ended, e.g. cancelled), `ValueError` (bad
    arguments).
    """
    if concurrency is not None and concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if on_overlap not in _ON_OVERLAP:
        raise ValueError(f"unknown on_overlap {on_overlap!r}")
    now = now or utcnow()
    lease = _lease(now, lease_seconds)
    execution = await _lock(conn, execution_id, require_graph=True)
    if execution.finished:
        raise Conflict(f"execution {execution_id} already ended {execution.status}")
    if execution.worker_id != worker_id:
        raise Conflict(f"execution {execution_id} is not leased by {worker_id}")
    this = update(executions).where(_c.id == execution_id)
    if execution.status == "running":
        await conn.execute(this.values(lease_expires_at=lease))
        return "running"
    if concurrency is None:  # no limit: who else runs or waits does not matter
        await conn.execute(this.values(status="running", started_at=now, lease_expires_at=lease))
        await _request_oldest_waiting(conn, execution.graph, now)
        return "running"

    running = (
        (
            await conn.execute(
                select(_c.id)
                .where(_c.graph == execution.graph, _c.status == "running")
                .order_by(_c.id)
            )
        )
        .scalars()
        .all()
    )
    # Waiting executions already woken (a request is on its way: no worker, a pending
    # marker) hold their slot, so a newcomer cannot overtake them (first in, first out).
    woken = 0
    if execution.status == "queued":
        woken = (
            await conn.execute(
                select(func.count())
                .select_from(executions)
                .where(
                    _c.graph == execution.graph,
                    _c.status == "waiting",
                    _c.worker_id.is_(None),
                    _c.lease_expires_at.is_not(None),
                )
            )
        ).scalar_one()
    if concurrency is None or len(running) + woken < concurrency:
        await conn.execute(this.values(status="running", started_at=now, lease_expires_at=lease))
        if concurrency is None or len(running) + 1 < concurrency:
            await _request_oldest_waiting(conn, execution.graph, now)
        return "running"
    if on_overlap == "skip":
        await conn.execute(
            this.values(status="skipped", finished_at=now, worker_id=None, lease_expires_at=None)
        )
        return "skipped"
    if on_overlap == "cancel_running":
        flagged = (
            (
                await conn.execute(
                    update(executions)
                    .where(
                        _c.id.in_(running),
                        _c.status == "running",
                        _c.cancel_requested.is_(False),
                    )
                    .values(cancel_requested=True)
                    .returning(_c.id)
                )
            )
            .scalars()
            .all()
        )
        for running_id in sorted(flagged):
            await enqueue(
                conn,
                "execution.cancel",
                key=running_id,
                data={"execution_id": running_id, "by": f"on_overlap:{execution_id}"},
            )
    await conn.execute(this.values(status="waiting", worker_id=None, lease_expires_at=None))
    return "waiting"


async def finish(
    conn: AsyncConnection,
    execution_id: str,
    status: str,
    *,
    error: str | None = None,
    now: datetime | None = None,
) -> str | None:
    """End the execution with `status` (one of `FINISHED_STATUSES`): finished_at, error,
    lease cleared. In the same transaction, with the graph's row locked, the OLDEST
    `waiting` execution of the graph not already requested gets an `execution.requested`;
    its id is returned (None if there is none). An execution that already ended is left
    as it is (None): finishing twice is harmless.

    Raises `NotFound`, `ValueError` for a status that is not final.
    """
    if status not in FINISHED_STATUSES:
        raise ValueError(f"{status!r} is not a final status")
    now = now or utcnow()
    execution = await _lock(conn, execution_id, require_graph=False)
    if execution.finished:
        return None
    await conn.execute(
        update(executions)
        .where(_c.id == execution_id)
        .values(status=status, finished_at=now, error=error, worker_id=None, lease_expires_at=None)
    )
    return await _request_oldest_waiting(conn, execution.graph, now)


# --- reaper (DESIGN §7) -----------------------------------------------------------------


async def reap(
    conn: AsyncConnection,
    *,
    now: datetime | None = None,
    queued_after_seconds: float = 300,
    limit: int = 100,
) -> list[str]:
    """Request again (a fresh `execution.requested` in the outbox) the executions that
    lost their owner: an expired lease (a worker died, or a claimed one was never
    admitted), a `queued` one older than `queued_after_seconds` that nobody claimed, and a
    `running` one released without requeue. Returns their ids, oldest first.

    A reaped `running` execution stays `running`: its worker is cleared (the old worker's
    `renew` now fails) and the next claimer takes it over and resumes it. Each reaped row
    gets a pending requeue until `now + queued_after_seconds`, so the next passes leave it
    alone meanwhile; on PostgreSQL rows are taken `FOR UPDATE SKIP LOCKED`, so concurrent
    reapers write one message per execution.
    """
    now = now or utcnow()
    backoff = timedelta(seconds=queued_after_seconds)
    query: Select[tuple[str, str]] = (
        select(_c.id, _c.graph)
        .where(
            _c.status.in_(ACTIVE_STATUSES),
            or_(
                and_(_c.lease_expires_at.is_not(None), _c.lease_expires_at <= now),
                and_(
                    _c.status == "queued",
                    _c.lease_expires_at.is_(None),
                    _c.created_at <= now - backoff,
                ),
                and_(_c.status == "running", _c.lease_expires_at.is_(None)),
            ),
        )
        .order_by(_c.created_at, _c.id)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = (await conn.execute(query)).all()
    if not rows:
        return []
    ids = [row.id for row in rows]
    await conn.execute(
        update(executions)
        .where(_c.id.in_(ids))
        .values(worker_id=None, lease_expires_at=now + backoff)
    )
    for row in rows:
        await _request(conn, row.id, row.graph)
    return ids


# --- cancel -----------------------------------------------------------------------------


async def request_cancel(
    conn: AsyncConnection, execution_id: str, by: str, *, now: datetime | None = None
) -> ExecutionRecord:
    """Ask for the execution to be cancelled; returns it as it now is.

    A `queued` or `waiting` one ends `cancelled` at once. A `running` one is flagged
    `cancel_requested` and an `execution.cancel` `{execution_id, by}` goes to the control
    channel (again on every call; its worker also sees the flag). One that already ended
    is returned as it is.

    Raises `NotFound`.
    """
    now = now or utcnow()
    execution = await _lock(conn, execution_id, require_graph=False)
    if execution.finished:
        return execution
    this = update(executions).where(_c.id == execution_id).returning(*_COLUMNS)
    if execution.status == "running":
        row = (await conn.execute(this.values(cancel_requested=True))).one()
        await enqueue(
            conn,
            "execution.cancel",
            key=execution_id,
            data={"execution_id": execution_id, "by": by},
        )
        return _record(row)
    row = (
        await conn.execute(
            this.values(
                status="cancelled",
                cancel_requested=True,
                finished_at=now,
                worker_id=None,
                lease_expires_at=None,
            )
        )
    ).one()
    if execution.status == "waiting" and execution.lease_expires_at is not None:
        # It had been requested by a `finish`: pass that wake-up on to the next one.
        await _request_oldest_waiting(conn, execution.graph, now)
    return _record(row)


# --- internals --------------------------------------------------------------------------


async def _request(conn: AsyncConnection, execution_id: str, graph: str) -> None:
    await enqueue(
        conn,
        "execution.requested",
        key=execution_id,
        data={"execution_id": execution_id, "graph": graph},
    )


async def _lock(
    conn: AsyncConnection, execution_id: str, *, require_graph: bool
) -> ExecutionRecord:
    """The execution, after locking its graph's row and then its own (PostgreSQL)."""
    postgres = conn.dialect.name == "postgresql"
    graph = (await conn.execute(select(_c.graph).where(_c.id == execution_id))).scalar()
    if graph is None:
        raise NotFound(f"execution {execution_id} not found")
    graph_query = select(graphs.c.name).where(graphs.c.name == graph)
    if postgres:
        # FOR NO KEY UPDATE: serializes admissions without blocking foreign-key checks
        # of rows that reference the graph (versions, triggers).
        graph_query = graph_query.with_for_update(key_share=True)
    if (await conn.execute(graph_query)).first() is None and require_graph:
        raise NotFound(f"graph {graph!r} not found")
    query = select(*_COLUMNS).where(_c.id == execution_id)
    if postgres:
        # FOR NO KEY UPDATE too: a worker appending logs or node runs of this execution
        # holds FOR KEY SHARE on it (foreign keys); FOR UPDATE would deadlock with it.
        query = query.with_for_update(key_share=True)
    row = (await conn.execute(query)).first()
    if row is None:
        raise NotFound(f"execution {execution_id} not found")
    return _record(row)


async def _request_oldest_waiting(conn: AsyncConnection, graph: str, now: datetime) -> str | None:
    """Request the oldest `waiting` execution of `graph` with no pending request; the
    caller holds the graph's lock."""
    oldest: str | None = (
        await conn.execute(
            select(_c.id)
            .where(
                _c.graph == graph,
                _c.status == "waiting",
                _c.worker_id.is_(None),
                or_(_c.lease_expires_at.is_(None), _c.lease_expires_at <= now),
            )
            .order_by(_c.created_at, _c.id)
            .limit(1)
        )
    ).scalar()
    if oldest is None:
        return None
    await conn.execute(
        update(executions)
        .where(_c.id == oldest, _c.worker_id.is_(None))
        .values(lease_expires_at=now + timedelta(seconds=REQUEUE_GRACE_SECONDS))
    )
    await _request(conn, oldest, graph)
    return oldest
