"""Executions: the stored record, idempotency keys, create (idempotent), read, list.

Plain async functions over an `AsyncConnection` in the caller's transaction (SQLAlchemy
Core). Those that write a work or control message put it in the outbox in that same
transaction; the caller calls `Database.notify_committed()` after the commit.

The lease, admission, finish, reaper and cancel operations live in `loom_db.admission`
and are re-exported here, so `executions.claim(...)` and the like keep working.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Final, Literal, cast, get_args

import psycopg
from sqlalchemy import and_, func, insert, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_common import CHANNEL_OF, encode_envelope, format_instant, parse_instant
from loom_db import raw
from loom_db.errors import Conflict, NotFound, classify_driver_error
from loom_db.models import executions
from loom_db.outbox import NOTIFY_CHANNEL, enqueue_many
from loom_db.pagination import check_limit, decode_cursor, encode_cursor
from loom_db.types import utcnow

__all__ = [
    "ACTIVE_STATUSES",
    "FINISHED_STATUSES",
    "MAX_KEY_LENGTH",
    "REQUEUE_GRACE_SECONDS",
    "STATUSES",
    "TRIGGER_TYPES",
    "Admission",
    "ExecutionRecord",
    "ExecutionStatus",
    "NewExecution",
    "OnOverlap",
    "TriggerType",
    "admit",
    "claim",
    "create_execution",
    "create_executions",
    "finish",
    "get_execution",
    "last_timer_tick",
    "list_executions",
    "list_executions_json",
    "reap",
    "release",
    "renew",
    "request_cancel",
    "rest_key",
    "timer_key",
    "webhook_key",
]

ExecutionStatus = Literal[
    "queued", "waiting", "running", "succeeded", "failed", "cancelled", "timed_out", "skipped"
]
TriggerType = Literal["manual", "webhook", "timer", "retry", "graph"]

STATUSES: Final = frozenset[str](get_args(ExecutionStatus))
ACTIVE_STATUSES: Final = frozenset({"queued", "waiting", "running"})
FINISHED_STATUSES: Final = STATUSES - ACTIVE_STATUSES
TRIGGER_TYPES: Final = frozenset[str](get_args(TriggerType))

MAX_KEY_LENGTH: Final = 400
"""The idempotency key column's width."""

_c = executions.c


@dataclass(frozen=True, slots=True)
class ExecutionRecord:
    """One execution as stored. Times are aware UTC datetimes."""

    id: str
    graph: str
    graph_version: int
    status: ExecutionStatus
    params: dict[str, Any]
    trigger_type: str
    trigger_info: dict[str, Any]
    idempotency_key: str | None
    origin_id: str | None
    parent_node_run_id: int | None
    worker_id: str | None
    lease_expires_at: datetime | None
    cancel_requested: bool
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES


_COLUMNS: Final = tuple(_c[f.name] for f in fields(ExecutionRecord))


def _record(row: Row[Any]) -> ExecutionRecord:
    # Positional: the rows are `select(*_COLUMNS)`, in the record's field order.
    return ExecutionRecord(*cast("tuple[Any, ...]", row))


# --- idempotency keys (DESIGN §5–§7) ----------------------------------------------------


def _part(value: str) -> str:
    # A colon inside a middle part would let two different triples spell the same key.
    return value.replace("%", "%25").replace(":", "%3A")


def rest_key(graph: str, principal: str, key: str) -> str:
    """`rest:{graph}:{principal}:{key}` for an `Idempotency-Key` header."""
    return f"rest:{_part(graph)}:{_part(principal)}:{key}"


def webhook_key(graph: str, hook: str, delivery_id: str) -> str:
    """`webhook:{graph}:{hook}:{delivery id}`."""
    return f"webhook:{_part(graph)}:{_part(hook)}:{delivery_id}"


def timer_key(graph: str, trigger_id: str, fire_time_iso: str | datetime) -> str:
    """`timer:{graph}:{trigger id}:{scheduled time}`; a datetime is written as ISO 8601
    UTC with `Z` (`loom_common.format_instant`), the same on every replica.

    Raises `loom_common.CronError` for a naive datetime.
    """
    when = fire_time_iso if isinstance(fire_time_iso, str) else format_instant(fire_time_iso)
    return f"timer:{_part(graph)}:{_part(trigger_id)}:{when}"


# --- create, read, list -----------------------------------------------------------------


