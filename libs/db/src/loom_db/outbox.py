"""The outbox: messages written in the same transaction as the change they announce.

A relay (loom_messaging) fetches unsent rows, publishes them and marks them sent; it is
woken right after a commit that wrote one (in-process, and `LISTEN/NOTIFY` on PostgreSQL)
and polls about once a second as a fallback.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_common import CHANNEL_OF, encode_envelope
from loom_db.models import outbox as _outbox
from loom_db.types import utcnow

__all__ = ["NOTIFY_CHANNEL", "enqueue"]

NOTIFY_CHANNEL = "loom_outbox"
"""The PostgreSQL LISTEN/NOTIFY channel that wakes relays in other processes."""


async def enqueue(conn: AsyncConnection, type: str, key: str, data: dict[str, Any]) -> int:
    """Write a message of `type` (DESIGN §1) to the outbox in the caller's transaction.

    Its channel comes from the type. On PostgreSQL a NOTIFY is sent on commit. The caller
    calls `Database.notify_committed()` after the commit to wake this process's relay.
    Returns the row id.
    """
    channel = CHANNEL_OF[type]
    result = await conn.execute(
        insert(_outbox).values(
            channel=channel, key=key, envelope=encode_envelope(type, data), created_at=utcnow()
        )
    )
    if conn.dialect.name == "postgresql":
        await conn.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))
    row_id = result.inserted_primary_key
    assert row_id is not None
    return int(row_id[0])
