"""Retention on both databases: old finished executions go with their logs and node runs,
in batches; recent and unfinished ones stay."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db.database import Database
from loom_db.models import executions, log_lines, node_runs
from loom_db.retention import delete_older_than
from loom_db.types import utcnow

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=utcnow().tzinfo)


def execution(created: datetime, status: str, finished: datetime | None) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "graph": "g",
        "graph_version": 1,
        "status": status,
        "params": {},
        "trigger_type": "timer",
        "trigger_info": {},
        "created_at": created,
        "started_at": created,
        "finished_at": finished,
    }


async def add(conn: AsyncConnection, rows: list[dict[str, Any]], lines: int = 2) -> None:
    await conn.execute(insert(executions), rows)
    await conn.execute(
        insert(node_runs),
        [
            {"execution_id": r["id"], "node": "a", "name": "a", "attempt": 1, "status": "succeeded"}
            for r in rows
        ],
    )
    await conn.execute(
        insert(log_lines),
        [
            {
                "execution_id": r["id"],
                "seq": seq,
                "node": "a",
                "stream": "stdout",
                "ts": r["created_at"],
                "text": f"line {seq}",
            }
            for r in rows
            for seq in range(1, lines + 1)
        ],
    )


async def count(db: Database, table: Any) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def test_old_finished_executions_are_deleted_with_logs_in_batches(db: Database) -> None:
    old = NOW - timedelta(days=40)
    statuses = ["succeeded", "failed", "cancelled", "timed_out", "skipped"]
    old_rows = [
        execution(old - timedelta(minutes=i), statuses[i % 5], old + timedelta(minutes=1))
        for i in range(1_200)
    ]
    recent = NOW - timedelta(days=2)
    keep_rows = [
        execution(recent, "succeeded", recent + timedelta(minutes=1)),
        # Finished just inside the window, though created before it.
        execution(NOW - timedelta(days=31), "failed", NOW - timedelta(days=29)),
        # Old but never finished: retention never touches them.
        execution(old, "running", None),
        execution(old, "queued", None),
        execution(old, "waiting", None),
    ]
    async with db.transaction() as conn:
        await add(conn, old_rows)
        await add(conn, keep_rows)

    deleted = await delete_older_than(db, 30, batch_size=500, now=NOW)

    assert deleted == 1_200
    async with db.read() as conn:
        left = set((await conn.execute(select(executions.c.id))).scalars())
        assert left == {r["id"] for r in keep_rows}
        assert set((await conn.execute(select(log_lines.c.execution_id))).scalars()) == left
        assert set((await conn.execute(select(node_runs.c.execution_id))).scalars()) == left
    assert await count(db, log_lines) == 2 * len(keep_rows)
    # Nothing more to do: a second run deletes nothing.
    assert await delete_older_than(db, 30, now=NOW) == 0


async def test_each_batch_commits_on_its_own(db: Database) -> None:
    """Batches are separate transactions: a batch size of 7 still deletes everything."""
    old = NOW - timedelta(days=10)
    async with db.transaction() as conn:
        await add(conn, [execution(old, "succeeded", old) for _ in range(20)], lines=1)
    commits = 0

    def on_commit(_conn: Any) -> None:
        nonlocal commits
        commits += 1

    event.listen(db.engine.sync_engine, "commit", on_commit)
    try:
        assert await delete_older_than(db, 7, batch_size=7, now=NOW) == 20
    finally:
        event.remove(db.engine.sync_engine, "commit", on_commit)
    assert commits == 4  # 7 + 7 + 6, then an empty batch that ends the loop
    assert await count(db, executions) == 0


async def test_zero_days_deletes_everything_finished_and_bad_arguments_are_refused(
    db: Database,
) -> None:
    async with db.transaction() as conn:
        await add(conn, [execution(NOW - timedelta(seconds=5), "succeeded", NOW)])
    assert await delete_older_than(db, 0, now=NOW + timedelta(seconds=1)) == 1
    with pytest.raises(ValueError, match="days"):
        await delete_older_than(db, -1)
    with pytest.raises(ValueError, match="batch_size"):
        await delete_older_than(db, 30, batch_size=0)