async def create_execution(
    conn: AsyncConnection,
    *,
    graph: str,
    graph_version: int,
    params: dict[str, Any],
    trigger_type: str,
    trigger_info: dict[str, Any],
    idempotency_key: str | None = None,
    origin_id: str | None = None,
    parent_node_run_id: int | None = None,
) -> tuple[ExecutionRecord, bool]:
    """Insert a `queued` execution and its `execution.requested` outbox row.

    With an `idempotency_key` already stored, nothing is written and the EXISTING
    execution is returned with `created=False` (also when the insert raced a concurrent
    one: the unique constraint decides, `ON CONFLICT DO NOTHING`). The caller compares
    params if a difference matters (REST answers 422). Returns `(execution, created)`.

    Raises `ValueError` for an unknown trigger type or an empty or over-long key
    (> `MAX_KEY_LENGTH`), `Conflict` if a conflicting row vanished before it could be read.
    """
    if trigger_type not in TRIGGER_TYPES:
        raise ValueError(f"unknown trigger type {trigger_type!r}")
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY_LENGTH:
        raise ValueError(f"an idempotency key has 1 to {MAX_KEY_LENGTH} characters")
    record = ExecutionRecord(
        id=str(uuid.uuid4()),
        graph=graph,
        graph_version=graph_version,
        status="queued",
        params=params,
        trigger_type=trigger_type,
        trigger_info=trigger_info,
        idempotency_key=idempotency_key,
        origin_id=origin_id,
        parent_node_run_id=parent_node_run_id,
        worker_id=None,
        lease_expires_at=None,
        cancel_requested=False,
        error=None,
        created_at=utcnow(),
        started_at=None,
        finished_at=None,
    )
    values = {f.name: getattr(record, f.name) for f in fields(ExecutionRecord)}
    if idempotency_key is None:
        await conn.execute(insert(executions).values(values))
    else:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        statement = (
            dialect.insert(executions)
            .values(values)
            .on_conflict_do_nothing(index_elements=[_c.idempotency_key])
            .returning(_c.id)
        )
        if (await conn.execute(statement)).first() is None:
            # READ COMMITTED: this statement sees the row whose commit the insert waited for.
            found = (
                await conn.execute(select(*_COLUMNS).where(_c.idempotency_key == idempotency_key))
            ).first()
            if found is None:
                raise Conflict(f"execution with key {idempotency_key!r} vanished; try again")
            return _record(found), False
    await _request(conn, record.id, graph)
    return record, True


@dataclass(frozen=True, slots=True)
class NewExecution:
    """One execution for `create_executions`."""

    graph: str
    graph_version: int
    params: dict[str, Any]
    trigger_type: str
    trigger_info: dict[str, Any]
    idempotency_key: str | None = None


async def create_executions(
    conn: AsyncConnection, new: Sequence[NewExecution]
) -> list[tuple[ExecutionRecord, bool]]:
    """`create_execution` for many at once, in the caller's transaction, with a fixed
    number of statements whatever their count (a multi-row insert of the executions, one
    of their outbox rows, one NOTIFY; one select more when a key was already stored).
    For a service storing many concurrent requests or ticks with one commit.

    Returns `(execution, created)` for each, in order. A key already stored gives the
    stored execution with `created=False`; a key repeated within `new` is created once,
    its later copies get the same execution with `created=False`. Raises `ValueError`
    as `create_execution` does, before writing anything.
    """
    now = utcnow()
    rows: list[dict[str, Any]] = []
    answers: list[tuple[ExecutionRecord | None, bool]] = []
    first_of_key: dict[str, int] = {}
    repeats: list[tuple[int, int]] = []  # (index, index of the first with its key)
    for index, item in enumerate(new):
        if item.trigger_type not in TRIGGER_TYPES:
            raise ValueError(f"unknown trigger type {item.trigger_type!r}")
        key = item.idempotency_key
        if key is not None:
            if not 0 < len(key) <= MAX_KEY_LENGTH:
                raise ValueError(f"an idempotency key has 1 to {MAX_KEY_LENGTH} characters")
            if key in first_of_key:
                repeats.append((index, first_of_key[key]))
                answers.append((None, False))
                continue
            first_of_key[key] = index
        row = {
            "id": str(uuid.uuid4()),
            "graph": item.graph,
            "graph_version": item.graph_version,
            "status": "queued",
            "params": item.params,
            "trigger_type": item.trigger_type,
            "trigger_info": item.trigger_info,
            "idempotency_key": key,
            "cancel_requested": False,
            "created_at": now,
        }
        answers.append((_new_record(row), True))
        rows.append(row)
    if rows:
        if conn.dialect.name == "postgresql":
            inserted = await _insert_with_requests_postgres(conn, rows)
        else:
            statement = (
                sqlite.insert(executions)
                .on_conflict_do_nothing(index_elements=[_c.idempotency_key])
                .returning(_c.id)
            )
            inserted = {row.id for row in (await conn.execute(statement, rows)).all()}
            await enqueue_many(
                conn,
                [
                    ("execution.requested", r["id"], {"execution_id": r["id"], "graph": r["graph"]})
                    for r in rows
                    if r["id"] in inserted
                ],
            )
        conflicted = {
            row["idempotency_key"]: index
            for index, row in zip(
                (i for i, answer in enumerate(answers) if answer[1]), rows, strict=True
            )
            if row["id"] not in inserted
        }
        if conflicted:
            found = await conn.execute(
                select(*_COLUMNS).where(_c.idempotency_key.in_(list(conflicted)))
            )
            stored = {row.idempotency_key: _record(row) for row in found}
            for key, index in conflicted.items():
                if key not in stored:
                    raise Conflict(f"execution with key {key!r} vanished; try again")
                answers[index] = (stored[key], False)
    for index, first in repeats:
        answers[index] = (answers[first][0], False)
    return [(record, created) for record, created in answers if record is not None]


