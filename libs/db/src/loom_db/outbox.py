"""The outbox: messages written in the same transaction as the change they announce.

A relay (`loom_db.relay`) fetches unsent rows (`fetch_unsent`), publishes them and marks
them sent (`mark_sent`), all in one transaction; it is woken right after a commit that
wrote one and polls about once a second as a fallback (`OutboxWaker`). Several relays are
safe together: on PostgreSQL each fetch locks its rows and skips rows another relay has
locked (`FOR UPDATE SKIP LOCKED`); SQLite has a single writer.

`OutboxWaker` is woken in-process by `Database.on_commit` callbacks and, on PostgreSQL,
by `LISTEN` on `NOTIFY_CHANNEL` over a dedicated connection (the NOTIFY that `enqueue`
sends is delivered on commit, to every process). That connection is re-established with
backoff when it drops; while it is down the poll fallback still runs, and every
(re)connect wakes the relay once, since a notification may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_common import CHANNEL_OF, encode_envelope
from loom_db import raw
from loom_db.models import outbox as _outbox
from loom_db.types import utcnow

if TYPE_CHECKING:
    from loom_db.database import Database

__all__ = [
    "LISTENER_APPLICATION_NAME",
    "NOTIFY_CHANNEL",
    "OutboxMessage",
    "OutboxWaker",
    "enqueue",
    "enqueue_many",
    "fetch_unsent",
    "mark_sent",
    "purge_sent",
]

_log = logging.getLogger("loom.db.outbox")

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


async def enqueue_many(
    conn: AsyncConnection, messages: Sequence[tuple[str, str, dict[str, Any]]]
) -> None:
    """`enqueue` for many `(type, key, data)` at once: one multi-row insert and one
    NOTIFY (PostgreSQL), in the caller's transaction. Nothing for an empty list."""
    if not messages:
        return
    now = utcnow()
    await conn.execute(
        insert(_outbox),
        [
            {
                "channel": CHANNEL_OF[type],
                "key": key,
                "envelope": encode_envelope(type, data),
                "created_at": now,
            }
            for type, key, data in messages
        ],
    )
    if conn.dialect.name == "postgresql":
        await conn.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """An unsent outbox row: publish `envelope` on `channel` with `key`."""

    id: int
    channel: str
    key: str
    envelope: bytes
    created_at: datetime


_FETCH_UNSENT = """
SELECT id, channel, key, envelope, created_at FROM outbox
WHERE sent_at IS NULL ORDER BY id LIMIT %b FOR UPDATE SKIP LOCKED
"""
_MARK_SENT = "UPDATE outbox SET sent_at = %b WHERE id = ANY(%b::bigint[])"


async def fetch_unsent(conn: AsyncConnection, limit: int = 100) -> list[OutboxMessage]:
    """Up to `limit` unsent messages, oldest first. On PostgreSQL the rows stay locked
    until the caller's transaction ends, and rows locked by another relay are skipped:
    publish, `mark_sent`, then commit, all in that transaction."""
    if conn.dialect.name == "postgresql":  # the relay's every pass: straight on psycopg
        rows = await raw.execute(conn, _FETCH_UNSENT, [limit])
        return [
            OutboxMessage(id, channel, key, bytes(envelope), created_at.astimezone(UTC))
            for id, channel, key, envelope, created_at in rows
        ]
    query = (
        select(
            _outbox.c.id,
            _outbox.c.channel,
            _outbox.c.key,
            _outbox.c.envelope,
            _outbox.c.created_at,
        )
        .where(_outbox.c.sent_at.is_(None))
        .order_by(_outbox.c.id)
        .limit(limit)
    )
    result = await conn.execute(query)
    return [OutboxMessage(*row) for row in result]


async def mark_sent(conn: AsyncConnection, ids: Sequence[int]) -> None:
    """Mark the messages `ids` sent (now), in the caller's transaction."""
    if ids and conn.dialect.name == "postgresql":
        await raw.execute(conn, _MARK_SENT, [utcnow(), list(ids)])
    elif ids:
        await conn.execute(
            update(_outbox).where(_outbox.c.id.in_(list(ids))).values(sent_at=utcnow())
        )


