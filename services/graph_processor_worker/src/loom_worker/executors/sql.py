"""The `sql` executor: one parameterised statement against a PostgreSQL database.

The node names a stored secret that holds the connection string (`postgresql://...`,
`postgres://...`, `postgresql+psycopg://...` or libpq's `key=value` form); the engine
looks it up and hands it over as `dsn`. Each attempt opens its own connection
(autocommit: the statement commits on its own) and closes it at the end.

**Values never become SQL.** `params` go to the server as bind parameters, named in the
query as `%(name)s` (psycopg's placeholders; with parameters, a literal `%` is written
`%%`). A `${{ }}` in the query itself is bound the same way (`render_sql`), so a webhook
payload cannot inject SQL; `| raw` pastes the text itself, explicitly (a table name, say).
A dict, or a list holding dicts or lists, is sent as `jsonb`; other lists as arrays.

**Outputs**: `rowcount` — the rows the statement returned, or for a statement without a
result (`UPDATE`, `DELETE`, ...) the rows it affected; `rows` — at most `max_rows` of
the returned rows, as objects keyed by column name, made JSON-able this way:

| PostgreSQL value | output |
|---|---|
| numeric | string, exact (`"12.50"`) |
| float NaN / ±Infinity | string (`"nan"`, `"inf"`, `"-inf"`) |
| timestamptz | ISO 8601 in UTC with `Z`; timestamp, date, time: ISO 8601 as stored |
| interval | seconds (a number) |
| uuid, inet, ranges, and types psycopg does not know | string |
| bytea | base64 string |
| json, jsonb, arrays, records | JSON values, converted the same way inside |

The whole result is transferred (rows past the cap are counted, not converted): put a
`LIMIT` on a query whose result may be large.

**Errors**: a failure is `NodeFailed` with the server's message and SQLSTATE. Failing to
connect, losing the connection, the server shutting down, too many connections, a
serialization failure or a deadlock are retryable (the node's `retries` apply); any other
SQL error is not. A timeout or cancel cancels the running statement on the server, closes
the connection and re-raises `CancelledError`.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from loom_common import Template, render_value, to_text

from .base import LogSink, NodeCall, NodeFailed, NodeResult

if TYPE_CHECKING:
    import psycopg

__all__ = ["DEFAULT_MAX_ROWS", "SqlExecutor", "json_value", "render_sql"]

DEFAULT_MAX_ROWS = 1000

_SCHEME = re.compile(r"^postgres(?:ql)?\+[A-Za-z0-9_]+://")
_RETRYABLE_STATES = frozenset({"57P01", "57P02", "57P03", "40001", "40P01"})
"""admin/crash shutdown, cannot connect now, serialization failure, deadlock."""
_RETRYABLE_CLASSES = ("08", "53")
"""Connection exceptions; insufficient resources (too many connections, out of memory)."""
_CANCEL_TIMEOUT = 5.0


def render_sql(body: Any, context: Mapping[str, Any]) -> dict[str, Any]:
    """Render a compiled `sql` node body (`connection`, `query`, `params`) in `context`.

    `connection` and `params` render as any template does. Each `${{ }}` in `query`
    becomes a bind parameter `%(__loom_<n>)s` whose value joins `params` — never SQL
    text — unless it is marked `| raw`. Raises `ExpressionError`.
    """
    params = dict(render_value(body.get("params") or {}, context))
    query = body["query"]
    if isinstance(query, Template):
        out: list[str] = []
        number = 0
        for part in query.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = part.evaluate(context)
            if part.raw:
                out.append(to_text(value))
                continue
            number += 1
            while (name := f"__loom_{number}") in params:
                number += 1
            params[name] = value
            out.append(f"%({name})s")
        query = "".join(out)
    return {
        "connection": to_text(render_value(body["connection"], context)),
        "query": query,
        "params": params,
    }


class SqlExecutor:
    """Runs `sql` nodes: `query()` per attempt, a connection of its own each time.

    `max_rows` caps the `rows` output; `connect_timeout` (seconds) bounds connecting.
    It holds no resources: nothing to close."""

    def __init__(self, *, max_rows: int = DEFAULT_MAX_ROWS, connect_timeout: float = 10.0) -> None:
        if max_rows < 0:
            raise ValueError(f"max_rows must not be negative, not {max_rows}")
        self.max_rows = max_rows
        self.connect_timeout = connect_timeout

    async def query(
        self, spec: Mapping[str, Any], *, dsn: str, call: NodeCall, log: LogSink
    ) -> NodeResult:
        """Run `spec["query"]` with `spec["params"]` against `dsn`. Outputs `rows` and
        `rowcount` (module docstring). Raises `NodeFailed`; re-raises `CancelledError`
        after cancelling the statement on the server."""
        import psycopg  # on first use: `loom run` without sql nodes need not load it

        query: str = spec["query"]
        params = {str(k): _param(v) for k, v in (spec.get("params") or {}).items()}
        conn = await self._connect(_conninfo(dsn, call))
        try:
            started = time.perf_counter()
            async with conn.cursor() as cur:
                await cur.execute(query, params or None)
                described = cur.description is not None
                rowcount = max(cur.rowcount, 0)
                names = [column.name for column in cur.description or ()]
                fetched = await cur.fetchmany(self.max_rows) if described and self.max_rows else []
                status = cur.statusmessage or ""
            elapsed = f"{(time.perf_counter() - started) * 1000:.0f} ms"
        except asyncio.CancelledError:
            await _cancel(conn)
            raise
        except psycopg.Error as exc:
            raise _failed(exc, log) from None
        finally:
            await conn.close()
        rows = [
            {name: json_value(v) for name, v in zip(names, row, strict=True)} for row in fetched
        ]
        if described:
            log("stdout", f"query returned {_plural(rowcount, 'row')} ({elapsed})")
            if rowcount > len(rows):
                log("stdout", f"kept the first {len(rows)} of {rowcount} rows (max_rows)")
        else:
            log("stdout", f"query done: {status} ({elapsed})")
        return NodeResult(outputs={"rows": rows, "rowcount": rowcount})

    async def _connect(self, conninfo: str) -> psycopg.AsyncConnection[Any]:
        import psycopg

        try:
            async with asyncio.timeout(self.connect_timeout):
                return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        except TimeoutError:
            raise NodeFailed(
                f"cannot connect to the database within {self.connect_timeout:g}s"
            ) from None
        except psycopg.OperationalError as exc:
            state = exc.sqlstate or ""
            # wrong password or user (28xxx), no such database (3D000): a retry cannot help
            retryable = not (state.startswith("28") or state == "3D000")
            raise NodeFailed(
                f"cannot connect to the database: {_first_lines(exc)}", retryable=retryable
            ) from None


def _conninfo(dsn: str, call: NodeCall) -> str:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    dsn = _SCHEME.sub("postgresql://", dsn.strip(), count=1)
    try:
        given = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:  # libpq's message may quote the secret: not shown
        raise NodeFailed(
            "the connection string is not a valid PostgreSQL URL or key=value conninfo",
            retryable=False,
        ) from None
    if "application_name" in given:
        return dsn
    # Shows in pg_stat_activity which node runs a statement.
    return make_conninfo(dsn, application_name=f"loom {call.execution_id[:8]} {call.node}"[:63])


async def _cancel(conn: psycopg.AsyncConnection[Any]) -> None:
    """Make sure the statement stops on the server (psycopg tries too; this is the
    guarantee, bounded in time). Closing alone would leave it running there."""
    import psycopg

    try:
        await conn.cancel_safe(timeout=_CANCEL_TIMEOUT)
    except (psycopg.Error, OSError):
        pass  # the connection is gone or the statement already ended: nothing runs


def _failed(exc: psycopg.Error, log: LogSink) -> NodeFailed:
    state = exc.sqlstate
    message = (exc.diag.message_primary or _first_lines(exc)).strip()
    error = f"{message} (SQLSTATE {state})" if state else f"database connection lost: {message}"
    log("stderr", f"ERROR: {error}")
    for label, extra in (("DETAIL", exc.diag.message_detail), ("HINT", exc.diag.message_hint)):
        if extra:
            log("stderr", f"{label}: {extra}")
    retryable = state is None or state in _RETRYABLE_STATES or state.startswith(_RETRYABLE_CLASSES)
    return NodeFailed(error, retryable=retryable)


def _first_lines(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _param(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    if isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(v, dict | list) for v in value)
    ):
        return Jsonb(value)
    return value


def json_value(value: Any) -> Any:
    """A value psycopg loaded, made JSON-able (the table in the module docstring)."""
    if value is None or isinstance(value, str | int):  # bool is an int
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.isoformat()
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date | dtime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"