def _new_record(row: dict[str, Any]) -> ExecutionRecord:
    values: dict[str, Any] = {f.name: row.get(f.name) for f in fields(ExecutionRecord)}
    return ExecutionRecord(**values)  # the columns not in `row` are None


_INSERT_WITH_REQUESTS = """
WITH new AS (
    SELECT * FROM unnest(
        %b::text[], %b::text[], %b::int[], %b::text[], %b::text[], %b::text[], %b::text[],
        %b::bytea[]
    ) AS t(id, graph, graph_version, params, trigger_type, trigger_info, idempotency_key,
           envelope)
), inserted AS (
    INSERT INTO executions (id, graph, graph_version, status, params, trigger_type,
                            trigger_info, idempotency_key, cancel_requested, created_at)
    SELECT id, graph, graph_version, 'queued', params::jsonb, trigger_type,
           trigger_info::jsonb, idempotency_key, false, %b
    FROM new
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id
), requested AS (
    INSERT INTO outbox (channel, key, envelope, created_at)
    SELECT %b, new.id, new.envelope, %b FROM new JOIN inserted USING (id)
    RETURNING 1
)
SELECT inserted.id, (SELECT count(*) FROM requested), pg_notify(%b, '') FROM inserted
"""


async def _insert_with_requests_postgres(
    conn: AsyncConnection, rows: list[dict[str, Any]]
) -> set[str]:
    """The executions of `rows` and the `execution.requested` outbox rows of those
    inserted (not already stored under their key), with the outbox NOTIFY: ONE
    statement. Returns the ids inserted."""
    created_at = rows[0]["created_at"]
    found = await raw.execute(
        conn,
        _INSERT_WITH_REQUESTS,
        [
            [r["id"] for r in rows],
            [r["graph"] for r in rows],
            [r["graph_version"] for r in rows],
            [raw.json_text(r["params"]) for r in rows],
            [r["trigger_type"] for r in rows],
            [raw.json_text(r["trigger_info"]) for r in rows],
            [r["idempotency_key"] for r in rows],
            [
                encode_envelope(
                    "execution.requested", {"execution_id": r["id"], "graph": r["graph"]}
                )
                for r in rows
            ],
            created_at,
            CHANNEL_OF["execution.requested"],
            created_at,
            NOTIFY_CHANNEL,
        ],
    )
    return {row[0] for row in found}


async def find_by_key(conn: AsyncConnection, idempotency_key: str) -> ExecutionRecord | None:
    """The execution an idempotency key already started, or None."""
    row = (
        await conn.execute(select(*_COLUMNS).where(_c.idempotency_key == idempotency_key))
    ).first()
    return None if row is None else _record(row)


