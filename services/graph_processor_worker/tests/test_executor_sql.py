"""The `sql` executor against a real PostgreSQL: rows, parameters that cannot inject,
the cap, errors, cancellation on the server, and `sql` nodes through the engine.

PostgreSQL comes from LOOM_TEST_POSTGRES_URL (a fresh database for this module, dropped
at the end); without it these tests are skipped, unless LOOM_TEST_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest
from sqlalchemy.engine import make_url

from loom_common.graph import load_graph
from loom_common.params import resolve_params
from loom_worker.engine import Engine, Execution
from loom_worker.events import Event, LogEvent, NodeEvent
from loom_worker.executors import NodeCall, NodeFailed, NodeResult, SqlExecutor

INJECTION = "'; drop table x; --"


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    """A plain `postgresql://` connection string to a fresh database."""
    base = os.environ.get("LOOM_TEST_POSTGRES_URL")
    if not base:
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail("LOOM_TEST_POSTGRES_URL is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("LOOM_TEST_POSTGRES_URL is not set: sql node tests skipped")
    url = make_url(base).set(drivername="postgresql")
    admin = url.render_as_string(hide_password=False)
    name = f"loom_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def table_x(dsn: str) -> Iterator[None]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE x (id int primary key, name text)")
        conn.execute("INSERT INTO x VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    try:
        yield
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS x")


def x_exists(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regclass('x') IS NOT NULL").fetchone() == (True,)


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __call__(self, stream: str, text: str) -> None:
        self.lines.append((stream, text))


CALL = NodeCall("e1", "q", 1)


async def query(
    dsn: str, sql: str, params: dict[str, Any] | None = None, *, max_rows: int = 1000
) -> tuple[NodeResult, Lines]:
    log = Lines()
    spec = {"connection": "DB", "query": sql, "params": params or {}}
    result = await SqlExecutor(max_rows=max_rows).query(spec, dsn=dsn, call=CALL, log=log)
    return result, log


async def test_rows_and_rowcount_come_back_with_a_log_line(dsn: str, table_x: None) -> None:
    result, log = await query(
        dsn, "SELECT id, name FROM x WHERE id >= %(low)s ORDER BY id", {"low": 2}
    )
    assert result.outputs == {
        "rows": [{"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
        "rowcount": 2,
    }
    [(stream, text)] = log.lines
    assert (
        stream == "stdout" and text.startswith("query returned 2 rows (") and text.endswith(" ms)")
    )


async def test_a_statement_without_rows_reports_what_it_changed(dsn: str, table_x: None) -> None:
    result, log = await query(dsn, "UPDATE x SET name = upper(name) WHERE id < %(n)s", {"n": 3})
    assert result.outputs == {"rows": [], "rowcount": 2}
    assert log.lines[0][1].startswith("query done: UPDATE 2 (")


async def test_a_param_value_is_never_sql(dsn: str, table_x: None) -> None:
    result, _ = await query(
        dsn, "SELECT %(v)s::text AS v, count(*) AS n FROM x WHERE name = %(v)s", {"v": INJECTION}
    )
    assert result.outputs["rows"] == [{"v": INJECTION, "n": 0}]
    await query(dsn, "INSERT INTO x VALUES (4, %(name)s)", {"name": INJECTION})
    assert x_exists(dsn)
    result, _ = await query(dsn, "SELECT name FROM x WHERE id = 4")
    assert result.outputs["rows"] == [{"name": INJECTION}]


async def test_values_come_out_json_able(dsn: str) -> None:
    result, _ = await query(
        dsn,
        """
        SELECT 12.50::numeric AS price, 'nan'::float8 AS nan, 1.5::float8 AS f,
               '2026-03-01 12:00:00+02'::timestamptz AS at, '2026-03-01'::date AS day,
               '2026-03-01 12:00:00'::timestamp AS local, '90 minutes'::interval AS took,
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS id, '\\x0001ff'::bytea AS raw,
               '{"a": [1, 2.5, null]}'::jsonb AS doc, ARRAY[1, 2] AS ints, true AS ok,
               NULL AS nothing, %(obj)s AS obj
        """,
        {"obj": {"k": ["v", 1]}},
    )
    [row] = result.outputs["rows"]
    assert row == {
        "price": "12.50",
        "nan": "nan",
        "f": 1.5,
        "at": "2026-03-01T10:00:00Z",
        "day": "2026-03-01",
        "local": "2026-03-01T12:00:00",
        "took": 5400.0,
        "id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "raw": "AAH/",
        "doc": {"a": [1, 2.5, None]},
        "ints": [1, 2],
        "ok": True,
        "nothing": None,
        "obj": {"k": ["v", 1]},
    }
    orjson.dumps(result.outputs)


async def test_rows_are_capped_and_the_cap_is_logged(dsn: str) -> None:
    result, log = await query(dsn, "SELECT g FROM generate_series(1, 2500) g", max_rows=1000)
    assert result.outputs["rowcount"] == 2500
    assert [r["g"] for r in result.outputs["rows"]] == list(range(1, 1001))
    assert log.lines[1] == ("stdout", "kept the first 1000 of 2500 rows (max_rows)")


async def test_bad_sql_fails_with_the_server_message_and_is_not_retried(dsn: str) -> None:
    with pytest.raises(NodeFailed) as failed:
        await query(dsn, "SELECT * FROM no_such_table")
    assert failed.value.error == 'relation "no_such_table" does not exist (SQLSTATE 42P01)'
    assert failed.value.retryable is False


async def test_an_unreachable_database_is_a_retryable_failure(dsn: str) -> None:
    unreachable = make_url(dsn).set(port=1).render_as_string(hide_password=False)
    with pytest.raises(NodeFailed) as failed:
        await query(unreachable, "SELECT 1")
    assert failed.value.error.startswith("cannot connect to the database: ")
    assert failed.value.retryable is True


async def test_every_spelling_of_a_postgres_url_is_accepted(dsn: str) -> None:
    for scheme in ("postgres", "postgresql+psycopg"):
        other = dsn.replace("postgresql://", f"{scheme}://", 1)
        result, _ = await query(other, "SELECT 1 AS one")
        assert result.outputs["rows"] == [{"one": 1}]


def backends(dsn: str, *, sleeping: bool) -> list[int]:
    """Backends running `pg_sleep(30)`, or else the executor's connections (whose
    application_name names the execution and node)."""
    where = (
        "state = 'active' AND query = 'SELECT pg_sleep(30)'"
        if sleeping
        else "application_name = 'loom e1 q'"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND {where}"
        ).fetchall()
    return [pid for (pid,) in rows]


async def test_a_timeout_cancels_the_statement_on_the_server(dsn: str) -> None:
    task = asyncio.create_task(query(dsn, "SELECT pg_sleep(30)"))
    deadline = time.monotonic() + 5
    while not await asyncio.to_thread(backends, dsn, sleeping=True):  # it runs there
        assert time.monotonic() < deadline, "the statement never started"
        await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await task
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 2
    while await asyncio.to_thread(backends, dsn, sleeping=True):  # and now it does not
        assert time.monotonic() < deadline, "pg_sleep(30) still runs on the server"
        await asyncio.sleep(0.05)
    assert await asyncio.to_thread(backends, dsn, sleeping=False) == []  # connection closed


# --- through the engine ---------------------------------------------------------------


async def run(
    text: str, params: dict[str, Any], secrets: dict[str, str]
) -> tuple[Execution, list[Event]]:
    graph = load_graph(textwrap.dedent(text))
    async with Engine(slots=2) as engine:
        execution = engine.start(
            graph, params=resolve_params(graph.spec.params, params), secrets=secrets
        )
        events = [event async for event in execution]
    return execution, events


GRAPH = """
    name: report
    params:
      n: {type: integer, default: 2}
      name: {type: string, default: nobody}
    nodes:
      count:
        sql:
          connection: DB
          query: SELECT g FROM generate_series(1, %(n)s) g
          params: {n: "${{ params.n }}"}
      greet:
        sql:
          connection: DB
          query: SELECT ${{ params.name }}::text AS name, (SELECT count(*) FROM x) AS rows_in_x
      report:
        needs: [count, greet]
        run: echo "${{ nodes.count.outputs.rowcount }} for ${{ nodes.greet.outputs.rows[0].name }}"
