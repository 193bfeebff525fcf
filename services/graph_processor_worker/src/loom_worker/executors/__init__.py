"""Node executors: thin I/O that turns one rendered node attempt into a result.

* `ShellExecutor` — `run` nodes: a script in its own process group (`run.py`);
* `PythonPool` — `python` nodes: `module:function` in Loom's own killable processes
  (`python.py`, the child side in `_pyhost.py`);
* `HttpExecutor` — `http` nodes over one shared httpx client, with a `CircuitBreaker`
  per host (`http.py`);
* `SqlExecutor` — `sql` nodes: one parameterised statement against PostgreSQL, psycopg
  loaded on first use (`sql.py`).

The executors are imported on first use (PEP 562): a pool process starts as
`python -m loom_worker.executors._pyhost`, which imports this package, and must not pay
for httpx (~0.2 s) or asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import BASE_ENV_NAMES, LogSink, NodeCall, NodeFailed, NodeResult, base_env

if TYPE_CHECKING:
    from .http import CircuitBreaker, HttpExecutor
    from .python import PythonPool
    from .run import ShellExecutor
    from .sql import SqlExecutor

__all__ = [
    "BASE_ENV_NAMES",
    "CircuitBreaker",
    "HttpExecutor",
    "LogSink",
    "NodeCall",
    "NodeFailed",
    "NodeResult",
    "PythonPool",
    "ShellExecutor",
    "SqlExecutor",
    "base_env",
]

_LAZY = {
    "CircuitBreaker": "http",
    "HttpExecutor": "http",
    "PythonPool": "python",
    "ShellExecutor": "run",
    "SqlExecutor": "sql",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
