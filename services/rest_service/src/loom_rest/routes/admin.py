"""Admin routes (DESIGN §5): the audit log and the work queue's dead letters.

`GET /api/v1/dlq` answers `{items, next_cursor}` like every list, with `next_cursor`
always null: brokers list their dead letters oldest first up to a limit, with no position
to continue from. Each item shows what the message was: its type and data when the body
is an envelope (even one of a type or version Loom does not take: the reason says why it
was refused), else a preview of its bytes. A replay publishes the message again (202)
and is audited; the audit entry is written in the transaction around the replay, so a
replay that fails leaves none. A broker that cannot be reached answers 503
(`problems.problem_for`).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from loom_auth import Role
from loom_db import audit
from loom_messaging import MAX_MESSAGE_BYTES, DeadLetter
from loom_rest.api import Call, Endpoint
from loom_rest.problems import ApiProblem
from loom_rest.schemas import AuditOut, DeadLetterOut, Page, PageQuery

__all__ = ["ENDPOINTS", "PREVIEW_BYTES", "AuditPage", "DeadLetterPage", "body_preview"]

_NO_NUL = r"^[^\x00]*$"  # PostgreSQL's text cannot hold NUL: refused as input, never a 500


class AuditPage(Page[AuditOut]):
    """Audit entries, newest first."""


class DeadLetterPage(Page[DeadLetterOut]):
    """Dead-lettered messages, oldest first; `next_cursor` is always null."""


class AuditQuery(PageQuery):
    actor: str | None = Field(default=None, max_length=200, pattern=_NO_NUL)
    object: str | None = Field(
        default=None,
        max_length=400,
        pattern=_NO_NUL,
        description="An object type (`graph`) or one object (`graph:nightly`)",
    )


class DeadLetterQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=100, ge=1, le=1000)


async def list_audit(call: Call[None, AuditQuery]) -> AuditPage:
    query = call.query
    object_type = object_id = None
    if query.object is not None:
        object_type, _, rest = query.object.partition(":")
        object_id = rest if rest else None
    async with call.runtime.database.read() as conn:
        records, next_cursor = await audit.list_audit(
            conn,
            actor=query.actor,
            object_type=object_type,
            object_id=object_id,
            limit=query.limit,
            cursor=query.cursor,
        )
    items = [AuditOut.model_validate(r) for r in records]
    return AuditPage(items=items, next_cursor=next_cursor)


PREVIEW_BYTES = 1024
"""How much of a body that is not an envelope a dead letter shows."""


def _dead_letter_out(letter: DeadLetter) -> DeadLetterOut:
    envelope = _envelope_of(letter.body)
    if envelope is None:
        preview, encoding = body_preview(letter.body)
        message_type, data = None, None
    else:
        preview, encoding = None, None
        kind = envelope.get("type")
        message_type, data = (kind if isinstance(kind, str) else None), envelope["data"]
    return DeadLetterOut(
        id=letter.id,
        key=letter.key,
        reason=letter.reason,
        at=letter.at,
        type=message_type,
        data=data,
        size=len(letter.body),
        preview=preview,
        preview_encoding=encoding,
    )


def _envelope_of(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object with `data`, whether or not `decode` takes it (an unknown
    type or version is worth showing as it is); None for anything else, and for a body
    over the cap of a work-queue message (it is shown as a preview, not parsed whole)."""
    if len(body) > MAX_MESSAGE_BYTES:
        return None
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return raw if isinstance(raw, dict) and "data" in raw else None


def body_preview(body: bytes) -> tuple[str, Literal["text", "base64"]]:
    """The first `PREVIEW_BYTES` of `body`: as text when they are UTF-8 without control
    characters (but tab and newlines), else as base64."""
    head = body[:PREVIEW_BYTES]
    text: str | None
    try:
        text = head.decode()
    except UnicodeDecodeError as exc:
        # The cut may split a character: what comes before it is still text.
        cut_short = len(body) > PREVIEW_BYTES and exc.reason == "unexpected end of data"
        text = head[: exc.start].decode() if cut_short else None
    if text is not None and not any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return text, "text"
    return base64.b64encode(head).decode("ascii"), "base64"


async def list_dead_letters(call: Call[None, DeadLetterQuery]) -> DeadLetterPage:
    letters = await call.runtime.broker.queue.dead_letters(call.query.limit)
    return DeadLetterPage(items=[_dead_letter_out(letter) for letter in letters], next_cursor=None)


async def replay_dead_letter(call: Call[None, None]) -> Response:
    """Publish a dead letter again and take it off the dead-letter queue."""
    letter_id = call.path("id")
    if len(letter_id) > 200 or any(ord(c) < 32 for c in letter_id):
        raise _unknown(letter_id)  # no broker makes such ids; never stored in the audit log
    async with call.runtime.database.transaction() as conn:
        await audit.record(
            conn,
            actor=call.actor,
            action="dead_letter.replay",
            object_type="dead_letter",
            object_id=letter_id,
        )
        try:
            await call.runtime.broker.queue.replay(letter_id)
        except LookupError:
            raise _unknown(letter_id) from None
    return Response(status_code=202)


def _unknown(letter_id: str) -> ApiProblem:
    return ApiProblem(404, f"no dead letter {letter_id[:100]!r}")


ENDPOINTS: list[Endpoint] = [
    Endpoint(
        "GET",
        "/api/v1/audit",
        list_audit,
        Role.ADMIN,
        "The audit log, newest first",
        query=AuditQuery,
        response=AuditPage,
    ),
    Endpoint(
        "GET",
        "/api/v1/dlq",
        list_dead_letters,
        Role.ADMIN,
        "Dead-lettered messages with their reason",
        query=DeadLetterQuery,
        response=DeadLetterPage,
    ),
    Endpoint(
        "POST",
        "/api/v1/dlq/{id}/replay",
        replay_dead_letter,
        Role.ADMIN,
        "Publish a dead-lettered message again",
        status=202,
    ),
]
