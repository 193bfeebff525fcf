"""The benchmarks run from the README's command and print their figures as JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def needs_postgres(benchmark: str) -> None:
    if not os.environ.get("LOOM_TEST_POSTGRES_URL"):
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail("LOOM_TEST_POSTGRES_URL is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip(f"LOOM_TEST_POSTGRES_URL is not set: the {benchmark} benchmark needs it")


def figures_of(script: str, *args: str) -> list[dict[str, Any]]:
    """Run `benchmarks/SCRIPT --quick --repeat 1 ARGS` as the README does; its JSON lines."""
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick", "--repeat", "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_engine_benchmark_quick_prints_b1_and_b2() -> None:
    figures = figures_of("engine.py")
    assert [f["benchmark"] for f in figures] == ["B1", "B2"]
    for figure in figures:
        assert FIELDS <= set(figure)
        assert figure["value"] > 0 and figure["baseline"] > 0 and figure["quick"] is True


def test_db_logs_benchmark_quick_prints_bdb() -> None:
    needs_postgres("Bdb")
    figures = figures_of("db_logs.py")
    assert [f["benchmark"] for f in figures] == ["Bdb", "Bdb"]
    for figure in figures:
        assert FIELDS <= set(figure)
        assert figure["value"] > 0 and figure["baseline"] > 0


def test_messaging_benchmark_quick_prints_bmsg() -> None:
    figures = figures_of("messaging.py", "--only", "memory,relay")
    assert figures and all(f["benchmark"] == "Bmsg" for f in figures)
    assert all(f["value"] > 0 for f in figures)


def test_rest_benchmark_quick_prints_brest_for_get_and_post() -> None:
    needs_postgres("Brest")
    figures = figures_of("rest.py")
    assert [f["benchmark"] for f in figures] == ["Brest", "Brest"]
    assert [f["name"].split()[0] for f in figures] == ["GET", "POST"]
    for figure in figures:
        assert FIELDS | {"p99_ms", "baseline_p99_ms"} <= set(figure)
        assert figure["value"] > 0 and figure["baseline"] > 0 and figure["ratio"] > 0
        assert figure["p99_ms"] > 0 and figure["baseline_p99_ms"] > 0
        assert figure["quick"] is True


def test_timers_benchmark_quick_prints_b6_delay_idle_cpu_and_replicas() -> None:
    needs_postgres("B6")
    figures = figures_of("timers.py")
    assert [f["benchmark"] for f in figures] == ["B6", "B6", "B6"]
    delay, idle, replicas = figures
    for figure in figures:
        assert FIELDS <= set(figure) and figure["quick"] is True and figure["n"] > 0
    assert delay["unit"] == "ms" and delay["value"] == delay["p99"] >= delay["p50"] > 0
    assert delay["baseline"] > 0 and delay["ratio"] > 0
    assert idle["value"] > 0 and idle["baseline"] > 0
    assert replicas["value"] == 0  # no tick missed, none fired twice


def test_webhooks_benchmark_quick_prints_b4() -> None:
    needs_postgres("B4")
    (figure,) = figures_of("webhooks.py")
    assert figure["benchmark"] == "B4" and FIELDS <= set(figure)
    assert figure["value"] > 0 and figure["baseline"] > 0 and figure["ratio"] > 0
    assert figure["p99"] >= figure["p50"] > 0
    assert figure["stored"] >= figure["n"]  # every 202 was one stored execution
    assert figure["service_cpu_ms_per_delivery"] > 0 and figure["quick"] is True


def test_latency_benchmark_quick_prints_b3_and_b1d() -> None:
    needs_postgres("B3")
    if not os.environ.get("LOOM_TEST_AMQP_URL"):
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail("LOOM_TEST_AMQP_URL is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("LOOM_TEST_AMQP_URL is not set: B3 needs RabbitMQ")
    figures = figures_of("latency.py")
    assert [f["benchmark"] for f in figures] == ["B3", "B1d"]
    b3, b1d = figures
    for figure in figures:
        assert FIELDS <= set(figure) and figure["quick"] is True
    assert b3["unit"] == "ms" and b3["p99"] >= b3["p50"] == b3["value"] > 0
    assert b3["baseline"] > 0
    assert b1d["unit"] == "ms/node" and b1d["value"] > 0 and b1d["n"] == 40


def test_live_logs_benchmark_quick_prints_b5_with_every_line_to_every_follower() -> None:
    """It exits 0 only if every follower got every line in order (memory run: no service
    needed; the Kafka run is left to the full benchmark, to stay under a minute)."""
    figures = figures_of("live_logs.py", "--only", "memory")
    assert [f["benchmark"] for f in figures] == ["B5", "B5"]
    throughput, memory = figures
    for figure in figures:
        assert FIELDS <= set(figure) and figure["quick"] is True
    assert throughput["unit"].startswith("lines/s per follower") and throughput["n"] == 10_000
    assert throughput["value"] > 0 and throughput["value_20"] > 0 and throughput["p99"] > 0
    assert throughput["baseline"] > 0 and throughput["ratio"] > 0
    assert memory["unit"] == "KiB RSS per connection" and memory["n"] == 100


def test_idle_memory_benchmark_quick_prints_b7_for_each_service() -> None:
    figures = figures_of("idle_memory.py")
    assert [f["benchmark"] for f in figures] == ["B7"] * 5
    assert [f["name"] for f in figures] == [
        f"idle {service}" for service in ("rest", "webhook", "timer", "worker", "websocket")
    ]
    for figure in figures:
        assert FIELDS | {"uss", "bare_python"} <= set(figure) and figure["quick"] is True
        assert figure["unit"] == "MB" and figure["value"] >= figure["uss"] > 0
        assert figure["baseline"] > figure["bare_python"] > 0 and figure["ratio"] > 0
