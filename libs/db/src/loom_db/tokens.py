"""API tokens and refresh-token families (DESIGN §5, §11).

The auth library makes the tokens and their hashes; this module stores hashes only and
never returns them. Neither tokens, hashes nor jtis enter the audit log.

* An API token has a role no higher than its user's. `find_api_token` answers with the
  token's role capped at the user's CURRENT role, so demoting a user demotes its tokens.
* A refresh-token family is one login's chain of rotating refresh tokens: the family row
  holds the one jti that may be presented next. `rotate_family` locks the row, so two
  rotations of one family never interleave.

Routine rotations and `last_used_at` touches are not audited (they would write an entry
per refresh); creating, revoking and detected reuse are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Row, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db import audit
from loom_db.errors import Conflict, NotFound
from loom_db.models import api_tokens, refresh_families, users
from loom_db.types import utcnow
from loom_db.users import UserRecord, check_role, role_rank

__all__ = [
    "LAST_USED_RESOLUTION",
    "ApiTokenRecord",
    "RotateOutcome",
    "create_api_token",
    "create_family",
    "family_user_id",
    "find_api_token",
    "list_api_tokens",
    "revoke_api_token",
    "revoke_family",
    "revoke_user_families",
    "rotate_family",
]

LAST_USED_RESOLUTION = timedelta(minutes=1)
"""`last_used_at` is written at most this often per token (not once per request)."""

RotateOutcome = Literal["rotated", "reused", "revoked", "expired", "unknown"]


@dataclass(frozen=True, slots=True)
class ApiTokenRecord:
    """An API token, without its hash."""

    id: str
    user_id: int
    name: str
    prefix: str
    """The token's first characters, shown to tell tokens apart."""
    role: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


# --- API tokens ---------------------------------------------------------------------


async def create_api_token(
    conn: AsyncConnection,
    *,
    token_id: str,
    user_id: int,
    name: str,
    token_hash: str,
    prefix: str,
    role: str,
    expires_at: datetime | None = None,
    by: str | None,
) -> ApiTokenRecord:
    """Store a new API token of user `user_id`.

    Raises `ValueError` for an unknown role, an empty or over-long name (100), hash (128)
    or prefix (16), or an `expires_at` in the past; `NotFound` for an unknown user;
    `Conflict` when `role` is above the user's current role, the user is disabled, or the
    id or hash exists.
    """
    check_role(role)
    _check_length("name", name, 100)
    _check_length("token hash", token_hash, 128)
    _check_length("prefix", prefix, 16)
    now = utcnow()
    if expires_at is not None and expires_at <= now:
        raise ValueError("expires_at must be in the future")
    # Shared lock: the user's role cannot change (nor the user vanish) before commit.
    owner = (
        await conn.execute(
            select(users.c.username, users.c.role, users.c.disabled)
            .where(users.c.id == user_id)
            .with_for_update(read=True)
        )
    ).first()
    if owner is None:
        raise NotFound(f"no user with id {user_id}")
    if owner.disabled:
        raise Conflict(f"user {owner.username!r} is disabled")
    if role_rank(role) > role_rank(owner.role):
        raise Conflict(
            f"a token's role cannot exceed its user's: {owner.username!r} is {owner.role}, "
            f"not {role}"
        )
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    row = (
        await conn.execute(
            dialect_insert(api_tokens)
            .values(
                id=token_id,
                user_id=user_id,
                name=name,
                token_hash=token_hash,
                prefix=prefix,
                role=role,
                created_at=now,
                expires_at=expires_at,
            )
            .on_conflict_do_nothing()  # the id or the hash: either is a Conflict
            .returning(*_TOKEN_COLUMNS)
        )
    ).first()
    if row is None:
        raise Conflict(f"an API token with id {token_id!r} or the same hash exists")
    await audit.record(
        conn,
        actor=by,
        action="api_token.create",
        object_type="api_token",
        object_id=token_id,
        detail={
            "user": owner.username,
            "name": name,
            "role": role,
            "expires_at": None if expires_at is None else expires_at.isoformat(),
        },
    )
    return _token(row)


