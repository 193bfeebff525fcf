"""The whole system as a user meets it, for the end-to-end and fault tests.

* `embedded`: `loom up` as one subprocess (SQLite and the memory brokers).
* `distributed`: each service as its own process (`python -m loom_<service>`: REST,
  webhook, websocket, two workers, two timer replicas) on a private PostgreSQL database,
  RabbitMQ for the work queue and the Kafka broker for the events, under a private broker
  prefix.

Clients are what users have: the `loom` command, plain HTTP and a `websockets` client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from loom_db.testing import require_services, scratch_database

SECRET_KEY = "e2e-secret-key-" + "e" * 40
PASSWORD = "e2e-admin-password-long-enough"
WAIT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def service_url(variable: str) -> str:
    url = os.environ.get(variable)
    if not url:
        if require_services():
            pytest.fail(f"{variable} is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip(f"{variable} is not set: distributed end-to-end tests skipped")
    return url


def until(check: Any, timeout: float = WAIT, what: str = "condition") -> Any:
    """`check()`'s first truthy answer, polled every 0.1 s for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    health: str | None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 30) -> int | None:
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()

    def wait_ready(self, timeout: float = WAIT) -> None:
        if self.health is None:
            return
        url = self.health

        def ready() -> bool:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited {self.popen.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        until(ready, timeout, f"{self.name} to be ready")


@dataclass
class Loom:
    """A running system and the ways a user reaches it."""

    mode: str
    tmp: Path
    api: str = ""
    hooks: str = ""
    ws: str = ""
    procs: dict[str, Proc] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    _token: str | None = None

    # --- processes ---------------------------------------------------------------------

    def add(self, name: str, args: list[str], health: str | None, **env: str) -> Proc:
        proc = Proc(name, args, {**self.env, **env}, self.tmp / f"{name}.log", health)
        self.procs[name] = proc
        proc.start()
        return proc

    def restart(self, name: str) -> None:
        proc = self.procs[name]
        proc.stop()
        proc.start()
        proc.wait_ready()

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.log.read_text(errors='replace')[-4000:]}"
            for p in self.procs.values()
        )

    # --- the CLI ------------------------------------------------------------------------

    def cli(
        self, *args: str, check: bool = True, timeout: float = WAIT
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LOOM_CONFIG_DIR": str(self.tmp / "config"), "LOOM_PASSWORD": PASSWORD}
        env = {k: v for k, v in env.items() if not k.startswith("LOOM_TEST")}
        done = subprocess.run(
            [sys.executable, "-m", "loom_cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"loom {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    # --- HTTP -----------------------------------------------------------------------------

    @property
    def token(self) -> str:
        if self._token is None:
            answer = httpx.post(
                f"{self.api}/api/v1/auth/login",
                json={"username": "admin", "password": PASSWORD},
                timeout=30,
            )
            answer.raise_for_status()
            self._token = str(answer.json()["access_token"])
        return self._token

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
        return httpx.request(method, f"{self.api}{path}", headers=headers, timeout=30, **kw)

    def get(self, path: str) -> Any:
        answer = self.request("GET", path)
        answer.raise_for_status()
        return answer.json()

    def execution(self, execution_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/api/v1/executions/{execution_id}")
        return result

    def finished(self, execution_id: str, timeout: float = WAIT) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            found = self.execution(execution_id)
            return found if found["status"] not in ("queued", "waiting", "running") else None

        result: dict[str, Any] = until(ended, timeout, f"execution {execution_id} to end")
        return result

    def executions(self, graph: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.get(f"/api/v1/executions?graph={graph}&limit=200")[
            "items"
        ]
        return items

    def stored_lines(self, execution_id: str) -> list[str]:
        return [
            line["text"] for line in self.get(f"/api/v1/executions/{execution_id}/logs")["items"]
        ]

    def webhook(
        self, graph: str, name: str, secret: str, payload: dict[str, Any], *, event: str = "push"
    ) -> httpx.Response:
        body = orjson.dumps(payload)
        signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return httpx.post(
            f"{self.hooks}/hooks/{graph}/{name}",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-GitHub-Event": event,
                "X-GitHub-Delivery": str(uuid.uuid4()),
                "X-Hub-Signature-256": signature,
            },
            timeout=30,
        )

    def follow(self, execution_id: str, after: int = 0) -> tuple[list[dict[str, Any]], int | None]:
        """Every frame of a WebSocket follow until the server closes it, and the code."""

        async def read() -> tuple[list[dict[str, Any]], int | None]:
            frames: list[dict[str, Any]] = []
            url = f"{self.ws}/ws/executions/{execution_id}?after={after}"
            headers = {"Authorization": f"Bearer {self.token}"}
            async with connect(
                url, additional_headers=headers, compression=None, max_size=None
            ) as ws:
                with contextlib.suppress(ConnectionClosed):
                    async for message in ws:
                        frames.append(orjson.loads(message))
            return frames, ws.close_code

        return asyncio.run(asyncio.wait_for(read(), WAIT))


def embedded(tmp: Path) -> Iterator[Loom]:
    port, ws_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env |= {
        "LOOM_ADMIN_PASSWORD": PASSWORD,
        "LOOM_SECRET_KEY": SECRET_KEY,
        "LOOM_SHUTDOWN_GRACE": "3",
    }
    loom = Loom("embedded", tmp, env=env)
    loom.api = loom.hooks = f"http://127.0.0.1:{port}"
    loom.ws = f"ws://127.0.0.1:{ws_port}"
    proc = loom.add(
        "loom-up",
        [
            sys.executable,
            "-m",
            "loom_cli",
            "up",
            "--port",
            str(port),
            "--ws-port",
            str(ws_port),
            "--data-dir",
            str(tmp / ".loom"),
        ],
        f"{loom.api}/readyz",
    )
    try:
        proc.wait_ready()
        yield loom
    finally:
        loom.close()


def distributed(
    tmp: Path,
    workers: int = 2,
    timers: int = 2,
    *,
    postgres: str | None = None,
    amqp: str | None = None,
    **env_overrides: str,
) -> Iterator[Loom]:
    """The system as separate processes. `postgres` / `amqp`: a private server's URL (a
    fault test stops it) instead of the shared one; `env_overrides`: more LOOM_* values."""
    amqp = amqp or service_url("LOOM_TEST_AMQP_URL")
    kafka = service_url("LOOM_TEST_KAFKA_URL")
    base = postgres or service_url("LOOM_TEST_POSTGRES_URL")
    with scratch_database(base, prefix="loom_e2e") as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
        ports = {name: free_port() for name in ("rest", "webhook", "websocket")}
        env |= {
            "LOOM_DATABASE_URL": url,
            "LOOM_QUEUE_URL": amqp,
            "LOOM_EVENTS_URL": kafka,
            "LOOM_BROKER_PREFIX": f"e2e-{uuid.uuid4().hex[:10]}",
            "LOOM_SECRET_KEY": SECRET_KEY,
            "LOOM_ADMIN_PASSWORD": PASSWORD,
            "LOOM_SHUTDOWN_GRACE": "3",
            "LOOM_LEASE_SECONDS": "6",
            "LOOM_REST_PUBLIC_WS_URL": f"ws://127.0.0.1:{ports['websocket']}",
            **env_overrides,
        }
        loom = Loom("distributed", tmp, env=env)
        loom.api = f"http://127.0.0.1:{ports['rest']}"
        loom.hooks = f"http://127.0.0.1:{ports['webhook']}"
        loom.ws = f"ws://127.0.0.1:{ports['websocket']}"
        migrate = subprocess.run(
            [sys.executable, "-m", "loom_db", "upgrade"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert migrate.returncode == 0, migrate.stderr
        try:
            started = [
                loom.add(
                    "rest",
                    [sys.executable, "-m", "loom_rest"],
                    f"{loom.api}/readyz",
                    LOOM_REST_PORT=str(ports["rest"]),
                ),
                loom.add(
                    "webhook",
                    [sys.executable, "-m", "loom_webhook"],
                    f"{loom.hooks}/readyz",
                    LOOM_WEBHOOK_PORT=str(ports["webhook"]),
                ),
                loom.add(
                    "websocket",
                    [sys.executable, "-m", "loom_websocket"],
                    f"http://127.0.0.1:{ports['websocket']}/readyz",
                    LOOM_WEBSOCKET_PORT=str(ports["websocket"]),
                ),
            ]
            for i in range(workers):
                port = free_port()
                started.append(
                    loom.add(
                        f"worker-{i}",
                        [sys.executable, "-m", "loom_worker"],
                        f"http://127.0.0.1:{port}/readyz",
                        LOOM_WORKER_PORT=str(port),
                        LOOM_WORKER_ID=f"worker-{i}",
                        LOOM_WORKER_SLOTS="4",
                    )
                )
            for i in range(timers):
                port = free_port()
                started.append(
                    loom.add(
                        f"timer-{i}",
                        [sys.executable, "-m", "loom_timer"],
                        f"http://127.0.0.1:{port}/readyz",
                        LOOM_TIMER_PORT=str(port),
                    )
                )
            for proc in started:
                proc.wait_ready()
            yield loom
        finally:
            loom.close()
