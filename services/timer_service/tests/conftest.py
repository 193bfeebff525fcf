"""Fixtures of the timer service's tests: real databases (SQLite and PostgreSQL) from
`loom_db.testing`."""

from loom_db.testing import (  # noqa: F401  (fixtures, found by pytest by name)
    _postgres_schema,
    _sqlite_template,
    postgres_db,
    postgres_url,
)
from loom_db.testing import db as db  # the fixture, re-exported under its own name
