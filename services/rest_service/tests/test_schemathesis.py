"""Schemathesis against the running service's own OpenAPI document: bounded generated
requests to every operation find no 5xx and no answer that breaks the document."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from loom_db.migrate import upgrade_sync
from loom_rest.openapi import openapi_document
from loom_rest.routes import ENDPOINTS
from loom_rest.routes.meta import VERSION

SECRET_KEY = "schemathesis-secret-key-" + "s" * 32
PASSWORD = "schemathesis admin password"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`python -m loom_rest` on SQLite and the memory broker: (base URL, admin token)."""
    directory = tmp_path_factory.mktemp("rest")
    url = f"sqlite+aiosqlite:///{directory / 'loom.db'}"
    upgrade_sync(url)
    port = _free_port()
    env = {
        **os.environ,
        "LOOM_DATABASE_URL": url,
        "LOOM_QUEUE_URL": "memory://",
        "LOOM_EVENTS_URL": "memory://",
        "LOOM_SECRET_KEY": SECRET_KEY,
        "LOOM_ADMIN_PASSWORD": PASSWORD,
        "LOOM_REST_HOST": "127.0.0.1",
        "LOOM_REST_PORT": str(port),
        "LOOM_LOG_LEVEL": "WARNING",
    }
    log = (directory / "service.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "loom_rest"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start: {_read(directory)}")
            time.sleep(0.1)
        answer = httpx.post(
            f"{base}/api/v1/auth/login", json={"username": "admin", "password": PASSWORD}
        )
        answer.raise_for_status()
        yield base, answer.json()["access_token"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def _read(directory: Path) -> str:
    return (directory / "service.log").read_text(errors="replace")[-3000:]


# The document the service serves at /api/v1/openapi.json (test_openapi.py checks they are
# the same), loaded at import so that pytest lists one test per operation, each with its
# own id (schemathesis' own parametrization gives every case the same node id, which
# pytest-xdist's per-file scheduling then runs once instead of once per operation).
schema = schemathesis.openapi.from_dict(openapi_document(ENDPOINTS, VERSION))
OPERATIONS = {
    f"{operation.method.upper()} {operation.path}": operation
    for operation in (result.ok() for result in schema.get_all_operations())
    # Logging out would end the admin session that every other case uses.
    if operation.path != "/api/v1/auth/logout"
}


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_operation_answers_5xx_or_breaks_its_schema(
    label: str, service: tuple[str, str]
) -> None:
    base, token = service

    @settings(
        max_examples=8,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(case=OPERATIONS[label].as_strategy())
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=base,
            headers={"Authorization": f"Bearer {token}"},
            # Schema-valid is not always acceptable: params that do not fit the graph, a
            # password the policy refuses, a wrong old password are 422 by design.
            excluded_checks=[schemathesis.checks.positive_data_acceptance],
        )

    check()
