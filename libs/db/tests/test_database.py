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