"""


async def test_a_sql_node_reads_params_and_passes_its_outputs_on(dsn: str, table_x: None) -> None:
    execution, events = await run(GRAPH, {"n": 4, "name": INJECTION}, {"DB": dsn})
    assert execution.status == "succeeded", execution.records
    count = execution.records["count"]
    assert count.outputs == {"rows": [{"g": g} for g in range(1, 5)], "rowcount": 4}
    # a ${{ }} in the query itself is a bound parameter too, never SQL text
    assert execution.records["greet"].outputs["rows"] == [{"name": INJECTION, "rows_in_x": 3}]
    assert x_exists(dsn)
    texts = [e.text for e in events if isinstance(e, LogEvent)]
    assert f"4 for {INJECTION}" in texts
    assert not any(dsn in t for t in texts)


async def test_a_missing_connection_secret_fails_the_node_without_retries(dsn: str) -> None:
    execution, events = await run(
        """
        name: report
        nodes:
          q: {sql: {connection: NOPE, query: SELECT 1}, retries: 3, retry_delay: 0s}
        """,
        {},
        {"DB": dsn},
    )
    assert execution.status == "failed"
    attempts = [e for e in events if isinstance(e, NodeEvent) and e.status == "failed"]
    assert [(e.attempt, e.error) for e in attempts] == [(1, "secret 'NOPE' is not available")]
