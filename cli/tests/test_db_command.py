"""`loom db upgrade` as a user runs it: a real process, its exit code and what it prints."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path


def loom(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loom_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "LOOM_DATABASE_URL"},
    )


def test_db_upgrade_creates_the_tables_of_a_new_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "state" / "loom.db"
    url = f"sqlite+aiosqlite:///{path}"

    result = loom("db", "upgrade", "--database-url", url, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"upgraded {url} from <none> to ")
    with sqlite3.connect(path) as conn:
        tables = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert {"executions", "node_runs", "log_lines", "outbox", "users"} <= tables
    assert result.stdout.strip().endswith(f"to {revision}")


def test_db_upgrade_defaults_to_the_embedded_database_in_the_working_directory(
    tmp_path: Path,
) -> None:
    result = loom("db", "upgrade", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".loom" / "loom.db").is_file()


def test_db_upgrade_of_an_unreachable_postgres_exits_1_with_one_clear_line(
    tmp_path: Path,
) -> None:
    url = "postgresql+psycopg://loom:s3cret@127.0.0.1:1/loom"

    result = loom("db", "upgrade", "--database-url", url, cwd=tmp_path)

    assert result.returncode == 1
    assert "database unavailable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stdout + result.stderr


def test_the_loom_command_does_not_import_alembic_until_it_migrates() -> None:
    code = "import sys, loom_cli.main; assert 'alembic' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
