"""Users (admin) and API tokens (every caller, their own).

* Users: list, create (201; 409 if the username exists; 422 for a username the database
  would refuse or a password below the policy, checked before any hashing), change role,
  disabled flag or password, delete. The database refuses to remove, demote or disable
  the last enabled admin (409). An admin setting a user's password ends that user's
  sessions (all but the caller's own, when admins change their own this way).
* API tokens: the token is answered once, at creation; the database keeps its hash. Its
  role defaults to the caller's and may not exceed it (403): the caller's role is the
  lower of the credential's and the user's current one, so neither a stale access token
  nor an API token can mint a stronger token. A caller sees and revokes only their own
  tokens; another user's token id answers 404, like an unknown one.

Every change is audited by the database functions, with the caller as actor.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime

from loom_auth import Role, hash_password, new_api_token, parse_role
from loom_db import tokens, users
from loom_db.tokens import ApiTokenRecord
from loom_db.users import UserRecord
from loom_rest.api import Call, Endpoint
from loom_rest.problems import ApiProblem, unprocessable
from loom_rest.routes.auth import check_new_password
from loom_rest.schemas import (
    ApiTokenCreated,
    ApiTokenIn,
    ApiTokenOut,
    Page,
    PageQuery,
    UserIn,
    UserOut,
    UserPatch,
)

__all__ = ["ENDPOINTS"]

_USERNAME = re.compile(users.USERNAME_PATTERN)


# Named subclasses: the OpenAPI document refers to a model by its class name, which for
# `Page[UserOut]` is not a valid component name.
class UserPage(Page[UserOut]):
    """A page of users."""


class ApiTokenPage(Page[ApiTokenOut]):
    """The caller's API tokens (one page: a user has few)."""


def _user_out(user: UserRecord) -> UserOut:
    return UserOut.model_validate(
        {
            "username": user.username,
            "role": user.role,
            "disabled": user.disabled,
            "created_at": user.created_at,
            "updated_at": user.updated_at,
        }
    )


def _token_fields(token: ApiTokenRecord) -> dict[str, object]:
    return {
        "id": token.id,
        "name": token.name,
        "prefix": token.prefix,
        "role": token.role,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "last_used_at": token.last_used_at,
    }


# --- users (admin) ------------------------------------------------------------------


async def list_users(call: Call[None, PageQuery]) -> UserPage:
    """Every user, by username."""
    async with call.runtime.database.read() as conn:
        found, cursor = await users.list_users(
            conn, limit=call.query.limit, cursor=call.query.cursor
        )
    return UserPage(items=[_user_out(user) for user in found], next_cursor=cursor)


async def create_user(call: Call[UserIn, None]) -> UserOut:
    """A new user with a password and a role (viewer unless given)."""
    body = call.body
    if not _USERNAME.fullmatch(body.username):
        message = "lowercase letters, digits, '_', '.' and '-', starting with a letter or digit"
        error = {"path": "body.username", "message": message, "line": None}
        raise unprocessable("the username is not valid", [error])
    check_new_password(body.password, "body.password")
    hashed = await asyncio.to_thread(hash_password, body.password, call.runtime.password_params)
    async with call.runtime.database.transaction() as conn:
        user = await users.create_user(conn, body.username, hashed, body.role, by=call.actor)
    return _user_out(user)


async def update_user(call: Call[UserPatch, None]) -> UserOut:
    """Change a user's role, disabled flag and/or password (absent fields stay)."""
    username, patch = call.path("username"), call.body
    hashed = None
    if patch.password is not None:
        check_new_password(patch.password, "body.password")
        hashed = await asyncio.to_thread(
            hash_password, patch.password, call.runtime.password_params
        )
    async with call.runtime.database.transaction() as conn:
        user = await users.update_user(
            conn, username, role=patch.role, disabled=patch.disabled, by=call.actor
        )
        if hashed is not None:
            await users.set_password(conn, username, hashed, by=call.actor)
            own = username == call.user.username
            keep = call.user.session_id if own else None
            await tokens.revoke_user_families(conn, user.id, keep=keep, by=call.actor)
            user = await users.get_user(conn, username)
    return _user_out(user)


