"""`list_executions_json`: PostgreSQL writes a page of executions as JSON, the same page
(rows, order, cursor) as `list_executions`, each value as the REST API writes it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import update

from loom_db.database import Database
from loom_db.errors import DatabaseUnavailable
from loom_db.executions import (
    ExecutionRecord,
    create_execution,
    list_executions,
    list_executions_json,
)
from loom_db.models import executions

NAMES = ("build", "deploy")


@pytest.fixture
def pg(postgres_db: Database) -> Database:
    """PostgreSQL only: SQLite lists through `list_executions`."""
    return postgres_db


async def create(db: Database, graph: str = "build", **overrides: Any) -> ExecutionRecord:
    async with db.transaction() as conn:
        record, _ = await create_execution(
            conn,
            graph=graph,
            graph_version=1,
            params=overrides.pop("params", {}),
            trigger_type=overrides.pop("trigger_type", "manual"),
            trigger_info=overrides.pop("trigger_info", {"user": "alice"}),
        )
        if overrides:
            table = executions
            await conn.execute(update(table).where(table.c.id == record.id).values(**overrides))
    return record


def expected(record: ExecutionRecord) -> dict[str, Any]:
    """What the REST API's models make of `record` (times by orjson with `Z`)."""
    info = record.trigger_info

    def text(key: str) -> str | None:
        return None if info.get(key) is None else str(info[key])

    return {
        "id": record.id,
        "graph": record.graph,
        "graph_version": record.graph_version,
        "status": record.status,
        "trigger": {
            "type": record.trigger_type,
            "fire_time": text("fire_time"),
            "delivery_id": text("delivery_id"),
            "user": text("user"),
            "origin_id": record.origin_id,
        },
        "params": record.params,
        "error": record.error,
        "cancel_requested": record.cancel_requested,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "nodes": None,
    }


async def test_items_are_the_listed_records_as_the_api_writes_them(pg: Database) -> None:
    await create(pg, params={"target": 'caf\u00e9 "q" \\ \n\x01\u2028', "n": [1, 2.5, None]})
    await create(
        pg,
        trigger_type="timer",
        trigger_info={"fire_time": "2030-01-01T00:00:00Z", "delivery_id": 7},
        status="failed",
        error='boom "quoted"\nsecond line',
        cancel_requested=True,
        started_at=datetime(2030, 1, 1, 0, 0, 0, tzinfo=UTC),  # no fraction: none written
        finished_at=datetime(2030, 1, 1, 0, 0, 1, 500, tzinfo=UTC),
    )
    await create(pg, "deploy", created_at=datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC))
    async with pg.read() as conn:
        records, cursor = await list_executions(conn)
        items, json_cursor = await list_executions_json(conn)
    assert cursor is json_cursor is None
    assert len(records) == 3
    # Byte for byte what orjson writes for the same values, `params` apart (spaced).
    for record, item in zip(records, orjson.loads(items), strict=True):
        assert item == orjson.loads(orjson.dumps(expected(record), option=orjson.OPT_UTC_Z))
    written = items.encode()
    for record in records:
        compact = expected(record) | {"params": None}
        assert orjson.dumps(record.params) in written.replace(b": ", b":").replace(b", ", b",")
        for key in ("created_at", "started_at", "finished_at"):
            time = orjson.dumps(compact[key], option=orjson.OPT_UTC_Z)
            assert b'"%s":%s' % (key.encode(), time) in written
    assert b'"started_at":"2030-01-01T00:00:00Z"' in written
    assert b'"finished_at":"2030-01-01T00:00:01.000500Z"' in written


async def test_pages_filters_and_cursors_match_list_executions(pg: Database) -> None:
    same_time = datetime(2030, 5, 5, tzinfo=UTC)
    for n in range(9):  # ties on created_at: the id decides
        await create(pg, NAMES[n % 2], created_at=same_time if n < 4 else datetime.now(UTC))
    await create(pg, trigger_type="retry", status="failed")
    for query in (
        {},
        {"graph": "deploy"},
        {"status": "failed"},
        {"trigger_type": "retry"},
        {"graph": "build", "status": "queued", "trigger_type": "manual"},
    ):
        async with pg.read() as conn:
            for limit in (1, 3, 50):
                cursor: str | None = None
                seen: list[str] = []
                while True:
                    records, next_cursor = await list_executions(
                        conn, limit=limit, cursor=cursor, **query
                    )
                    items, json_cursor = await list_executions_json(
                        conn, limit=limit, cursor=cursor, **query
                    )
                    ids = [item["id"] for item in orjson.loads(items)]
                    assert ids == [record.id for record in records], (query, limit)
                    assert json_cursor == next_cursor
                    seen += ids
                    if next_cursor is None:
                        break
                    cursor = next_cursor
                assert len(seen) == len(set(seen))
    async with pg.read() as conn:
        assert len(orjson.loads((await list_executions_json(conn, limit=1000))[0])) == 10
        assert (await list_executions_json(conn, graph="nothing")) == ("[]", None)
        first = await list_executions_json(conn, limit=3)
        second = await list_executions_json(conn, limit=3, cursor=first[1], graph="build")
    async with pg.direct_read() as direct:  # psycopg's own connection: the same pages
        assert await list_executions_json(direct, limit=3) == first
        assert await list_executions_json(direct, limit=3, cursor=first[1], graph="build") == (
            second
        )


async def test_bad_arguments_are_refused_as_list_executions_refuses_them(pg: Database) -> None:
    async with pg.read() as conn:
        for bad in ("garbage!", "", "W10"):
            with pytest.raises(ValueError, match="cursor"):
                await list_executions_json(conn, cursor=bad)
        with pytest.raises(ValueError, match="limit"):
            await list_executions_json(conn, limit=0)
        with pytest.raises(ValueError, match="status"):
            await list_executions_json(conn, status="done")
        with pytest.raises(ValueError, match="trigger"):
            await list_executions_json(conn, trigger_type="cron")


async def test_a_lost_direct_connection_is_database_unavailable(pg: Database) -> None:
    async with pg.direct_read() as direct:
        await direct.close()
        with pytest.raises(DatabaseUnavailable):
            await list_executions_json(direct)


async def test_sqlite_is_refused(sqlite_db: Database) -> None:
    async with sqlite_db.read() as conn:
        with pytest.raises(ValueError, match="PostgreSQL"):
            await list_executions_json(conn)