async def find_api_token(
    conn: AsyncConnection, token_hash: str, *, now: datetime | None = None
) -> tuple[ApiTokenRecord, UserRecord] | None:
    """The live token with `token_hash` and its user; None when there is none, or it is
    revoked or expired, or its user is disabled. The token's `role` is capped at the
    user's current role. Touches `last_used_at` when it is older than
    `LAST_USED_RESOLUTION`, so call it inside `Database.transaction()`; most calls write
    nothing."""
    now = now or utcnow()
    row = (
        await conn.execute(
            select(
                *_TOKEN_COLUMNS,
                users.c.username,
                users.c.role.label("user_role"),
                users.c.disabled,
                users.c.created_at.label("user_created_at"),
                users.c.updated_at.label("user_updated_at"),
            )
            .join(users, users.c.id == api_tokens.c.user_id)
            .where(api_tokens.c.token_hash == token_hash)
        )
    ).first()
    if row is None or row.revoked_at is not None or row.disabled:
        return None
    if row.expires_at is not None and row.expires_at <= now:
        return None
    user = UserRecord(
        id=row.user_id,
        username=row.username,
        role=row.user_role,
        disabled=bool(row.disabled),
        created_at=row.user_created_at,
        updated_at=row.user_updated_at,
    )
    token = _token(row)
    if row.last_used_at is None or row.last_used_at <= now - LAST_USED_RESOLUTION:
        # Conditional, so concurrent requests with one token write it once.
        stale = (api_tokens.c.last_used_at.is_(None)) | (
            api_tokens.c.last_used_at <= now - LAST_USED_RESOLUTION
        )
        await conn.execute(
            update(api_tokens).where(api_tokens.c.id == token.id, stale).values(last_used_at=now)
        )
        token = replace(token, last_used_at=now)
    if role_rank(token.role) > role_rank(user.role):
        token = replace(token, role=user.role)
    return token, user


async def list_api_tokens(
    conn: AsyncConnection, user_id: int, *, include_revoked: bool = False
) -> list[ApiTokenRecord]:
    """A user's API tokens, newest first (revoked ones only with `include_revoked`;
    expired ones are listed, with their `expires_at`)."""
    query = (
        select(*_TOKEN_COLUMNS)
        .where(api_tokens.c.user_id == user_id)
        .order_by(api_tokens.c.created_at.desc(), api_tokens.c.id.desc())
    )
    if not include_revoked:
        query = query.where(api_tokens.c.revoked_at.is_(None))
    return [_token(row) for row in (await conn.execute(query)).all()]


async def revoke_api_token(
    conn: AsyncConnection, token_id: str, *, user_id: int | None = None, by: str | None
) -> ApiTokenRecord:
    """Revoke an API token; returns it. With `user_id`, only a token of that user (a user
    revoking their own); None is an admin revoking anyone's. Revoking a revoked token
    changes nothing. Raises `NotFound` for an unknown token or another user's."""
    query = select(*_TOKEN_COLUMNS).where(api_tokens.c.id == token_id).with_for_update()
    row = (await conn.execute(query)).first()
    if row is None or (user_id is not None and row.user_id != user_id):
        raise NotFound(f"no API token with id {token_id!r}")  # another's: not even its existence
    token = _token(row)
    if token.revoked_at is not None:
        return token
    now = utcnow()
    await conn.execute(update(api_tokens).where(api_tokens.c.id == token_id).values(revoked_at=now))
    await audit.record(
        conn,
        actor=by,
        action="api_token.revoke",
        object_type="api_token",
        object_id=token_id,
        detail={"user_id": token.user_id, "name": token.name},
    )
    return replace(token, revoked_at=now)


# --- refresh-token families ---------------------------------------------------------


async def create_family(
    conn: AsyncConnection,
    *,
    family_id: str,
    user_id: int,
    jti: str,
    expires_at: datetime,
    by: str | None = None,
) -> None:
    """Start a refresh-token family (a login) whose next valid token is `jti`. Raises
    `NotFound` for an unknown user, `Conflict` when the family id exists, `ValueError`
    for an `expires_at` in the past."""
    now = utcnow()
    if expires_at <= now:
        raise ValueError("expires_at must be in the future")
    username = (
        await conn.execute(select(users.c.username).where(users.c.id == user_id))
    ).scalar_one_or_none()
    if username is None:
        raise NotFound(f"no user with id {user_id}")
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    inserted = (
        await conn.execute(
            dialect_insert(refresh_families)
            .values(
                id=family_id,
                user_id=user_id,
                current_jti=jti,
                created_at=now,
                expires_at=expires_at,
            )
            .on_conflict_do_nothing(index_elements=[refresh_families.c.id])
            .returning(refresh_families.c.id)
        )
    ).first()
    if inserted is None:
        raise Conflict(f"refresh-token family {family_id!r} exists")
    await audit.record(
        conn,
        actor=by or username,
        action="session.create",
        object_type="user",
        object_id=username,
        detail={"family": family_id},
    )


