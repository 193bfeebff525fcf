"""Log output as people and log collectors see it: console lines, JSON lines, bound context."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from loom_common.logs import (
    bind_log_context,
    configure_logging,
    current_log_context,
    log_context,
    reset_log_context,
)

log = logging.getLogger("loom.worker")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """configure_logging changes the root logger; give the next test the one it had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_context_inside_and_not_outside() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)

    with log_context(execution_id="ex_1", node="build"):
        log.info("node %s started", "build")
    log.info("idle")

    inside, outside = json_lines(out)
    assert inside["message"] == "node build started"
    assert inside["level"] == "INFO"
    assert inside["logger"] == "loom.worker"
    assert (inside["execution_id"], inside["node"]) == ("ex_1", "build")
    assert outside["message"] == "idle"
    assert "execution_id" not in outside
    assert "node" not in outside


def test_json_timestamp_is_utc_iso8601_with_z() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)

    log.warning("now")

    (line,) = json_lines(out)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    stamp = datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - stamp) < timedelta(seconds=5)


def test_json_includes_extra_fields_and_exception_text() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)

    with log_context(execution_id="ex_1", attempt=1):
        try:
            raise RuntimeError("disk full")
        except RuntimeError:
            log.exception("node failed", extra={"attempt": 2, "exit_code": 1})

    (line,) = json_lines(out)
    assert line["level"] == "ERROR"
    assert line["exit_code"] == 1
    assert line["attempt"] == 2  # `extra` wins over the bound context
    assert line["execution_id"] == "ex_1"
    assert "Traceback" in line["exc_info"]
    assert "RuntimeError: disk full" in line["exc_info"]


def test_json_survives_values_orjson_cannot_encode() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out)

    log.info("odd", extra={"obj": object(), "huge": 2**70, "level": "shadow"})

    (line,) = json_lines(out)
    assert line["level"] == "INFO"
    assert line["field_level"] == "shadow"
    assert line["huge"] == str(2**70)
    assert line["obj"].startswith("<object object")


def test_console_line_is_readable() -> None:
    out = io.StringIO()
    configure_logging("console", stream=out)

    with log_context(execution_id="ex_1", node="build"):
        log.info("node finished", extra={"reason": "exit 0"})

    line = out.getvalue().rstrip("\n")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO  loom\.worker  node finished  "
        r'reason="exit 0" execution_id=ex_1 node=build',
        line,
    ), line


def test_console_prints_traceback_after_the_line() -> None:
    out = io.StringIO()
    configure_logging("console", stream=out)

    try:
        raise ValueError("bad input")
    except ValueError:
        log.exception("failed")

    first, *rest = out.getvalue().splitlines()
    assert first.endswith("ERROR loom.worker  failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: bad input"


def test_configure_logging_twice_keeps_one_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("console", stream=first)
    configure_logging("json", level="DEBUG", stream=second)

    log.debug("once")

    assert first.getvalue() == ""
    assert [line["message"] for line in json_lines(second)] == ["once"]
    ours = [
        h for h in logging.getLogger().handlers if getattr(h, "stream", None) in (first, second)
    ]
    assert len(ours) == 1


def test_level_filters_records_below_it() -> None:
    out = io.StringIO()
    configure_logging("json", level="warning", stream=out)

    log.info("quiet")
    log.warning("loud")

    assert [line["message"] for line in json_lines(out)] == ["loud"]


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        configure_logging(level="LOUD")


def test_nested_contexts_add_fields_and_unwind() -> None:
    with log_context(execution_id="ex_1"):
        with log_context(node="build"):
            assert current_log_context() == {"execution_id": "ex_1", "node": "build"}
        assert current_log_context() == {"execution_id": "ex_1"}
    assert current_log_context() == {}


def test_bind_and_reset_log_context() -> None:
    token = bind_log_context(execution_id="ex_9")
    assert current_log_context() == {"execution_id": "ex_9"}
    reset_log_context(token)
    assert current_log_context() == {}


def test_reserved_record_attributes_cannot_be_bound() -> None:
    with pytest.raises(ValueError, match="reserved log record attributes: msg, name"):
        bind_log_context(name="x", msg="y")


async def test_concurrent_tasks_keep_their_own_context() -> None:
    """Two executions on one event loop never see each other's fields."""
    out = io.StringIO()
    configure_logging("json", stream=out)

    async def run(execution_id: str) -> None:
        with log_context(execution_id=execution_id):
            for step in range(3):
                await asyncio.sleep(0)
                log.info("step", extra={"step": step, "task": execution_id})

    await asyncio.gather(run("ex_a"), run("ex_b"))

    lines = json_lines(out)
    assert len(lines) == 6
    assert all(line["execution_id"] == line["task"] for line in lines)
