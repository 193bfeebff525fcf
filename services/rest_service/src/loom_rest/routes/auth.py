"""Sessions and the caller's own account: login, refresh, logout, me, my password.

* Login answers ONE 401 for an unknown user, a wrong password and a disabled user (and
  an unknown user still costs one argon2 verification), so neither the answer nor its
  time tells which usernames exist. Failures are counted per username and per client
  address (`runtime.login_limiter`); past the limit the answer is 429 with `Retry-After`,
  before any password is checked.
* A login starts a refresh-token family; its id is the access token's `sid`. Refresh
  rotates the family (`tokens.rotate_family`): a spent token presented again revokes the
  whole family. Every refused refresh answers the same 401 as a bad access token; the
  reason goes to the log only. A refreshed access token carries the user's CURRENT role.
* Logout revokes the caller's family. An API token has no session: its logout is a 400
  that says to revoke the token instead (answering 204 would let a client believe the
  token stopped working).
* Changing one's password needs the old one: a wrong one is a 422 naming
  `body.old_password` (the request is authenticated and allowed; one field is wrong, so
  clients can show it by that field), counted by the login limiter like a failed login.
  The user's other sessions are revoked; the caller's own stays. API tokens cannot
  change the password (403): a leaked token must not take over the account.

Argon2 runs in a worker thread: 64 MiB and tens of milliseconds per hash must not stall
the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from loom_auth import (
    REFRESH_TOKEN_LIFETIME,
    InvalidToken,
    LoginLimiter,
    PasswordPolicyError,
    RefreshToken,
    Role,
    check_password_policy,
    hash_password,
    needs_rehash,
    new_access_token,
    new_family_id,
    new_refresh_token,
    parse_refresh_token,
    retry_after,
    verify_dummy,
    verify_password,
)
from loom_db import NotFound, tokens, users
from loom_db.users import UserRecord
from loom_rest.api import Call, Endpoint
from loom_rest.problems import ApiProblem, unprocessable
from loom_rest.runtime import Runtime
from loom_rest.schemas import LoginIn, MeOut, PasswordIn, RefreshIn, TokenPair

__all__ = ["ENDPOINTS", "check_new_password"]

_log = logging.getLogger("loom.rest")

BAD_LOGIN = "wrong username or password"


def check_new_password(password: str, path: str) -> None:
    """Raise a 422 naming `path` unless `password` meets the password policy."""
    try:
        check_password_policy(password)
    except PasswordPolicyError as exc:
        raise unprocessable(str(exc), [{"path": path, "message": str(exc), "line": None}]) from None


def _limiter(runtime: Runtime) -> LoginLimiter:
    assert runtime.login_limiter is not None, "Runtime.__post_init__ sets one"
    return runtime.login_limiter


def _address(call: Call[Any, Any]) -> str:
    client = call.request.client
    return client.host if client is not None else "unknown"


def _begin_attempt(limiter: LoginLimiter, username: str, address: str) -> None:
    """429 when the caller must wait; else the attempt is counted as failed until
    `record_success` (so concurrent guesses cannot all slip past the limit)."""
    wait = limiter.begin(username, address)
    if wait is not None:
        raise ApiProblem(
            429,
            "too many failed attempts; wait before trying again",
            headers={"Retry-After": retry_after(wait)},
        )


def _token_pair(runtime: Runtime, user: UserRecord, refresh: RefreshToken) -> TokenPair:
    seconds = runtime.settings.rest_access_token_seconds
    access = new_access_token(
        runtime.signing_key,
        user.username,
        user.role,
        session_id=refresh.family_id,
        lifetime=seconds,
    )
    return TokenPair(access_token=access.token, refresh_token=refresh.token, expires_in=seconds)


async def login(call: Call[LoginIn, None]) -> TokenPair:
    """Exchange a username and password for an access token and a refresh token."""
    runtime, body = call.runtime, call.body
    limiter, address = _limiter(runtime), _address(call)
    _begin_attempt(limiter, body.username, address)
    found: tuple[UserRecord, str] | None
    async with runtime.database.read() as conn:
        try:
            found = await users.get_password_hash(conn, body.username)
        except NotFound:
            found = None
    if found is None:
        await asyncio.to_thread(verify_dummy, body.password, runtime.password_params)
        verified = False
    else:
        verified = await asyncio.to_thread(verify_password, found[1], body.password)
    if found is None or not verified or found[0].disabled:
        raise ApiProblem(401, BAD_LOGIN, headers={"WWW-Authenticate": 'Bearer realm="loom"'})
    user, stored = found
    limiter.record_success(body.username, address)
    rehashed = None
    if needs_rehash(stored, runtime.password_params):
        rehashed = await asyncio.to_thread(hash_password, body.password, runtime.password_params)
    refresh = new_refresh_token(new_family_id())
    async with runtime.database.transaction() as conn:
        if rehashed is not None:
            await users.set_password(conn, user.username, rehashed, by=user.username)
        await tokens.create_family(
            conn,
            family_id=refresh.family_id,
            user_id=user.id,
            jti=refresh.jti,
            expires_at=datetime.now(UTC) + REFRESH_TOKEN_LIFETIME,
            by=user.username,
        )
    return _token_pair(runtime, user, refresh)


async def refresh(call: Call[RefreshIn, None]) -> TokenPair:
    """Spend a refresh token for a new pair; a spent one presented again ends the
    session it belongs to."""
    presented = parse_refresh_token(call.body.refresh_token)  # InvalidToken: 401
    following = new_refresh_token(presented.family_id)
    user: UserRecord | None = None
    # The transaction commits whatever the outcome: a detected reuse's revocation stays.
    async with call.runtime.database.transaction() as conn:
        outcome = await tokens.rotate_family(
            conn, presented.family_id, presented.jti, following.jti
        )
        if outcome == "rotated":
            user_id = await tokens.family_user_id(conn, presented.family_id)
            user = await users.get_user_by_id(conn, user_id)
    if outcome == "reused":
        _log.warning("refresh token reused: session %s revoked", presented.family_id)
    if user is None or user.disabled:
        raise InvalidToken(f"refresh refused: {outcome}, user disabled: {user is not None}")
    return _token_pair(call.runtime, user, following)


async def logout(call: Call[None, None]) -> None:
    """End the caller's session: its refresh token stops working. The access token
    itself lives on until it expires (minutes)."""
    principal = call.user
    if principal.session_id is None:
        raise ApiProblem(
            400,
            "this token did not come from a login, so there is no session to end; "
            "an API token is revoked with DELETE /api/v1/tokens/{id}",
        )
    async with call.runtime.database.transaction() as conn:
        user = await users.get_user(conn, principal.username)
        await tokens.revoke_family(
            conn, principal.session_id, user_id=user.id, by=principal.username
        )


async def get_me(call: Call[None, None]) -> MeOut:
    """Who the caller is: username, role (an API token's own), kind of token."""
    principal = call.user
    return MeOut(username=principal.username, role=principal.role.value, token=principal.kind)


async def change_password(call: Call[PasswordIn, None]) -> None:
    """Change the caller's password; the old one is required. Ends every other session."""
    principal, runtime, body = call.user, call.runtime, call.body
    if principal.kind != "access":
        raise ApiProblem(403, "an API token cannot change a password; log in with it instead")
    check_new_password(body.new_password, "body.new_password")
    limiter, address = _limiter(runtime), _address(call)
    _begin_attempt(limiter, principal.username, address)
    async with runtime.database.read() as conn:
        user, stored = await users.get_password_hash(conn, principal.username)
    if not await asyncio.to_thread(verify_password, stored, body.old_password):
        message = "does not match the current password"
        raise unprocessable(
            "the old password is wrong",
            [{"path": "body.old_password", "message": message, "line": None}],
        )
    limiter.record_success(principal.username, address)
    hashed = await asyncio.to_thread(hash_password, body.new_password, runtime.password_params)
    async with runtime.database.transaction() as conn:
        await users.set_password(conn, user.username, hashed, by=principal.username)
        await tokens.revoke_user_families(
            conn, user.id, keep=principal.session_id, by=principal.username
        )


ENDPOINTS: list[Endpoint] = [
    Endpoint(
        "POST",
        "/api/v1/auth/login",
        login,
        None,
        "Log in: an access token and a refresh token",
        body=LoginIn,
        response=TokenPair,
        errors=(401, 429),
    ),
    Endpoint(
        "POST",
        "/api/v1/auth/refresh",
        refresh,
        None,
        "Rotate a refresh token; reuse of a spent one ends its session",
        body=RefreshIn,
        response=TokenPair,
        errors=(401,),
    ),
    Endpoint(
        "POST",
        "/api/v1/auth/logout",
        logout,
        Role.VIEWER,
        "End the caller's session (its refresh token)",
        status=204,
        errors=(400,),
    ),
    Endpoint("GET", "/api/v1/me", get_me, Role.VIEWER, "Who am I", response=MeOut),
    Endpoint(
        "PUT",
        "/api/v1/me/password",
        change_password,
        Role.VIEWER,
        "Change my password (the old one is required); ends my other sessions",
        status=204,
        body=PasswordIn,
        errors=(429,),
    ),
]
