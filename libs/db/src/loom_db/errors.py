"""Errors of loom_db.

::

    LoomError (loom_common)
     └── DatabaseError
          ├── DatabaseUnavailable     cannot reach the database (services answer 503)
          ├── NotFound (LookupError)  no such graph, execution, secret, ...
          ├── Conflict                the change contradicts what is stored (e.g. a name exists)
          ├── TransactionConflict     a deadlock or serialization failure: retrying is safe
          └── SecretKeyMismatch       a stored secret does not decrypt with LOOM_SECRET_KEY

Driver and SQLAlchemy errors are translated in ONE place, `translate_errors`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc

from loom_common import LoomError

__all__ = [
    "Conflict",
    "DatabaseError",
    "DatabaseUnavailable",
    "NotFound",
    "SecretKeyMismatch",
    "TransactionConflict",
    "classify_driver_error",
    "translate_errors",
]


class DatabaseError(LoomError):
    """Base of loom_db's errors."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached now; retrying later may work."""


class NotFound(DatabaseError, LookupError):
    """The object asked for does not exist."""


class Conflict(DatabaseError):
    """The change contradicts what is stored."""


class TransactionConflict(DatabaseError):
    """The transaction lost a race with another (deadlock, serialization failure) and was
    rolled back; running it again is safe."""


class SecretKeyMismatch(DatabaseError):
    """A stored secret cannot be decrypted with any key of `LOOM_SECRET_KEY` (the key
    changed without rotation, or the stored bytes were altered)."""


_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
"""Admin/crash shutdown, cannot connect now, too many connections (class 08 too)."""

_RACE_SQLSTATES = frozenset({"40001", "40P01"})
"""Serialization failure, deadlock detected."""


def classify_driver_error(orig: BaseException | None) -> type[DatabaseError] | None:
    """`DatabaseUnavailable`, `TransactionConflict` or None (not ours to translate) for an
    error of a database driver (psycopg, sqlite3)."""
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        if sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_SQLSTATES:
            return DatabaseUnavailable
        if sqlstate in _RACE_SQLSTATES:
            return TransactionConflict
        return None
    if type(orig).__module__.startswith("sqlite3"):
        # SQLite: only a lock held too long is "unavailable"; "no such table" or a
        # syntax error is a bug or a missing migration, and must say so.
        message = str(orig).lower()
        if type(orig).__name__ == "OperationalError" and ("locked" in message or "busy" in message):
            return DatabaseUnavailable
        return None
    if type(orig).__name__ == "OperationalError":
        return DatabaseUnavailable  # psycopg without a SQLSTATE: the connection failed
    return None


def _classify(exc: sa_exc.DBAPIError) -> type[DatabaseError] | None:
    if exc.connection_invalidated or isinstance(exc, sa_exc.InterfaceError):
        return DatabaseUnavailable
    return classify_driver_error(exc.orig)


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map connection failures of either database to `DatabaseUnavailable`, and lost
    races (deadlock, serialization failure) to `TransactionConflict`. Anything else
    (a missing table, a constraint, a syntax error) passes through unchanged."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        kind = _classify(exc)
        if kind is None:
            raise
        what = "database unavailable" if kind is DatabaseUnavailable else "transaction conflict"
        raise kind(f"{what}: {exc.orig or exc}") from exc
    except (sa_exc.TimeoutError, ConnectionError, TimeoutError) as exc:
        raise DatabaseUnavailable(f"database unavailable: {exc}") from exc