async def last_timer_tick(conn: AsyncConnection, graph: str, trigger_id: str) -> datetime | None:
    """The newest scheduled time already fired for the timer trigger `trigger_id` of
    `graph` (the `fire_time` of its newest `timer` execution, aware UTC), or None if it
    never fired. Raises `loom_common.CronError` if a stored `fire_time` is not an instant.
    """
    fire_time = _c.trigger_info["fire_time"].as_string()
    query = (
        select(fire_time)
        .where(
            _c.graph == graph,
            _c.trigger_type == "timer",
            _c.trigger_info["trigger_id"].as_string() == trigger_id,
        )
        # `format_instant` text sorts as time except within one second, where the bare
        # `...:05Z` must come before `...:05.250000Z` ('.' < 'Z'): the whole second first,
        # then the longer text (with a fraction), then the fraction (always 6 digits).
        .order_by(
            func.substr(fire_time, 1, 19).desc(), func.length(fire_time).desc(), fire_time.desc()
        )
        .limit(1)
    )
    newest = (await conn.execute(query)).scalar_one_or_none()
    return None if newest is None else parse_instant(newest)


async def get_execution(conn: AsyncConnection, execution_id: str) -> ExecutionRecord:
    """The execution `execution_id`. Raises `NotFound`."""
    row = (await conn.execute(select(*_COLUMNS).where(_c.id == execution_id))).first()
    if row is None:
        raise NotFound(f"execution {execution_id} not found")
    return _record(row)


async def list_executions(
    conn: AsyncConnection,
    *,
    graph: str | None = None,
    status: str | None = None,
    trigger_type: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[ExecutionRecord], str | None]:
    """One page of executions, newest first, and the cursor of the next page (or None).

    The cursor is a keyset position (created_at, id): pages neither skip nor repeat rows
    while others are inserted (those newer than the first page simply do not appear).

    Raises `ValueError` for a limit outside 1..`MAX_PAGE`, an unknown status or trigger
    type, or a cursor this function did not produce.
    """
    check_limit(limit)
    query = select(*_COLUMNS)
    if graph is not None:
        query = query.where(_c.graph == graph)
    if status is not None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        query = query.where(_c.status == status)
    if trigger_type is not None:
        if trigger_type not in TRIGGER_TYPES:
            raise ValueError(f"unknown trigger type {trigger_type!r}")
        query = query.where(_c.trigger_type == trigger_type)
    if cursor is not None:
        created_at, last_id = decode_cursor(cursor, datetime, str)
        query = query.where(
            or_(_c.created_at < created_at, and_(_c.created_at == created_at, _c.id < last_id))
        )
    query = query.order_by(_c.created_at.desc(), _c.id.desc()).limit(limit + 1)
    rows = (await conn.execute(query)).all()
    items = [_record(row) for row in rows[:limit]]
    last = items[-1] if items else None
    next_cursor = encode_cursor(last.created_at, last.id) if last and len(rows) > limit else None
    return items, next_cursor


def _json_time(column: str) -> str:
    """SQL for `column` (timestamptz) as the JSON orjson writes for it with `OPT_UTC_Z`:
    `"2026-11-23T22:04:49.494080Z"`, without the fraction when it is zero; `null`."""
    utc = f"({column} AT TIME ZONE 'UTC')"
    return (
        f"CASE WHEN {column} IS NULL THEN 'null' "
        f"WHEN date_trunc('second', {utc}) = {utc} "
        f"""THEN '"' || to_char({utc}, 'YYYY-MM-DD"T"HH24:MI:SS"Z"') || '"' """
        f"""ELSE '"' || to_char({utc}, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"' END"""
    )


def _json_text(expression: str) -> str:
    """SQL for a text `expression` as a JSON string, or `null`."""
    return f"coalesce(to_json({expression})::text, 'null')"


_LISTED_JSON: Final = (
    """'{"id":' || to_json(id)::text"""
    """ || ',"graph":' || to_json(graph)::text"""
    """ || ',"graph_version":' || graph_version::text"""
    """ || ',"status":' || to_json(status)::text"""
    """ || ',"trigger":{"type":' || to_json(trigger_type)::text"""
    f""" || ',"fire_time":' || {_json_text("trigger_info->>'fire_time'")}"""
    f""" || ',"delivery_id":' || {_json_text("trigger_info->>'delivery_id'")}"""
    f""" || ',"user":' || {_json_text("trigger_info->>'user'")}"""
    f""" || ',"origin_id":' || {_json_text("origin_id")}"""
    """ || '},"params":' || params::text"""
    f""" || ',"error":' || {_json_text("error")}"""
    """ || ',"cancel_requested":' || cancel_requested::text"""
    f""" || ',"created_at":' || {_json_time("created_at")}"""
    f""" || ',"started_at":' || {_json_time("started_at")}"""
    f""" || ',"finished_at":' || {_json_time("finished_at")}"""
    """ || ',"nodes":null}'"""
)
"""One execution as the REST API lists it (`loom_rest`'s `ExecutionOut` without nodes,
the trigger's details taken from `trigger_info`), as JSON text built by PostgreSQL."""

