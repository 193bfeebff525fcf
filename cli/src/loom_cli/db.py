"""`loom db upgrade`: bring the database to the newest migration (`python -m loom_db upgrade`
does the same in a service image)."""

from __future__ import annotations

import asyncio
import sys

import click

__all__ = ["db"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@click.group("db")
def db() -> None:
    """Manage Loom's database."""


@db.command("upgrade")
@click.option(
    "--database-url",
    metavar="URL",
    default=None,
    help="The database (default: LOOM_DATABASE_URL, loom.toml, ./.loom/loom.db).",
)
@click.option("--revision", default="head", show_default=True, help="The target revision.")
def upgrade(database_url: str | None, revision: str) -> None:
    """Apply every migration the database lacks, in one transaction.

    Exit status: 0 done (or nothing to do), 1 database unavailable or migration failed,
    2 bad settings or URL.
    """
    sys.exit(upgrade_command(database_url, revision))


def upgrade_command(database_url: str | None, revision: str) -> int:
    # Imported here: `loom run` and the other commands must not pay for SQLAlchemy/Alembic.
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from loom_common import SettingsError, load_settings
    from loom_db.errors import DatabaseUnavailable
    from loom_db.migrate import upgrade

    try:
        url = load_settings(database_url=database_url).database_url
        done = asyncio.run(upgrade(url, revision))
    except DatabaseUnavailable as exc:
        return _fail(str(exc), EXIT_FAILED)
    except (CommandError, SQLAlchemyError, RuntimeError) as exc:
        return _fail(f"migration failed: {exc}", EXIT_FAILED)
    except (SettingsError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    print(done)
    return EXIT_OK


def _fail(message: str, status: int) -> int:
    print(f"loom: {' '.join(message.split())}", file=sys.stderr)
    return status
