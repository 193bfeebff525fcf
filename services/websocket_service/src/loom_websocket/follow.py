"""`/ws/executions/{id}?after=SEQ`: the current state, the stored lines after `after`,
then the live events, with no gap and no duplicate (DESIGN §9).

The follower registers with the hub BEFORE it reads anything, so every event published
from then on is buffered for it; it then sends the state, replays what is stored, works
through the buffer (dropping lines it already sent, filling any gap from the database)
and, once nothing is buffered, joins the hub's broadcast group. Whenever the hub hands it
back (a gap, the final status, the database having moved on) it does the same again.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from websockets.asyncio.server import ServerConnection

from loom_db import Database, NotFound, executions, logs, node_runs
from loom_db.executions import ExecutionRecord
from loom_messaging import Envelope
from loom_websocket.hub import POLL, SLOW, Follower, Hub, execution_frame, logs_frame, node_frame
from loom_websocket.metrics import WebsocketMetrics

__all__ = ["NOT_FOUND", "FollowExecution"]

NOT_FOUND = 4404

PAGE = 1000
"""Stored lines read per query while replaying or filling a gap."""

FRAME_BYTES = 256 * 1024
"""About the largest `logs` frame sent (a live `log.batch` is at most 256 KiB too)."""

_RANK = {"pending": 0, "queued": 0, "waiting": 0, "running": 1}


def _rank(status: str) -> int:
    return _RANK.get(status, 2)


def _iso(value: datetime | None) -> str:
    value = value or datetime.now(UTC)
    return value.isoformat().replace("+00:00", "Z")


class FollowExecution:
    """One connection's follow of one execution, from registration to close."""

    def __init__(
        self,
        hub: Hub,
        database: Database,
        metrics: WebsocketMetrics,
        conn: ServerConnection,
        execution_id: str,
        after: int,
        *,
        slow_seconds: float,
    ) -> None:
        self._slow_seconds = slow_seconds
        self._hub = hub
        self._database = database
        self._metrics = metrics
        self._conn = conn
        self._follower = Follower(conn, execution_id, after)
        self._nodes: dict[str, tuple[int, int]] = {}

    async def run(self) -> None:
        follower = self._follower
        self._hub.follow(follower)
        try:
            await self._follow()
        except NotFound:  # unknown, or deleted while followed (retention)
            await self._conn.close(NOT_FOUND, "no such execution")
        except _TooSlow:
            self._metrics.slow_closes.inc()
            reason = f"too slow: reconnect with after={follower.last_seq}"
            await self._conn.close(SLOW, reason)
        finally:
            self._hub.leave(follower)

    async def _follow(self) -> None:
        follower = self._follower
        record = await self._state()
        await self._fill()
        if record.finished:
            await self._finish(record)
            return
        while True:
            if follower.draining:
                await self._drained()
            envelope = follower.take()
            if envelope is None:
                if self._hub.step_in(follower):
                    await follower.wake.wait()
                continue
            if await self._handle(envelope):
                return

    async def _drained(self) -> None:
        """Wait until the connection has taken what the broadcasts gave it (a burst), or
        raise `_TooSlow` when it does not within `slow_seconds`."""
        try:
            async with asyncio.timeout(self._slow_seconds):
                await self._conn.drain()
        except TimeoutError:
            raise _TooSlow from None
        self._follower.draining = False

    async def _handle(self, envelope: Envelope) -> bool:
        """Send what `envelope` says that was not sent yet; True once the follow ended."""
        data = envelope.data
        if envelope.type == "log.batch":
            lines: list[dict[str, Any]] = data["lines"]
            if not lines:
                return False
            if lines[0]["seq"] > self._follower.last_seq + 1:
                await self._fill(until=lines[0]["seq"] - 1)
            if lines[0]["seq"] == self._follower.last_seq + 1:
                await self._send(self._hub.batch_frame(envelope))
                self._follower.last_seq = lines[-1]["seq"]
                return False
            tail = [line for line in lines if line["seq"] > self._follower.last_seq]
            if tail:
                await self._send(logs_frame(tail))
                self._follower.last_seq = tail[-1]["seq"]
        elif envelope.type == "node.status":
            if self._advances(data["node"], data["attempt"], data["status"]):
                await self._send(node_frame(data))
        elif envelope.type == "execution.status":
            if data.get("status") in executions.FINISHED_STATUSES:
                await self._fill()
                await self._send(execution_frame(data))
                await self._conn.close(1000, "execution finished")
                return True
            await self._send(execution_frame(data))
        elif envelope.type == POLL:
            record = await self._state()
            await self._fill()
            if record.finished:
                await self._finish(record)
                return True
        return False

    async def _state(self) -> ExecutionRecord:
        """Send each node instance's state that this connection has not seen yet."""
        async with self._database.read() as conn:
            record = await executions.get_execution(conn, self._follower.execution_id)
            runs = await node_runs.latest_node_runs(conn, self._follower.execution_id)
        for run in runs:
            if self._advances(run.node, run.attempt, run.status):
                data = {
                    "node": run.node,
                    "status": run.status,
                    "attempt": run.attempt,
                    "ts": _iso(run.finished_at or run.started_at),
                    "exit_code": run.exit_code,
                    "error": run.error,
                }
                await self._send(node_frame(data))
        return record

    def _advances(self, node: str, attempt: int, status: str) -> bool:
        now = (attempt, _rank(status))
        seen = self._nodes.get(node)
        if seen is not None and seen >= now:
            return False
        self._nodes[node] = now
        return True

    async def _fill(self, until: int | None = None) -> None:
        """Send the stored lines after the last one sent (up to `until`, or all)."""
        follower = self._follower
        while until is None or follower.last_seq < until:
            async with self._database.read() as conn:
                page = await logs.read_logs(
                    conn, follower.execution_id, after=follower.last_seq, limit=PAGE
                )
            if not page:
                return
            lines: list[dict[str, Any]] = []
            size = 0
            for line in page:
                if lines and size + len(line.text) + 96 > FRAME_BYTES:
                    await self._send(logs_frame(lines))
                    lines, size = [], 0
                lines.append(
                    {
                        "seq": line.seq,
                        "node": line.node,
                        "stream": line.stream,
                        "ts": _iso(line.ts),
                        "text": line.text,
                    }
                )
                size += len(line.text) + 96
            await self._send(logs_frame(lines))
            follower.last_seq = page[-1].seq
            if len(page) < PAGE:
                return

    async def _finish(self, record: ExecutionRecord) -> None:
        data = {
            "status": record.status,
            "ts": _iso(record.finished_at),
            "error": record.error,
        }
        await self._send(execution_frame(data))
        await self._conn.close(1000, "execution finished")

    async def _send(self, frame: bytes) -> None:
        """Send one frame, waiting while the connection is full, up to `slow_seconds`."""
        try:
            async with asyncio.timeout(self._slow_seconds):
                await self._conn.send(frame, text=True)
        except TimeoutError:
            raise _TooSlow from None
        self._metrics.sent(1, len(frame))


class _TooSlow(Exception):
    """The connection took nothing for `slow_seconds`: it is closed with 4008."""
