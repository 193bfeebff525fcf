"""Users and their roles (DESIGN §5): admin ⊃ editor ⊃ viewer.

Password hashes are made and checked by the auth library; this module only stores them.
A hash leaves it through `get_password_hash` alone (for login), never in a `UserRecord`,
and never enters the audit log.

Two rules hold under concurrency:

* `ensure_admin` creates user `admin` only in an empty table, once, however many replicas
  start together: the insert is guarded by the unique username (`ON CONFLICT DO
  NOTHING`), so concurrent callers cannot both insert it.
* The last enabled admin cannot be deleted, demoted or disabled. The check locks every
  enabled admin's row (`FOR UPDATE`, in id order; SQLite has a single writer), so two
  admins demoting each other at once cannot leave none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Select, delete, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db import audit
from loom_db.errors import Conflict, NotFound
from loom_db.models import refresh_families, users
from loom_db.pagination import check_limit, decode_cursor, encode_cursor
from loom_db.types import utcnow

__all__ = [
    "ADMIN_USERNAME",
    "ROLES",
    "USERNAME_PATTERN",
    "UserRecord",
    "check_role",
    "create_user",
    "delete_user",
    "ensure_admin",
    "get_password_hash",
    "get_user",
    "has_users",
    "get_user_by_id",
    "list_users",
    "role_rank",
    "set_password",
    "update_user",
]

ROLES = ("viewer", "editor", "admin")
"""From least to most privileged; each role includes the ones before it."""

ADMIN_USERNAME = "admin"
"""The user the first start of an empty system creates."""

USERNAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,99}$"
_USERNAME = re.compile(USERNAME_PATTERN)
_MAX_HASH = 255


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user, without its password hash."""

    id: int
    username: str
    role: str
    """`viewer`, `editor` or `admin`."""
    disabled: bool
    created_at: datetime
    updated_at: datetime


def check_role(role: str) -> str:
    """`role` itself; `ValueError` unless it is one of `ROLES`."""
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: one of {', '.join(ROLES)}")
    return role


def role_rank(role: str) -> int:
    """0 for viewer, 1 for editor, 2 for admin. Raises `ValueError` for another role."""
    return ROLES.index(check_role(role))


async def create_user(
    conn: AsyncConnection, username: str, password_hash: str, role: str, *, by: str | None
) -> UserRecord:
    """Create a user. Raises `ValueError` for a username not matching `USERNAME_PATTERN`,
    an unknown role or an empty hash, and `Conflict` when the username exists."""
    _check_username(username)
    check_role(role)
    _check_hash(password_hash)
    row = await _insert_user(conn, username, password_hash, role)
    if row is None:
        raise Conflict(f"user {username!r} exists")
    await audit.record(
        conn,
        actor=by,
        action="user.create",
        object_type="user",
        object_id=username,
        detail={"role": role},
    )
    return _record(row)


async def ensure_admin(conn: AsyncConnection, password_hash: str) -> bool:
    """Create user `admin` (role admin) if the users table is empty; True if this call
    created it. Race-free across replicas starting together: exactly one of them gets
    True. A system that has any user (even without an `admin`) is left alone. Raises
    `ValueError` for an empty hash."""
    _check_hash(password_hash)
    row = await _insert_user(conn, ADMIN_USERNAME, password_hash, "admin", only_if_empty=True)
    if row is None:
        return False
    await audit.record(
        conn,
        actor=None,
        action="user.create",
        object_type="user",
        object_id=ADMIN_USERNAME,
        detail={"role": "admin", "first_start": True},
    )
    return True


async def has_users(conn: AsyncConnection) -> bool:
    """Whether any user exists (a cheap check before hashing a first admin's password)."""
    return (await conn.execute(select(users.c.id).limit(1))).first() is not None


