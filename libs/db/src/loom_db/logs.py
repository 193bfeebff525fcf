"""Log lines: append a batch on the fast path, read them back in `seq` order.

The worker commits an execution's log lines in batches (at most 100 ms or 500 lines,
DESIGN §8), each line numbered with a per-execution `seq` 1, 2, 3, ... Keeping `seq`
gapless is the writer's job (`last_seq` tells a resumed writer where to continue); the
key (execution id, seq) makes a line stored twice an error, never a silent duplicate.

The fast path: on PostgreSQL a batch goes in with one binary `COPY` through the psycopg
connection underneath the caller's SQLAlchemy connection, so it is part of the caller's
transaction; on SQLite it is one `executemany` of a Core insert.

PostgreSQL's `text` cannot hold NUL characters, which a process may well print: both
databases store them as U+FFFD, so a batch never fails because of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db.errors import Conflict, NotFound, classify_driver_error
from loom_db.models import log_lines as _log_lines
from loom_db.pagination import check_limit

__all__ = ["LogLineIn", "LogLineOut", "append_logs", "last_seq", "read_logs"]

_COPY = "COPY log_lines (execution_id, seq, node, stream, ts, text) FROM STDIN (FORMAT BINARY)"
_COPY_TYPES = ("text", "int8", "text", "text", "timestamptz", "text")


class LogLineIn(NamedTuple):
    """One line to store. `ts` is an aware datetime; `stream` is `stdout`, `stderr` or
    `loom` (the engine's own notes)."""

    seq: int
    node: str
    stream: str
    ts: datetime
    text: str


class LogLineOut(NamedTuple):
    """One stored line, as `read_logs` returns it (`ts` aware, UTC)."""

    seq: int
    node: str
    stream: str
    ts: datetime
    text: str


def _clean(text: str) -> str:
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


async def append_logs(conn: AsyncConnection, execution_id: str, lines: Sequence[LogLineIn]) -> None:
    """Store `lines` of execution `execution_id` in the caller's transaction.

    Raises `Conflict` if a (execution id, seq) is already stored (the whole batch is then
    refused: the caller's transaction is rolled back), `NotFound` if there is no such
    execution, `ValueError` for a naive `ts`, `DatabaseUnavailable` if the connection
    fails.
    """
    if not lines:
        return
    # Checked before anything is written: a failure halfway through a COPY would leave
    # the caller's PostgreSQL transaction aborted.
    if any(line.ts.tzinfo is None for line in lines):
        raise ValueError("naive datetime given to the database; use an aware UTC datetime")
    if conn.dialect.name == "postgresql":
        await _copy(conn, execution_id, lines)
        return
    rows = [
        {
            "execution_id": execution_id,
            "seq": line.seq,
            "node": line.node,
            "stream": line.stream,
            "ts": line.ts,
            "text": _clean(line.text),
        }
        for line in lines
    ]
    try:
        await conn.execute(insert(_log_lines), rows)
    except sa_exc.IntegrityError as exc:
        raise _integrity(execution_id, str(exc.orig)) from exc
    except sa_exc.StatementError as exc:
        if isinstance(exc.orig, ValueError):  # a naive ts (UtcDateTime refuses it)
            raise ValueError(str(exc.orig)) from exc
        raise


async def _copy(conn: AsyncConnection, execution_id: str, lines: Sequence[LogLineIn]) -> None:
    import psycopg  # only PostgreSQL needs it; loom_db depends on it anyway

    raw = await conn.get_raw_connection()
    pg: Any = raw.driver_connection
    try:
        async with pg.cursor() as cur, cur.copy(_COPY) as copy:
            copy.set_types(_COPY_TYPES)
            write = copy.write_row
            for seq, node, stream, ts, text in lines:
                await write((execution_id, seq, node, stream, ts, _clean(text)))
    except psycopg.IntegrityError as exc:
        raise _integrity(execution_id, str(exc)) from exc
    except psycopg.Error as exc:
        kind = classify_driver_error(exc)
        if kind is None:
            raise
        raise kind(f"appending log lines: {exc}") from exc


def _integrity(execution_id: str, message: str) -> Exception:
    lowered = message.lower()
    if "foreign key" in lowered:
        return NotFound(f"no execution {execution_id!r} to append log lines to")
    return Conflict(
        f"a log line of execution {execution_id!r} with one of these seq is already stored"
    )


async def read_logs(
    conn: AsyncConnection,
    execution_id: str,
    *,
    after: int = 0,
    node: str | None = None,
    limit: int = 1000,
) -> list[LogLineOut]:
    """Up to `limit` lines of `execution_id` with `seq > after`, in `seq` order; only the
    lines of node instance `node` when given. Page on with `after=lines[-1].seq`."""
    query = (
        select(
            _log_lines.c.seq,
            _log_lines.c.node,
            _log_lines.c.stream,
            _log_lines.c.ts,
            _log_lines.c.text,
        )
        .where(_log_lines.c.execution_id == execution_id, _log_lines.c.seq > after)
        .order_by(_log_lines.c.seq)
        .limit(check_limit(limit))
    )
    if node is not None:
        query = query.where(_log_lines.c.node == node)
    result = await conn.execute(query)
    return [LogLineOut(*row) for row in result]


async def last_seq(conn: AsyncConnection, execution_id: str) -> int:
    """The highest stored `seq` of `execution_id`, 0 if it has no lines."""
    result = await conn.execute(
        select(func.coalesce(func.max(_log_lines.c.seq), 0)).where(
            _log_lines.c.execution_id == execution_id
        )
    )
    return int(result.scalar_one())
