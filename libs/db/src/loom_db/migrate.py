"""Schema migrations: ONE Alembic history for SQLite and PostgreSQL, inside the package.

The history lives in ``loom_db/migrations/versions/`` and is configured here, in code: an
installed image needs no ``alembic.ini`` to run ``python -m loom_db upgrade``. Alembic is
imported only by the functions of this module, never by ``import loom_db`` (DESIGN §10,
B7: it costs memory and start-up time in every service that does not migrate).

Upgrading
---------
``python -m loom_db upgrade`` (or ``loom db upgrade``) brings the database of
``LOOM_DATABASE_URL`` (or ``--database-url``) to the newest revision; the embedded mode
calls ``await upgrade(db)`` at start. An upgrade is one transaction: it applies every
missing revision or none. Concurrent upgrades are safe (PostgreSQL: an advisory lock;
SQLite: the write lock taken at ``BEGIN IMMEDIATE``).

Adding a migration
------------------
1. Change the tables in ``loom_db/models.py``.
2. ``uv run python -m loom_db revision -m "add executions.priority"`` — autogenerates the
   difference between the models and a throwaway SQLite database upgraded to the current
   head, and writes ``versions/<NNNN>_<slug>.py`` (formatted with ruff when installed).
3. Read it. Autogenerate cannot see renames (it drops and adds) nor PostgreSQL-only
   details; SQLite alterations render as ``batch_alter_table`` (SQLite rebuilds the
   table; PostgreSQL runs plain ``ALTER``), so one script serves both databases.
4. ``uv run pytest libs/db/tests/test_migrations.py``: the drift test fails while the
   models and the migrated schema differ, on either database.

Before the first release the history may be squashed back into one initial revision:
``uv run python -m loom_db regenerate`` replaces every file in ``versions/`` with a fresh
``0001_initial.py``. A database already at ``0001`` does not see that change: delete
development databases (``./.loom/loom.db``) afterwards. Never regenerate once a release
has shipped; add revisions instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy import DefaultClause, Text, TypeDecorator, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, make_url

from loom_db.database import Database, create_database
from loom_db.errors import translate_errors
from loom_db.models import metadata

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from alembic.config import Config
    from alembic.operations.ops import MigrationScript
    from alembic.runtime.migration import MigrationContext

__all__ = [
    "MIGRATIONS_DIR",
    "Upgrade",
    "alembic_config",
    "current",
    "migration_options",
    "regenerate",
    "revision",
    "upgrade",
    "upgrade_sync",
]

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

# Any constant works; it only has to be the same for every Loom process.
_PG_MIGRATION_LOCK = 0x4C4F4F4D  # "LOOM"


@dataclass(frozen=True)
class Upgrade:
    """What an upgrade did: the database (password hidden) and its revision before/after."""

    database: str
    before: str | None
    after: str | None

    def __str__(self) -> str:
        if self.before == self.after:
            return f"{self.database} already at {self.after or '<none>'}"
        return f"upgraded {self.database} from {self.before or '<none>'} to {self.after}"


def alembic_config(directory: Path = MIGRATIONS_DIR) -> Config:
    """The Alembic configuration of Loom's history, built in code (no alembic.ini).

    `directory` holds `env.py`, `script.py.mako` and `versions/` (tests pass a copy)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(directory))
    config.set_main_option("path_separator", "os")
    # `%%` because the option parser interpolates `%(...)s`.
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.set_main_option("truncate_slug_length", "40")
    if importlib.util.find_spec("ruff") is not None:
        # Format first, so that the check only reports what formatting cannot fix.
        config.set_section_option("post_write_hooks", "hooks", "ruff_format, ruff_fix")
        for name, options in (("ruff_format", "format --quiet"), ("ruff_fix", "check --fix")):
            config.set_section_option("post_write_hooks", f"{name}.type", "module")
            config.set_section_option("post_write_hooks", f"{name}.module", "ruff")
            config.set_section_option(
                "post_write_hooks", f"{name}.options", f"{options} REVISION_SCRIPT_FILENAME"
            )
    return config


def migration_options(dialect_name: str) -> dict[str, Any]:
    """The options of `context.configure` (env.py) and of the drift check's comparison."""
    return {
        "target_metadata": metadata,
        "compare_type": True,
        "compare_server_default": _compare_server_default,
        # SQLite cannot ALTER most things: autogenerate renders batch operations, which
        # rebuild the table on SQLite and are plain ALTERs on PostgreSQL.
        "render_as_batch": dialect_name == "sqlite",
        "render_item": _render_item,
    }


