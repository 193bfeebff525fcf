"""Execution routes (DESIGN §4, §5): trigger a graph, list and read executions, their
logs, cancel and retry.

Choices this module makes (and its tests pin):

* Triggering a paused graph (`enabled: false`) answers 409: pausing stops every way a
  graph starts, the API's manual trigger and retries included; resume it first.
* `Idempotency-Key` (1 to 200 characters) is stored as `rest:{graph}:{user}:{key}`: the
  same key again answers 200 with the execution it made, with other params 422.
* Cancelling an execution that already ended answers 202 with it unchanged (cancel is
  idempotent: a client racing the end of a run need not tell the two cases apart).
* Retry: only an execution that ended without succeeding (failed, cancelled, timed out,
  skipped) can be retried, else 409; the new one runs the same graph version and params.
* An id that is not a UUID is a 404 like any unknown id.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.responses import Response

from loom_auth import Role
from loom_common import ParamError, resolve_params
from loom_common.spec import GRAPH_NAME_PATTERN, ParamSpec
from loom_db import NotFound, audit, executions, graphs, logs, node_runs
from loom_db.executions import ExecutionRecord, ExecutionStatus, TriggerType
from loom_db.node_runs import NodeRunRecord
from loom_rest.api import JSON, Call, Endpoint, json_response
from loom_rest.problems import ApiProblem, unprocessable
from loom_rest.schemas import (
    ExecutionOut,
    LogLine,
    LogPage,
    NodeRunOut,
    Page,
    PageQuery,
    TriggerIn,
    TriggerOut,
)

__all__ = ["ENDPOINTS", "ExecutionPage", "execution_out", "execution_page_response"]

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 200
NEXT_AFTER_HEADER = "Loom-Next-After"
TEXT = "text/plain"
_NO_NUL = r"^[^\x00]*$"  # PostgreSQL's text cannot hold NUL: refused as input, never a 500
_GRAPH_NAME = re.compile(GRAPH_NAME_PATTERN)


class ExecutionPage(Page[ExecutionOut]):
    """One page of executions, newest first (without their nodes)."""


class ExecutionQuery(PageQuery):
    graph: str | None = Field(default=None, max_length=200, pattern=_NO_NUL)
    status: ExecutionStatus | None = None
    trigger: TriggerType | None = None


class LogQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after: int = Field(default=0, ge=0, le=2**63 - 1, description="Lines with a greater `seq`")
    node: str | None = Field(
        default=None, max_length=200, pattern=_NO_NUL, description="Only this node instance"
    )
    limit: int = Field(default=1000, ge=1, le=1000)


# --- shapes -----------------------------------------------------------------------------


def _info_text(info: Mapping[str, Any], key: str) -> str | None:
    value = info.get(key)
    return None if value is None else str(value)


def _trigger_out(record: ExecutionRecord) -> TriggerOut:
    info = record.trigger_info or {}
    return TriggerOut(
        type=record.trigger_type,  # type: ignore[arg-type]  # checked by create_execution
        fire_time=_info_text(info, "fire_time"),
        delivery_id=_info_text(info, "delivery_id"),
        user=_info_text(info, "user"),
        origin_id=record.origin_id,
    )


def _node_out(run: NodeRunRecord) -> NodeRunOut:
    return NodeRunOut(
        id=run.node,
        node=run.name,
        index=run.index,
        status=run.status,
        attempt=run.attempt,
        started_at=run.started_at,
        finished_at=run.finished_at,
        exit_code=run.exit_code,
        outputs=run.outputs,
        error=run.error,
        child_execution_id=run.child_execution_id,
    )


def execution_out(
    record: ExecutionRecord, nodes: list[NodeRunRecord] | None = None
) -> ExecutionOut:
    """The API's shape of an execution; `nodes` only for a single one."""
    return ExecutionOut(
        id=record.id,
        graph=record.graph,
        graph_version=record.graph_version,
        status=record.status,
        trigger=_trigger_out(record),
        params=record.params,
        error=record.error,
        cancel_requested=record.cancel_requested,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        nodes=None if nodes is None else [_node_out(run) for run in nodes],
    )


