"""The lease reaper (DESIGN §7): executions that lost their owner get a fresh
`execution.requested` through the outbox.

Safe with any number of timer replicas reaping at the same moment: rows are taken
`FOR UPDATE SKIP LOCKED` and each one requeued is marked with a pending request
(`loom_db.executions.reap`), so two replicas write ONE request per lost execution
(SQLite has a single writer anyway). Retention, the other housekeeping of the timer, is
`loom_db.retention.delete_older_than` as it is (batched, SKIP LOCKED).
"""

from __future__ import annotations

from datetime import datetime

from loom_db import Database, executions

__all__ = ["REAP_BATCH", "reap_lost"]

REAP_BATCH = 100
"""Executions requeued per transaction: short transactions, however many were lost."""


async def reap_lost(
    database: Database,
    *,
    queued_after_seconds: float,
    batch: int = REAP_BATCH,
    now: datetime | None = None,
) -> list[str]:
    """Request again every execution that lost its owner (an expired lease, `queued`
    for longer than `queued_after_seconds` with nobody claiming it, `running` released
    without requeue), `batch` per transaction until a pass finds fewer; the ids, oldest
    first. Wakes the outbox relay after each pass that requeued something.

    Raises `DatabaseUnavailable` / `TransactionConflict` (the passes before stay done;
    the next call continues), `ValueError` for a batch below 1.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    reaped: list[str] = []
    while True:
        async with database.transaction() as conn:
            ids = await executions.reap(
                conn, now=now, queued_after_seconds=queued_after_seconds, limit=batch
            )
        if ids:
            database.notify_committed()
        reaped.extend(ids)
        if len(ids) < batch:
            return reaped
