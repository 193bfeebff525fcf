"""Errors of loom_db.

::

    LoomError (loom_common)
     └── DatabaseError
          ├── DatabaseUnavailable     cannot reach the database (services answer 503)
          ├── NotFound (LookupError)  no such graph, execution, secret, ...
          ├── Conflict                the change contradicts what is stored (e.g. a name exists)
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


class SecretKeyMismatch(DatabaseError):
    """A stored secret cannot be decrypted with any key of `LOOM_SECRET_KEY` (the key
    changed without rotation, or the stored bytes were altered)."""


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map connection-level failures of either database to `DatabaseUnavailable`."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        if exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        ):
            raise DatabaseUnavailable(f"database unavailable: {exc.orig or exc}") from exc
        raise
    except (sa_exc.TimeoutError, ConnectionError, TimeoutError) as exc:
        raise DatabaseUnavailable(f"database unavailable: {exc}") from exc
