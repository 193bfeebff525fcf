"""Statements run straight on psycopg, under an SQLAlchemy connection's transaction, for
the few hot paths where SQLAlchemy's per-statement and per-row work would cost more than
the database does (PostgreSQL only).

`execute` runs one statement on the driver connection beneath `conn` -- the same
connection, in the same transaction -- and translates connection failures and lost races
as `Database.transaction()` does for SQLAlchemy's statements.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson
import psycopg
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db.errors import classify_driver_error

__all__ = ["execute", "json_text"]


async def execute(
    conn: AsyncConnection, sql: str, params: Sequence[Any] = ()
) -> list[tuple[Any, ...]]:
    """Run `sql` (psycopg placeholders: `%b` sends a parameter in binary, which spares
    escaping each element of a list) with `params` in `conn`'s transaction; the rows it
    returns (none for a statement that returns none). Raises `DatabaseUnavailable` or
    `TransactionConflict` as the SQLAlchemy path does, other psycopg errors unchanged."""
    if conn.dialect.name != "postgresql":
        raise RuntimeError(f"raw.execute needs PostgreSQL, not {conn.dialect.name}")
    raw = await conn.get_raw_connection()
    driver: psycopg.AsyncConnection[Any] = raw.driver_connection  # type: ignore[assignment]
    try:
        async with driver.cursor() as cursor:
            await cursor.execute(sql, params)
            return await cursor.fetchall() if cursor.description is not None else []
    except psycopg.Error as exc:
        kind = classify_driver_error(exc)
        if kind is None:
            raise
        raise kind(f"database unavailable: {exc}") from exc


def json_text(value: Any) -> str:
    """`value` as JSON text for a `jsonb` parameter: orjson, or the standard library for
    what orjson refuses (integers beyond 64 bits, which jsonb keeps exactly)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
