"""Authentication for Starlette apps: a backend, the `Principal` it yields, a role guard.

Install it with Starlette's own middleware::

    Middleware(AuthenticationMiddleware, backend=BearerAuthBackend(key, lookup_api_token))

The backend reads ``Authorization: Bearer <token>`` (and, for WebSockets only when
`allow_query_token` is on, ``?token=``, since browsers cannot set headers on a WebSocket).
A ``loom_`` token is hashed and handed to the injected `lookup_api_token` (the service
passes a database-backed function that returns `None` for an unknown, revoked or expired
token); anything else is decoded as a JWT access token with the signing key.

A request whose credentials fail is NOT answered here: it continues as an `Anonymous`
user that remembers why (for the logs), so public routes still work with a stale token,
and a guarded route answers 401 with ``WWW-Authenticate: Bearer error="invalid_token"``.
Guarded routes use `requires_role` (or call `authorize`); its 401 and 403 answers are RFC
9457 problem details, like every Loom error.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar, cast

from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    BaseUser,
    UnauthenticatedUser,
)
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response
from starlette.status import WS_1008_POLICY_VIOLATION
from starlette.websockets import WebSocket

from loom_auth.api_tokens import API_TOKEN_PREFIX, is_api_token
from loom_auth.errors import AuthError, InvalidToken, NotAuthenticated, PermissionDenied
from loom_auth.roles import Role, parse_role, role_allows, scopes_for
from loom_auth.tokens import check_signing_key, decode_access_token, hash_token

__all__ = [
    "PROBLEM_JSON",
    "Anonymous",
    "BearerAuthBackend",
    "LookupApiToken",
    "LookupRole",
    "Principal",
    "TokenKind",
    "auth_error_response",
    "authorize",
    "problem_response",
    "requires_role",
]

logger = logging.getLogger("loom.auth")

PROBLEM_JSON = "application/problem+json"

TokenKind = Literal["access", "api"]


@dataclass(frozen=True, slots=True)
class Principal(BaseUser):
    """Who made a request, as `request.user`: a user by a JWT, or an API token."""

    username: str
    role: Role
    kind: TokenKind
    token_id: str
    """The JWT's `jti`, or the API token's id."""
    session_id: str | None = None
    """For a JWT from a login: its refresh-token family, which logout revokes."""

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.username

    @property
    def identity(self) -> str:
        return self.username

    @property
    def scopes(self) -> list[str]:
        """`scopes_for(role)`, as in `request.auth.scopes`."""
        return scopes_for(self.role)


class Anonymous(UnauthenticatedUser):
    """A request without valid credentials. `failure` is why presented credentials were
    rejected (for the logs, never for the client), `None` when there were none."""

    def __init__(self, failure: str | None = None) -> None:
        self.failure = failure


LookupApiToken = Callable[[str], Awaitable[Principal | None]]
"""`lookup_api_token(token_hash)`: the principal of a live API token, `None` otherwise."""

LookupRole = Callable[[str], Awaitable[Role | None]]
"""`lookup_role(username)`: the user's current role, `None` when the user was deleted or
disabled. Checked for access tokens, so that a demotion takes effect before the token
expires (the service may cache it for a moment)."""


class BearerAuthBackend(AuthenticationBackend):
    """Turns a bearer token into a `Principal` (see the module docstring).

    Raises `ValueError` at construction for a signing key shorter than 32 bytes.
    `authenticate` raises only what `lookup_api_token` raises (e.g. the database being
    down), so that the service answers 503 rather than "invalid token".
    """

    def __init__(
        self,
        signing_key: bytes,
        lookup_api_token: LookupApiToken,
        *,
        allow_query_token: bool = False,
        leeway: float = 0.0,
        clock: Callable[[], float] = time.time,
        lookup_role: LookupRole | None = None,
    ) -> None:
        check_signing_key(signing_key)
        self._signing_key = signing_key
        self._lookup_api_token = lookup_api_token
        self._lookup_role = lookup_role
        self._allow_query_token = allow_query_token
        self._leeway = leeway
        self._clock = clock

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        try:
            token = self._presented_token(conn)
            if token is None:
                return None
            principal = await self._principal(token)
        except InvalidToken as exc:
            logger.info(
                "credentials rejected",
                extra={"reason": exc.reason, "path": conn.url.path},
            )
            return AuthCredentials(), Anonymous(exc.reason)
        return AuthCredentials(principal.scopes), principal

    def _presented_token(self, conn: HTTPConnection) -> str | None:
        header = conn.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer":
                raise InvalidToken("Authorization header does not use the Bearer scheme")
            if not token or " " in token:
                raise InvalidToken("malformed Bearer credentials")
            return token
        if self._allow_query_token and conn.scope["type"] == "websocket":
            return conn.query_params.get("token")
        return None

    async def _principal(self, token: str) -> Principal:
        if token.startswith(API_TOKEN_PREFIX):
            if not is_api_token(token):
                raise InvalidToken("malformed API token")
            principal = await self._lookup_api_token(hash_token(token))
            if principal is None:
                raise InvalidToken("unknown, revoked or expired API token")
            return principal
        claims = decode_access_token(
            token, self._signing_key, now=self._clock(), leeway=self._leeway
        )
        role = claims.role
        if self._lookup_role is not None:
            current = await self._lookup_role(claims.username)
            if current is None:
                raise InvalidToken("the token's user was deleted or disabled")
            role = min(role, current, key=lambda r: r.rank)
        return Principal(
            username=claims.username,
            role=role,
            kind="access",
            token_id=claims.jti,
            session_id=claims.session_id,
        )


def authorize(conn: HTTPConnection, need: Role | str) -> Principal:
    """The caller of `conn`, if their role allows `need`.

    Raises `NotAuthenticated` without valid credentials, `PermissionDenied` when the role
    is too low, `UnknownRole` when `need` is not a role. Needs `AuthenticationMiddleware`
    with `BearerAuthBackend` in front (Starlette asserts the middleware is there).
    """
    user = conn.user
    if not isinstance(user, Principal):
        failure = getattr(user, "failure", None)
        if failure is not None:
            raise NotAuthenticated(InvalidToken.public_detail, invalid_token=True)
        raise NotAuthenticated(
            "this route needs `Authorization: Bearer <token>` (an access token from "
            "POST /api/v1/auth/login, or an API token)"
        )
    if not role_allows(user.role, need):
        raise PermissionDenied(f"this needs the {need} role; the caller has {user.role}")
    return user


_P = ParamSpec("_P")
_R = TypeVar("_R")


def requires_role(
    need: Role | str,
) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Awaitable[_R | Response]]]:
    """Guard an endpoint (`async def endpoint(request)`, a method taking a request, or a
    WebSocket endpoint) so that only callers with `need` or a higher role reach it.

    Others get 401 or 403 problem details (`auth_error_response`); a WebSocket is closed
    with 1008 (policy violation) before it is accepted. Raises `UnknownRole` at decoration
    time for a `need` that is not a role.
    """
    role = parse_role(need) if not isinstance(need, Role) else need

    def decorate(endpoint: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R | Response]]:
        @functools.wraps(endpoint)
        async def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R | Response:
            conn = _connection(args, kwargs)
            try:
                authorize(conn, role)
            except (NotAuthenticated, PermissionDenied) as exc:
                if isinstance(conn, WebSocket):
                    await conn.close(code=WS_1008_POLICY_VIOLATION)
                    return cast(_R, None)
                return auth_error_response(exc)
            return await endpoint(*args, **kwargs)

        return guarded

    return decorate


def _connection(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> HTTPConnection:
    for value in (*args, *kwargs.values()):
        if isinstance(value, HTTPConnection):
            return value
    raise TypeError("requires_role: the endpoint takes no Request or WebSocket argument")


def auth_error_response(exc: AuthError) -> Response:
    """The problem-details answer to an authentication error: 401 with
    `WWW-Authenticate` for `NotAuthenticated` and `InvalidToken` (whose reason is NOT
    shown), 403 for `PermissionDenied`, 400 for any other `AuthError`. Raises nothing."""
    if isinstance(exc, InvalidToken):
        exc = NotAuthenticated(InvalidToken.public_detail, invalid_token=True)
    if isinstance(exc, NotAuthenticated):
        challenge = 'Bearer realm="loom"'
        if exc.invalid_token:
            challenge += ', error="invalid_token"'
        return problem_response(
            401, "Unauthorized", str(exc), headers={"WWW-Authenticate": challenge}
        )
    if isinstance(exc, PermissionDenied):
        return problem_response(403, "Forbidden", str(exc))
    return problem_response(400, "Bad Request", str(exc))


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    type: str = "about:blank",  # the RFC 9457 member's name
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> Response:
    """An RFC 9457 problem-details response (`application/problem+json`) with `type`,
    `title`, `status`, `detail` and any extension members (e.g. `errors=[...]`)."""
    body = {"type": type, "title": title, "status": status, "detail": detail, **extensions}
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)
