"""Logging for every Loom process: stdlib `logging`, one handler, two formats.

* ``console`` — one readable line per record, for people at a terminal::

      2026-11-23 10:00:00.123 INFO  loom.worker  node finished  execution_id=ex_1 node=build

* ``json`` — one JSON object per line, for log collectors::

      {"ts":"2026-11-23T09:00:00.123Z","level":"INFO","logger":"loom.worker",
       "message":"node finished","execution_id":"ex_1","node":"build"}

Fields come from two places: `extra={...}` on one call, and the context bound with
`log_context(...)` / `bind_log_context(...)`. The context lives in a `contextvars`
variable, so it follows an asyncio task (and the tasks it starts) and never leaks into a
concurrent execution on the same event loop. A field given in `extra` wins over the
same field bound in the context.

The handler sits on the root logger so that libraries' records (Hypercorn, aio-pika,
aiokafka...) come out in the same format and carry the same context fields.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Literal, TextIO

import orjson

__all__ = [
    "LogFormat",
    "bind_log_context",
    "configure_logging",
    "current_log_context",
    "log_context",
    "reset_log_context",
]

LogFormat = Literal["console", "json"]

_EMPTY: Mapping[str, object] = MappingProxyType({})
_CONTEXT: ContextVar[Mapping[str, object]] = ContextVar("loom_log_context", default=_EMPTY)

# Attributes every LogRecord has; anything else on a record is a field (from `extra` or
# from the bound context). `taskName` is 3.12+, listed so the set is right there too.
_RECORD_ATTRS = frozenset(
    {*vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)), "message", "asctime"}
    | {"taskName"}
)


def bind_log_context(**fields: object) -> Token[Mapping[str, object]]:
    """Add `fields` to every record logged from the current context from now on.

    Returns the token for `reset_log_context`. Prefer `log_context`, which resets for you.

    Raises:
        ValueError: a field name is a standard LogRecord attribute (`name`, `msg`, ...),
            which logging itself would refuse as an `extra` key.
    """
    reserved = sorted(_RECORD_ATTRS.intersection(fields))
    if reserved:
        raise ValueError(f"cannot bind reserved log record attributes: {', '.join(reserved)}")
    return _CONTEXT.set(MappingProxyType({**_CONTEXT.get(), **fields}))


def reset_log_context(token: Token[Mapping[str, object]]) -> None:
    """Restore the context as it was before the `bind_log_context` that returned `token`."""
    _CONTEXT.reset(token)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Within the block, every record carries `fields` (nested blocks add to them)."""
    token = bind_log_context(**fields)
    try:
        yield
    finally:
        reset_log_context(token)


def current_log_context() -> Mapping[str, object]:
    """The fields bound right now, read-only (e.g. to hand them to a thread pool)."""
    return _CONTEXT.get()


class _ContextFilter(logging.Filter):
    """Copies the bound context onto each record, in the thread and task that logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    parts = []
    if record.exc_info:
        # logging caches the text on the record; reuse it when another handler made it.
        record.exc_text = record.exc_text or formatter.formatException(record.exc_info)
    if record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(parts) or None


class _ConsoleFormatter(logging.Formatter):
    """`time LEVEL logger  message  key=value ...`, local time, traceback on the next lines."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        line = (
            f"{stamp}.{int(record.msecs):03d} {record.levelname:<5} {record.name}  "
            f"{record.getMessage()}"
        )
        fields = _fields(record)
        if fields:
            line += "  " + " ".join(f"{k}={_console_value(v)}" for k, v in fields.items())
        extra_text = _exception_text(self, record)
        return f"{line}\n{extra_text}" if extra_text else line


def _console_value(value: object) -> str:
    text = str(value)
    # Quote only when needed, so `node=build` stays easy to read and to grep.
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return orjson.dumps(text).decode()
    return text


class _JsonFormatter(logging.Formatter):
    """One orjson object per line: ts (UTC, Z), level, logger, message, fields, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=UTC)
        out: dict[str, object] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            # A field must never overwrite the envelope a log collector parses.
            out[f"field_{key}" if key in out else key] = value
        extra_text = _exception_text(self, record)
        if extra_text:
            out["exc_info"] = extra_text
        try:
            return orjson.dumps(out, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()
        except orjson.JSONEncodeError:  # e.g. an int beyond 64 bits: keep the line anyway
            return orjson.dumps(
                {k: v if isinstance(v, str) else repr(v) for k, v in out.items()}
            ).decode()


class _LoomHandler(logging.StreamHandler[TextIO]):
    """Marks the handler configure_logging installed, so a second call replaces it."""


def configure_logging(
    format: LogFormat = "console",
    level: str = "INFO",
    stream: TextIO | None = None,
) -> None:
    """Send every record at `level` or above to `stream` (stderr by default) in `format`.

    Idempotent: calling it again replaces Loom's handler instead of adding a second one, so
    tests and `loom up` (which starts several services in one process) may call it freely.

    Raises:
        ValueError: `level` is not a logging level name.
    """
    numeric = logging.getLevelNamesMapping().get(level.strip().upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    handler = _LoomHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_JsonFormatter() if format == "json" else _ConsoleFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LoomHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
