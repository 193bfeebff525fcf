"""Graphs, their versions and the trigger index (DESIGN §5, §7).

`apply_graph` validates a document and stores it as a new version only when its
normalized spec changed (a reformatted YAML with the same meaning keeps the version). The
trigger index holds one row per trigger of every ENABLED graph's current version: what
the timer (`list_triggers`) and webhook (`find_webhook`) services look up. Every change
writes a `graph.changed` outbox message and an audit entry in the same transaction; the
caller calls `Database.notify_committed()` after the commit to wake the relay.

Changes to one graph are serialised by locking its row (`FOR UPDATE` on PostgreSQL;
SQLite has a single writer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson
from sqlalchemy import Row, Select, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db import audit
from loom_db.errors import Conflict, NotFound
from loom_db.models import executions, graph_versions, graphs, triggers
from loom_db.outbox import enqueue
from loom_db.pagination import check_limit, decode_cursor, encode_cursor
from loom_db.types import utcnow

if TYPE_CHECKING:
    from loom_common import Graph

__all__ = [
    "ApplyOutcome",
    "GraphRecord",
    "TriggerRecord",
    "VersionRecord",
    "apply_graph",
    "delete_graph",
    "find_webhook",
    "get_graph",
    "list_graphs",
    "list_triggers",
    "list_versions",
    "lock_states",
    "set_enabled",
    "spec_hash",
]

ApplyOutcome = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True, slots=True)
class TriggerRecord:
    """One trigger of a graph version, as indexed."""

    graph: str
    id: str
    kind: str
    """`cron`, `every`, `delay`, `at` or `webhook`."""
    graph_version: int
    webhook_name: str | None
    """The hook's name for `webhook` triggers (`/hooks/{graph}/{name}`), else None."""
    spec: dict[str, Any]
    """The trigger as validated: `model_dump(mode="json", by_alias=True)`."""


@dataclass(frozen=True, slots=True)
class GraphRecord:
    name: str
    version: int
    """The version shown (the latest unless another was asked for)."""
    latest_version: int
    enabled: bool
    description: str
    source: str
    """The document as uploaded."""
    spec: dict[str, Any]
    """The normalized spec (defaults left out)."""
    spec_hash: str
    created_at: datetime
    updated_at: datetime
    triggers: tuple[TriggerRecord, ...]
    """The triggers of this version (indexed only while the graph is enabled)."""


@dataclass(frozen=True, slots=True)
class VersionRecord:
    graph: str
    version: int
    description: str
    spec_hash: str
    created_at: datetime
    created_by: str | None


