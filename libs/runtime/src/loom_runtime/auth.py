"""The bearer-token backend every service that authenticates uses, over the runtime's
database: API tokens are looked up by hash, and an access token's role is capped by the
user's current role (a demotion or a disabled account takes effect within a second)."""

from __future__ import annotations

import time

from loom_auth import BearerAuthBackend, Principal, Role, parse_role
from loom_db import Database, NotFound, tokens, users

__all__ = ["auth_backend"]


def auth_backend(
    database: Database, signing_key: bytes, *, allow_query_token: bool = False
) -> BearerAuthBackend:
    """A `BearerAuthBackend` whose lookups read `database`. `allow_query_token` accepts
    `?token=` on WebSockets (browsers cannot set headers there)."""

    async def lookup_api_token(token_hash: str) -> Principal | None:
        async with database.transaction() as conn:
            found = await tokens.find_api_token(conn, token_hash)
        if found is None:
            return None
        token, user = found
        return Principal(
            username=user.username, role=parse_role(token.role), kind="api", token_id=token.id
        )

    roles = _CurrentRoles(database)
    return BearerAuthBackend(
        signing_key,
        lookup_api_token,
        lookup_role=roles.get,
        allow_query_token=allow_query_token,
    )


class _CurrentRoles:
    """Users' current roles for access tokens (`None`: deleted or disabled), read from the
    database and kept for `ttl` seconds: a demotion or a disabled account takes effect
    within that, not at the token's expiry, for one indexed read per user and second."""

    def __init__(self, database: Database, ttl: float = 1.0) -> None:
        self._database = database
        self._ttl = ttl
        self._known: dict[str, tuple[float, Role | None]] = {}

    async def get(self, username: str) -> Role | None:
        now = time.monotonic()
        known = self._known.get(username)
        if known is not None and now - known[0] < self._ttl:
            return known[1]
        async with self._database.read() as conn:
            try:
                user = await users.get_user(conn, username)
            except NotFound:
                user = None
        role = None if user is None or user.disabled else parse_role(user.role)
        if len(self._known) > 10_000:
            self._known.clear()
        self._known[username] = (now, role)
        return role