async def get_user(conn: AsyncConnection, username: str) -> UserRecord:
    """The user `username`. Raises `NotFound`."""
    row = (await conn.execute(_select().where(users.c.username == username))).first()
    if row is None:
        raise NotFound(f"no user named {username!r}")
    return _record(row)


async def get_user_by_id(conn: AsyncConnection, user_id: int) -> UserRecord:
    """The user with id `user_id`. Raises `NotFound`."""
    row = (await conn.execute(_select().where(users.c.id == user_id))).first()
    if row is None:
        raise NotFound(f"no user with id {user_id}")
    return _record(row)


async def get_password_hash(conn: AsyncConnection, username: str) -> tuple[UserRecord, str]:
    """The user and its stored password hash, for login (the caller also checks
    `disabled`). Raises `NotFound`."""
    query = select(*_COLUMNS, users.c.password_hash).where(users.c.username == username)
    row = (await conn.execute(query)).first()
    if row is None:
        raise NotFound(f"no user named {username!r}")
    return _record(row), row.password_hash


async def set_password(
    conn: AsyncConnection, username: str, password_hash: str, *, by: str | None
) -> None:
    """Replace a user's password hash (also on login, to rehash with new parameters).
    Sessions stay: the caller revokes them with `tokens.revoke_user_families` when the
    change should log the user out everywhere. Raises `NotFound`, and `ValueError` for an
    empty hash."""
    _check_hash(password_hash)
    result = await conn.execute(
        update(users)
        .where(users.c.username == username)
        .values(password_hash=password_hash, updated_at=utcnow())
    )
    if result.rowcount == 0:
        raise NotFound(f"no user named {username!r}")
    await audit.record(
        conn, actor=by, action="user.password", object_type="user", object_id=username
    )


async def update_user(
    conn: AsyncConnection,
    username: str,
    *,
    role: str | None = None,
    disabled: bool | None = None,
    by: str | None,
) -> UserRecord:
    """Change a user's role and/or disabled flag (None leaves it); returns the user.
    Disabling a user also revokes its refresh-token families (its API tokens stop
    working because `find_api_token` refuses disabled users). Raises `NotFound`,
    `ValueError` for an unknown role, and `Conflict` when the change would leave no
    enabled admin."""
    if role is not None:
        check_role(role)
    losing_admin = (role is not None and role != "admin") or disabled is True
    admins = await _lock_enabled_admins(conn) if losing_admin else []
    current = await _lock_user(conn, username)
    changes: dict[str, Any] = {}
    if role is not None and role != current.role:
        changes["role"] = role
    if disabled is not None and disabled != current.disabled:
        changes["disabled"] = disabled
    if not changes:
        return current
    if _is_enabled_admin(current) and losing_admin:
        _keep_an_admin(admins, current)
    row = (
        await conn.execute(
            update(users)
            .where(users.c.id == current.id)
            .values(**changes, updated_at=utcnow())
            .returning(*_COLUMNS)
        )
    ).one()
    if changes.get("disabled"):
        await conn.execute(
            update(refresh_families)
            .where(
                refresh_families.c.user_id == current.id, refresh_families.c.revoked_at.is_(None)
            )
            .values(revoked_at=utcnow())
        )
    await audit.record(
        conn, actor=by, action="user.update", object_type="user", object_id=username, detail=changes
    )
    return _record(row)


async def delete_user(conn: AsyncConnection, username: str, *, by: str | None) -> None:
    """Delete a user with its API tokens and refresh-token families. Raises `NotFound`,
    and `Conflict` for the last enabled admin."""
    admins = await _lock_enabled_admins(conn)
    current = await _lock_user(conn, username)
    if _is_enabled_admin(current):
        _keep_an_admin(admins, current)
    await conn.execute(delete(users).where(users.c.id == current.id))
    await audit.record(
        conn,
        actor=by,
        action="user.delete",
        object_type="user",
        object_id=username,
        detail={"role": current.role},
    )


