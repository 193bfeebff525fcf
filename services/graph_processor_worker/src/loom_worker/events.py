"""What the engine tells the world: execution status, node status, log lines.

Plain frozen dataclasses; the worker service turns them into rows and messages, the CLI
into terminal lines. Times are aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

__all__ = [
    "EXECUTION_TERMINAL",
    "NODE_TERMINAL",
    "Event",
    "ExecutionEvent",
    "ExecutionStatus",
    "LogEvent",
    "NodeEvent",
    "NodeStatus",
    "PriorNode",
]

ExecutionStatus = Literal["running", "succeeded", "failed", "cancelled", "timed_out"]
NodeStatus = Literal[
    "pending", "running", "succeeded", "failed", "timed_out", "cancelled", "skipped"
]

NODE_TERMINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled", "skipped"})
EXECUTION_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})


@dataclass(frozen=True, slots=True)
class ExecutionEvent:
    execution_id: str
    status: ExecutionStatus
    ts: datetime
    error: str | None = None


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """A node instance changed status. `node` is the instance name (`build[0]`), `name` the
    node id (`build`). A fan-out also gets one event for the node as a whole when all its
    instances are done (`index` None, `fanout` True, `outputs` the list of theirs)."""

    execution_id: str
    node: str
    name: str
    index: int | None
    status: NodeStatus
    attempt: int
    ts: datetime
    exit_code: int | None = None
    error: str | None = None
    outputs: Any = None
    retry_in: float | None = None
    """Set on a failed attempt that will be retried after this many seconds."""
    fanout: bool = False


@dataclass(frozen=True, slots=True)
class LogEvent:
    execution_id: str
    seq: int
    node: str
    stream: str
    """`stdout`, `stderr`, or `loom` for the engine's own notes (retries, timeouts)."""
    ts: datetime
    text: str


Event = ExecutionEvent | NodeEvent | LogEvent


@dataclass(frozen=True, slots=True)
class PriorNode:
    """A node instance's state from an earlier run of the same execution (resume) or of
    the execution being retried. Terminal states are kept; anything else runs again as
    `attempt + 1`."""

    status: NodeStatus
    outputs: Any = None
    attempt: int = 0
