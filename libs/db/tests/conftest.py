"""The contract suite's fixture: every test that takes `db` runs on SQLite AND PostgreSQL.

PostgreSQL comes from LOOM_TEST_POSTGRES_URL (SERVICES.md): one fresh database per test
run (`loom_test_<random>`, dropped at the end), tables emptied between tests. Without the
URL those tests are skipped with a reason, unless LOOM_TEST_REQUIRE_SERVICES=1 (CI), where
a missing service is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from loom_db.database import Database, create_database
from loom_db.models import metadata


def _require_services() -> bool:
    return os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, as a `postgresql+psycopg://` URL."""
    base = os.environ.get("LOOM_TEST_POSTGRES_URL")
    if not base:
        if _require_services():
            pytest.fail("LOOM_TEST_POSTGRES_URL is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("LOOM_TEST_POSTGRES_URL is not set: PostgreSQL tests skipped")
    url = make_url(base)
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
def _postgres_schema(postgres_url: str) -> str:
    """Create the schema once per run (sync: async fixtures call this inside their loop)."""
    engine = create_engine(postgres_url)
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()
    return postgres_url


async def create_schema(db: Database) -> None:
    async with db.transaction() as conn:
        await conn.run_sync(metadata.create_all)


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        database = create_database(f"sqlite+aiosqlite:///{tmp_path / 'loom.db'}")
        await create_schema(database)
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