async def list_users(
    conn: AsyncConnection, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[UserRecord], str | None]:
    """Users by username, one page at a time: `(items, next_cursor)`, `next_cursor` None
    on the last page. Raises `ValueError` for a malformed cursor or a limit outside
    1..`MAX_PAGE`."""
    query = _select().order_by(users.c.username).limit(check_limit(limit) + 1)
    if cursor is not None:
        query = query.where(users.c.username > decode_cursor(cursor, str)[0])
    rows = (await conn.execute(query)).all()
    items = [_record(row) for row in rows[:limit]]
    return items, (encode_cursor(items[-1].username) if len(rows) > limit else None)


# --- internals ----------------------------------------------------------------------

_COLUMNS = (
    users.c.id,
    users.c.username,
    users.c.role,
    users.c.disabled,
    users.c.created_at,
    users.c.updated_at,
)


def _select() -> Select[Any]:
    return select(*_COLUMNS)


def _record(row: Row[*tuple[Any, ...]]) -> UserRecord:
    return UserRecord(
        id=row.id,
        username=row.username,
        role=row.role,
        disabled=bool(row.disabled),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _check_username(username: str) -> None:
    if not _USERNAME.fullmatch(username):
        raise ValueError(
            f"invalid username {username!r}: lowercase letters, digits, '_', '.' and '-', "
            "starting with a letter or digit, at most 100 characters"
        )


def _check_hash(password_hash: str) -> None:
    if not password_hash or len(password_hash) > _MAX_HASH:
        raise ValueError(f"a password hash must have 1 to {_MAX_HASH} characters")


async def _insert_user(
    conn: AsyncConnection,
    username: str,
    password_hash: str,
    role: str,
    *,
    only_if_empty: bool = False,
) -> Row[*tuple[Any, ...]] | None:
    """Insert a user unless the username exists (or, with `only_if_empty`, unless any
    user exists); the new row, or None."""
    now = utcnow()
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    values = {
        "username": username,
        "password_hash": password_hash,
        "role": role,
        "disabled": False,
        "created_at": now,
        "updated_at": now,
    }
    if only_if_empty:
        # INSERT ... SELECT ... WHERE NOT EXISTS alone is not race-free on PostgreSQL
        # (READ COMMITTED: every replica sees the empty table); the unique username
        # makes the losers' inserts do nothing.
        source = select(*(literal(v, users.c[k].type) for k, v in values.items())).where(
            ~select(users.c.id).exists()
        )
        stmt = dialect_insert(users).from_select(list(values), source)
    else:
        stmt = dialect_insert(users).values(**values)
    guarded = stmt.on_conflict_do_nothing(index_elements=[users.c.username])
    return (await conn.execute(guarded.returning(*_COLUMNS))).first()


async def _lock_user(conn: AsyncConnection, username: str) -> UserRecord:
    row = (
        await conn.execute(_select().where(users.c.username == username).with_for_update())
    ).first()
    if row is None:
        raise NotFound(f"no user named {username!r}")
    return _record(row)


def _is_enabled_admin(user: UserRecord) -> bool:
    return user.role == "admin" and not user.disabled


async def _lock_enabled_admins(conn: AsyncConnection) -> list[int]:
    """The ids of the enabled admins, locked in id order. Taken BEFORE the target user's
    row, always in this order, so concurrent demotions serialise (instead of each seeing
    the other still in place) without deadlocking."""
    query = (
        select(users.c.id)
        .where(users.c.role == "admin", users.c.disabled.is_(False))
        .order_by(users.c.id)
        .with_for_update()
    )
    return list((await conn.execute(query)).scalars())


def _keep_an_admin(admins: list[int], losing: UserRecord) -> None:
    """Raise `Conflict` unless an enabled admin other than `losing` remains."""
    if not any(admin_id != losing.id for admin_id in admins):
        raise Conflict(
            f"user {losing.username!r} is the last enabled admin: make another user admin first"
        )
