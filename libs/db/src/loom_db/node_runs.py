"""Node runs: one row per node instance and attempt, written on the fast path.

The worker commits every node state change before it publishes it (DESIGN §8). A change
is an upsert keyed by (execution id, node instance, attempt) — `INSERT ... ON CONFLICT
DO UPDATE` on both databases, SQLAlchemy Core, no ORM objects — so a retry adds a row
and a status change of the same attempt updates it.

What a change carries overwrites the row (`status`, `exit_code`, `outputs`, `error`: a
`running` change clears them), except the times and the child execution, which a later
change only fills in: a `succeeded` change need not repeat when the attempt started.

`prior_states` is what a resumed (or retried) execution starts from: plain values
defined here, which the worker turns into the engine's own types (loom_db does not
import the worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db.models import node_runs as _node_runs

__all__ = [
    "NodeChange",
    "NodeRunRecord",
    "PriorState",
    "all_node_runs",
    "latest_node_runs",
    "prior_states",
    "record_node",
    "record_nodes",
]

_c = _node_runs.c


@dataclass(frozen=True, slots=True)
class NodeChange:
    """One state change of one attempt of one node instance (`build` or `build[0]`;
    `name` is the node id, `index` its place in a fan-out)."""

    node: str
    name: str
    index: int | None
    attempt: int
    status: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    outputs: Any = None
    error: str | None = None
    child_execution_id: str | None = None


@dataclass(frozen=True, slots=True)
class NodeRunRecord:
    """A stored attempt of a node instance."""

    id: int
    node: str
    name: str
    index: int | None
    attempt: int
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    outputs: Any
    error: str | None
    child_execution_id: str | None


@dataclass(frozen=True, slots=True)
class PriorState:
    """The latest attempt of a node instance, as a resumed execution needs it."""

    status: str
    outputs: Any
    attempt: int


async def record_node(
    conn: AsyncConnection,
    execution_id: str,
    *,
    node: str,
    name: str,
    index: int | None,
    attempt: int,
    status: str,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    exit_code: int | None = None,
    outputs: Any = None,
    error: str | None = None,
    child_execution_id: str | None = None,
) -> None:
    """Store one state change (an upsert) in the caller's transaction."""
    change = NodeChange(
        node,
        name,
        index,
        attempt,
        status,
        started_at,
        finished_at,
        exit_code,
        outputs,
        error,
        child_execution_id,
    )
    await record_nodes(conn, execution_id, [change])


async def record_nodes(
    conn: AsyncConnection, execution_id: str, changes: Sequence[NodeChange]
) -> None:
    """Store `changes`, in order, in the caller's transaction: one statement executed
    for many rows. Changes of the same attempt within the batch are folded first."""
    if not changes:
        return
    rows = [
        {
            "execution_id": execution_id,
            "node": ch.node,
            "name": ch.name,
            "index": ch.index,
            "attempt": ch.attempt,
            "status": ch.status,
            "started_at": ch.started_at,
            "finished_at": ch.finished_at,
            "exit_code": ch.exit_code,
            "outputs": ch.outputs,
            "error": ch.error,
            "child_execution_id": ch.child_execution_id,
        }
        for ch in _fold(changes)
    ]
    await conn.execute(_UPSERTS[conn.dialect.name], rows)


def _fold(changes: Sequence[NodeChange]) -> list[NodeChange]:
    """Merge changes of the same (node, attempt) the way the upsert merges them into a
    row, so each row is written once (PostgreSQL refuses to update a row twice in one
    multi-row statement, and it saves the writes)."""
    folded: dict[tuple[str, int], NodeChange] = {}
    for ch in changes:
        key = (ch.node, ch.attempt)
        old = folded.get(key)
        if old is not None:
            ch = replace(
                ch,
                started_at=ch.started_at or old.started_at,
                finished_at=ch.finished_at or old.finished_at,
                child_execution_id=ch.child_execution_id or old.child_execution_id,
            )
        folded[key] = ch
    return list(folded.values())


def _upsert(dialect: str) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(_node_runs)
    new = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=[_c.execution_id, _c.node, _c.attempt],
        set_={
            "name": new.name,
            "index": new["index"],
            "status": new.status,
            "exit_code": new.exit_code,
            "outputs": new.outputs,
            "error": new.error,
            "started_at": func.coalesce(new.started_at, _c.started_at),
            "finished_at": func.coalesce(new.finished_at, _c.finished_at),
            "child_execution_id": func.coalesce(new.child_execution_id, _c.child_execution_id),
        },
    )


_UPSERTS = {dialect: _upsert(dialect) for dialect in ("postgresql", "sqlite")}


def _per_instance(execution_id: str) -> Any:
    """Per node instance: its latest attempt and its first row (the order of first start)."""
    return (
        select(
            _c.node.label("node"),
            func.max(_c.attempt).label("latest"),
            func.min(_c.id).label("first"),
        )
        .where(_c.execution_id == execution_id)
        .group_by(_c.node)
        .subquery()
    )


def _records(execution_id: str, *, latest_only: bool) -> Select[Any]:
    instances = _per_instance(execution_id)
    on = _c.node == instances.c.node
    if latest_only:
        on = on & (_c.attempt == instances.c.latest)
    return (
        select(_node_runs)
        .join(instances, on)
        .where(_c.execution_id == execution_id)
        .order_by(instances.c.first, _c.attempt)
    )


_FIELDS = tuple(f.name for f in fields(NodeRunRecord))


def _record(row: Any) -> NodeRunRecord:
    values = row._mapping  # not attributes: a Row is a tuple, `row.index` is tuple.index
    return NodeRunRecord(**{field: values[field] for field in _FIELDS})


async def latest_node_runs(conn: AsyncConnection, execution_id: str) -> list[NodeRunRecord]:
    """The latest attempt of every node instance of `execution_id`, in the order the
    instances were first recorded (first started, or skipped)."""
    result = await conn.execute(_records(execution_id, latest_only=True))
    return [_record(row) for row in result]


async def all_node_runs(conn: AsyncConnection, execution_id: str) -> list[NodeRunRecord]:
    """Every attempt of every node instance of `execution_id`: instances in the order
    they were first recorded, each one's attempts in order."""
    result = await conn.execute(_records(execution_id, latest_only=False))
    return [_record(row) for row in result]


async def prior_states(conn: AsyncConnection, execution_id: str) -> dict[str, PriorState]:
    """Per node instance, its latest attempt's status, outputs and attempt number: what
    the worker gives the engine as prior states when it resumes `execution_id` (or
    retries it, keeping the succeeded ones)."""
    query = select(_c.node, _c.status, _c.outputs, _c.attempt).join(
        instances := _per_instance(execution_id),
        (_c.node == instances.c.node) & (_c.attempt == instances.c.latest),
    )
    result = await conn.execute(query.where(_c.execution_id == execution_id))
    return {row.node: PriorState(row.status, row.outputs, row.attempt) for row in result}
