"""`python -m loom_rest` as an operator runs it: refuses to start without a secret key,
shows a generated admin password once, serves, and exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loom_db.migrate import upgrade_sync


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update(
        LOOM_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'loom.db'}",
        LOOM_QUEUE_URL="memory://",
        LOOM_EVENTS_URL="memory://",
        LOOM_REST_HOST="127.0.0.1",
        LOOM_REST_PORT=str(_free_port()),
    )
    env.update(extra)
    return env


def test_missing_secret_key_stops_the_service_with_a_clear_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loom_rest"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "LOOM_SECRET_KEY is not set" in done.stderr


def test_serves_shows_the_generated_admin_password_once_and_exits_0_on_sigterm(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path, LOOM_SECRET_KEY="serve-test-secret-key-" + "k" * 30)
    upgrade_sync(env["LOOM_DATABASE_URL"])
    base = f"http://127.0.0.1:{env['LOOM_REST_PORT']}"
    log_path = tmp_path / "service.log"

    def start() -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "loom_rest"], env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    return process
            except httpx.TransportError:
                pass
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)

    process = start()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    first_log = log_path.read_text()
    marker = "created user admin with the generated password "
    assert first_log.count(marker) == 1, first_log
    password = first_log.split(marker)[1].split()[0]
    process = start()  # a second start creates nothing and shows nothing
    try:
        answer = httpx.post(
            f"{base}/api/v1/auth/login", json={"username": "admin", "password": password}
        )
        assert answer.status_code == 200, answer.text
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert log_path.read_text().count(marker) == 1
