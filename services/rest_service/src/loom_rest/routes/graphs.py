"""Graph routes (DESIGN §5): list, create, apply, read (any version), versions, pause and
resume, delete, validate, and the webhook deliveries of a graph.

A graph document arrives as YAML (`application/yaml`, `application/x-yaml`,
`text/yaml`), JSON, or a multipart upload (field `file`), up to
`rest_max_graph_bytes`; it must be UTF-8. Every change writes `graph.changed` to the
outbox in its transaction (loom_db.graphs), and the relay is woken after the commit.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from loom_auth import Role
from loom_common import (
    CronError,
    CronExpression,
    Graph,
    SpecError,
    SpecIssue,
    load_graph,
    next_every,
    parse_duration,
    parse_instant,
    parse_timezone,
)
from loom_db import deliveries, graphs
from loom_db.graphs import GraphRecord, TriggerRecord
from loom_rest.api import JSON, Call, Endpoint, json_response, media_type, read_body
from loom_rest.problems import ApiProblem, unprocessable
from loom_rest.schemas import (
    DeliveryOut,
    EnabledIn,
    GraphOut,
    Page,
    PageQuery,
    TriggerRef,
    Valid,
    VersionOut,
)

__all__ = ["ENDPOINTS"]

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")
MULTIPART = "multipart/form-data"
_TIMER_KINDS = frozenset({"cron", "every", "at", "delay"})

GRAPH_CONTENT: dict[str, Any] = {
    **{kind: {"schema": {"type": "string"}} for kind in YAML_TYPES},
    JSON: {"schema": {"type": "object"}},
    MULTIPART: {
        "schema": {
            "type": "object",
            "properties": {
                "file": {"type": "string", "contentMediaType": "application/octet-stream"}
            },
            "required": ["file"],
        }
    },
}
"""The request body of the routes that take a graph document."""


class VersionQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(default=None, ge=1, le=2**31 - 1, description="Default: the latest")


class DeliveriesQuery(PageQuery):
    hook: str | None = Field(default=None, max_length=63, description="Only this hook's")


# --- the document -----------------------------------------------------------------------


async def _document(request: Request, limit: int) -> str:
    """The graph document of the request body as text. Raises `ApiProblem`: 413 past
    `limit` bytes, 415 for another media type, 422 for a missing upload, invalid JSON or
    a document that is not UTF-8."""
    raw = await read_body(request, limit)
    kind = media_type(request)
    where = "body"
    if kind == MULTIPART:
        raw, where = await _upload(request, limit), "body.file"
    elif kind == JSON:
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            error = {"path": "body", "message": f"not valid JSON: {exc.msg}", "line": exc.lineno}
            raise unprocessable("the body is not valid JSON", [error]) from None
    elif kind not in YAML_TYPES:
        accepted = ", ".join((*YAML_TYPES, JSON, MULTIPART))
        raise ApiProblem(415, f"send the graph as one of {accepted}, not {kind or 'nothing'}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        error = {"path": where, "message": f"not UTF-8: {exc.reason}", "line": None}
        raise unprocessable("the document is not UTF-8", [error]) from None


async def _upload(request: Request, limit: int) -> bytes:
    """The `file` field of a multipart body (already read whole by `read_body`)."""
    try:
        async with request.form(max_files=1, max_fields=10, max_part_size=limit) as form:
            field = form.get("file")
            if isinstance(field, UploadFile):
                return await field.read()
    except HTTPException as exc:  # Starlette's answer to a malformed multipart body
        raise ApiProblem(400, f"the multipart body is malformed: {exc.detail}") from None
    if isinstance(field, str):  # sent as a plain field rather than a file
        return field.encode("utf-8")
    error = {"path": "body.file", "message": "the graph file is missing", "line": None}
    raise unprocessable("upload the graph as the multipart field `file`", [error])


async def _load(source: str) -> Graph:
    """Validate off the event loop: a large document takes a while. Raises `SpecError`."""
    return await asyncio.to_thread(load_graph, source)


_NAME_LINE = re.compile(r'^(?:name|[\s{]*"name")\s*:', re.MULTILINE)


def _name_line(source: str) -> int | None:
    """The line of the top-level `name:` key (a best guess for a JSON document)."""
    found = _NAME_LINE.search(source)
    return None if found is None else source.count("\n", 0, found.start()) + 1


# --- answers ----------------------------------------------------------------------------


def _next_fire_time(trigger: TriggerRecord, now: datetime) -> datetime | None:
    """When a timer trigger fires next after `now`; None for webhooks, for an `at` in the
    past, and for `delay` (it counts from the end of the trigger's previous run, which
    only the timer follows)."""
    spec = trigger.spec
    try:
        if trigger.kind == "cron":
            zone = parse_timezone(spec.get("timezone") or "UTC")
            return CronExpression.parse(spec["cron"]).next_after(now, zone)
        if trigger.kind == "every":
            start = spec.get("start")
            anchor = parse_instant(start) if start else None
            return next_every(now, parse_duration(spec["every"]), anchor)
        if trigger.kind == "at":
            moment = parse_instant(spec["at"])
            return moment if moment > now else None
    except CronError:  # an expression that never fires again (within cron's horizon)
        return None
    return None


def _triggers(record: GraphRecord, now: datetime) -> list[TriggerRef]:
    live = record.enabled and record.version == record.latest_version
    return [
        TriggerRef(
            id=t.id,
            kind=t.kind,
            next_fire_time=_next_fire_time(t, now) if live and t.kind in _TIMER_KINDS else None,
        )
        for t in record.triggers
    ]


def _graph_out(record: GraphRecord, now: datetime | None = None) -> GraphOut:
    return GraphOut(
        name=record.name,
        version=record.version,
        latest_version=record.latest_version,
        description=record.description,
        enabled=record.enabled,
        spec=record.spec,
        source=record.source,
        created_at=record.created_at,
        updated_at=record.updated_at,
        triggers=_triggers(record, now or datetime.now(UTC)),
    )


# --- handlers ---------------------------------------------------------------------------


async def list_graphs(call: Call[None, PageQuery]) -> Page[GraphOut]:
    async with call.runtime.database.read() as conn:
        items, cursor = await graphs.list_graphs(
            conn, limit=call.query.limit, cursor=call.query.cursor
        )
    now = datetime.now(UTC)
    return Page[GraphOut](items=[_graph_out(r, now) for r in items], next_cursor=cursor)


async def create_graph(call: Call[None, None]) -> GraphOut:
    """201 with the new graph; 409 if its name exists (PUT updates)."""
    runtime = call.runtime
    source = await _document(call.request, runtime.settings.rest_max_graph_bytes)
    await _load(source)
    async with runtime.database.transaction() as conn:
        record, _ = await graphs.apply_graph(conn, source, by=call.actor, create_only=True)
    runtime.database.notify_committed()
    return _graph_out(record)


async def apply_graph(call: Call[None, None]) -> Response:
    """Create (201) or update (200) the graph named in the path: the same spec keeps its
    version, a changed one becomes version + 1."""
    runtime = call.runtime
    name = call.path("name")
    source = await _document(call.request, runtime.settings.rest_max_graph_bytes)
    graph = await _load(source)
    if graph.name != name:
        issue = SpecIssue(
            "body.name",
            f"the document names graph {graph.name!r}, the path {name!r}",
            _name_line(source),
        )
        raise SpecError([issue])
    async with runtime.database.transaction() as conn:
        record, outcome = await graphs.apply_graph(conn, source, by=call.actor)
    runtime.database.notify_committed()
    return json_response(_graph_out(record), 201 if outcome == "created" else 200)


async def get_graph(call: Call[None, VersionQuery]) -> GraphOut:
    async with call.runtime.database.read() as conn:
        record = await graphs.get_graph(conn, call.path("name"), call.query.version)
    return _graph_out(record)


async def list_graph_versions(call: Call[None, None]) -> Page[VersionOut]:
    """Every version, newest first, in one page (`next_cursor` is always null)."""
    async with call.runtime.database.read() as conn:
        found = await graphs.list_versions(conn, call.path("name"))
    items = [VersionOut.model_validate(v) for v in found]
    return Page[VersionOut](items=items, next_cursor=None)


async def set_graph_enabled(call: Call[EnabledIn, None]) -> GraphOut:
    runtime = call.runtime
    async with runtime.database.transaction() as conn:
        record = await graphs.set_enabled(conn, call.path("name"), call.body.enabled, by=call.actor)
    runtime.database.notify_committed()
    return _graph_out(record)


async def delete_graph(call: Call[None, None]) -> None:
    runtime = call.runtime
    async with runtime.database.transaction() as conn:
        await graphs.delete_graph(conn, call.path("name"), by=call.actor)
    runtime.database.notify_committed()


async def validate_graph(call: Call[None, None]) -> Valid:
    """Validate a document without storing it: 200, or 422 with every error."""
    source = await _document(call.request, call.runtime.settings.rest_max_graph_bytes)
    graph = await _load(source)
    return Valid(name=graph.name)


async def list_graph_deliveries(call: Call[None, DeliveriesQuery]) -> Page[DeliveryOut]:
    """The graph's webhook deliveries, newest first."""
    name = call.path("name")
    async with call.runtime.database.read() as conn:
        await graphs.list_versions(conn, name)  # NotFound for an unknown graph
        items, cursor = await deliveries.list_deliveries(
            conn, name, hook=call.query.hook, limit=call.query.limit, cursor=call.query.cursor
        )
    return Page[DeliveryOut](
        items=[DeliveryOut.model_validate(d) for d in items],
        next_cursor=cursor,
    )