def _listed_json(record: ExecutionRecord) -> dict[str, Any]:
    """`execution_out(record)` as `json_response` would dump it, built directly: a page
    is 50 of them, and making then dumping the models was most of a listing's time. The
    same JSON (a test compares them); times are dumped by orjson with `Z`."""
    info = record.trigger_info or {}
    return {
        "id": record.id,
        "graph": record.graph,
        "graph_version": record.graph_version,
        "status": record.status,
        "trigger": {
            "type": record.trigger_type,
            "fire_time": _info_text(info, "fire_time"),
            "delivery_id": _info_text(info, "delivery_id"),
            "user": _info_text(info, "user"),
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


def execution_page_response(records: list[ExecutionRecord], next_cursor: str | None) -> Response:
    """An `ExecutionPage` of `records` as JSON (200)."""
    page = {"items": [_listed_json(r) for r in records], "next_cursor": next_cursor}
    return Response(orjson.dumps(page, option=orjson.OPT_UTC_Z), media_type=JSON)


def _execution_id(call: Call[Any, Any]) -> str:
    """The path's execution id, normalized; `NotFound` unless it is a UUID (so no
    malformed id ever reaches the database)."""
    raw = call.path("id")
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise NotFound(f"execution {raw[:100]!r} not found") from None


def _graph_name(call: Call[Any, Any]) -> str:
    name = call.path("name")
    if not _GRAPH_NAME.fullmatch(name):
        raise NotFound(f"no graph named {name[:100]!r}")
    return name


# --- trigger ----------------------------------------------------------------------------


def _idempotency_key(call: Call[Any, Any]) -> str | None:
    key = call.request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    problem = None
    if not key:
        problem = "must not be empty"
    elif len(key) > MAX_IDEMPOTENCY_KEY:
        problem = f"at most {MAX_IDEMPOTENCY_KEY} characters, not {len(key)}"
    elif any(ord(c) < 32 or ord(c) == 127 for c in key):
        problem = "must not contain control characters"
    if problem is not None:
        error = {"path": f"header.{IDEMPOTENCY_HEADER}", "message": problem, "line": None}
        raise unprocessable(f"the {IDEMPOTENCY_HEADER} header is not valid", [error])
    return key


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


def _resolve(spec: Mapping[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`given` checked against the graph's declared params, defaults filled in. Raises
    `ParamError` naming each bad param."""
    declared = {
        name: ParamSpec.model_validate(param) for name, param in spec.get("params", {}).items()
    }
    resolved = resolve_params(declared, given)
    nul = {name: "text cannot contain NUL characters" for name in given if _has_nul(given[name])}
    if nul:
        raise ParamError(nul)
    return resolved


def _paused(name: str) -> ApiProblem:
    return ApiProblem(
        409,
        f"graph {name!r} is paused (enabled: false): resume it with "
        f'PATCH /api/v1/graphs/{name} {{"enabled": true}} to start executions',
    )


async def trigger_execution(call: Call[TriggerIn, None]) -> Response:
    """202 with the new execution; 200 with the one an `Idempotency-Key` already made.

    A key seen before answers what it answered first, even if the graph was paused or
    changed since: the params sent are resolved against the version that execution ran,
    and compared with its params (422 when they differ)."""
    name = _graph_name(call)
    key = _idempotency_key(call)
    user = call.user.username
    database = call.runtime.database
    stored_key = None if key is None else executions.rest_key(name, user, key)
    if stored_key is not None and len(stored_key) > executions.MAX_KEY_LENGTH:
        message = f"with the graph and user it is longer than {executions.MAX_KEY_LENGTH}"
        error = {"path": f"header.{IDEMPOTENCY_HEADER}", "message": message, "line": None}
        raise unprocessable(f"the {IDEMPOTENCY_HEADER} is too long", [error])
    async with database.transaction() as conn:
        record = None if stored_key is None else await executions.find_by_key(conn, stored_key)
        if record is not None:
            return await _repeated(conn, call, record)
        graph = await graphs.get_graph(conn, name)
        if not graph.enabled:
            raise _paused(name)
        params = _resolve(graph.spec, call.body.params)
        record, created = await executions.create_execution(
            conn,
            graph=name,
            graph_version=graph.version,
            params=params,
            trigger_type="manual",
            trigger_info={"user": user},
            idempotency_key=stored_key,
        )
        if not created:  # a concurrent request with the same key won the insert
            return await _repeated(conn, call, record)
        await audit.record(
            conn,
            actor=user,
            action="execution.create",
            object_type="execution",
            object_id=record.id,
            detail={"graph": name, "version": graph.version, "trigger": "manual"},
        )
    database.notify_committed()
    return json_response(execution_out(record), 202)


async def _repeated(
    conn: AsyncConnection, call: Call[TriggerIn, None], record: ExecutionRecord
) -> Response:
    """The answer to a repeated `Idempotency-Key`: 200 with its execution, or 422 when the
    params sent now resolve to other params than it ran with."""
    try:
        spec = (await graphs.get_graph(conn, record.graph, record.graph_version)).spec
        params = _resolve(spec, call.body.params)
    except NotFound:  # that version was deleted since: compare what can be compared
        params = call.body.params
    if record.params != params:
        error = {
            "path": "body.params",
            "message": f"differ from the params of execution {record.id}, which this "
            f"{IDEMPOTENCY_HEADER} already started",
            "line": None,
        }
        raise unprocessable(f"the {IDEMPOTENCY_HEADER} was already used with other params", [error])
    return json_response(execution_out(record), 200)


# --- read -------------------------------------------------------------------------------


async def list_executions(call: Call[None, ExecutionQuery]) -> Response:
    """An `ExecutionPage`. On PostgreSQL the database writes the items' JSON (the same
    values; `params` spaced as PostgreSQL writes JSON) on a connection of
    `Database.direct_read()`: no row is decoded in Python, no SQLAlchemy in the way."""
    query = call.query
    database = call.runtime.database
    page: dict[str, Any] = {
        "graph": query.graph,
        "status": query.status,
        "trigger_type": query.trigger,
        "limit": query.limit,
        "cursor": query.cursor,
    }
    if database.is_postgres:
        async with database.direct_read() as direct:
            items, next_cursor = await executions.list_executions_json(direct, **page)
        body = b'{"items":%b,"next_cursor":%b}' % (items.encode(), orjson.dumps(next_cursor))
        return Response(body, media_type=JSON)
    async with database.read() as conn:
        records, next_cursor = await executions.list_executions(conn, **page)
    return execution_page_response(records, next_cursor)


async def get_execution(call: Call[None, None]) -> ExecutionOut:
    execution_id = _execution_id(call)
    async with call.runtime.database.read() as conn:
        record = await executions.get_execution(conn, execution_id)
        nodes = await node_runs.latest_node_runs(conn, execution_id)
    return execution_out(record, nodes)


def _wants_text(accept: str) -> bool:
    """Whether `Accept` prefers text/plain to JSON (by q, then by order; JSON by default)."""
    best: tuple[float, int, bool] | None = None
    for position, part in enumerate(accept.split(",")):
        media, *options = (piece.strip() for piece in part.split(";"))
        media = media.lower()
        if media not in (TEXT, "application/json", "text/*"):
            continue
        q = 1.0
        for option in options:
            name, _, value = option.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        candidate = (q, -position, media != "application/json")
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    return best is not None and best[2]


def _text_line(line: logs.LogLineOut) -> str:
    """A line as `loom run` prints it: `node | text`, Loom's own notes marked `[loom]`."""
    text = f"[loom] {line.text}" if line.stream == "loom" else line.text
    return f"{line.node} | {text}\n"


async def read_execution_logs(call: Call[None, LogQuery]) -> Response:
    """JSON `{items, next_after}`, or with `Accept: text/plain` one line per log line and
    `next_after` in the `Loom-Next-After` header."""
    execution_id = _execution_id(call)
    query = call.query
    async with call.runtime.database.read() as conn:
        await executions.get_execution(conn, execution_id)
        lines = await logs.read_logs(
            conn, execution_id, after=query.after, node=query.node, limit=query.limit
        )
    next_after = lines[-1].seq if lines else query.after
    headers = {NEXT_AFTER_HEADER: str(next_after)}
    if _wants_text(call.request.headers.get("accept", "")):
        body = "".join(_text_line(line) for line in lines)
        return Response(body, media_type=TEXT, headers=headers)
    items = [LogLine(**line._asdict()) for line in lines]
    return json_response(LogPage(items=items, next_after=next_after), headers=headers)


# --- cancel and retry -------------------------------------------------------------------


async def cancel_execution(call: Call[None, None]) -> ExecutionOut:
    """A queued or waiting execution ends cancelled at once; a running one is flagged and
    its worker told; one that already ended is answered unchanged."""
    execution_id = _execution_id(call)
    user = call.user.username
    database = call.runtime.database
    async with database.transaction() as conn:
        before = await executions.get_execution(conn, execution_id)
        record = await executions.request_cancel(conn, execution_id, by=user)
        if not before.finished:
            await audit.record(
                conn,
                actor=user,
                action="execution.cancel",
                object_type="execution",
                object_id=execution_id,
                detail={"status": record.status},
            )
    database.notify_committed()
    return execution_out(record)


async def retry_execution(call: Call[None, None]) -> ExecutionOut:
    """A new execution (trigger `retry`, naming its origin) of the same graph version and
    params; the worker reuses the outputs of the nodes that succeeded."""
    execution_id = _execution_id(call)
    user = call.user.username
    database = call.runtime.database
    async with database.transaction() as conn:
        origin = await executions.get_execution(conn, execution_id)
        if not origin.finished or origin.status == "succeeded":
            raise ApiProblem(
                409,
                f"execution {execution_id} is {origin.status}: only an execution that ended "
                "without succeeding can be retried",
            )
        try:
            graph = await graphs.get_graph(conn, origin.graph, origin.graph_version)
        except NotFound:
            raise ApiProblem(
                409,
                f"graph {origin.graph!r} version {origin.graph_version} no longer exists",
            ) from None
        if not graph.enabled:
            raise _paused(origin.graph)
        record, _ = await executions.create_execution(
            conn,
            graph=origin.graph,
            graph_version=origin.graph_version,
            params=origin.params,
            trigger_type="retry",
            trigger_info={"user": user},
            origin_id=origin.id,
        )
        await audit.record(
            conn,
            actor=user,
            action="execution.retry",
            object_type="execution",
            object_id=record.id,
            detail={"graph": origin.graph, "version": origin.graph_version, "origin_id": origin.id},
        )
    database.notify_committed()
    return execution_out(record)


ENDPOINTS: list[Endpoint] = [
    Endpoint(
        "POST",
        "/api/v1/graphs/{name}/executions",
        trigger_execution,
        Role.EDITOR,
        "Start an execution (optional Idempotency-Key header)",
        status=202,
        body=TriggerIn,
        body_required=False,
        response=ExecutionOut,
        errors=(409,),
        other_statuses={200: "The execution this Idempotency-Key already started"},
    ),
    Endpoint(
        "GET",
        "/api/v1/executions",
        list_executions,
        Role.VIEWER,
        "Executions, newest first",
        query=ExecutionQuery,
        response=ExecutionPage,
    ),
    Endpoint(
        "GET",
        "/api/v1/executions/{id}",
        get_execution,
        Role.VIEWER,
        "An execution with every node instance's latest attempt",
        response=ExecutionOut,
    ),
    Endpoint(
        "GET",
        "/api/v1/executions/{id}/logs",
        read_execution_logs,
        Role.VIEWER,
        "Log lines after a seq (JSON, or text/plain with Accept)",
        query=LogQuery,
        response=LogPage,
        response_content={TEXT: {"schema": {"type": "string"}}},
    ),
    Endpoint(
        "POST",
        "/api/v1/executions/{id}/cancel",
        cancel_execution,
        Role.EDITOR,
        "Cancel an execution (one that ended is answered unchanged)",
        status=202,
        response=ExecutionOut,
    ),
    Endpoint(
        "POST",
        "/api/v1/executions/{id}/retry",
        retry_execution,
        Role.EDITOR,
        "Start a new execution that retries one that did not succeed",
        status=202,
        response=ExecutionOut,
        errors=(409,),
    ),
]
