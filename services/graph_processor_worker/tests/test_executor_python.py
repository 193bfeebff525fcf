"""The `python` executor: `PythonPool` against real pool processes."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loom_worker.executors import BASE_ENV_NAMES, NodeCall, NodeFailed, PythonPool

TARGETS = str(Path(__file__).parent)
CALL = NodeCall(execution_id="exec-1", node="deploy", attempt=1)


class Lines:
    """A LogSink that keeps what it is given."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def __call__(self, stream: str, text: str) -> None:
        self.items.append((stream, text))


def is_gone(pid: int) -> bool:
    """Dead, or a zombie nobody reaped (PID 1 of a container may not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def wait_gone(pids: list[int], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not all(is_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if not is_gone(p)]}"
        await asyncio.sleep(0.05)


def text_of(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def wait_for_file(path: Path, seconds: float = 10.0) -> str:
    deadline = time.monotonic() + seconds
    while not (text := text_of(path)):
        assert time.monotonic() < deadline, f"{path} never written"
        await asyncio.sleep(0.02)
    return text


@pytest.fixture
async def exec_pool() -> AsyncIterator[PythonPool]:
    async with PythonPool(2, sys_path=[TARGETS], kill_grace=0.5) as pool:
        yield pool


async def call(
    pool: PythonPool, target: str, log: Lines | None = None, /, **kwargs: object
) -> object:
    result = await pool.call(target, kwargs, call=CALL, log=log or Lines())
    return result.outputs["result"]


async def test_the_return_value_is_the_result(exec_pool: PythonPool) -> None:
    result = await exec_pool.call("pyhost_targets:add", {"a": 2, "b": 3}, call=CALL, log=Lines())
    assert result.outputs == {"result": 5}


async def test_an_async_function_is_awaited(exec_pool: PythonPool) -> None:
    assert await call(exec_pool, "pyhost_targets:async_add", a=1, b=2) == 3


async def test_prints_and_logging_are_the_node_log_in_order(exec_pool: PythonPool) -> None:
    log = Lines()
    assert await call(exec_pool, "pyhost_targets:chatty", log) == "done"
    assert log.items == [
        ("stdout", "printed first"),
        ("stderr", "WARNING pyhost_targets: logged second"),
        ("stderr", "printed third"),
        ("stderr", "INFO pyhost_targets: info is shown too"),
        ("stdout", "partial line"),
    ]


async def test_raw_writes_to_fd_1_and_2_are_logged_as_stderr(exec_pool: PythonPool) -> None:
    log = Lines()
    await call(exec_pool, "pyhost_targets:raw_writes", log)
    assert sorted(log.items) == [
        ("stderr", "from a subprocess"),
        ("stderr", "raw to fd 1"),
        ("stderr", "raw to fd 2"),
    ]


async def test_an_exception_fails_the_node_with_its_traceback_logged(
    exec_pool: PythonPool,
) -> None:
    log = Lines()
    with pytest.raises(NodeFailed) as failed:
        await call(exec_pool, "pyhost_targets:boom", log)
    assert failed.value.error == "ValueError: boom"
    assert failed.value.retryable is True
    stderr = [text for stream, text in log.items if stream == "stderr"]
    assert stderr[0] == "Traceback (most recent call last):"
    assert stderr[-1] == "ValueError: boom"
    assert any('raise ValueError("boom")' in line for line in stderr)
    assert not any("_pyhost" in line for line in stderr)


async def test_a_return_value_json_cannot_hold_fails_naming_its_type(
    exec_pool: PythonPool,
) -> None:
    with pytest.raises(NodeFailed) as failed:
        await call(exec_pool, "pyhost_targets:returns_a_set")
    assert "not JSON-serialisable" in failed.value.error and "set" in failed.value.error
    assert failed.value.retryable is False
    assert await call(exec_pool, "pyhost_targets:add", a=1) == 1  # the process lives on


@pytest.mark.parametrize(
    ("target", "kwargs", "message"),
    [
        ("no_such_module:f", {}, "cannot import module 'no_such_module': ModuleNotFoundError"),
        ("pyhost_targets:nothing", {}, "module 'pyhost_targets' has no function 'nothing'"),
        ("pyhost_targets", {}, "bad target 'pyhost_targets': expected 'module:function'"),
        ("pyhost_targets:add", {"c": 1}, "bad arguments for pyhost_targets:add"),
    ],
)
async def test_a_call_that_cannot_be_made_is_not_retried(
    exec_pool: PythonPool, target: str, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(NodeFailed) as failed:
        await exec_pool.call(target, kwargs, call=CALL, log=Lines())
    assert message in failed.value.error
    assert failed.value.retryable is False


async def test_a_module_that_fails_to_import_logs_why(tmp_path: Path) -> None:
    (tmp_path / "broken_module.py").write_text("def f(:\n")
    log = Lines()
    async with PythonPool(1, sys_path=[str(tmp_path)]) as pool:
        with pytest.raises(NodeFailed) as failed:
            await pool.call("broken_module:f", {}, call=CALL, log=log)
    assert failed.value.error.startswith("cannot import module 'broken_module': SyntaxError")
    assert failed.value.retryable is False
    assert any("SyntaxError" in text for _, text in log.items)


async def test_arguments_json_cannot_hold_are_refused(exec_pool: PythonPool) -> None:
    with pytest.raises(NodeFailed) as failed:
        await exec_pool.call("pyhost_targets:add", {"a": object()}, call=CALL, log=Lines())
    assert failed.value.retryable is False


async def test_a_pool_process_starts_without_the_other_executors(exec_pool: PythonPool) -> None:
    """The executors package imports lazily, so a pool process does not load httpx."""
    modules = await call(exec_pool, "pyhost_targets:loaded_modules")
    assert isinstance(modules, list)
    assert "httpx" not in modules and "loom_worker.executors.python" not in modules


async def test_a_process_is_reused_between_calls(exec_pool: PythonPool) -> None:
    first = await call(exec_pool, "os:getpid")
    assert await call(exec_pool, "os:getpid") == first


async def test_a_process_dying_mid_call_fails_it_and_is_replaced(exec_pool: PythonPool) -> None:
    before = await call(exec_pool, "os:getpid")
    with pytest.raises(NodeFailed) as failed:
        await call(exec_pool, "pyhost_targets:exit_hard", code=3)
    assert failed.value.error == "python process exited with code 3"
    assert failed.value.exit_code == 3
    with pytest.raises(NodeFailed) as failed:
        await call(exec_pool, "pyhost_targets:kill_myself")
    assert failed.value.error == "python process killed by SIGKILL"
    after = await call(exec_pool, "os:getpid")
    assert after != before
    assert isinstance(before, int)
    await wait_gone([before])


async def test_the_call_env_and_workdir_apply_to_that_call_only(
    exec_pool: PythonPool, tmp_path: Path
) -> None:
    with_env = NodeCall("exec-7", "deploy", 1, env={"APP_ENV": "production"}, workdir=tmp_path)
    env = await exec_pool.call("pyhost_targets:environment", {}, call=with_env, log=Lines())
    assert env.outputs["result"]["APP_ENV"] == "production"
    assert env.outputs["result"]["LOOM_EXECUTION_ID"] == "exec-7"
    cwd = await exec_pool.call("os:getcwd", {}, call=with_env, log=Lines())
    assert cwd.outputs["result"] == str(tmp_path)
    await call(exec_pool, "pyhost_targets:set_environment", name="LEAK", value="1")
    after = await call(exec_pool, "pyhost_targets:environment")
    assert isinstance(after, dict)
    assert "APP_ENV" not in after and "LEAK" not in after
    assert await call(exec_pool, "os:getcwd") != str(tmp_path)


async def test_the_processes_see_only_the_allow_listed_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOOM_SECRET_KEY", "topsecret")
    monkeypatch.setenv("DATABASE_URL", "postgresql://admin:pw@db/loom")
    async with PythonPool(1, sys_path=[TARGETS]) as pool:
        env = await call(pool, "pyhost_targets:environment")
    assert isinstance(env, dict)
    assert "LOOM_SECRET_KEY" not in env and "DATABASE_URL" not in env
    assert "topsecret" not in repr(env)
    assert env["PATH"] == os.environ["PATH"]
    assert env["PYTHONPATH"] == TARGETS
    assert set(env) <= {*BASE_ENV_NAMES, "PYTHONPATH", "LOOM_EXECUTION_ID"}


async def test_a_timeout_kills_only_its_own_process(exec_pool: PythonPool) -> None:
    slow = exec_pool.call("pyhost_targets:sleep_then", {"seconds": 100}, call=CALL, log=Lines())
    fine = exec_pool.call(
        "pyhost_targets:sleep_then", {"seconds": 1, "value": "b"}, call=CALL, log=Lines()
    )
    started = time.monotonic()
    timed_out, completed = await asyncio.gather(
        asyncio.wait_for(slow, 0.3), fine, return_exceptions=True
    )
    assert isinstance(timed_out, TimeoutError)
    assert not isinstance(completed, BaseException)
    assert completed.outputs == {"result": "b"}
    assert time.monotonic() - started < 5
    assert await call(exec_pool, "pyhost_targets:add", a=1) == 1


async def test_cancelling_a_call_kills_the_process_group(
    exec_pool: PythonPool, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids"
    task = asyncio.create_task(
        call(exec_pool, "pyhost_targets:start_subprocess_and_sleep", pid_file=str(pid_file))
    )
    pids = [int(pid) for pid in (await wait_for_file(pid_file)).split()]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_gone(pids)


async def test_a_function_ignoring_sigterm_is_killed_after_the_grace(
    exec_pool: PythonPool, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    task = asyncio.create_task(
        call(exec_pool, "pyhost_targets:ignore_sigterm_and_sleep", pid_file=str(pid_file))
    )
    pid = int(await wait_for_file(pid_file))
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 0.4 <= time.monotonic() - started < 5  # kill_grace is 0.5 s
    await wait_gone([pid])


async def test_calls_beyond_the_size_wait_for_a_free_process() -> None:
    async with PythonPool(1, sys_path=[TARGETS]) as pool:
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                pool.call("pyhost_targets:sleep_then", {"seconds": 0.2, "value": i}, call=CALL,
                          log=Lines())
                for i in range(3)
            )
        )  # fmt: skip
        assert [r.outputs["result"] for r in results] == [0, 1, 2]
        assert time.monotonic() - started >= 0.6
        assert await call(pool, "os:getpid") == await call(pool, "os:getpid")


async def test_a_waiting_call_can_be_cancelled_without_losing_the_process() -> None:
    async with PythonPool(1, sys_path=[TARGETS]) as pool:
        pid = await call(pool, "os:getpid")
        busy = asyncio.create_task(call(pool, "pyhost_targets:sleep_then", seconds=0.3))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call(pool, "os:getpid"), 0.05)
        await busy
        assert await call(pool, "os:getpid") == pid


async def test_aclose_stops_every_process() -> None:
    pool = PythonPool(2, sys_path=[TARGETS])
    pids = await asyncio.gather(call(pool, "os:getpid"), call(pool, "os:getpid"))
    await pool.aclose()
    await wait_gone([pid for pid in pids if isinstance(pid, int)], seconds=3)
    with pytest.raises(RuntimeError):
        await call(pool, "os:getpid")