ENDPOINTS: list[Endpoint] = [
    Endpoint(
        "GET",
        "/api/v1/graphs",
        list_graphs,
        Role.VIEWER,
        "Graphs at their latest version, by name",
        query=PageQuery,
        response=Page[GraphOut],
    ),
    Endpoint(
        "POST",
        "/api/v1/graphs",
        create_graph,
        Role.EDITOR,
        "Create a graph from YAML, JSON or a multipart upload (field `file`)",
        status=201,
        response=GraphOut,
        errors=(400, 409),
        request_content=GRAPH_CONTENT,
    ),
    Endpoint(
        "POST",
        "/api/v1/graphs/validate",
        validate_graph,
        Role.VIEWER,
        "Validate a graph document without storing it",
        response=Valid,
        errors=(400,),
        request_content=GRAPH_CONTENT,
    ),
    Endpoint(
        "GET",
        "/api/v1/graphs/{name}",
        get_graph,
        Role.VIEWER,
        "A graph at its latest version, or at `version`",
        query=VersionQuery,
        response=GraphOut,
    ),
    Endpoint(
        "PUT",
        "/api/v1/graphs/{name}",
        apply_graph,
        Role.EDITOR,
        "Create or update a graph: the same spec keeps its version, a changed one is version + 1",
        response=GraphOut,
        errors=(400,),
        request_content=GRAPH_CONTENT,
        other_statuses={201: "Created"},
    ),
    Endpoint(
        "PATCH",
        "/api/v1/graphs/{name}",
        set_graph_enabled,
        Role.EDITOR,
        "Pause (`enabled: false`: webhooks answer 404, timers stop) or resume a graph",
        body=EnabledIn,
        response=GraphOut,
    ),
    Endpoint(
        "DELETE",
        "/api/v1/graphs/{name}",
        delete_graph,
        Role.EDITOR,
        "Delete a graph; its triggers stop, its executions stay",
        status=204,
    ),
    Endpoint(
        "GET",
        "/api/v1/graphs/{name}/versions",
        list_graph_versions,
        Role.VIEWER,
        "A graph's versions, newest first, in one page",
        response=Page[VersionOut],
    ),
    Endpoint(
        "GET",
        "/api/v1/graphs/{name}/deliveries",
        list_graph_deliveries,
        Role.VIEWER,
        "The graph's last webhook deliveries, newest first",
        query=DeliveriesQuery,
        response=Page[DeliveryOut],
    ),
]
