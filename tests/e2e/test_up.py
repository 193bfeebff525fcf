"""`loom up` as a newcomer meets it: the first start creates `.loom/` (database, a secret
key only its owner reads), prints the URLs, the admin login and the next step; a second
start reuses them and prints no password; Ctrl-C stops it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .harness import free_port, until

pytestmark = pytest.mark.slow


def _start(tmp: Path, port: int, ws_port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    return subprocess.Popen(
        [sys.executable, "-m", "loom_cli", "up", "--port", str(port), "--ws-port", str(ws_port)],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _until_up(proc: subprocess.Popen[str]) -> list[str]:
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C stops."):
            return lines
    raise AssertionError("loom up ended before it was up:\n" + "\n".join(lines))


def _interrupt(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def test_loom_up_starts_in_a_fresh_directory_prints_the_way_in_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    port, ws_port = free_port(), free_port()
    began = time.monotonic()
    proc = _start(tmp_path, port, ws_port)
    try:
        lines = _until_up(proc)
        print(f"loom up: ready in {time.monotonic() - began:.2f}s (process start to banner)")
        text = "\n".join(lines)
        assert f"http://127.0.0.1:{port}/api/v1/" in text
        assert f"ws://127.0.0.1:{ws_port}/ws/executions/" in text
        login = next(line for line in lines if "login" in line and "admin /" in line)
        password = login.split("admin /")[1].split()[0]
        assert "loom apply -f examples/hello.yaml" in text
        key = tmp_path / ".loom" / "secret_key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert (tmp_path / ".loom" / "loom.db").exists()
        answer = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/auth/login",
            json={"username": "admin", "password": password},
        )
        assert answer.status_code == 200
        index = httpx.get(f"http://127.0.0.1:{port}/api/v1/").json()
        assert index["ws_url"] == f"ws://127.0.0.1:{ws_port}"
        code, rest = _interrupt(proc)
        assert code == 0, rest
        assert "Traceback" not in rest

        # Again: the same key and users, no new password.
        proc = _start(tmp_path, port, ws_port)
        again = "\n".join(_until_up(proc))
        assert "admin /" not in again
        until(
            lambda: (
                httpx.post(
                    f"http://127.0.0.1:{port}/api/v1/auth/login",
                    json={"username": "admin", "password": password},
                ).status_code
                == 200
            ),
            what="the old password to work",
        )
        code, rest = _interrupt(proc)
        assert code == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_loom_up_with_a_bad_setting_says_which_and_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env["LOOM_WORKER_SLOTS"] = "many"
    done = subprocess.run(
        [sys.executable, "-m", "loom_cli", "up", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "worker_slots" in done.stderr.lower() or "LOOM_WORKER_SLOTS" in done.stderr


def test_loom_up_on_a_port_in_use_says_so_and_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "loom_cli",
                "up",
                "--port",
                str(free_port()),
                "--ws-port",
                str(port),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    assert f"127.0.0.1:{port}" in done.stderr and "--ws-port" in done.stderr
    assert "Traceback" not in done.stderr