def spec_hash(spec: dict[str, Any]) -> str:
    """The SHA-256 of a normalized spec's canonical JSON (sorted keys)."""
    return hashlib.sha256(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def apply_graph(
    conn: AsyncConnection, source: str, *, by: str | None = None, create_only: bool = False
) -> tuple[GraphRecord, ApplyOutcome]:
    """Create or update a graph from its document (YAML or JSON).

    An identical normalized spec keeps the current version and writes nothing
    ("unchanged"); a changed one becomes version + 1 ("updated"). A new graph starts
    after the highest version its name's remaining executions refer to (1 for a new
    name), so a deleted and re-created graph never reuses a version number that old
    executions name. Raises `SpecError` for an invalid document, and `Conflict` with
    `create_only` when the name exists.
    """
    from loom_common import load_graph  # on first use: a service that applies none skips Jinja2

    graph = load_graph(source)
    name = graph.name
    spec = graph.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    digest = spec_hash(spec)
    now = utcnow()
    current = await _lock(conn, name)
    if current is None:
        first_version = 1 + await _last_executed_version(conn, name)
        if not await _insert_graph_row(conn, name, first_version, now):
            current = await _lock(conn, name)  # a concurrent transaction created it
            assert current is not None
    outcome: ApplyOutcome
    if current is None:
        outcome, version, enabled = "created", first_version, True
    else:
        if create_only:
            raise Conflict(f"graph {name!r} exists")
        stored_hash = (
            await conn.execute(
                select(graph_versions.c.spec_hash).where(
                    graph_versions.c.graph == name, graph_versions.c.version == current.version
                )
            )
        ).scalar_one()
        if stored_hash == digest:
            return await get_graph(conn, name), "unchanged"
        outcome, version, enabled = "updated", current.version + 1, current.enabled
        await conn.execute(
            update(graphs).where(graphs.c.name == name).values(version=version, updated_at=now)
        )
    entries = _trigger_entries(graph)
    await conn.execute(
        insert(graph_versions).values(
            graph=name,
            version=version,
            description=graph.spec.description,
            source=source,
            spec=spec,
            spec_hash=digest,
            triggers=entries,
            created_at=now,
            created_by=by,
        )
    )
    if enabled:
        await _index_triggers(conn, name, version, entries)
    await _announce(conn, name, version, enabled=enabled, deleted=False)
    await audit.record(
        conn,
        actor=by,
        action=f"graph.{'create' if outcome == 'created' else 'update'}",
        object_type="graph",
        object_id=name,
        detail={"version": version, "spec_hash": digest},
    )
    return await get_graph(conn, name), outcome


async def set_enabled(
    conn: AsyncConnection, name: str, enabled: bool, *, by: str | None = None
) -> GraphRecord:
    """Pause (`False`: its triggers leave the index, so webhooks answer 404 and timers
    stop) or resume a graph. Setting the state it already has changes nothing. Raises
    `NotFound`."""
    current = await _lock(conn, name)
    if current is None:
        raise NotFound(f"no graph named {name!r}")
    if current.enabled != enabled:
        await conn.execute(
            update(graphs).where(graphs.c.name == name).values(enabled=enabled, updated_at=utcnow())
        )
        if enabled:
            entries = (
                await conn.execute(
                    select(graph_versions.c.triggers).where(
                        graph_versions.c.graph == name,
                        graph_versions.c.version == current.version,
                    )
                )
            ).scalar_one()
            await _index_triggers(conn, name, current.version, entries)
        else:
            await conn.execute(delete(triggers).where(triggers.c.graph == name))
        await _announce(conn, name, current.version, enabled=enabled, deleted=False)
        await audit.record(
            conn,
            actor=by,
            action="graph.enable" if enabled else "graph.disable",
            object_type="graph",
            object_id=name,
            detail={"version": current.version},
        )
    return await get_graph(conn, name)


async def delete_graph(conn: AsyncConnection, name: str, *, by: str | None = None) -> None:
    """Delete a graph with its versions and triggers; its executions stay. Raises
    `NotFound`."""
    current = await _lock(conn, name)
    if current is None:
        raise NotFound(f"no graph named {name!r}")
    await conn.execute(delete(triggers).where(triggers.c.graph == name))
    await conn.execute(delete(graph_versions).where(graph_versions.c.graph == name))
    await conn.execute(delete(graphs).where(graphs.c.name == name))
    await _announce(conn, name, current.version, enabled=False, deleted=True)
    await audit.record(
        conn,
        actor=by,
        action="graph.delete",
        object_type="graph",
        object_id=name,
        detail={"version": current.version},
    )


async def get_graph(conn: AsyncConnection, name: str, version: int | None = None) -> GraphRecord:
    """A graph at its latest version, or at `version`. Raises `NotFound` for an unknown
    graph or version."""
    query = _graph_query().where(graphs.c.name == name)
    query = query.where(
        graph_versions.c.version == (graphs.c.version if version is None else version)
    )
    row = (await conn.execute(query)).first()
    if row is None:
        suffix = f" version {version}" if version is not None else ""
        raise NotFound(f"no graph named {name!r}{suffix}")
    return _graph_record(row)


async def list_graphs(
    conn: AsyncConnection, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[GraphRecord], str | None]:
    """Graphs at their latest version, by name, one page at a time: `(items,
    next_cursor)`, `next_cursor` None on the last page. Raises `ValueError` for a limit
    below 1."""
    check_limit(limit)
    query = (
        _graph_query()
        .where(graph_versions.c.version == graphs.c.version)
        .order_by(graphs.c.name)
        .limit(limit + 1)
    )
    if cursor is not None:
        query = query.where(graphs.c.name > decode_cursor(cursor, str)[0])
    rows = (await conn.execute(query)).all()
    items = [_graph_record(row) for row in rows[:limit]]
    return items, (encode_cursor(items[-1].name) if len(rows) > limit else None)


async def list_versions(conn: AsyncConnection, name: str) -> list[VersionRecord]:
    """A graph's versions, newest first. Raises `NotFound`."""
    rows = (
        await conn.execute(
            select(
                graph_versions.c.graph,
                graph_versions.c.version,
                graph_versions.c.description,
                graph_versions.c.spec_hash,
                graph_versions.c.created_at,
                graph_versions.c.created_by,
            )
            .where(graph_versions.c.graph == name)
            .order_by(graph_versions.c.version.desc())
        )
    ).all()
    if not rows:
        raise NotFound(f"no graph named {name!r}")
    return [VersionRecord(*row) for row in rows]


async def list_triggers(
    conn: AsyncConnection, *, kind: str | Sequence[str] | None = None
) -> list[TriggerRecord]:
    """Every indexed trigger (those of enabled graphs), by graph and id; only those of
    `kind` (one kind or several) when given."""
    query = select(triggers).order_by(triggers.c.graph, triggers.c.trigger_id)
    if isinstance(kind, str):
        query = query.where(triggers.c.kind == kind)
    elif kind is not None:
        query = query.where(triggers.c.kind.in_(list(kind)))
    return [_trigger_record(row) for row in (await conn.execute(query)).all()]


async def lock_states(conn: AsyncConnection, names: Iterable[str]) -> dict[str, tuple[int, bool]]:
    """`{graph: (current version, enabled)}` of those of `names` that exist, their rows
    locked shared (in name order, so concurrent callers cannot deadlock) for the rest of
    the caller's transaction: a pause or delete commits before it or after it. What a
    service storing many executions at once checks first."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    rows = await conn.execute(
        select(graphs.c.name, graphs.c.version, graphs.c.enabled)
        .where(graphs.c.name.in_(wanted))
        .order_by(graphs.c.name)
        .with_for_update(read=True)  # SQLite: its writers are serialized anyway
    )
    return {row.name: (row.version, row.enabled) for row in rows}


async def find_webhook(conn: AsyncConnection, graph: str, hook_name: str) -> TriggerRecord | None:
    """The webhook trigger `hook_name` of `graph`; None if the graph is unknown or
    disabled or has no such hook."""
    row = (
        await conn.execute(
            select(triggers).where(triggers.c.graph == graph, triggers.c.webhook_name == hook_name)
        )
    ).first()
    return None if row is None else _trigger_record(row)


# --- internals ----------------------------------------------------------------------


async def _lock(conn: AsyncConnection, name: str) -> Row[int, bool] | None:
    """The graph's row (version, enabled), locked for the rest of the transaction."""
    query = (
        select(graphs.c.version, graphs.c.enabled).where(graphs.c.name == name).with_for_update()
    )
    return (await conn.execute(query)).first()


async def _last_executed_version(conn: AsyncConnection, name: str) -> int:
    query = select(func.max(executions.c.graph_version)).where(executions.c.graph == name)
    return int((await conn.execute(query)).scalar_one_or_none() or 0)


async def _insert_graph_row(conn: AsyncConnection, name: str, version: int, now: datetime) -> bool:
    """Insert the graph's row unless it exists (a concurrent create); True if inserted."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = (
        dialect_insert(graphs)
        .values(name=name, version=version, enabled=True, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=[graphs.c.name])
        .returning(graphs.c.name)  # rowcount is not reliable here across drivers
    )
    return (await conn.execute(stmt)).first() is not None


def _trigger_entries(graph: Graph) -> list[dict[str, Any]]:
    entries = []
    for info in graph.triggers:
        spec = info.spec.model_dump(mode="json", by_alias=True)
        entries.append(
            {
                "id": info.id,
                "kind": info.kind,
                "webhook_name": spec["webhook"]["name"] if info.kind == "webhook" else None,
                "spec": spec,
            }
        )
    return entries


async def _index_triggers(
    conn: AsyncConnection, name: str, version: int, entries: Sequence[dict[str, Any]]
) -> None:
    """Replace the graph's rows in the trigger index with `entries`."""
    await conn.execute(delete(triggers).where(triggers.c.graph == name))
    if entries:
        await conn.execute(
            insert(triggers),
            [
                {
                    "graph": name,
                    "trigger_id": entry["id"],
                    "kind": entry["kind"],
                    "graph_version": version,
                    "webhook_name": entry["webhook_name"],
                    "spec": entry["spec"],
                }
                for entry in entries
            ],
        )


async def _announce(
    conn: AsyncConnection, name: str, version: int, *, enabled: bool, deleted: bool
) -> None:
    await enqueue(
        conn,
        "graph.changed",
        name,
        {"graph": name, "version": version, "enabled": enabled, "deleted": deleted},
    )


def _graph_query() -> Select[Any]:
    return select(
        graphs.c.name,
        graph_versions.c.version,
        graphs.c.version.label("latest_version"),
        graphs.c.enabled,
        graph_versions.c.description,
        graph_versions.c.source,
        graph_versions.c.spec,
        graph_versions.c.spec_hash,
        graphs.c.created_at,
        graphs.c.updated_at,
        graph_versions.c.triggers,
    ).join(graph_versions, graph_versions.c.graph == graphs.c.name)


def _graph_record(row: Row[Any]) -> GraphRecord:
    return GraphRecord(
        name=row.name,
        version=row.version,
        latest_version=row.latest_version,
        enabled=row.enabled,
        description=row.description,
        source=row.source,
        spec=row.spec,
        spec_hash=row.spec_hash,
        created_at=row.created_at,
        updated_at=row.updated_at,
        triggers=tuple(
            TriggerRecord(
                graph=row.name,
                id=entry["id"],
                kind=entry["kind"],
                graph_version=row.version,
                webhook_name=entry["webhook_name"],
                spec=entry["spec"],
            )
            for entry in row.triggers
        ),
    )


def _trigger_record(row: Row[Any]) -> TriggerRecord:
    return TriggerRecord(
        graph=row.graph,
        id=row.trigger_id,
        kind=row.kind,
        graph_version=row.graph_version,
        webhook_name=row.webhook_name,
        spec=row.spec,
    )
