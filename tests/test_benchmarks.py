"""The benchmarks run from the README's command and print their figures as JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {
    "benchmark",
    "name",
    "value",
    "unit",
    "baseline",
    "baseline_name",
    "ratio",
    "target",
    "n",
    "quick",
}


def test_engine_benchmark_quick_prints_b1_and_b2() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/engine.py", "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    figures = [json.loads(line) for line in result.stdout.splitlines()]
    assert [f["benchmark"] for f in figures] == ["B1", "B2"]
    for figure in figures:
        assert FIELDS <= set(figure)
        assert figure["value"] > 0 and figure["baseline"] > 0 and figure["quick"] is True


def test_db_logs_benchmark_quick_prints_bdb() -> None:
    if not os.environ.get("LOOM_TEST_POSTGRES_URL"):
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail("LOOM_TEST_POSTGRES_URL is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("LOOM_TEST_POSTGRES_URL is not set: the Bdb benchmark needs PostgreSQL")
    result = subprocess.run(
        [sys.executable, "benchmarks/db_logs.py", "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    figures = [json.loads(line) for line in result.stdout.splitlines()]
    assert [f["benchmark"] for f in figures] == ["Bdb", "Bdb"]
    for figure in figures:
        assert FIELDS <= set(figure)
        assert figure["value"] > 0 and figure["baseline"] > 0


def test_messaging_benchmark_quick_prints_bmsg() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/messaging.py",
            "--quick",
            "--repeat",
            "1",
            "--only",
            "memory,relay",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    figures = [json.loads(line) for line in result.stdout.splitlines()]
    assert figures and all(f["benchmark"] == "Bmsg" for f in figures)
    assert all(f["value"] > 0 for f in figures)


def test_rest_benchmark_quick_prints_brest_for_get_and_post() -> None:
    if not os.environ.get("LOOM_TEST_POSTGRES_URL"):
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail("LOOM_TEST_POSTGRES_URL is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("LOOM_TEST_POSTGRES_URL is not set: the Brest benchmark needs PostgreSQL")
    result = subprocess.run(
        [sys.executable, "benchmarks/rest.py", "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    figures = [json.loads(line) for line in result.stdout.splitlines()]
    assert [f["benchmark"] for f in figures] == ["Brest", "Brest"]
    assert [f["name"].split()[0] for f in figures] == ["GET", "POST"]
    for figure in figures:
        assert FIELDS | {"p99_ms", "baseline_p99_ms"} <= set(figure)
        assert figure["value"] > 0 and figure["baseline"] > 0 and figure["ratio"] > 0
        assert figure["p99_ms"] > 0 and figure["baseline_p99_ms"] > 0
        assert figure["quick"] is True
