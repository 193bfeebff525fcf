"""Store, then publish (DESIGN §8): one execution's engine events become rows, committed
in batches, and then messages on the event stream.

Log lines wait up to 100 ms or 500 lines; a node or execution status change is committed
at once (with the lines before it, so the order holds). A node printing faster than its
lines are stored is held (`valve`): past `HOLD_LINES` waiting lines its pipes are not
read until the batch in flight is stored, so memory stays bounded and a line reaches its
followers soon after the worker read it. Each batch is one transaction;
its events are published after the commit, and a failed publish is only logged (events
are news: whoever missed one reads the database). A database outage is waited out with
backoff, keeping the events in order; the owner decides when that has gone on too long
(its lease).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loom_common import encode_envelope
from loom_db import Database, DatabaseUnavailable, TransactionConflict, executions, logs, node_runs
from loom_db.logs import LogLineIn
from loom_db.node_runs import NodeChange
from loom_messaging import LOG_BATCH_MAX_BYTES, Broker
from loom_worker.events import NODE_TERMINAL, Event, ExecutionEvent, LogEvent, NodeEvent
from loom_worker.executors._process import Valve

__all__ = ["EXECUTION_FINAL", "Batch", "EventStore"]

_log = logging.getLogger("loom.worker")

MAX_LINES = 500
HOLD_LINES = 2000
"""Lines waiting to be stored past which the nodes' output is not read (`Valve`)."""
MAX_WAIT = 0.1
EXECUTION_FINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out", "skipped"})
_BACKOFF = (0.2, 5.0)
# A log.batch message's room for lines: its cap less the envelope around them.
_BATCH_ROOM = LOG_BATCH_MAX_BYTES - 4096


@dataclass(slots=True)
class Batch:
    lines: list[LogEvent] = field(default_factory=list)
    nodes: list[NodeEvent] = field(default_factory=list)
    final: ExecutionEvent | None = None


