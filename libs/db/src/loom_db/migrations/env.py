"""Alembic's environment for Loom, run by `loom_db.migrate` (there is no alembic.ini).

`migrate` opens a connection from Loom's async engine, begins the one transaction of the
upgrade and runs Alembic on it through `AsyncConnection.run_sync`, handing the synchronous
connection over in `config.attributes["connection"]`. This script only configures the
context (the options shared with the drift test) and runs the revisions.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from loom_db.migrate import migration_options

if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported")

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run Loom's migrations with `python -m loom_db upgrade`")

context.configure(connection=connection, **migration_options(connection.dialect.name))
with context.begin_transaction():
    context.run_migrations()