async def rotate_family(
    conn: AsyncConnection,
    family_id: str,
    presented_jti: str,
    new_jti: str,
    *,
    now: datetime | None = None,
) -> RotateOutcome:
    """Spend the refresh token `presented_jti` of a family, making `new_jti` the next
    valid one. Runs in the caller's transaction with the family's row locked (`FOR
    UPDATE` on PostgreSQL; SQLite has a single writer), so rotations of one family are
    serialised. The outcome:

    * `"rotated"`: the presented token was the current one of a live family;
    * `"reused"`: the family is live but the token was already spent, so it (or a copy)
      was presented twice: the family is revoked now, including the token the
      legitimate rotation just issued. That is intended: after a reuse nobody can tell
      the thief's copy from the owner's, so every token of the family dies and the user
      logs in again. Two concurrent rotations of one token thus give one `"rotated"` and
      one `"reused"`, and neither token works afterwards;
    * `"revoked"`: the family was revoked (logout, reuse, disabled user);
    * `"expired"`: the family is past its `expires_at`;
    * `"unknown"`: no such family (never created, or its user was deleted).

    The caller commits the transaction even for `"reused"` (the revocation must stay).
    """
    now = now or utcnow()
    row = (
        await conn.execute(
            select(
                refresh_families.c.user_id,
                refresh_families.c.current_jti,
                refresh_families.c.expires_at,
                refresh_families.c.revoked_at,
            )
            .where(refresh_families.c.id == family_id)
            .with_for_update()
        )
    ).first()
    if row is None:
        return "unknown"
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at <= now:
        return "expired"
    if row.current_jti != presented_jti:
        await _revoke_families(conn, refresh_families.c.id == family_id, now)
        await audit.record(
            conn,
            actor=None,
            action="session.reuse",
            object_type="refresh_family",
            object_id=family_id,
            detail={"user_id": row.user_id, "revoked": True},
        )
        return "reused"
    await conn.execute(
        update(refresh_families)
        .where(refresh_families.c.id == family_id)
        .values(current_jti=new_jti)
    )
    return "rotated"


async def revoke_family(
    conn: AsyncConnection, family_id: str, *, user_id: int | None = None, by: str | None = None
) -> bool:
    """Revoke a family (logout); True if it was live. With `user_id`, only a family of
    that user. Raises `NotFound` for an unknown family or another user's."""
    query = select(refresh_families.c.user_id, refresh_families.c.revoked_at).where(
        refresh_families.c.id == family_id
    )
    row = (await conn.execute(query.with_for_update())).first()
    if row is None or (user_id is not None and row.user_id != user_id):
        raise NotFound(f"no refresh-token family {family_id!r}")
    if row.revoked_at is not None:
        return False
    await _revoke_families(conn, refresh_families.c.id == family_id, utcnow())
    await audit.record(
        conn,
        actor=by,
        action="session.revoke",
        object_type="refresh_family",
        object_id=family_id,
        detail={"user_id": row.user_id},
    )
    return True


async def family_user_id(conn: AsyncConnection, family_id: str) -> int:
    """The id of the user whose login started the family (live or not), e.g. to issue
    a refreshed access token with the user's current role. Raises `NotFound`."""
    user_id = (
        await conn.execute(
            select(refresh_families.c.user_id).where(refresh_families.c.id == family_id)
        )
    ).scalar_one_or_none()
    if user_id is None:
        raise NotFound(f"no refresh-token family {family_id!r}")
    return int(user_id)


async def revoke_user_families(
    conn: AsyncConnection, user_id: int, *, keep: str | None = None, by: str | None = None
) -> int:
    """Revoke every live family of a user (logout everywhere, password change) but the
    family `keep` (the caller's own session, when it stays logged in); returns how many
    were revoked."""
    where = refresh_families.c.user_id == user_id
    if keep is not None:
        where = where & (refresh_families.c.id != keep)
    count = await _revoke_families(conn, where, utcnow())
    if count:
        username = (
            await conn.execute(select(users.c.username).where(users.c.id == user_id))
        ).scalar_one()
        await audit.record(
            conn,
            actor=by,
            action="session.revoke_all",
            object_type="user",
            object_id=username,
            detail={"count": count},
        )
    return count


# --- internals ----------------------------------------------------------------------

_TOKEN_COLUMNS = (
    api_tokens.c.id,
    api_tokens.c.user_id,
    api_tokens.c.name,
    api_tokens.c.prefix,
    api_tokens.c.role,
    api_tokens.c.created_at,
    api_tokens.c.expires_at,
    api_tokens.c.last_used_at,
    api_tokens.c.revoked_at,
)


def _token(row: Row[*tuple[Any, ...]]) -> ApiTokenRecord:
    return ApiTokenRecord(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        prefix=row.prefix,
        role=row.role,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def _check_length(what: str, value: str, maximum: int) -> None:
    if not value or len(value) > maximum:
        raise ValueError(f"{what} must have 1 to {maximum} characters")


async def _revoke_families(conn: AsyncConnection, where: Any, now: datetime) -> int:
    result = await conn.execute(
        update(refresh_families)
        .where(where, refresh_families.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount)