_JSON_FILTERS: Final = (
    ("graph", "graph = %(graph)s"),
    ("status", "status = %(status)s"),
    ("trigger_type", "trigger_type = %(trigger_type)s"),
    ("cursor", "(created_at < %(at)s OR (created_at = %(at)s AND id < %(id)s))"),
)
_json_queries: dict[tuple[bool, ...], str] = {}


def _json_query(present: tuple[bool, ...]) -> str:
    """The page query for the filters `present` (one flag per `_JSON_FILTERS` entry):
    limit + 1 rows, so whether a next page exists is known; the items of the first
    `limit`, their count, and the keyset position of the last."""
    query = _json_queries.get(present)
    if query is None:
        where = " AND ".join(sql for (_, sql), on in zip(_JSON_FILTERS, present, strict=True) if on)
        query = _json_queries[present] = (
            "SELECT string_agg(item, ',' ORDER BY n) FILTER (WHERE n <= %(limit)s),"
            " count(*),"
            " max(created_at) FILTER (WHERE n = %(limit)s),"
            " max(id) FILTER (WHERE n = %(limit)s)"
            " FROM (SELECT row_number() OVER (ORDER BY created_at DESC, id DESC) AS n,"
            f" created_at, id, {_LISTED_JSON} AS item"
            " FROM (SELECT * FROM executions"
            + (f" WHERE {where}" if where else "")
            + " ORDER BY created_at DESC, id DESC LIMIT %(limit)s + 1) AS page) AS numbered"
        )
    return query


async def list_executions_json(
    conn: AsyncConnection | psycopg.AsyncConnection[Any],
    *,
    graph: str | None = None,
    status: str | None = None,
    trigger_type: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[str, str | None]:
    """`list_executions` on PostgreSQL with the page built by the database: the items as
    the JSON array (text) of the executions as the REST API lists them (`ExecutionOut`
    without nodes: times in UTC with `Z`, `params` as PostgreSQL writes JSON), and the
    same next cursor. One statement on the driver's connection: no row reaches Python.
    `conn` is SQLAlchemy's or psycopg's own (`Database.direct_read()`).

    Raises `ValueError` as `list_executions` does, and for a connection that is not
    PostgreSQL's; `DatabaseUnavailable` for a lost connection.
    """
    if isinstance(conn, AsyncConnection) and conn.dialect.name != "postgresql":
        raise ValueError("list_executions_json needs PostgreSQL")
    check_limit(limit)
    params: dict[str, Any] = {"limit": limit}
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    if trigger_type is not None and trigger_type not in TRIGGER_TYPES:
        raise ValueError(f"unknown trigger type {trigger_type!r}")
    if cursor is not None:
        params["at"], params["id"] = decode_cursor(cursor, datetime, str)
    params.update(graph=graph, status=status, trigger_type=trigger_type)
    present = (graph is not None, status is not None, trigger_type is not None, cursor is not None)
    if isinstance(conn, AsyncConnection):
        driver = cast(
            "psycopg.AsyncConnection[Any]", (await conn.get_raw_connection()).driver_connection
        )
    else:
        driver = conn
    try:
        async with driver.cursor() as cur:
            await cur.execute(_json_query(present), params)
            row = await cur.fetchone()
    except psycopg.Error as exc:  # not wrapped by SQLAlchemy: translated here
        kind = classify_driver_error(exc)
        if kind is None:
            raise
        raise kind(f"database unavailable: {exc}") from exc
    assert row is not None  # an aggregate: always one row
    items, count, last_at, last_id = row
    next_cursor = encode_cursor(last_at, last_id) if count > limit else None
    return f"[{items or ''}]", next_cursor


# The lease, admission, finish, reaper and cancel build on the record above, so they are
# imported after it (`loom_db/__init__` imports this module before anything else does).
from loom_db.admission import (  # noqa: E402
    REQUEUE_GRACE_SECONDS,
    Admission,
    OnOverlap,
    _request,
    admit,
    claim,
    finish,
    reap,
    release,
    renew,
    request_cancel,
)
