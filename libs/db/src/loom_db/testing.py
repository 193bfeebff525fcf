"""Test fixtures for loom_db's databases, shared by every member's tests (the contract suite
of loom_db and the services' tests): import them into a `conftest.py`.

Every test that takes `db` runs on SQLite AND PostgreSQL.
The schema comes from the migrations (`loom_db.migrate`), as in production: SQLite gets a
copy of one database migrated once per run, PostgreSQL comes from LOOM_TEST_POSTGRES_URL
(SERVICES.md): one fresh database per test run (`loom_test_<random>`, migrated once,
dropped at the end), tables emptied between tests. Without the
URL those tests are skipped with a reason, unless LOOM_TEST_REQUIRE_SERVICES=1 (CI), where
a missing service is a failure.

Needs pytest (a dev dependency): never imported by a service's code.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url

from loom_db.database import Database, create_database
from loom_db.migrate import upgrade, upgrade_sync
from loom_db.models import metadata

__all__ = [
    "_postgres_schema",
    "_sqlite_template",
    "create_schema",
    "db",
    "empty_database_url",
    "fresh_postgres_database",
    "postgres_url",
    "require_services",
]


def require_services() -> bool:
    return os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1"


def _postgres_base_url() -> URL:
    """LOOM_TEST_POSTGRES_URL, or skip (fail in CI) when it is not set."""
    base = os.environ.get("LOOM_TEST_POSTGRES_URL")
    if not base:
        if require_services():
            pytest.fail("LOOM_TEST_POSTGRES_URL is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("LOOM_TEST_POSTGRES_URL is not set: PostgreSQL tests skipped")
    return make_url(base)


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database (`loom_test_<random>`), dropped afterwards."""
    url = _postgres_base_url()
    name = f"loom_test_{uuid.uuid4().hex[:12]}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, as a `postgresql+psycopg://` URL."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A brand-new database with no tables, for ONE test (never the shared migrated one)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


@pytest.fixture(scope="session")
def _postgres_schema(postgres_url: str) -> str:
    """Migrate once per run (sync: async fixtures call this inside their loop)."""
    upgrade_sync(postgres_url)
    return postgres_url


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated once per run; each test gets a copy of the file."""
    path = tmp_path_factory.mktemp("schema") / "loom.db"
    upgrade_sync(f"sqlite+aiosqlite:///{path}")
    return path


async def create_schema(db: Database) -> None:
    """Migrate `db` to the newest revision."""
    await upgrade(db)


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        for suffix in ("", "-wal"):  # closed cleanly, the WAL is already checkpointed
            if template.with_name(template.name + suffix).exists():
                shutil.copyfile(
                    template.with_name(template.name + suffix), tmp_path / f"loom.db{suffix}"
                )
        database = create_database(f"sqlite+aiosqlite:///{tmp_path / 'loom.db'}")
    else:
        url = request.getfixturevalue("_postgres_schema")
        database = create_database(url)
    try:
        yield database
    finally:
        if database.is_postgres:
            names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
            async with database.transaction() as conn:
                await conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        await database.dispose()
