"""Every graph in examples/ runs and succeeds (the HTTP one against a local server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"zen": "Keep it logically awesome.", "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture(scope="module")
def local_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/zen"
    finally:
        server.shutdown()
        server.server_close()


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "hello.yaml",
        "fanout.yaml",
        "http-and-python.yaml",
        "retries.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_succeeds(path: Path, local_url: str) -> None:
    args = ["-p", f"url={local_url}"] if "http" in path.name else []
    result = subprocess.run(
        [sys.executable, "-m", "loom_cli", "run", str(path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "succeeded" in result.stdout


def test_http_and_python_example_summarises_the_answer(local_url: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loom_cli",
            "run",
            "examples/http-and-python.yaml",
            "-p",
            f"url={local_url}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert "show      | HTTP 200: an object with 2 keys (path, zen)" in result.stdout
    assert "summarised a dict" in result.stdout  # logging in the python node is its log


def test_retries_example_succeeds_on_the_third_try() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loom_cli", "run", "examples/retries.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0
    assert "flaky succeeded after 3 tries" in result.stdout