async def delete_user(call: Call[None, None]) -> None:
    """Delete a user with its API tokens and sessions."""
    async with call.runtime.database.transaction() as conn:
        await users.delete_user(conn, call.path("username"), by=call.actor)


# --- API tokens (the caller's own) ----------------------------------------------------


async def list_tokens(call: Call[None, None]) -> ApiTokenPage:
    """The caller's live API tokens, newest first (never the tokens themselves)."""
    async with call.runtime.database.read() as conn:
        user = await users.get_user(conn, call.user.username)
        found = await tokens.list_api_tokens(conn, user.id)
    items = [ApiTokenOut.model_validate(_token_fields(token)) for token in found]
    return ApiTokenPage(items=items, next_cursor=None)


async def create_token(call: Call[ApiTokenIn, None]) -> ApiTokenCreated:
    """A new API token of the caller, with a role up to the caller's own. The token is
    in this answer only."""
    principal, body = call.user, call.body
    if principal.kind != "access":
        # A leaked API token must not be able to mint others that outlive its revocation.
        raise ApiProblem(403, "API tokens are created by a logged-in user, not by a token")
    if body.expires_at is not None and body.expires_at <= datetime.now(UTC):
        error = {"path": "body.expires_at", "message": "must be in the future", "line": None}
        raise unprocessable("the token would be expired already", [error])
    made = new_api_token()
    async with call.runtime.database.transaction() as conn:
        user = await users.get_user(conn, principal.username)
        if user.disabled:
            raise ApiProblem(403, f"user {user.username!r} is disabled")
        own = min(principal.role, parse_role(user.role), key=lambda role: role.rank)
        role = parse_role(body.role) if body.role is not None else own
        if role.rank > own.rank:
            raise ApiProblem(403, f"a token's role can be at most the caller's ({own}), not {role}")
        token = await tokens.create_api_token(
            conn,
            token_id=str(uuid.uuid4()),
            user_id=user.id,
            name=body.name,
            token_hash=made.token_hash,
            prefix=made.prefix,
            role=role.value,
            expires_at=body.expires_at,
            by=principal.username,
        )
    return ApiTokenCreated.model_validate({**_token_fields(token), "token": made.token})


async def revoke_token(call: Call[None, None]) -> None:
    """Revoke one of the caller's API tokens: it stops working at once."""
    async with call.runtime.database.transaction() as conn:
        user = await users.get_user(conn, call.user.username)
        await tokens.revoke_api_token(conn, call.path("id"), user_id=user.id, by=call.actor)


ENDPOINTS: list[Endpoint] = [
    Endpoint(
        "GET",
        "/api/v1/users",
        list_users,
        Role.ADMIN,
        "List users",
        query=PageQuery,
        response=UserPage,
    ),
    Endpoint(
        "POST",
        "/api/v1/users",
        create_user,
        Role.ADMIN,
        "Create a user",
        status=201,
        body=UserIn,
        response=UserOut,
        errors=(409,),
    ),
    Endpoint(
        "PATCH",
        "/api/v1/users/{username}",
        update_user,
        Role.ADMIN,
        "Change a user's role, disabled flag or password",
        body=UserPatch,
        response=UserOut,
        errors=(409,),
    ),
    Endpoint(
        "DELETE",
        "/api/v1/users/{username}",
        delete_user,
        Role.ADMIN,
        "Delete a user (not the last enabled admin)",
        status=204,
        errors=(409,),
    ),
    Endpoint(
        "GET",
        "/api/v1/tokens",
        list_tokens,
        Role.VIEWER,
        "My API tokens",
        response=ApiTokenPage,
    ),
    Endpoint(
        "POST",
        "/api/v1/tokens",
        create_token,
        Role.VIEWER,
        "Create an API token (shown once) with a role up to my own",
        status=201,
        body=ApiTokenIn,
        response=ApiTokenCreated,
    ),
    Endpoint(
        "DELETE",
        "/api/v1/tokens/{id}",
        revoke_token,
        Role.VIEWER,
        "Revoke one of my API tokens",
        status=204,
    ),
]
