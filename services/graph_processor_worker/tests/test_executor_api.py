"""The public surface of `loom_worker.executors`."""

from __future__ import annotations

import loom_worker.executors as executors


def test_the_public_names_are_pinned() -> None:
    assert sorted(executors.__all__) == [
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
    for name in executors.__all__:
        assert getattr(executors, name) is not None
