"""Webhook deliveries: the outcome of every request to a hook, the last 1,000 per hook
(DESIGN §6), for `GET /api/v1/graphs/{name}/deliveries`.

The trim runs with each insert, in the same transaction: one DELETE of the rows older
than the hook's `keep`-th newest, found through the `(graph, hook, id)` index (a bounded
index scan of `keep` entries; usually it deletes one row). Bound: after a committed
`record_delivery` a hook has at most `keep` rows, plus one per other `record_delivery`
of the same hook that was in flight at the same moment on PostgreSQL (those cannot see
each other's rows); SQLite has a single writer, so there exactly `keep`.
`record_deliveries` writes many rows at once and leaves trimming to its caller
(`trim_deliveries`), for the webhook service's group commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db import raw
from loom_db.models import webhook_deliveries as _deliveries
from loom_db.pagination import check_limit, decode_cursor, encode_cursor
from loom_db.types import utcnow

__all__ = [
    "DELIVERIES_KEPT",
    "DeliveryRecord",
    "NewDelivery",
    "list_deliveries",
    "record_deliveries",
    "record_delivery",
    "trim_deliveries",
]

DELIVERIES_KEPT = 1_000
"""Deliveries kept per (graph, hook)."""


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    id: int
    graph: str
    hook: str
    delivery_id: str | None
    received_at: datetime
    status_code: int
    outcome: str
    """`accepted`, `duplicate`, `skipped`, `unauthorized`, `invalid`, ..."""
    detail: str | None
    execution_id: str | None


async def record_delivery(
    conn: AsyncConnection,
    *,
    graph: str,
    hook: str,
    delivery_id: str | None,
    status_code: int,
    outcome: str,
    detail: str | None = None,
    execution_id: str | None = None,
    keep: int = DELIVERIES_KEPT,
) -> int:
    """Record a delivery's outcome and drop the hook's deliveries beyond the newest
    `keep`; returns the new row's id."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    result = await conn.execute(
        insert(_deliveries).values(
            graph=graph,
            hook=hook,
            delivery_id=delivery_id,
            received_at=utcnow(),
            status_code=status_code,
            outcome=outcome,
            detail=detail,
            execution_id=execution_id,
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    await trim_deliveries(conn, graph, hook, keep)
    return int(key[0])


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """One outcome for `record_deliveries`."""

    graph: str
    hook: str
    delivery_id: str | None
    status_code: int
    outcome: str
    detail: str | None = None
    execution_id: str | None = None


_INSERT_MANY = """
INSERT INTO webhook_deliveries (graph, hook, delivery_id, status_code, outcome, detail,
                                execution_id, received_at)
SELECT *, %b::timestamptz FROM unnest(%b::text[], %b::text[], %b::text[], %b::int[],
                                      %b::text[], %b::text[], %b::text[])
"""


async def record_deliveries(conn: AsyncConnection, new: Sequence[NewDelivery]) -> None:
    """Record many outcomes with one multi-row insert, WITHOUT trimming: the caller calls
    `trim_deliveries` for each hook now and then (a service trims a hook every hundred
    deliveries, so a log holds at most `DELIVERIES_KEPT` plus that)."""
    if not new:
        return
    now = utcnow()
    if conn.dialect.name == "postgresql":
        await raw.execute(
            conn,
            _INSERT_MANY,
            [
                now,
                [d.graph for d in new],
                [d.hook for d in new],
                [d.delivery_id for d in new],
                [d.status_code for d in new],
                [d.outcome for d in new],
                [d.detail for d in new],
                [d.execution_id for d in new],
            ],
        )
        return
    await conn.execute(
        insert(_deliveries),
        [
            {
                "graph": item.graph,
                "hook": item.hook,
                "delivery_id": item.delivery_id,
                "received_at": now,
                "status_code": item.status_code,
                "outcome": item.outcome,
                "detail": item.detail,
                "execution_id": item.execution_id,
            }
            for item in new
        ],
    )


async def trim_deliveries(
    conn: AsyncConnection, graph: str, hook: str, keep: int = DELIVERIES_KEPT
) -> None:
    """Delete the hook's deliveries beyond the newest `keep`."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    same_hook = (_deliveries.c.graph == graph, _deliveries.c.hook == hook)
    # The id of the newest row that falls off; NULL (nothing deleted) while there are
    # no more than `keep`.
    threshold = (
        select(_deliveries.c.id)
        .where(*same_hook)
        .order_by(_deliveries.c.id.desc())
        .offset(keep)
        .limit(1)
        .scalar_subquery()
    )
    await conn.execute(delete(_deliveries).where(*same_hook, _deliveries.c.id <= threshold))


async def list_deliveries(
    conn: AsyncConnection,
    graph: str,
    *,
    hook: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[DeliveryRecord], str | None]:
    """A graph's deliveries (of one hook, or all), newest first, one page at a time:
    `(items, next_cursor)`, `next_cursor` None on the last page. Raises `ValueError` for
    a malformed cursor or a limit below 1."""
    query = (
        select(_deliveries)
        .where(_deliveries.c.graph == graph)
        .order_by(_deliveries.c.id.desc())
        .limit(check_limit(limit) + 1)
    )
    if hook is not None:
        query = query.where(_deliveries.c.hook == hook)
    if cursor is not None:
        query = query.where(_deliveries.c.id < decode_cursor(cursor, int)[0])
    rows = (await conn.execute(query)).all()
    items = [
        DeliveryRecord(
            id=row.id,
            graph=row.graph,
            hook=row.hook,
            delivery_id=row.delivery_id,
            received_at=row.received_at,
            status_code=row.status_code,
            outcome=row.outcome,
            detail=row.detail,
            execution_id=row.execution_id,
        )
        for row in rows[:limit]
    ]
    return items, (encode_cursor(items[-1].id) if len(rows) > limit else None)
