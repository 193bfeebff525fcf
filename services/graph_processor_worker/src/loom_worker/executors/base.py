"""What every node executor shares: the call it receives, the result it returns, its errors.

An executor is thin I/O: it turns one *rendered* node attempt (templates already
evaluated by the engine) into a process, a request or a call, streams the node's output
lines to a `LogSink`, and returns a `NodeResult` or raises `NodeFailed`.

Timeouts and cancellation reach an executor as `asyncio.CancelledError` in the task that
awaits it (the engine wraps each attempt in `asyncio.timeout`). An executor that owns a
process must then kill it (the whole process group: SIGTERM, SIGKILL after
`kill_grace` seconds), wait for it, and re-raise the `CancelledError`.

Error tree::

    Exception
     └── NodeFailed          the attempt failed; `error` says why, `exit_code` if a process ended
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._process import Valve

__all__ = ["BASE_ENV_NAMES", "LogSink", "NodeCall", "NodeFailed", "NodeResult", "base_env"]

LogSink = Callable[[str, str], None]
"""`sink(stream, text)`: one call per line of output, `stream` is "stdout" or "stderr",
`text` has no trailing newline. Called from the event loop's thread only."""

BASE_ENV_NAMES = ("PATH", "HOME", "LANG", "TZ")
"""The only variables of the worker's own environment a node process ever sees."""


def base_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of `environ` (default: this process's environment)."""
    source = os.environ if environ is None else environ
    env = {name: source[name] for name in BASE_ENV_NAMES if name in source}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


@dataclass(frozen=True, slots=True)
class NodeCall:
    """One attempt of one node instance, as an executor sees it."""

    execution_id: str
    node: str
    """The instance name: `build` or, in a fan-out, `build[0]`."""
    attempt: int
    env: Mapping[str, str] = field(default_factory=dict)
    """The graph's and the node's `env`, rendered; added to the allow-listed base."""
    workdir: Path | None = None
    """A fresh, empty directory for this attempt (created by the engine), or None."""
    valve: Valve | None = None
    """Holds the reading of the node's output while its consumer is behind (see `Valve`)."""


@dataclass(slots=True)
class NodeResult:
    outputs: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


class NodeFailed(Exception):
    """The attempt failed. The engine records `error` and may retry."""

    def __init__(
        self,
        error: str,
        *,
        exit_code: int | None = None,
        outputs: dict[str, Any] | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(error)
        self.error = error
        self.exit_code = exit_code
        self.outputs = outputs or {}
        self.retryable = retryable
