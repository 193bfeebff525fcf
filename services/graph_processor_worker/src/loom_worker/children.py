"""`graph` nodes (DESIGN §3, §8): start another graph's execution and wait for it, without
holding a slot.

The child is created through the same idempotent path as every execution, under the key
`graph:{parent execution}:{node instance}:{attempt}`, so a node attempt starts at most
one child. After a crash the resumed node (its next attempt) first looks for the child
of the attempt before: if that one is still going, or succeeded, the node re-attaches to
it instead of starting another. A child that failed is not re-attached: the new attempt
is a retry and starts a new child. Cancelling the node asks the child to cancel too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from loom_common import ParamError, ParamSpec, resolve_params
from loom_db import Database, NotFound, executions, graphs
from loom_worker.executors import NodeCall, NodeFailed
from loom_worker.executors.base import LogSink, NodeResult

__all__ = ["ChildGraphs", "child_key"]

_log = logging.getLogger("loom.worker")


def child_key(execution_id: str, node: str, attempt: int) -> str:
    return f"graph:{execution_id}:{node}:{attempt}"


class ChildGraphs:
    """The worker's `GraphRunner`: children are rows in the database, watched by polling
    their status every `poll` seconds."""

    def __init__(self, database: Database, *, poll: float = 0.25) -> None:
        self._database = database
        self._poll = poll

    async def run(
        self, call: NodeCall, graph: str, params: dict[str, Any], *, log: LogSink
    ) -> NodeResult:
        child = await self._attach_or_start(call, graph, params, log)
        try:
            status = await self._wait(child)
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel(child))
            raise
        outputs = {"execution_id": child, "status": status}
        log("stdout", f"child execution {child} of graph {graph} ended {status}")
        if status != "succeeded":
            raise NodeFailed(f"child execution {child} ended {status}", outputs=outputs)
        return NodeResult(outputs=outputs)

    async def _attach_or_start(
        self, call: NodeCall, graph: str, given: dict[str, Any], log: LogSink
    ) -> str:
        async with self._database.transaction() as conn:
            if call.attempt > 1:
                earlier = await executions.find_by_key(
                    conn, child_key(call.execution_id, call.node, call.attempt - 1)
                )
                if earlier is not None and earlier.status not in _NOT_REUSED:
                    log("stdout", f"re-attached to child execution {earlier.id} of graph {graph}")
                    return earlier.id
            try:
                stored = await graphs.get_graph(conn, graph)
            except NotFound:
                raise NodeFailed(f"there is no graph named {graph!r}", retryable=False) from None
            if not stored.enabled:
                raise NodeFailed(f"graph {graph!r} is paused", retryable=True)
            declared = {
                name: ParamSpec.model_validate(spec)
                for name, spec in stored.spec.get("params", {}).items()
            }
            try:
                params = resolve_params(declared, given)
            except ParamError as exc:
                raise NodeFailed(f"params of graph {graph!r}: {exc}", retryable=False) from None
            record, created = await executions.create_execution(
                conn,
                graph=graph,
                graph_version=stored.version,
                params=params,
                trigger_type="graph",
                trigger_info={"parent_execution_id": call.execution_id, "node": call.node},
                idempotency_key=child_key(call.execution_id, call.node, call.attempt),
            )
        if created:
            self._database.notify_committed()
        log("stdout", f"started child execution {record.id} of graph {graph}")
        return record.id

    async def _wait(self, child: str) -> str:
        while True:
            async with self._database.read() as conn:
                record = await executions.get_execution(conn, child)
            if record.finished:
                return record.status
            await asyncio.sleep(self._poll)

    async def _cancel(self, child: str) -> None:
        try:
            async with self._database.transaction() as conn:
                await executions.request_cancel(conn, child, "parent node cancelled")
            self._database.notify_committed()
        except Exception as exc:  # the parent is going away: log, never raise
            _log.warning("could not cancel child execution %s: %s", child, exc)


_NOT_REUSED = frozenset({"failed", "cancelled", "timed_out", "skipped"})
"""A child that ended so is not re-attached: the new attempt starts its own."""