async def purge_sent(conn: AsyncConnection, older_than: datetime) -> int:
    """Delete the messages sent before `older_than`; returns how many. Unsent messages
    are never deleted, however old."""
    result = await conn.execute(
        delete(_outbox).where(_outbox.c.sent_at.is_not(None), _outbox.c.sent_at < older_than)
    )
    return int(result.rowcount)


LISTENER_APPLICATION_NAME = "loom-outbox-listener"
"""The `application_name` of the LISTEN connection (how to find it in pg_stat_activity)."""

_CONNECT_TIMEOUT = 10.0


class OutboxWaker:
    """Tells the relay when to look at the outbox.

    `wake()` (register it with `Database.on_commit`) and, when `listen_url` is a
    PostgreSQL URL, every NOTIFY on `NOTIFY_CHANNEL` set the signal; `wait(timeout)`
    returns when it is set or after `timeout` seconds. Use it as
    `async with OutboxWaker.for_database(db) as waker:` (or call `start()` and
    `aclose()`): that runs and stops the LISTEN loop.

    The loop reconnects after a failure with exponential backoff from `min_backoff` to
    `max_backoff` seconds (each failure logged), and checks an idle connection every
    `health_interval` seconds, so a connection that died silently is noticed.
    """

    def __init__(
        self,
        listen_url: str | None = None,
        *,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        health_interval: float = 30.0,
    ) -> None:
        self._conninfo: str | None = None
        if listen_url is not None:
            url = make_url(listen_url)
            if url.get_backend_name() != "postgresql":
                raise ValueError(f"LISTEN needs a PostgreSQL URL, not {url.drivername}://")
            self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.health_interval = health_interval
        self._event = asyncio.Event()
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connects = 0
        """How many times LISTEN was established (1 + reconnects)."""

    @classmethod
    def for_database(cls, db: Database, **options: Any) -> OutboxWaker:
        """A waker woken by `db`'s commits and, on PostgreSQL, by LISTEN on its database."""
        url = db.engine.url.render_as_string(hide_password=False) if db.is_postgres else None
        waker = cls(url, **options)
        db.on_commit(waker.wake)
        return waker

    @property
    def listening(self) -> bool:
        """Whether a LISTEN connection is established now."""
        return self._listening.is_set()

    def wake(self) -> None:
        """Wake the relay (call from the event loop's thread)."""
        self._event.set()

    # A timeout that ends the wait normally, as threading.Event.wait's: it is the relay's
    # poll interval, not an error, hence the parameter (ASYNC109).
    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Return True as soon as woken (at once if woken since the last call), or False
        after `timeout` seconds without a wake-up."""
        if not self._event.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._event.wait()
            except TimeoutError:
                return False
        self._event.clear()
        return True

    async def wait_listening(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until LISTEN is established (False after `timeout`, or without a URL)."""
        if self._conninfo is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._listening.wait()
        except TimeoutError:
            return False
        return True

    async def start(self) -> None:
        """Start the LISTEN loop (nothing to start without a PostgreSQL URL)."""
        if self._conninfo is not None and self._task is None:
            self._task = asyncio.create_task(
                self._listen(self._conninfo), name="loom-outbox-listen"
            )

    async def aclose(self) -> None:
        """Stop the LISTEN loop and close its connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def __aenter__(self) -> OutboxWaker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _listen(self, conninfo: str) -> None:
        import psycopg  # only PostgreSQL needs it (and loom_db depends on it anyway)

        delay = self.min_backoff
        while True:
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    conn = await psycopg.AsyncConnection.connect(
                        conninfo, autocommit=True, application_name=LISTENER_APPLICATION_NAME
                    )
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._listening.set()
                    self.connects += 1
                    delay = self.min_backoff
                    self.wake()  # a notification may have gone out while not listening
                    while True:
                        async for _ in conn.notifies(timeout=self.health_interval):
                            self.wake()
                        async with asyncio.timeout(_CONNECT_TIMEOUT):
                            await conn.execute("SELECT 1")
            except (psycopg.OperationalError, OSError, TimeoutError) as exc:
                self._listening.clear()
                _log.warning(
                    "outbox LISTEN connection failed (%s); reconnecting in %.1fs",
                    str(exc).strip() or type(exc).__name__,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
