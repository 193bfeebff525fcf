"""One async engine per process, for SQLite (aiosqlite) or PostgreSQL (psycopg 3).

`Database` owns the engine and hands out transactions (`async with db.transaction() as
conn`) whose connection errors arrive as `DatabaseUnavailable`. Operations elsewhere in
loom_db are plain async functions over that `AsyncConnection` (SQLAlchemy Core).

On PostgreSQL a pooled connection is checked for life when it is handed out without a
round trip (`_check_alive`: the socket is read without blocking, so a server that closed it
on restart is noticed and the pool reconnects), reads run in autocommit (no BEGIN and
ROLLBACK round trips; each statement sees what was committed before it, as in a READ
COMMITTED transaction), and JSON columns are decoded with orjson. The hottest reads (the
REST API's execution list) can skip SQLAlchemy altogether: `direct_read()` hands out a
psycopg connection in autocommit from a small pool of its own (`_DirectPool`, sized like
the engine's), checked for life the same way.

SQLite runs in WAL mode with a busy timeout and foreign keys on; it has a single writer,
so every transaction that writes takes the write lock at its start (`BEGIN IMMEDIATE`)
instead of failing with "database is locked" halfway through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg.types.json import set_json_loads
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from loom_common import LoomSettings
from loom_db.errors import DatabaseUnavailable, TransactionConflict, translate_errors

__all__ = ["Database", "create_database", "database_from_settings"]

_log = logging.getLogger("loom.db")
T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 10_000


def create_database(
    url: str, *, pool_size: int = 10, max_overflow: int = 10, echo: bool = False
) -> Database:
    """A `Database` for `url` (`sqlite+aiosqlite:///path` or `postgresql+psycopg://...`).
    Creates the SQLite file's directory. Does not connect yet."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    elif parsed.get_backend_name() == "postgresql":
        if parsed.drivername != "postgresql+psycopg":
            raise ValueError(
                f"use postgresql+psycopg:// for PostgreSQL, not {parsed.drivername}://"
            )
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow)
    else:
        raise ValueError(
            f"unsupported database URL {parsed.drivername}:// "
            "(use sqlite+aiosqlite:// or postgresql+psycopg://)"
        )
    engine = create_async_engine(parsed, **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
        return Database(engine)
    _configure_postgres(engine)
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    return Database(engine, _DirectPool(conninfo, pool_size, pool_size + max_overflow))


def database_from_settings(settings: LoomSettings) -> Database:
    """The process's `Database`, as `LOOM_DATABASE_URL` and the pool settings say."""
    return create_database(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
    )


_LONG_NUMBER = re.compile(rb"\d{19}")
"""19 digits or more: maybe beyond 64 bits, which orjson would read as a float."""


def _json_loads(data: bytes | str) -> Any:
    """orjson's decoding, or the standard library's where they differ: integers beyond 64
    bits (kept exact) and numbers beyond a double (infinity)."""
    raw = data.encode() if isinstance(data, str) else data
    if _LONG_NUMBER.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def _is_alive(connection: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle connection is still open, without a round trip: read what its
    socket holds without blocking. A server that stopped or restarted closed it (after a
    FATAL message, hence two reads)."""
    pgconn = connection.pgconn
    try:
        for _ in range(2):
            pgconn.consume_input()
    except psycopg.OperationalError:  # the socket is gone
        return False
    return pgconn.status == ConnStatus.OK


def _configure_postgres(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        set_json_loads(_json_loads, dbapi_connection.driver_connection)

    @event.listens_for(sync_engine, "checkout")
    def _check_alive(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        """Instead of a pre-ping (a round trip per checkout): `_is_alive`. The pool then
        reconnects, every older connection discarded, as after a failed pre-ping."""
        if not _is_alive(dbapi_connection.driver_connection):
            raise sa_exc.InvalidatePoolError("the connection to PostgreSQL is closed")


class _DirectPool:
    """psycopg connections in autocommit for `Database.direct_read()`, outside SQLAlchemy
    (whose checkout, return and greenlet hops cost more than a short read itself).

    At most `limit` connections are open at once (a caller waits for one to be returned);
    up to `size` idle ones are kept. A connection is handed out only if `_is_alive`, so
    after a server restart the stale ones are dropped and new ones made; one returned in
    a bad state (broken, or inside a transaction) is closed. Connecting opens a new one
    at once: a server that is down fails the read, it does not make it wait.
    """

    def __init__(self, conninfo: str, size: int, limit: int) -> None:
        self._conninfo = conninfo
        self._size = size
        self._limit = asyncio.Semaphore(limit)
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._closed = False

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._limit:
            connection = await self._get()
            try:
                yield connection
            finally:
                await self._put(connection)

    async def _get(self) -> psycopg.AsyncConnection[Any]:
        if self._closed:
            raise DatabaseUnavailable("the database has been disposed of")
        while self._idle:
            connection = self._idle.pop()
            if _is_alive(connection):
                return connection
            await connection.close()
        try:
            connection = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"database unavailable: {exc}") from exc
        set_json_loads(_json_loads, connection)
        return connection

    async def _put(self, connection: psycopg.AsyncConnection[Any]) -> None:
        reusable = (
            not self._closed
            and len(self._idle) < self._size
            and connection.pgconn.status == ConnStatus.OK
            and connection.pgconn.transaction_status == TransactionStatus.IDLE
        )
        if reusable:
            self._idle.append(connection)
        else:
            await connection.close()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()


def _configure_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would defer BEGIN; Loom emits BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        readonly = connection.get_execution_options().get("loom_readonly", False)
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


class Database:
    """The process's database: one engine, transactions, and the outbox wake-up hooks."""

    def __init__(self, engine: AsyncEngine, direct: _DirectPool | None = None) -> None:
        self.engine = engine
        self._direct = direct
        self.dialect = engine.dialect.name
        options: dict[str, Any] = {"loom_readonly": True}
        if self.dialect == "postgresql":
            options["isolation_level"] = "AUTOCOMMIT"
        self._reader = engine.execution_options(**options)
        """The same engine and pool, for `read()`."""
        self._after_commit: list[Callable[[], None]] = []

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction, committed when the block ends without error."""
        with translate_errors():
            async with self.engine.begin() as conn:
                yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reading, never writing: on SQLite it does not take the write
        lock; on PostgreSQL it runs in autocommit, so each statement sees what was
        committed before it (as in the default READ COMMITTED) without BEGIN and ROLLBACK
        round trips."""
        with translate_errors():
            async with self._reader.connect() as conn:
                yield conn

    @asynccontextmanager
    async def direct_read(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """PostgreSQL only: a psycopg connection in autocommit for reading, never writing,
        outside SQLAlchemy (its own small pool; see `_DirectPool`), for the hottest
        reads. Each statement sees what was committed before it, as in `read()`. Errors
        of the statements run on it are the caller's to translate (e.g. with
        `classify_driver_error`); failing to connect raises `DatabaseUnavailable`.
        Raises `RuntimeError` on SQLite."""
        if self._direct is None:
            raise RuntimeError(f"direct_read() needs PostgreSQL, not {self.dialect}")
        async with self._direct.connection() as connection:
            yield connection

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every `notify_committed()` (the outbox relay's wake-up)."""
        self._after_commit.append(callback)

    def notify_committed(self) -> None:
        for callback in self._after_commit:
            callback()

    async def retrying(
        self, operation: Callable[[], Awaitable[T]], *, attempts: int = 3, delay: float = 0.2
    ) -> T:
        """Run an IDEMPOTENT operation, retrying only `DatabaseUnavailable` and
        `TransactionConflict`, with backoff; each retry is logged."""
        for attempt in range(1, attempts + 1):
            try:
                return await operation()
            except (DatabaseUnavailable, TransactionConflict) as exc:
                if attempt == attempts:
                    raise
                _log.warning("%s (attempt %d of %d)", exc, attempt, attempts)
                await asyncio.sleep(delay * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def dispose(self) -> None:
        """Close every pooled connection (the engine's and `direct_read()`'s)."""
        if self._direct is not None:
            await self._direct.close()
        await self.engine.dispose()
