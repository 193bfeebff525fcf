"""Secret routes (DESIGN §3, §5): write-only values. Only names ever leave the API; the
values go in encrypted (`loom_db.secrets`) and come out only to workers and the webhook
service. `PUT` creates or replaces (204 either way), `DELETE` removes (404 if unknown);
each change is audited by `loom_db.secrets`, by name, never with the value."""

from __future__ import annotations

import re
from typing import Any

from loom_auth import Role
from loom_db import NotFound
from loom_db import secrets as stored
from loom_db.pagination import decode_cursor, encode_cursor
from loom_rest.api import Call, Endpoint
from loom_rest.problems import unprocessable
from loom_rest.schemas import Page, PageQuery, SecretIn, SecretOut

__all__ = ["ENDPOINTS", "SecretPage"]

_NAME = re.compile(stored.SECRET_NAME_PATTERN)


class SecretPage(Page[SecretOut]):
    """Secret names, sorted."""


def _name(call: Call[Any, Any], *, missing_is_404: bool) -> str:
    name = call.path("name")
    if _NAME.fullmatch(name):
        return name
    if missing_is_404:  # no secret can have this name
        raise NotFound(f"no secret named {name[:100]!r}")
    error = {
        "path": "path.name",
        "message": "letters, digits and _, not starting with a digit, at most 100 characters",
        "line": None,
    }
    raise unprocessable(f"invalid secret name {name[:100]!r}", [error])


async def list_secrets(call: Call[None, PageQuery]) -> SecretPage:
    """Names only, sorted, a page at a time."""
    after = None
    if call.query.cursor is not None:
        after = decode_cursor(call.query.cursor, str)[0]
    async with call.runtime.database.read() as conn:
        names = await stored.list_secret_names(conn)
    if after is not None:
        names = [name for name in names if name > after]
    page = names[: call.query.limit]
    next_cursor = encode_cursor(page[-1]) if len(names) > len(page) else None
    return SecretPage(items=[SecretOut(name=name) for name in page], next_cursor=next_cursor)


async def put_secret(call: Call[SecretIn, None]) -> None:
    name = _name(call, missing_is_404=False)
    async with call.runtime.database.transaction() as conn:
        await stored.put_secret(conn, call.runtime.keys, name, call.body.value, by=call.actor)


async def delete_secret(call: Call[None, None]) -> None:
    name = _name(call, missing_is_404=True)
    async with call.runtime.database.transaction() as conn:
        await stored.delete_secret(conn, name, by=call.actor)


ENDPOINTS: list[Endpoint] = [
    Endpoint(
        "GET",
        "/api/v1/secrets",
        list_secrets,
        Role.EDITOR,
        "Secret names (never values)",
        query=PageQuery,
        response=SecretPage,
    ),
    Endpoint(
        "PUT",
        "/api/v1/secrets/{name}",
        put_secret,
        Role.EDITOR,
        "Create or replace a secret",
        status=204,
        body=SecretIn,
    ),
    Endpoint(
        "DELETE",
        "/api/v1/secrets/{name}",
        delete_secret,
        Role.EDITOR,
        "Delete a secret",
        status=204,
    ),
]
