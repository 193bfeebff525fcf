"""`python -m loom_webhook` as its image runs it: it serves, refuses a 100 MiB body without
reading it, answers 503 while its PostgreSQL is stopped and recovers by itself, and
stops on SIGTERM with exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from loom_db import create_database
from loom_db.migrate import upgrade
from loom_db.testing import private_postgres
from loom_webhook import github_signature

from .conftest import HOOK_SECRET, SECRET_KEY, install

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def webhook_service(
    database_url: str, tmp_path: Path
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env |= {
        "LOOM_DATABASE_URL": database_url,
        "LOOM_SECRET_KEY": SECRET_KEY,
        "LOOM_WEBHOOK_HOST": HOST,
        "LOOM_WEBHOOK_PORT": str(port),
        "LOOM_QUEUE_URL": "memory://",
        "LOOM_EVENTS_URL": "memory://",
        "LOOM_WEBHOOK_CACHE_SECONDS": "0",
    }
    log = (tmp_path / "webhook.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom_webhook"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "webhook.log").read_text()
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "the webhook service did not start"
                time.sleep(0.1)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def post(
    port: int, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"http://{HOST}:{port}{path}", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"{}")


def signed(body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": github_signature(HOOK_SECRET, body),
    }


PUSH = json.dumps({"ref": "refs/heads/main", "after": "abc", "commits": []}).encode()


@pytest.mark.slow
def test_serves_refuses_a_huge_body_unread_and_stops_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/loom.db"

    async def prepare() -> None:
        database = create_database(url)
        try:
            await upgrade(database)
            await install(database)
        finally:
            await database.dispose()

    asyncio.run(prepare())
    with webhook_service(url, tmp_path) as (port, proc):
        status, answer = post(port, "/hooks/app/github", PUSH, signed(PUSH))
        assert status == 202, answer

        # Declares 100 MiB and sends none of it: the answer comes at once.
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(
                b"POST /hooks/app/github HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n"
            )
            head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 413"), head

        # Chunked, no length: refused once past the limit, long before 100 MiB.
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(
                b"POST /hooks/app/github HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
            sent = 0
            sock.settimeout(0.05)
            head = b""
            while sent < 100 * 1024 * 1024 and not head:
                try:
                    sock.sendall(chunk)
                    sent += 65536
                    head = sock.recv(4096)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            sock.settimeout(10)
            if not head:
                head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 413"), head
        assert sent < 8 * 1024 * 1024

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_database_stopped_gives_503_then_recovers(tmp_path: Path) -> None:
    with private_postgres() as server:

        async def prepare() -> None:
            database = create_database(server.url)
            try:
                await upgrade(database)
                await install(database)
            finally:
                await database.dispose()

        asyncio.run(prepare())
        with webhook_service(server.url, tmp_path) as (port, proc):
            assert post(port, "/hooks/app/github", PUSH, signed(PUSH))[0] == 202

            server.stop()
            headers = signed(PUSH)
            status, answer = post(port, "/hooks/app/github", PUSH, headers)
            assert status == 503, answer
            assert answer["status"] == 503
            with pytest.raises(urllib.error.HTTPError) as not_ready:
                urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=10)
            assert not_ready.value.code == 503
            not_ready.value.close()

            server.start()
            # The same delivery, retried by its sender, is accepted once the database is back.
            deadline = time.monotonic() + 30
            while (status := post(port, "/hooks/app/github", PUSH, headers)[0]) == 503:
                assert time.monotonic() < deadline
                time.sleep(0.5)
            assert status == 202
            assert proc.poll() is None
