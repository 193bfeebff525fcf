"""Each service's start path stays light (DESIGN §10, B7: <= 120 MB RSS idle).

Every service is started alone, as its image runs it (`python -m loom_<service>`, on a
migrated SQLite database and the memory brokers), under `python -X importtime`; once its
`/readyz` answers 200 it is stopped, and the modules it imported on the way are read from
that trace. None may be one of the heavy modules it does not need to start: networkx
(graph validation: applying a graph), Alembic (migrations: `python -m loom_db upgrade`),
httpx (the worker's `http` nodes, ~7 MB with what its `__init__` pulls in), the RabbitMQ
and Kafka clients (memory brokers here), and for the timer and the websocket service,
which never read a graph, Jinja2 and PyYAML. A failure names the chain of imports that
brought the module in: make that import lazy again (inside the function that needs it,
or a PEP 562 `__getattr__` in the package's `__init__`).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
HEAVY_EVERYWHERE = frozenset({"networkx", "alembic", "httpx", "aio_pika", "aiokafka"})
HEAVY = {
    "rest": HEAVY_EVERYWHERE,
    "webhook": HEAVY_EVERYWHERE,
    "timer": HEAVY_EVERYWHERE | {"jinja2", "yaml"},
    "worker": HEAVY_EVERYWHERE,
    "websocket": HEAVY_EVERYWHERE | {"jinja2", "yaml"},
}
# `import time:  self [us] | cumulative | <2 spaces per level>module`
_TRACE_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| ( *)(\S+)$")


def _plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="loom-imports-") as directory:
        url = f"sqlite+aiosqlite:///{directory}/loom.db"
        migrated = subprocess.run(
            [sys.executable, "-m", "loom_db", "upgrade", "--database-url", url],
            env=_plain_env(),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        assert migrated.returncode == 0, migrated.stderr
        yield url


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_trace(service: str, database_url: str) -> list[tuple[int, str]]:
    """(depth, module) of every import of `python -X importtime -m loom_<service>` from
    its start until it is ready and stopped, children before their parent."""
    port = _free_port()
    env = _plain_env()
    env.update(
        LOOM_DATABASE_URL=database_url,
        LOOM_SECRET_KEY=secrets.token_urlsafe(48),
        LOOM_ADMIN_PASSWORD=secrets.token_urlsafe(24),
        LOOM_QUEUE_URL="memory://",
        LOOM_EVENTS_URL="memory://",
        LOOM_LOG_LEVEL="WARNING",
        **{f"LOOM_{service.upper()}_HOST": HOST, f"LOOM_{service.upper()}_PORT": str(port)},
    )
    with tempfile.TemporaryFile() as trace:
        process = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", f"loom_{service}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=trace,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not _ready(port):
                assert process.poll() is None, f"loom_{service} exited {process.returncode}"
                assert time.monotonic() < deadline, f"loom_{service} was not ready in time"
                time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=START_TIMEOUT)
        trace.seek(0)
        lines = trace.read().decode(errors="replace").splitlines()
    entries = []
    for line in lines:
        match = _TRACE_LINE.match(line)
        if match:
            entries.append((len(match[1]) // 2, match[2]))
    return entries


def import_chain(entries: list[tuple[int, str]], index: int) -> str:
    """`yaml <- loom_common.source <- ... <- loom_timer`: who imported `entries[index]`
    (its parent is the next entry of a smaller depth)."""
    chain = [entries[index][1]]
    depth = entries[index][0]
    for level, module in entries[index + 1 :]:
        if level < depth:
            chain.append(module)
            depth = level
    return " <- ".join(chain)


@pytest.mark.parametrize("service", sorted(HEAVY))
def test_a_service_starts_without_the_heavy_modules_it_does_not_need(
    service: str, database_url: str
) -> None:
    entries = start_trace(service, database_url)
    imported = {module for _, module in entries}
    assert {f"loom_{service}", "sqlalchemy", "prometheus_client"} <= imported  # a real trace
    heavy = [import_chain(entries, i) for i, (_, m) in enumerate(entries) if m in HEAVY[service]]
    assert not heavy, "\n".join(heavy)


def test_the_trace_names_who_imported_a_module() -> None:
    entries = [(2, "yaml.error"), (1, "yaml"), (1, "re"), (0, "loom_common.source")]
    assert import_chain(entries, 0) == "yaml.error <- yaml <- loom_common.source"
    assert import_chain(entries, 2) == "re <- loom_common.source"


def test_the_trace_of_a_real_start_is_parsed() -> None:
    """Guards the pattern against a change of `-X importtime`'s format."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    names = [m[2] for line in result.stderr.splitlines() if (m := _TRACE_LINE.match(line))]
    assert "json" in names and "json.decoder" in names