def _compare_server_default(
    context: MigrationContext,
    inspected_column: Any,
    metadata_column: Any,
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    """Alembic's comparison of server defaults, minus its false alarm on SQLite, which
    reflects ``server_default=""`` as ``('')`` (Alembic unwraps only non-empty strings).
    None means "let Alembic compare"."""
    if isinstance(metadata_default, DefaultClause) and isinstance(metadata_default.arg, str):
        literal = "'" + metadata_default.arg.replace("'", "''") + "'"
        if _unwrap(inspected_default) == literal:
            return False
    return None


def _unwrap(sql: str | None) -> str | None:
    while sql is not None and sql.startswith("(") and sql.endswith(")"):
        sql = sql[1:-1].strip()
    return sql


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render Loom's own column types (`loom_db.types`) as importable code, and JSONB."""
    if type_ != "type":
        return False
    if isinstance(obj, JSONB):
        # Alembic renders a variant with the impl of the database it compares against
        # (SQLite), which writes an unimportable `astext_type=Text()`.
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return "postgresql.JSONB()" if type(obj.astext_type) is Text else False
    if not type(obj).__module__.startswith("loom_db."):
        return False
    module = type(obj).__module__
    autogen_context.imports.add(f"import {module}")
    if isinstance(obj, TypeDecorator) and type(obj).__init__ is TypeDecorator.__init__:
        # Its impl is fixed by the class: the repr's impl arguments would only be noise.
        return f"{module}.{type(obj).__name__}()"
    return f"{module}.{obj!r}"


# --- running against a database ---------------------------------------------------------


async def upgrade(db_or_url: Database | str, revision: str = "head") -> Upgrade:
    """Apply every missing revision up to `revision`, in one transaction.

    Raises:
        DatabaseUnavailable: the database cannot be reached.
        alembic.util.CommandError: `revision` is unknown, or the database is at a revision
            this history does not contain (a newer Loom migrated it).
        sqlalchemy.exc.SQLAlchemyError: a migration statement failed (nothing applied).

    Alembic keeps its running environment in module globals: one process migrates one
    database at a time (concurrent upgrades of the SAME database wait for each other).
    """
    async with _database(db_or_url) as db:
        return await _in_migration_transaction(db, lambda conn: _upgrade(conn, revision))


async def current(db_or_url: Database | str) -> str | None:
    """The database's revision, or None when it was never migrated.

    Raises:
        DatabaseUnavailable: the database cannot be reached.
    """
    async with _database(db_or_url) as db, db.read() as conn:
        return await conn.run_sync(_current_revision)


def upgrade_sync(url: str, revision: str = "head") -> Upgrade:
    """`upgrade` for synchronous callers; also works while this thread runs an event loop
    (it then migrates on a helper thread with its own loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(upgrade(url, revision))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loom-migrate") as pool:
        return pool.submit(asyncio.run, upgrade(url, revision)).result()


def _upgrade(connection: Connection, revision: str) -> Upgrade:
    from alembic import command

    before = _current_revision(connection)
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)
    database = make_url(str(connection.engine.url)).render_as_string(hide_password=True)
    return Upgrade(database, before, _current_revision(connection))


def _current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


@asynccontextmanager
async def _database(db_or_url: Database | str) -> AsyncIterator[Database]:
    """The caller's database, or one of our own for a URL (disposed at the end)."""
    if isinstance(db_or_url, Database):
        yield db_or_url
        return
    db = create_database(db_or_url, pool_size=1, max_overflow=0)
    try:
        yield db
    finally:
        await db.dispose()


async def _in_migration_transaction(db: Database, work: Callable[[Connection], T]) -> T:
    """Run `work` on a sync connection in ONE transaction, committed if it returns.

    Only reaching the database (connect, begin, commit) is translated to
    `DatabaseUnavailable`: a failing migration statement is a bug in a migration, not an
    outage, and must say so.
    """
    sqlite = not db.is_postgres
    with translate_errors():
        conn = await db.engine.connect()
    try:
        with translate_errors():
            if sqlite:
                # With foreign keys on, the DROP TABLE of a batch migration (SQLite rebuilds
                # a table to alter it) would run ON DELETE CASCADE on every child row. The
                # pragma is ignored inside a transaction, hence before BEGIN; the check
                # below still refuses a migration that breaks a reference.
                await conn.run_sync(_sqlite_foreign_keys_off)
            await conn.begin()
            if db.is_postgres:
                # Two processes upgrading at once: the second waits, then finds the work done.
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
                )
        result = await conn.run_sync(work)
        if sqlite:
            broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).fetchall()
            if broken:
                raise RuntimeError(f"the migration breaks foreign keys: {broken[:5]}")
        with translate_errors():
            await conn.commit()
        return result
    finally:
        if sqlite:
            # Never hand a connection with foreign keys off back to the pool: the next one
            # gets them on again from the engine's connect hook.
            await conn.invalidate()
        await conn.close()


