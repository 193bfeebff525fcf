"""Cursor pagination shared by every list: `?limit=50&cursor=...` → `(items, next_cursor)`.

A cursor is the keyset position of the last item of a page (e.g. `(created_at, id)`),
opaque to clients (URL-safe base64 of JSON), so pages neither skip nor repeat rows while
others are written.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

import orjson

__all__ = ["MAX_PAGE", "InvalidCursor", "check_limit", "decode_cursor", "encode_cursor"]

MAX_PAGE = 1000


class InvalidCursor(ValueError):
    """A cursor this module did not make (or made for another list)."""


def check_limit(limit: int) -> int:
    """`limit` itself; `ValueError` outside 1..MAX_PAGE."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")
    return limit


def encode_cursor(*position: str | int | datetime) -> str:
    values = [p.isoformat() if isinstance(p, datetime) else p for p in position]
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode().rstrip("=")


def decode_cursor(cursor: str, *shape: type) -> list[Any]:
    """The position in `cursor`, each part converted to the type in `shape` (str, int or
    datetime). Raises `InvalidCursor` (a `ValueError`) for anything this module did not
    make."""
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(values, list) or len(values) != len(shape):
            raise ValueError
        out: list[Any] = []
        for value, kind in zip(values, shape, strict=True):
            if kind is datetime:
                moment = datetime.fromisoformat(value)
                # Aware, and far from the ends of the calendar (where shifting it to UTC,
                # as the databases do, would overflow).
                if moment.utcoffset() is None or not 1900 <= moment.year <= 9000:
                    raise ValueError
                out.append(moment)
            elif kind is int and isinstance(value, int) and not isinstance(value, bool):
                if not -(2**63) <= value < 2**63:
                    raise ValueError
                out.append(value)
            elif kind is str and isinstance(value, str) and "\x00" not in value:
                out.append(value)
            else:
                raise ValueError
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError):
        raise InvalidCursor("invalid cursor: pass the next_cursor of a previous page") from None
    return out
