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

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
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
    "PrivatePostgres",
    "fresh_postgres_database",
    "postgres_db",
    "postgres_url",
    "private_postgres",
    "require_services",
    "scratch_database",
    "sqlite_db",
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
def scratch_database(base_url: str | URL, prefix: str = "loom_test") -> Iterator[str]:
    """A new, empty PostgreSQL database (`<prefix>_<random>`) on the server of `base_url`,
    as a `postgresql+psycopg://` URL; dropped afterwards. For tests and benchmarks."""
    url = make_url(base_url) if isinstance(base_url, str) else base_url
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        scratch = url.set(drivername="postgresql+psycopg", database=name)
        yield scratch.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty database on LOOM_TEST_POSTGRES_URL's server (`loom_test_<random>`),
    dropped afterwards; skips (fails in CI) without the variable."""
    with scratch_database(_postgres_base_url()) as url:
        yield url


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


@asynccontextmanager
async def _open_test_database(request: pytest.FixtureRequest, kind: str) -> AsyncIterator[Database]:
    if kind == "sqlite":
        tmp_path: Path = request.getfixturevalue("tmp_path")
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


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """A migrated, empty database: each test runs on SQLite and on PostgreSQL."""
    async with _open_test_database(request, str(request.param)) as database:
        yield database


@pytest.fixture
async def postgres_db(request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """The PostgreSQL half of `db`, for what only PostgreSQL has."""
    async with _open_test_database(request, "postgres") as database:
        yield database


@pytest.fixture
async def sqlite_db(request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """The SQLite half of `db`, for what only the embedded mode does."""
    async with _open_test_database(request, "sqlite") as database:
        yield database


# --- a private PostgreSQL server, for tests that stop it (DESIGN §14) -------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL server of the test's own (`initdb` in a temporary directory, a free
    port, trust auth), never the shared one: tests stop and start it to cut the database
    away from the code under test. Runs as user `postgres` when the test runs as root
    (initdb refuses root). Skips (fails in CI) where PostgreSQL's binaries are missing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.port = _free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stderr or done.stdout}")

    def init(self) -> None:
        if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
            if require_services():
                pytest.fail("initdb/pg_ctl not found and LOOM_TEST_REQUIRE_SERVICES=1")
            pytest.skip("PostgreSQL's initdb/pg_ctl are not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.directory, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")  # fmt: skip

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.directory} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "server.log"),
                  "-o", options, "-w", "-t", "30", "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop_quietly(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop()


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started `PrivatePostgres`, stopped and removed at the end. Its directory is made
    in the system's temporary directory, not under pytest's `tmp_path` (which user
    `postgres` may not enter)."""
    directory = Path(tempfile.mkdtemp(prefix="loom-pg-"))
    server = PrivatePostgres(directory)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop_quietly()
        shutil.rmtree(directory, ignore_errors=True)
