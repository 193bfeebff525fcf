"""The Alembic history: from empty to head on both databases, no drift from models.py, an
idempotent upgrade, `python -m loom_db`, and Alembic kept off the import path."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection

from loom_db.database import Database, create_database
from loom_db.migrate import (
    MIGRATIONS_DIR,
    _in_migration_transaction,
    alembic_config,
    current,
    migration_options,
    regenerate,
    revision,
    upgrade,
)
from loom_db.models import audit_log, graphs, metadata, users
from loom_db.types import utcnow

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


def schema_diff(conn: Connection, target: MetaData) -> list[Any]:
    """What autogenerate would write to bring the database to `target` (empty: no drift)."""
    options = migration_options(conn.dialect.name)
    del options["target_metadata"]
    return list(compare_metadata(MigrationContext.configure(conn, opts=options), target))


def copy_of_models() -> MetaData:
    copy = MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.sorted_tables:
        table.to_metadata(copy)
    return copy


async def test_upgrade_from_empty_creates_every_table(empty_database_url: str) -> None:
    db = create_database(empty_database_url)
    try:
        assert await current(db) is None
        done = await upgrade(db)
        assert (done.before, done.after) == (None, HEAD)
        assert str(done).startswith("upgraded ") and str(done).endswith(f"from <none> to {HEAD}")
        async with db.read() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert tables == set(metadata.tables) | {"alembic_version"}
        assert await current(db) == HEAD
    finally:
        await db.dispose()


async def test_upgrading_twice_changes_nothing(empty_database_url: str) -> None:
    await upgrade(empty_database_url)
    again = await upgrade(empty_database_url)
    assert (again.before, again.after) == (HEAD, HEAD)
    assert str(again).endswith(f"already at {HEAD}")


async def test_concurrent_upgrades_apply_the_history_once(empty_database_url: str) -> None:
    """Replicas starting together: one migrates, the others wait and find it done."""
    results = await asyncio.gather(*(upgrade(empty_database_url) for _ in range(3)))
    assert sorted((r.before or "", r.after) for r in results) == [
        ("", HEAD),
        (HEAD, HEAD),
        (HEAD, HEAD),
    ]


async def test_migrated_schema_does_not_drift_from_the_models(empty_database_url: str) -> None:
    """Fails when models.py changed without a migration: run `python -m loom_db revision`."""
    db = create_database(empty_database_url)
    try:
        await upgrade(db)
        async with db.read() as conn:
            diff = await conn.run_sync(schema_diff, metadata)
        assert diff == [], f"models.py and the migrations differ: {diff}"
    finally:
        await db.dispose()


async def test_drift_check_notices_a_column_table_or_type_without_a_migration(
    empty_database_url: str,
) -> None:
    changed = copy_of_models()
    changed.tables["executions"].append_column(Column("priority", Integer, nullable=True))
    Table("extra", changed, Column("id", Integer, primary_key=True))
    changed.tables["users"].c.role.type = String(40)
    db = create_database(empty_database_url)
    try:
        await upgrade(db)
        async with db.read() as conn:
            diff = await conn.run_sync(schema_diff, changed)
    finally:
        await db.dispose()
    kinds = {(change[0][0] if isinstance(change, list) else change[0]) for change in diff}
    assert kinds == {"add_column", "add_table", "modify_type"}, diff


async def test_server_defaults_and_json_round_trip(db: Database) -> None:
    now = utcnow()
    detail = {"nested": [1, {"b": None, "ü": "ß"}], "big": 2**53}
    async with db.transaction() as conn:
        await conn.execute(
            users.insert().values(
                username="ann", password_hash="x", role="admin", created_at=now, updated_at=now
            )
        )
        await conn.execute(
            graphs.insert().values(name="g", version=1, created_at=now, updated_at=now)
        )
        await conn.execute(
            audit_log.insert().values(
                ts=now, actor="ann", action="x", object_type="graph", object_id="g", detail=detail
            )
        )
    async with db.read() as conn:
        assert (await conn.execute(select(users.c.disabled))).scalar_one() is False
        assert (await conn.execute(select(graphs.c.enabled))).scalar_one() is True
        assert (await conn.execute(select(audit_log.c.detail))).scalar_one() == detail
        if db.is_postgres:
            rows = await conn.execute(
                text(
                    "SELECT table_name, column_name FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND data_type = 'jsonb'"
                )
            )
            jsonb = {(table, column) for table, column in rows}
            json_columns = {
                (table.name, column.name)
                for table in metadata.sorted_tables
                for column in table.columns
                if isinstance(column.type, JSON)
            }
            assert json_columns and jsonb == json_columns


async def test_a_batch_migration_on_sqlite_keeps_the_rows_of_child_tables(tmp_path: Path) -> None:
    """SQLite alters a table by rebuilding it; with foreign keys on, dropping the old table
    would cascade-delete every child row. Migrations run with them off, checked after."""
    schema = MetaData()
    Table("parent", schema, Column("id", Integer, primary_key=True))
    Table(
        "child",
        schema,
        Column("id", Integer, primary_key=True),
        Column("parent_id", Integer, ForeignKey("parent.id", ondelete="CASCADE")),
    )

    def rebuild_parent(conn: Connection) -> None:
        operations = Operations(MigrationContext.configure(conn))
        with operations.batch_alter_table("parent", recreate="always") as batch:
            batch.add_column(Column("note", String(10), nullable=True))

    async def child_rows(db: Database) -> int:
        async with db.read() as conn:
            return int((await conn.execute(text("SELECT count(*) FROM child"))).scalar_one())

    db = create_database(f"sqlite+aiosqlite:///{tmp_path / 'batch.db'}")
    try:
        async with db.transaction() as conn:
            await conn.run_sync(schema.create_all)
            await conn.execute(text("INSERT INTO parent (id) VALUES (1)"))
            await conn.execute(text("INSERT INTO child (id, parent_id) VALUES (1, 1)"))
        await _in_migration_transaction(db, rebuild_parent)
        assert await child_rows(db) == 1
        async with db.read() as conn:  # the pool does not keep the pragma switched off
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one() == 1

        # The hazard itself: the same rebuild in an ordinary transaction loses the child.
        async with db.transaction() as conn:
            await conn.run_sync(rebuild_parent)
        assert await child_rows(db) == 0
    finally:
        await db.dispose()


def test_regenerate_writes_one_initial_revision_matching_the_models(tmp_path: Path) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory, ignore=shutil.ignore_patterns("__pycache__"))

    written = regenerate(directory=directory)

    assert written.name == "0001_initial.py"
    assert {p.name for p in (directory / "versions").glob("*.py")} == {
        "__init__.py",
        "0001_initial.py",
    }
    source = written.read_text()
    assert "import loom_db.types" in source and "loom_db.types.UtcDateTime()" in source
    assert 'with_variant(postgresql.JSONB(), "postgresql")' in source
    assert "Text()" not in source.replace("sa.Text()", "")
    for name in metadata.tables:
        assert f'"{name}"' in source
    # Upgrading a throwaway database with it and comparing again finds nothing to write.
    assert revision("nothing changed", directory=directory) is None
    assert len(list((directory / "versions").glob("*.py"))) == 2


def test_importing_loom_db_does_not_import_alembic() -> None:
    """DESIGN §10, B7: services import loom_db; only migrating may load Alembic."""
    code = (
        "import importlib, pkgutil, sys, loom_db\n"
        "for m in pkgutil.iter_modules(loom_db.__path__):\n"
        "    if m.name != 'migrations':\n"
        "        importlib.import_module('loom_db.' + m.name)\n"
        "leaked = sorted(n for n in sys.modules if n.split('.')[0] == 'alembic'"
        " or n.startswith('loom_db.migrations'))\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def loom_db_command(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loom_db", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_python_m_loom_db_upgrade_uses_loom_database_url(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'loom.db'}"
    first = loom_db_command("upgrade", cwd=tmp_path, env={"LOOM_DATABASE_URL": url})
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"upgraded {url} from <none> to {HEAD}"
    second = loom_db_command("upgrade", "--database-url", url, cwd=tmp_path)
    assert (second.returncode, second.stdout.strip()) == (0, f"{url} already at {HEAD}")


def test_python_m_loom_db_upgrade_reports_an_unreachable_database_in_one_line(
    tmp_path: Path,
) -> None:
    url = "postgresql+psycopg://loom:s3cret@127.0.0.1:1/loom"
    result = loom_db_command("upgrade", "--database-url", url, cwd=tmp_path)
    assert result.returncode == 1
    assert "database unavailable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr + result.stdout
