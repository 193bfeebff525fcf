"""The tables (SQLModel on SQLAlchemy). One metadata for both databases and for Alembic.

Hot paths (log lines, node runs, outbox, leases) use these tables through SQLAlchemy Core
(`Model.__table__`), not ORM objects.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

from loom_db.types import BigId, JsonValue, UtcDateTime

__all__ = [
    "ApiToken",
    "AuditEntry",
    "Execution",
    "GraphRow",
    "GraphVersion",
    "LogLine",
    "NodeRun",
    "OutboxRow",
    "RefreshFamily",
    "SecretRow",
    "TriggerRow",
    "User",
    "WebhookDelivery",
    "api_tokens",
    "audit_log",
    "executions",
    "graph_versions",
    "graphs",
    "log_lines",
    "metadata",
    "node_runs",
    "outbox",
    "refresh_families",
    "secrets",
    "triggers",
    "users",
    "webhook_deliveries",
]

metadata = SQLModel.metadata
metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _time(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(sa_column=Column(UtcDateTime(), nullable=nullable, index=index))


# --- people and credentials -------------------------------------------------------------


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    username: str = Field(sa_column=Column(String(100), nullable=False, unique=True))
    password_hash: str = Field(sa_column=Column(String(255), nullable=False))
    role: str = Field(sa_column=Column(String(16), nullable=False))
    disabled: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=text("false"))
    )
    created_at: datetime = _time()
    updated_at: datetime = _time()


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_tokens"

    id: str = Field(sa_column=Column(String(36), primary_key=True))
    user_id: int = Field(
        sa_column=Column(
            BigId, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    name: str = Field(sa_column=Column(String(100), nullable=False))
    token_hash: str = Field(sa_column=Column(String(128), nullable=False, unique=True))
    prefix: str = Field(sa_column=Column(String(16), nullable=False))
    role: str = Field(sa_column=Column(String(16), nullable=False))
    created_at: datetime = _time()
    expires_at: datetime | None = _time(nullable=True)
    last_used_at: datetime | None = _time(nullable=True)
    revoked_at: datetime | None = _time(nullable=True)


class RefreshFamily(SQLModel, table=True):
    """A chain of rotating refresh tokens; reuse of a spent one revokes the family."""

    __tablename__ = "refresh_families"

    id: str = Field(sa_column=Column(String(36), primary_key=True))
    user_id: int = Field(
        sa_column=Column(
            BigId, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    current_jti: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = _time()
    expires_at: datetime = _time()
    revoked_at: datetime | None = _time(nullable=True)


# --- graphs -----------------------------------------------------------------------------


class GraphRow(SQLModel, table=True):
    __tablename__ = "graphs"

    name: str = Field(sa_column=Column(String(63), primary_key=True))
    version: int = Field(sa_column=Column(Integer, nullable=False))
    """The current version."""
    enabled: bool = Field(
        default=True, sa_column=Column(Boolean, nullable=False, server_default=text("true"))
    )
    created_at: datetime = _time()
    updated_at: datetime = _time()


class GraphVersion(SQLModel, table=True):
    __tablename__ = "graph_versions"

    graph: str = Field(
        sa_column=Column(
            String(63), ForeignKey("graphs.name", ondelete="CASCADE"), primary_key=True
        )
    )
    version: int = Field(sa_column=Column(Integer, primary_key=True))
    description: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))
    source: str = Field(sa_column=Column(Text, nullable=False))
    """The document as uploaded."""
    spec: dict[str, Any] = Field(sa_column=Column(JsonValue, nullable=False))
    """The normalized spec (JSON)."""
    spec_hash: str = Field(sa_column=Column(String(64), nullable=False))
    triggers: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JsonValue, nullable=False)
    )
    """This version's trigger index entries, `[{id, kind, webhook_name, spec}]`: what
    enabling the graph restores and what a graph shows, without re-validating its source."""
    created_at: datetime = _time()
    created_by: str | None = Field(default=None, sa_column=Column(String(100), nullable=True))


class TriggerRow(SQLModel, table=True):
    """The trigger index: every trigger of every enabled graph, by its id."""

    __tablename__ = "triggers"
    __table_args__ = (UniqueConstraint("graph", "webhook_name"),)

    graph: str = Field(
        sa_column=Column(
            String(63), ForeignKey("graphs.name", ondelete="CASCADE"), primary_key=True
        )
    )
    trigger_id: str = Field(sa_column=Column(String(100), primary_key=True))
    kind: str = Field(sa_column=Column(String(16), nullable=False, index=True))
    graph_version: int = Field(sa_column=Column(Integer, nullable=False))
    webhook_name: str | None = Field(default=None, sa_column=Column(String(63), nullable=True))
    spec: dict[str, Any] = Field(sa_column=Column(JsonValue, nullable=False))


# --- executions -------------------------------------------------------------------------


class Execution(SQLModel, table=True):
    __tablename__ = "executions"
    __table_args__ = (
        Index("ix_executions_graph_created", "graph", "created_at"),
        # The executions list (newest first, keyset (created_at, id)): read backwards.
        Index("ix_executions_created", "created_at", "id"),
        Index("ix_executions_status_lease", "status", "lease_expires_at"),
    )

    id: str = Field(sa_column=Column(String(36), primary_key=True))
    graph: str = Field(sa_column=Column(String(63), nullable=False))
    graph_version: int = Field(sa_column=Column(Integer, nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    params: dict[str, Any] = Field(sa_column=Column(JsonValue, nullable=False))
    trigger_type: str = Field(sa_column=Column(String(16), nullable=False))
    trigger_info: dict[str, Any] = Field(sa_column=Column(JsonValue, nullable=False))
    idempotency_key: str | None = Field(
        default=None, sa_column=Column(String(400), nullable=True, unique=True)
    )
    origin_id: str | None = Field(default=None, sa_column=Column(String(36), nullable=True))
    """The execution this one retries (trigger type `retry`)."""
    parent_node_run_id: int | None = Field(default=None, sa_column=Column(BigId, nullable=True))
    """The `graph` node run that started this one (trigger type `graph`)."""
    worker_id: str | None = Field(default=None, sa_column=Column(String(100), nullable=True))
    lease_expires_at: datetime | None = _time(nullable=True)
    cancel_requested: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=text("false"))
    )
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _time(index=True)
    started_at: datetime | None = _time(nullable=True)
    finished_at: datetime | None = _time(nullable=True)


class NodeRun(SQLModel, table=True):
    """One row per node instance and attempt."""

    __tablename__ = "node_runs"
    __table_args__ = (UniqueConstraint("execution_id", "node", "attempt"),)

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    execution_id: str = Field(
        sa_column=Column(
            String(36), ForeignKey("executions.id", ondelete="CASCADE"), nullable=False
        )
    )
    node: str = Field(sa_column=Column(String(100), nullable=False))
    """The instance name: `build` or `build[0]`."""
    name: str = Field(sa_column=Column(String(64), nullable=False))
    index: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    attempt: int = Field(sa_column=Column(Integer, nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    started_at: datetime | None = _time(nullable=True)
    finished_at: datetime | None = _time(nullable=True)
    exit_code: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    outputs: Any = Field(default=None, sa_column=Column(JsonValue, nullable=True))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    child_execution_id: str | None = Field(
        default=None, sa_column=Column(String(36), nullable=True)
    )


class LogLine(SQLModel, table=True):
    __tablename__ = "log_lines"

    execution_id: str = Field(
        sa_column=Column(
            String(36), ForeignKey("executions.id", ondelete="CASCADE"), primary_key=True
        )
    )
    seq: int = Field(sa_column=Column(BigId, primary_key=True, autoincrement=False))
    node: str = Field(sa_column=Column(String(100), nullable=False))
    stream: str = Field(sa_column=Column(String(8), nullable=False))
    ts: datetime = _time()
    text: str = Field(sa_column=Column(Text, nullable=False))


# --- secrets, outbox, deliveries, audit -------------------------------------------------


class SecretRow(SQLModel, table=True):
    __tablename__ = "secrets"

    name: str = Field(sa_column=Column(String(100), primary_key=True))
    value: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    """A Fernet token: the plaintext never appears in these bytes."""
    created_at: datetime = _time()
    updated_at: datetime = _time()
    updated_by: str | None = Field(default=None, sa_column=Column(String(100), nullable=True))


class OutboxRow(SQLModel, table=True):
    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_unsent", "sent_at", "id"),)

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    channel: str = Field(sa_column=Column(String(16), nullable=False))
    key: str = Field(sa_column=Column(String(200), nullable=False))
    envelope: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = _time()
    sent_at: datetime | None = _time(nullable=True)


class WebhookDelivery(SQLModel, table=True):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_hook", "graph", "hook", "id"),)

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    graph: str = Field(sa_column=Column(String(63), nullable=False))
    hook: str = Field(sa_column=Column(String(63), nullable=False))
    delivery_id: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    received_at: datetime = _time()
    status_code: int = Field(sa_column=Column(Integer, nullable=False))
    outcome: str = Field(sa_column=Column(String(32), nullable=False))
    """`accepted`, `duplicate`, `skipped`, `unauthorized`, `invalid`, ..."""
    detail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    execution_id: str | None = Field(default=None, sa_column=Column(String(36), nullable=True))


class AuditEntry(SQLModel, table=True):
    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_actor", "actor", "id"),
        Index("ix_audit_log_object", "object_type", "object_id", "id"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    ts: datetime = _time()
    actor: str = Field(sa_column=Column(String(100), nullable=False))
    action: str = Field(sa_column=Column(String(64), nullable=False))
    object_type: str = Field(sa_column=Column(String(32), nullable=False))
    object_id: str = Field(sa_column=Column(String(200), nullable=False))
    detail: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JsonValue, nullable=False)
    )


# --- Core handles for the hot paths -----------------------------------------------------


def _table(model: type[SQLModel]) -> Table:
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


users = _table(User)
api_tokens = _table(ApiToken)
refresh_families = _table(RefreshFamily)
graphs = _table(GraphRow)
graph_versions = _table(GraphVersion)
triggers = _table(TriggerRow)
executions = _table(Execution)
node_runs = _table(NodeRun)
log_lines = _table(LogLine)
secrets = _table(SecretRow)
outbox = _table(OutboxRow)
webhook_deliveries = _table(WebhookDelivery)
audit_log = _table(AuditEntry)
