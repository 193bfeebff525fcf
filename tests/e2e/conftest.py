"""The system fixture: `loom` runs it embedded (`loom up`) and distributed (a process per
service on PostgreSQL, RabbitMQ and Kafka); see harness.py. When a test fails, the tail
of every process's log is printed with it."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Loom, distributed, embedded


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, Any]:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(params=["embedded", "distributed"])
def loom(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Loom]:
    start = embedded if request.param == "embedded" else distributed
    started = start(tmp_path)
    system = next(started)
    yield system
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        print(system.logs())
    started.close()
