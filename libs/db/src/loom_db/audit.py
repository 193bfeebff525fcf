"""The audit log: who did what to which object, when (DESIGN §5, `GET /api/v1/audit`).

Entries are written in the transaction of the change they describe, so an entry exists
exactly when its change was committed. They never hold secret values.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db.models import audit_log
from loom_db.pagination import check_limit, decode_cursor, encode_cursor
from loom_db.types import utcnow

__all__ = ["SYSTEM_ACTOR", "AuditRecord", "list_audit", "record"]

SYSTEM_ACTOR = "system"
"""The actor of changes made by Loom itself or by a caller that named nobody."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    ts: datetime
    actor: str
    action: str
    """`<object type>.<verb>`: `graph.create`, `secret.delete`, `user.update`, ..."""
    object_type: str
    object_id: str
    detail: dict[str, Any]


async def record(
    conn: AsyncConnection,
    *,
    actor: str | None,
    action: str,
    object_type: str,
    object_id: str,
    detail: dict[str, Any] | None = None,
) -> int:
    """Append an entry in the caller's transaction; returns its id. `actor` None is
    `SYSTEM_ACTOR`."""
    result = await conn.execute(
        insert(audit_log).values(
            ts=utcnow(),
            actor=actor or SYSTEM_ACTOR,
            action=action,
            object_type=object_type,
            object_id=object_id,
            detail=detail or {},
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


async def list_audit(
    conn: AsyncConnection,
    *,
    actor: str | None = None,
    object_type: str | None = None,
    object_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[AuditRecord], str | None]:
    """Entries newest first, filtered, one page at a time: `(items, next_cursor)`;
    `next_cursor` is None on the last page. Pages neither skip nor repeat entries while
    new ones are written. Raises `ValueError` for a malformed cursor or a limit below 1.
    """
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(check_limit(limit) + 1)
    if actor is not None:
        query = query.where(audit_log.c.actor == actor)
    if object_type is not None:
        query = query.where(audit_log.c.object_type == object_type)
    if object_id is not None:
        query = query.where(audit_log.c.object_id == object_id)
    if cursor is not None:
        query = query.where(audit_log.c.id < decode_cursor(cursor, int)[0])
    rows = (await conn.execute(query)).mappings().all()
    items = [
        AuditRecord(
            id=row["id"],
            ts=row["ts"],
            actor=row["actor"],
            action=row["action"],
            object_type=row["object_type"],
            object_id=row["object_id"],
            detail=row["detail"],
        )
        for row in rows[:limit]
    ]
    return items, (encode_cursor(items[-1].id) if len(rows) > limit else None)
