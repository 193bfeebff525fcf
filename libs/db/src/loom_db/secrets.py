"""Secrets: named values stored encrypted (Fernet under a key derived for this alone,
DESIGN §3). The stored bytes are a Fernet token: they never contain the plaintext. Values
leave this module only through `get_secret(s)`, for the worker and the webhook service;
the API lists names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cryptography.fernet import InvalidToken
from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db import audit
from loom_db.errors import NotFound, SecretKeyMismatch
from loom_db.keys import Keys
from loom_db.models import secrets as _secrets
from loom_db.types import utcnow

__all__ = [
    "SECRET_NAME_PATTERN",
    "all_secrets",
    "delete_secret",
    "get_secret",
    "get_secrets",
    "list_secret_names",
    "put_secret",
    "rotate_secrets",
]

SECRET_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,99}$"
_NAME = re.compile(SECRET_NAME_PATTERN)


async def put_secret(
    conn: AsyncConnection, keys: Keys, name: str, value: str, *, by: str | None = None
) -> bool:
    """Create or replace the secret `name`; returns True if it was created.

    Raises `ValueError` for a name that does not match `SECRET_NAME_PATTERN`.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid secret name {name!r}: letters, digits and _, not starting with a digit, "
            "at most 100 characters"
        )
    now = utcnow()
    token = keys.secrets.encrypt(value.encode("utf-8"))
    values = {"name": name, "value": token, "created_at": now, "updated_at": now}
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    upsert = dialect_insert(_secrets).values(**values, updated_by=by)
    stmt = upsert.on_conflict_do_update(
        index_elements=[_secrets.c.name],
        set_={"value": token, "updated_at": now, "updated_by": by},
    ).returning(_secrets.c.created_at)
    created_at = (await conn.execute(stmt)).scalar_one()
    # On conflict the row keeps its old created_at: equal only for a fresh row.
    created = bool(created_at == now)
    await audit.record(
        conn,
        actor=by,
        action="secret.create" if created else "secret.update",
        object_type="secret",
        object_id=name,
    )
    return created


async def get_secret(conn: AsyncConnection, keys: Keys, name: str) -> str:
    """The value of secret `name`. Raises `NotFound`, or `SecretKeyMismatch` when the
    configured keys cannot decrypt it."""
    token = (
        await conn.execute(select(_secrets.c.value).where(_secrets.c.name == name))
    ).scalar_one_or_none()
    if token is None:
        raise NotFound(f"no secret named {name!r}")
    return _decrypt(keys, name, token)


async def get_secrets(conn: AsyncConnection, keys: Keys, names: Iterable[str]) -> dict[str, str]:
    """The values of those of `names` that exist (missing names are left out). Raises
    `SecretKeyMismatch` when the configured keys cannot decrypt one."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    rows = await conn.execute(
        select(_secrets.c.name, _secrets.c.value).where(_secrets.c.name.in_(wanted))
    )
    return {row.name: _decrypt(keys, row.name, row.value) for row in rows}


async def all_secrets(conn: AsyncConnection, keys: Keys) -> dict[str, str]:
    """Every secret's value, by name (what a worker masks in an execution's logs). Raises
    `SecretKeyMismatch` when the configured keys cannot decrypt one."""
    rows = await conn.execute(select(_secrets.c.name, _secrets.c.value))
    return {row.name: _decrypt(keys, row.name, row.value) for row in rows}


async def list_secret_names(conn: AsyncConnection) -> list[str]:
    """Every secret's name, sorted."""
    rows = await conn.execute(select(_secrets.c.name).order_by(_secrets.c.name))
    return list(rows.scalars())


async def delete_secret(conn: AsyncConnection, name: str, *, by: str | None = None) -> None:
    """Delete secret `name`. Raises `NotFound`."""
    result = await conn.execute(delete(_secrets).where(_secrets.c.name == name))
    if result.rowcount == 0:
        raise NotFound(f"no secret named {name!r}")
    await audit.record(conn, actor=by, action="secret.delete", object_type="secret", object_id=name)


async def rotate_secrets(conn: AsyncConnection, keys: Keys, *, by: str | None = None) -> int:
    """Re-encrypt every secret with the newest key of `keys`; returns how many.

    Afterwards the older keys can be dropped from `LOOM_SECRET_KEY`. Raises
    `SecretKeyMismatch` (and the caller's transaction rolls back, changing nothing) if a
    secret cannot be decrypted with any of the keys.
    """
    rows = (
        await conn.execute(select(_secrets.c.name, _secrets.c.value).order_by(_secrets.c.name))
    ).all()
    for name, token in rows:
        try:
            rotated = keys.secrets.rotate(token)
        except InvalidToken:
            raise _mismatch(name) from None
        await conn.execute(update(_secrets).where(_secrets.c.name == name).values(value=rotated))
    if rows:
        await audit.record(
            conn,
            actor=by,
            action="secret.rotate",
            object_type="secret",
            object_id="*",
            detail={"count": len(rows)},
        )
    return len(rows)


def _decrypt(keys: Keys, name: str, token: bytes) -> str:
    try:
        return keys.secrets.decrypt(token).decode("utf-8")
    except InvalidToken:
        raise _mismatch(name) from None


def _mismatch(name: str) -> SecretKeyMismatch:
    return SecretKeyMismatch(
        f"secret {name!r} cannot be decrypted with LOOM_SECRET_KEY: the key changed without "
        "a rotation (keep the old key after the new one, comma-separated, and run the "
        "rotation) or the stored value was altered"
    )
