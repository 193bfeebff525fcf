"""Loom's source of truth on SQLite (embedded) and PostgreSQL (production).

The public surface: one `Database` per process (`create_database(url)`), the errors, and
the operations as modules of plain async functions over an `AsyncConnection`::

    from loom_db import Database, create_database, executions, graphs

    async with db.transaction() as conn:
        record, created = await executions.create_execution(conn, ...)
    db.notify_committed()  # wakes this process's outbox relay

Migrations (`loom_db.migrate`, Alembic) are deliberately not imported here: a service's
start path does not load Alembic (DESIGN §10, B7).
"""

from loom_db import (
    audit,
    deliveries,
    executions,
    graphs,
    keys,
    logs,
    node_runs,
    outbox,
    pagination,
    relay,
    retention,
    secrets,
    tokens,
    users,
)
from loom_db.database import Database, create_database, database_from_settings
from loom_db.errors import (
    Conflict,
    DatabaseError,
    DatabaseUnavailable,
    NotFound,
    SecretKeyMismatch,
    TransactionConflict,
)

__all__ = [
    "Conflict",
    "Database",
    "DatabaseError",
    "DatabaseUnavailable",
    "NotFound",
    "SecretKeyMismatch",
    "TransactionConflict",
    "audit",
    "create_database",
    "database_from_settings",
    "deliveries",
    "executions",
    "graphs",
    "keys",
    "logs",
    "node_runs",
    "outbox",
    "pagination",
    "relay",
    "retention",
    "secrets",
    "tokens",
    "users",
]