class EventStore:
    """Takes one execution's events (`add`) and stores and publishes them in order, in a
    task of its own, until `close()` (which flushes what is left). `commit_final` is
    called in the transaction that stores the execution's final status."""

    def __init__(
        self,
        database: Database,
        broker: Broker,
        execution_id: str,
        graph: str,
        *,
        worker_id: str,
        lease_seconds: float,
        on_stored: Callable[[Batch], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._database = database
        self._events = broker.events
        self._id = execution_id
        self._graph = graph
        self._worker_id = worker_id
        self._lease_seconds = lease_seconds
        self._on_stored = on_stored
        self._on_lost = on_lost
        self.lost = False
        self._pending = Batch()
        self.valve = Valve()
        self._has_work = asyncio.Event()
        self._urgent = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name=f"loom-store-{execution_id}")

    def add(self, event: Event) -> None:
        pending = self._pending
        if isinstance(event, LogEvent):
            pending.lines.append(event)
            if len(pending.lines) >= MAX_LINES:
                self._urgent.set()
                if len(pending.lines) >= HOLD_LINES:
                    self.valve.close()
        elif isinstance(event, NodeEvent):
            pending.nodes.append(event)
            self._urgent.set()
        elif event.status in EXECUTION_FINAL:
            pending.final = event
            self._urgent.set()
        else:
            return  # `running`: stored by the admission that started it
        self._has_work.set()

    async def close(self) -> None:
        """Store what is pending and stop."""
        self._closing = True
        self._urgent.set()
        self._has_work.set()
        await self._task

    def abandon(self) -> None:
        """Stop at once, storing nothing more (the lease was lost or given back)."""
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            await self._has_work.wait()
            if not self._urgent.is_set():
                try:
                    async with asyncio.timeout(MAX_WAIT):
                        await self._urgent.wait()
                except TimeoutError:
                    pass
            self._has_work.clear()
            self._urgent.clear()
            batch, self._pending = self._pending, Batch()
            if batch.lines or batch.nodes or batch.final is not None:
                stored = await self._store(batch)
                self.valve.open()  # (a lost lease stops the nodes anyway)
                if not stored:
                    return
                await self._publish(batch)
            if self._closing and not self._has_work.is_set():
                return

    async def _store(self, batch: Batch) -> bool:
        """Store `batch`; False (nothing stored, nothing more will be) once the lease is
        found lost."""
        delay = _BACKOFF[0]
        while True:
            try:
                async with self._database.transaction() as conn:
                    # Every batch renews the lease, and a batch whose lease is gone (the
                    # reaper gave the execution to another worker) is not written.
                    if not await executions.renew(
                        conn, self._id, self._worker_id, self._lease_seconds
                    ):
                        raise _Lost
                    await self._write(conn, batch)
                break
            except _Lost:
                _log.warning("lost the lease of %s: its events are not stored", self._id)
                self.lost = True
                if self._on_lost is not None:
                    self._on_lost()
                return False
            except (DatabaseUnavailable, TransactionConflict) as exc:
                _log.warning("storing events of %s: %s (retrying in %.1fs)", self._id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF[1])
        if batch.final is not None:
            self._database.notify_committed()  # `finish` may have woken a waiting one
        if self._on_stored is not None:
            self._on_stored(batch)
        return True

    async def _write(self, conn: Any, batch: Batch) -> None:
        if batch.lines:
            await logs.append_logs(
                conn,
                self._id,
                [LogLineIn(e.seq, e.node, e.stream, e.ts, e.text) for e in batch.lines],
            )
        if batch.nodes:
            await node_runs.record_nodes(conn, self._id, [_change(e) for e in batch.nodes])
        if batch.final is not None:
            await executions.finish(
                conn, self._id, batch.final.status, error=batch.final.error, now=batch.final.ts
            )

    async def _publish(self, batch: Batch) -> None:
        items: list[tuple[bytes, str]] = []
        for lines in _chunks(batch.lines):
            items.append((encode_envelope("log.batch", _log_batch(self._id, lines)), self._id))
        for event in batch.nodes:
            items.append((encode_envelope("node.status", _node_status(event)), self._id))
        if batch.final is not None:
            data = {
                "execution_id": self._id,
                "graph": self._graph,
                "status": batch.final.status,
                "ts": _iso(batch.final.ts),
            }
            items.append((encode_envelope("execution.status", data), self._id))
        await publish_quietly(self._events.publish_batch(items), self._id)


async def publish_quietly(publishing: Awaitable[None], execution_id: str) -> None:
    """Events are news: a broker that cannot take them is logged, never fatal."""
    try:
        await publishing
    except Exception as exc:
        _log.warning("publishing events of %s failed: %s", execution_id, exc)


class _Lost(Exception):
    """The lease is not ours any more (rolls the batch's transaction back)."""


def _change(event: NodeEvent) -> NodeChange:
    return NodeChange(
        node=event.node,
        name=event.name,
        index=event.index,
        attempt=event.attempt,
        status=event.status,
        started_at=event.ts if event.status == "running" else None,
        finished_at=event.ts if event.status in NODE_TERMINAL else None,
        exit_code=event.exit_code,
        outputs=event.outputs,
        error=event.error,
    )


def _iso(ts: Any) -> str:
    return str(ts.isoformat().replace("+00:00", "Z"))


def _node_status(event: NodeEvent) -> dict[str, Any]:
    data: dict[str, Any] = {
        "execution_id": event.execution_id,
        "node": event.node,
        "index": event.index,
        "status": event.status,
        "attempt": event.attempt,
        "ts": _iso(event.ts),
    }
    if event.exit_code is not None:
        data["exit_code"] = event.exit_code
    if event.error is not None:
        data["error"] = event.error
    return data


def _log_batch(execution_id: str, lines: list[LogEvent]) -> dict[str, Any]:
    return {
        "execution_id": execution_id,
        "lines": [
            {"seq": e.seq, "node": e.node, "stream": e.stream, "ts": _iso(e.ts), "text": e.text}
            for e in lines
        ],
    }


def _chunks(lines: list[LogEvent]) -> list[list[LogEvent]]:
    """Lines in runs whose `log.batch` stays under its cap (a line is at most 16 KiB)."""
    chunks: list[list[LogEvent]] = []
    current: list[LogEvent] = []
    size = 0
    for line in lines:
        cost = len(line.text.encode()) * 2 + len(line.node) + 128  # escapes, fields
        if current and size + cost > _BATCH_ROOM:
            chunks.append(current)
            current, size = [], 0
        current.append(line)
        size += cost
    if current:
        chunks.append(current)
    return chunks
