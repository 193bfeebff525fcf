"""The engine: both databases answer, SQLite is in WAL mode, errors are translated."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from loom_db.database import Database, create_database
from loom_db.errors import DatabaseUnavailable


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