def _sqlite_foreign_keys_off(connection: Connection) -> None:
    # At the DBAPI level: SQLAlchemy's execute would open a transaction first.
    cursor = connection.connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=OFF")
    finally:
        cursor.close()


# --- writing revisions (development only) -----------------------------------------------


def revision(
    message: str, *, rev_id: str | None = None, directory: Path = MIGRATIONS_DIR
) -> Path | None:
    """Autogenerate a revision from `models.py` into `versions/`; its path, or None when the
    models and the history already agree (nothing is written then).

    The comparison runs against a throwaway SQLite database upgraded to the current head.
    The new revision's id is the next number (`0002`, ...) unless `rev_id` is given.

    Raises:
        alembic.util.CommandError: the history has several heads (merge them first).
    """
    with tempfile.TemporaryDirectory(prefix="loom-revision-") as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'autogenerate.db'}"
        return asyncio.run(_autogenerate(url, message, rev_id, directory))


async def _autogenerate(url: str, message: str, rev_id: str | None, directory: Path) -> Path | None:
    async with _database(url) as db:
        return await _in_migration_transaction(
            db, lambda conn: _revision(conn, message, rev_id, directory)
        )


def regenerate(message: str = "initial", *, directory: Path = MIGRATIONS_DIR) -> Path:
    """Replace the whole history with ONE revision `0001` autogenerated from `models.py`.

    Only before the first release (see the module docstring). The old files are put back
    if generating the new one fails.
    """
    with tempfile.TemporaryDirectory(prefix="loom-versions-") as tmp:
        versions = directory / "versions"
        moved = [path for path in versions.glob("*.py") if path.name != "__init__.py"]
        for path in moved:
            shutil.move(path, Path(tmp) / path.name)
        try:
            written = revision(message, rev_id="0001", directory=directory)
            if written is None:
                raise RuntimeError("models.py has no tables: nothing to generate")
        except BaseException:
            for path in versions.glob("*.py"):
                if path.name != "__init__.py":
                    path.unlink()
            for path in moved:
                shutil.move(Path(tmp) / path.name, path)
            raise
        return written


def _revision(
    connection: Connection, message: str, rev_id: str | None, directory: Path
) -> Path | None:
    from alembic import command
    from alembic.script import ScriptDirectory

    config = alembic_config(directory)
    config.attributes["connection"] = connection
    heads = ScriptDirectory.from_config(config).get_heads()
    if heads:
        command.upgrade(config, "head")
    if rev_id is None:
        rev_id = _next_rev_id(heads)

    written: list[bool] = []

    def skip_if_empty(
        context: MigrationContext, revision: Any, directives: list[MigrationScript]
    ) -> None:
        script = directives[0]
        if all(ops.is_empty() for ops in script.upgrade_ops_list):
            directives[:] = []
        else:
            written.append(True)

    script = command.revision(
        config,
        message,
        autogenerate=True,
        rev_id=rev_id,
        process_revision_directives=skip_if_empty,
    )
    if not written or script is None or isinstance(script, list):
        return None
    return Path(script.path)


def _next_rev_id(heads: Sequence[str]) -> str | None:
    """`0001`, `0002`, ...: readable order. None (a random id) after a non-numeric head."""
    if not heads:
        return "0001"
    if len(heads) > 1:
        from alembic.util import CommandError

        raise CommandError(f"the history has several heads {heads}: merge them first")
    return f"{int(heads[0]) + 1:04d}" if heads[0].isdigit() else None
