"""The engine: both databases answer, SQLite is in WAL mode, errors are translated."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import cast, literal, select, text

from loom_db.database import Database, create_database
from loom_db.errors import DatabaseUnavailable
from loom_db.types import JsonValue


async def test_both_databases_answer(db: Database) -> None:
    async with db.read() as conn:
        assert (await conn.execute(text("select 1"))).scalar() == 1


async def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    db = create_database(f"sqlite+aiosqlite:///{tmp_path / 'sub' / 'loom.db'}")
    try:
        async with db.transaction() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == 10_000
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
    finally:
        await db.dispose()


async def test_an_unreachable_postgres_is_database_unavailable() -> None:
    db = create_database("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    try:
        with pytest.raises(DatabaseUnavailable):
            async with db.read() as conn:
                await conn.execute(text("select 1"))
    finally:
        await db.dispose()


def test_other_drivers_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="postgresql\\+psycopg"):
        create_database("postgresql+asyncpg://x@y/z")
    with pytest.raises(ValueError, match="unsupported database URL"):
        create_database("mysql+aiomysql://x@y/z")


async def test_a_missing_table_is_a_plain_error_not_unavailable(db: Database) -> None:
    from sqlalchemy.exc import DBAPIError

    with pytest.raises(DBAPIError) as info:
        async with db.read() as conn:
            await conn.execute(text("select * from no_such_table"))
    assert not isinstance(info.value, DatabaseUnavailable)


async def test_pooled_connections_the_server_closed_are_replaced_unnoticed(
    postgres_url: str,
) -> None:
    # What a PostgreSQL restart does to an idle pool, without a round trip per checkout.
    db = create_database(postgres_url, pool_size=3, max_overflow=0)
    try:
        async with db.read() as a, db.read() as b:
            pids = {
                (await a.execute(text("select pg_backend_pid()"))).scalar(),
                (await b.execute(text("select pg_backend_pid()"))).scalar(),
            }
        killer = create_database(postgres_url)
        try:
            async with killer.read() as other:
                killed = await other.execute(
                    text("select pg_terminate_backend(pid) from unnest(cast(:p as int[])) pid"),
                    {"p": list(pids)},
                )
                assert all(killed.scalars())
        finally:
            await killer.dispose()
        await asyncio.sleep(0.2)  # the backends exit and close their sockets
        for _ in range(3):
            async with db.read() as conn:
                pid = (await conn.execute(text("select pg_backend_pid()"))).scalar()
                assert pid not in pids
            async with db.transaction() as conn:
                assert (await conn.execute(text("select 1"))).scalar() == 1
    finally:
        await db.dispose()


async def test_postgres_reads_see_what_others_committed_and_hold_no_transaction(
    postgres_url: str,
) -> None:
    db = create_database(postgres_url)
    try:
        async with db.transaction() as conn:
            await conn.execute(text("create table seen (n int)"))
        async with db.read() as reader:
            assert (await reader.execute(text("select count(*) from seen"))).scalar() == 0
            async with db.transaction() as writer:
                await writer.execute(text("insert into seen values (1)"))
            assert (await reader.execute(text("select count(*) from seen"))).scalar() == 1
            # Each statement on its own (no BEGIN / ROLLBACK round trips, no snapshot held).
            first = (await reader.execute(text("select transaction_timestamp()"))).scalar()
            await asyncio.sleep(0.01)
            second = (await reader.execute(text("select transaction_timestamp()"))).scalar()
            assert first != second
    finally:
        async with db.transaction() as conn:
            await conn.execute(text("drop table if exists seen"))
        await db.dispose()


@pytest.mark.parametrize(
    "value",
    [
        {"big": 123456789012345678901234567890, "neg": -9223372036854775809},
        {"max": 18446744073709551615, "min": -9223372036854775808},
        {"f": 0.1, "g": -2.5, "s": "caf\u00e9 \U0001f600", "n": None, "l": [1, 2.5, True]},
    ],
)
async def test_postgres_json_values_read_back_exactly(
    postgres_url: str, value: dict[str, Any]
) -> None:
    db = create_database(postgres_url)
    try:
        async with db.read() as conn:
            query = select(cast(literal(value, JsonValue), JsonValue))
            stored = (await conn.execute(query)).scalar()
    finally:
        await db.dispose()
    assert stored == value
    assert all(type(stored[k]) is type(v) for k, v in value.items())


async def test_direct_reads_see_what_others_committed_and_hold_no_transaction(
    postgres_url: str,
) -> None:
    db = create_database(postgres_url)
    try:
        async with db.transaction() as conn:
            await conn.execute(text("create table seen_direct (n int)"))
        async with db.direct_read() as reader:
            assert await (await reader.execute("select count(*) from seen_direct")).fetchall() == [
                (0,)
            ]
            async with db.transaction() as writer:
                await writer.execute(text("insert into seen_direct values (1)"))
            assert await (await reader.execute("select count(*) from seen_direct")).fetchall() == [
                (1,)
            ]
            first = await (await reader.execute("select transaction_timestamp()")).fetchone()
            await asyncio.sleep(0.01)
            second = await (await reader.execute("select transaction_timestamp()")).fetchone()
            assert first != second
    finally:
        async with db.transaction() as conn:
            await conn.execute(text("drop table if exists seen_direct"))
        await db.dispose()


async def _direct_pid(db: Database) -> int:
    async with db.direct_read() as conn:
        row = await (await conn.execute("select pg_backend_pid()")).fetchone()
    assert row is not None
    pid: int = row[0]
    return pid


async def test_direct_connections_are_reused_and_replaced_after_the_server_closed_them(
    postgres_url: str,
) -> None:
    db = create_database(postgres_url, pool_size=2, max_overflow=0)
    try:
        async with db.direct_read() as a, db.direct_read() as b:
            pids = set()
            for conn in (a, b):
                row = await (await conn.execute("select pg_backend_pid()")).fetchone()
                assert row is not None
                pids.add(row[0])
        assert {await _direct_pid(db) for _ in range(5)} <= pids  # reused, not reopened
        async with db.read() as other:
            killed = await other.execute(
                text("select pg_terminate_backend(pid) from unnest(cast(:p as int[])) pid"),
                {"p": list(pids)},
            )
            assert all(killed.scalars())
        await asyncio.sleep(0.2)  # the backends exit and close their sockets
        for _ in range(3):
            assert await _direct_pid(db) not in pids
    finally:
        await db.dispose()


async def test_direct_reads_wait_for_a_connection_beyond_the_pool_limit(
    postgres_url: str,
) -> None:
    db = create_database(postgres_url, pool_size=1, max_overflow=1)
    try:
        async with db.direct_read(), db.direct_read():
            third = asyncio.ensure_future(_direct_pid(db))
            await asyncio.sleep(0.2)
            assert not third.done()
        await asyncio.wait_for(third, 5)
    finally:
        await db.dispose()


async def test_dispose_closes_the_direct_connections(postgres_url: str) -> None:
    db = create_database(postgres_url)
    async with db.direct_read() as idle:
        pass
    async with db.direct_read() as busy:
        await db.dispose()
    assert idle.closed
    assert busy.closed
    with pytest.raises(DatabaseUnavailable):
        async with db.direct_read():
            pass


async def test_an_unreachable_postgres_is_unavailable_to_direct_reads() -> None:
    db = create_database("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    try:
        with pytest.raises(DatabaseUnavailable):
            async with db.direct_read():
                pass
    finally:
        await db.dispose()


async def test_direct_reads_need_postgres(sqlite_db: Database) -> None:
    with pytest.raises(RuntimeError, match="PostgreSQL"):
        async with sqlite_db.direct_read():
            pass
