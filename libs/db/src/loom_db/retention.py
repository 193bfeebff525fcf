"""Retention: delete finished executions older than N days with their node runs and log
lines (DESIGN §7, `LOOM_RETENTION_DAYS`), run by the timer service.

Small batches, each its own short transaction, so deleting a year of history never holds
locks for long nor blocks SQLite's single writer for more than one batch. On PostgreSQL a
batch skips executions locked by someone else (`SKIP LOCKED`), so several timer replicas
can run retention at once without waiting on each other.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db.database import Database
from loom_db.models import executions, log_lines, node_runs
from loom_db.types import utcnow

__all__ = ["FINISHED_STATUSES", "delete_older_than"]

FINISHED_STATUSES = ("succeeded", "failed", "cancelled", "timed_out", "skipped")
"""The statuses an execution never leaves; only these are ever deleted."""


async def delete_older_than(
    conn_factory: Database, days: int, *, batch_size: int = 500, now: datetime | None = None
) -> int:
    """Delete the executions that finished more than `days` days before `now` (default:
    the current time), with their node runs and log lines; returns how many executions.

    Running, queued and waiting executions are never deleted, however old. Raises
    `ValueError` for negative `days` or a batch size below 1; `DatabaseUnavailable`
    from a batch leaves the batches before it deleted (running it again continues).
    """
    if days < 0:
        raise ValueError(f"days must not be negative, not {days}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    cutoff = (now or utcnow()) - timedelta(days=days)
    deleted = 0
    while True:
        async with conn_factory.transaction() as conn:
            count = await _delete_batch(conn, cutoff, batch_size)
        deleted += count
        if count == 0:
            return deleted


async def _delete_batch(conn: AsyncConnection, cutoff: datetime, batch_size: int) -> int:
    query = (
        select(executions.c.id)
        .where(
            executions.c.status.in_(FINISHED_STATUSES),
            executions.c.finished_at < cutoff,
            # Implied by the line above (an execution finishes after it is created), and
            # served by the created_at index, so a batch does not scan the whole table.
            executions.c.created_at < cutoff,
        )
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    )
    ids = list((await conn.execute(query)).scalars())
    if ids:
        await conn.execute(delete(log_lines).where(log_lines.c.execution_id.in_(ids)))
        await conn.execute(delete(node_runs).where(node_runs.c.execution_id.in_(ids)))
        await conn.execute(delete(executions).where(executions.c.id.in_(ids)))
    return len(ids)
