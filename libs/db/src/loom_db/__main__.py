"""`python -m loom_db`: migrate a database, or write a new migration (see `loom_db.migrate`).

::

    python -m loom_db upgrade [--database-url URL] [--revision REV]
    python -m loom_db current [--database-url URL]
    python -m loom_db revision -m MESSAGE          (development: autogenerate a revision)
    python -m loom_db regenerate                   (development: squash into 0001_initial)

The URL defaults to the settings' `database_url` (`LOOM_DATABASE_URL`, `loom.toml`).
Exit status: 0 done, 1 the database is unavailable or a migration failed, 2 bad usage or
settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from loom_common import SettingsError, load_settings
from loom_db import migrate
from loom_db.errors import DatabaseUnavailable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("revision", "regenerate"):
        return _write_revision(args.command, args.message)
    try:
        url = load_settings(database_url=args.database_url).database_url
        shown = make_url(url).render_as_string(hide_password=True)
    except (SettingsError, ArgumentError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    if args.command == "upgrade":
        return _report(lambda: str(asyncio.run(migrate.upgrade(url, args.revision))))
    return _report(lambda: f"{shown} at {asyncio.run(migrate.current(url)) or '<none>'}")


def _report(action: Callable[[], str]) -> int:
    from alembic.util import CommandError

    try:
        line = action()
    except DatabaseUnavailable as exc:
        _error(str(exc))
        return EXIT_FAILED
    except (CommandError, SQLAlchemyError, RuntimeError) as exc:
        _error(f"migration failed: {exc}")
        return EXIT_FAILED
    except ValueError as exc:  # create_database: a URL Loom cannot use
        _error(str(exc))
        return EXIT_USAGE
    print(line)  # noqa: T201
    return EXIT_OK


def _write_revision(command: str, message: str | None) -> int:
    from alembic.util import CommandError

    try:
        path = migrate.regenerate() if command == "regenerate" else migrate.revision(message or "")
    except CommandError as exc:
        _error(str(exc))
        return EXIT_FAILED
    if path is None:
        print("no changes: the models and the migrations agree")  # noqa: T201
    else:
        print(f"wrote {path}")  # noqa: T201
    return EXIT_OK


def _error(message: str) -> None:
    # One line: a service's init container log should say it all without a traceback.
    print(f"loom_db: {' '.join(message.split())}", file=sys.stderr)  # noqa: T201


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loom_db", description="Migrate Loom's database."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    upgrade = commands.add_parser("upgrade", help="apply every missing migration")
    upgrade.add_argument("--revision", default="head", help="target revision (default: head)")
    current = commands.add_parser("current", help="print the database's revision")
    for sub in (upgrade, current):
        sub.add_argument(
            "--database-url", metavar="URL", help="default: LOOM_DATABASE_URL or loom.toml"
        )
    revision = commands.add_parser(
        "revision", help="development: autogenerate a migration from models.py"
    )
    revision.add_argument("-m", "--message", required=True)
    regenerate = commands.add_parser(
        "regenerate",
        help="development, before the first release: replace the history with one "
        "0001_initial revision",
    )
    regenerate.set_defaults(message="initial")
    return parser


if __name__ == "__main__":
    sys.exit(main())
