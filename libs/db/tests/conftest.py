"""The contract suite's fixtures (`db` on SQLite and PostgreSQL): see `loom_db.testing`."""

from loom_db.testing import (  # noqa: F401  (fixtures, found by pytest by name)
    _postgres_schema,
    _sqlite_template,
    create_schema,
    db,
    empty_database_url,
    fresh_postgres_database,
    postgres_db,
    postgres_url,
    sqlite_db,
)
