"""The `run` executor against real bash/sh processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom_worker.executors import BASE_ENV_NAMES, NodeCall, NodeFailed, ShellExecutor
from loom_worker.executors.run import OUTPUT_FILE_NAME, parse_outputs

SHELL_MADE = {"PWD", "SHLVL", "_", "OLDPWD"}
"""Variables bash/sh themselves export to the commands they run."""


class Lines:
    """A LogSink that keeps what it is given."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.seen = asyncio.Event()
        self.wanted: str | None = None

    def __call__(self, stream: str, text: str) -> None:
        self.items.append((stream, text))
        if text == self.wanted:
            self.seen.set()

    def of(self, stream: str) -> list[str]:
        return [text for name, text in self.items if name == stream]


def node(tmp_path: Path, **env: str) -> NodeCall:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return NodeCall(execution_id="exec-1", node="build", attempt=1, env=env, workdir=workdir)


async def run(
    script: str,
    tmp_path: Path,
    *,
    executor: ShellExecutor | None = None,
    shell: str | None = None,
    extra_env: dict[str, str] | None = None,
    log: Lines | None = None,
    call: NodeCall | None = None,
) -> tuple[dict[str, object], Lines]:
    log = log or Lines()
    executor = executor or ShellExecutor(kill_grace=0.5)
    result = await executor.run(
        call or node(tmp_path),
        script,
        extra_env=extra_env or {},
        shell=shell,  # type: ignore[arg-type]
        log=log,
    )
    assert result.exit_code == 0
    return result.outputs, log


def is_missing(path: str) -> bool:
    return not os.path.exists(path)


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


async def test_key_value_and_multiline_outputs_become_the_result(tmp_path: Path) -> None:
    outputs, _ = await run(
        """
        echo "version=1.2.3" >> "$LOOM_OUTPUT"
        echo "url=https://x.test/?a=b=c" >> "$LOOM_OUTPUT"
        echo "" >> "$LOOM_OUTPUT"
        printf 'notes<<EOF\\nfirst line\\nsecond = line\\n\\nEOF\\n' >> "$LOOM_OUTPUT"
        echo "empty=" >> "$LOOM_OUTPUT"
        """,
        tmp_path,
    )
    assert outputs == {
        "version": "1.2.3",
        "url": "https://x.test/?a=b=c",
        "notes": "first line\nsecond = line\n",
        "empty": "",
    }


async def test_a_script_without_outputs_has_none(tmp_path: Path) -> None:
    outputs, _ = await run("true", tmp_path)
    assert outputs == {}


async def test_a_bad_output_line_fails_the_node_naming_the_line(tmp_path: Path) -> None:
    with pytest.raises(NodeFailed) as failed:
        await run('echo "a=1" >> "$LOOM_OUTPUT"; echo "oops" >> "$LOOM_OUTPUT"', tmp_path)
    assert "line 2" in failed.value.error
    assert failed.value.retryable is False


async def test_a_non_zero_exit_fails_with_its_code_and_keeps_the_outputs(tmp_path: Path) -> None:
    with pytest.raises(NodeFailed) as failed:
        await run('echo "partial=yes" >> "$LOOM_OUTPUT"; exit 3', tmp_path)
    assert failed.value.error == "exit code 3"
    assert failed.value.exit_code == 3
    assert failed.value.outputs == {"partial": "yes"}


async def test_a_signal_death_reports_the_signal(tmp_path: Path) -> None:
    with pytest.raises(NodeFailed) as failed:
        await run("kill -KILL $$", tmp_path)
    assert failed.value.error == "killed by SIGKILL"
    assert failed.value.exit_code == -signal.SIGKILL


async def test_bash_runs_with_errexit_and_pipefail(tmp_path: Path) -> None:
    log = Lines()
    with pytest.raises(NodeFailed) as failed:
        await run("false | true\necho not reached", tmp_path, log=log)
    assert failed.value.exit_code == 1
    assert "not reached" not in log.of("stdout")


async def test_shell_sh_runs_the_script_with_sh(tmp_path: Path) -> None:
    _, log = await run('echo "$0"; echo "${BASH_VERSION:-none}"', tmp_path, shell="sh")
    shell, bash_version = log.of("stdout")
    assert os.path.basename(shell) != "bash"
    assert bash_version == "none"
    with pytest.raises(NodeFailed):  # -e: the first failure stops it
        await run("false\necho not reached", tmp_path, shell="sh")


async def test_without_bash_on_path_the_script_falls_back_to_sh(tmp_path: Path) -> None:
    executor = ShellExecutor(environ={"PATH": str(tmp_path)})
    _, log = await run('echo "${BASH_VERSION:-none}"', tmp_path, executor=executor)
    assert log.of("stdout") == ["none"]
    with pytest.raises(NodeFailed) as failed:
        await run("true", tmp_path, executor=executor, shell="bash")
    assert failed.value.retryable is False


async def test_stdout_and_stderr_stream_as_lines_in_order(tmp_path: Path) -> None:
    _, log = await run(
        "echo one; echo two >&2; printf 'three\\r\\n'; echo four >&2; printf '\\xff bad\\n'; "
        "printf 'last without newline'",
        tmp_path,
    )
    assert log.of("stdout") == ["one", "three", "\ufffd bad", "last without newline"]
    assert log.of("stderr") == ["two", "four"]


async def test_lines_arrive_while_the_script_is_still_running(tmp_path: Path) -> None:
    log = Lines()
    log.wanted = "started"
    task = asyncio.create_task(run("echo started; sleep 30", tmp_path, log=log))
    async with asyncio.timeout(10):
        await log.seen.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_one_mib_line_is_read_whole(tmp_path: Path) -> None:
    _, log = await run(
        "head -c 1048576 /dev/zero | tr '\\0' x; echo; echo after; head -c 3000000 /dev/zero",
        tmp_path,
    )
    stdout = log.of("stdout")
    assert stdout[0] == "x" * 1048576
    assert stdout[1] == "after"
    # a line past the 1 MiB cap comes in 1 MiB pieces instead of growing the buffer
    assert "".join(stdout[2:]) == "\0" * 3000000
    assert max(len(piece) for piece in stdout[2:]) <= 1 << 20


async def test_the_node_sees_only_the_allow_listed_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_SECRET_KEY", "topsecret")
    monkeypatch.setenv("DATABASE_URL", "postgresql://admin:pw@db/loom")
    _, log = await run(
        'env; echo "ref=$LOOM_X_1" >> "$LOOM_OUTPUT"',
        tmp_path,
        call=node(tmp_path, APP_ENV="production"),
        extra_env={"LOOM_X_1": "main; rm -rf /"},
    )
    env = dict(line.split("=", 1) for line in log.of("stdout"))
    assert "topsecret" not in "\n".join(log.of("stdout"))
    assert "LOOM_SECRET_KEY" not in env and "DATABASE_URL" not in env
    assert env["PATH"] == os.environ["PATH"]
    assert env["LOOM_EXECUTION_ID"] == "exec-1"
    assert env["LOOM_OUTPUT"] == str(tmp_path / "work" / OUTPUT_FILE_NAME)
    assert env["APP_ENV"] == "production"
    allowed = set(BASE_ENV_NAMES) | {"LOOM_OUTPUT", "LOOM_EXECUTION_ID", "APP_ENV", "LOOM_X_1"}
    assert set(env) - allowed <= SHELL_MADE


async def test_template_values_reach_the_script_as_data(tmp_path: Path) -> None:
    outputs, _ = await run(
        'echo "ref=$LOOM_X_1" >> "$LOOM_OUTPUT"',
        tmp_path,
        extra_env={"LOOM_X_1": "main; echo injected"},
    )
    assert outputs == {"ref": "main; echo injected"}


async def test_the_base_environment_comes_from_environ(tmp_path: Path) -> None:
    executor = ShellExecutor(
        environ={"PATH": os.environ["PATH"], "TZ": "Europe/Berlin", "AWS_SECRET": "x"}
    )
    _, log = await run("env", tmp_path, executor=executor)
    env = dict(line.split("=", 1) for line in log.of("stdout"))
    assert env["TZ"] == "Europe/Berlin"
    assert "AWS_SECRET" not in env and "HOME" not in env


async def test_the_workdir_is_the_cwd_and_stdin_is_empty(tmp_path: Path) -> None:
    _, log = await run("pwd; cat; echo end", tmp_path)
    assert log.of("stdout") == [str(tmp_path / "work"), "end"]


async def test_without_a_workdir_the_output_file_is_temporary(tmp_path: Path) -> None:
    call = NodeCall(execution_id="exec-1", node="build", attempt=1)
    outputs, log = await run('echo "$LOOM_OUTPUT"; echo a=1 > "$LOOM_OUTPUT"', tmp_path, call=call)
    assert outputs == {"a": "1"}
    assert is_missing(log.of("stdout")[0])


async def test_a_timeout_stops_the_script_promptly(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await run("sleep 1000", tmp_path)
    assert time.monotonic() - started < 3


async def test_cancelling_kills_the_whole_process_tree(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    log = Lines()
    log.wanted = "ready"
    script = f"""
        sleep 1000 &
        echo $! >> {pids}
        bash -c 'sleep 1000 & echo $! >> {pids}; echo $$ >> {pids}; echo ready; wait' &
        wait
    """
    task = asyncio.create_task(run(script, tmp_path, log=log))
    async with asyncio.timeout(10):
        await log.seen.wait()
    numbers = [int(line) for line in pids.read_text().split()]
    assert len(numbers) == 3 and not any(is_gone(pid) for pid in numbers)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_gone(numbers)


async def test_a_script_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    log = Lines()
    log.wanted = "ready"
    script = "trap '' TERM; echo $$ > pid; echo ready; while true; do sleep 0.05; done"
    task = asyncio.create_task(run(script, tmp_path, log=log))
    async with asyncio.timeout(10):
        await log.seen.wait()
    pid = int((tmp_path / "work" / "pid").read_text())
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 5  # kill_grace is 0.5 s
    await wait_gone([pid])


async def test_a_background_child_holding_the_pipes_does_not_hang_the_node(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    outputs, _ = await run('sleep 1000 & echo "child=$!" >> "$LOOM_OUTPUT"', tmp_path)
    assert time.monotonic() - started < 5
    await wait_gone([int(str(outputs["child"]))])


async def test_without_pidfd_a_thread_waits_for_the_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux < 5.3 (or another Unix): the exit is noticed by a waiting thread instead."""

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    with pytest.raises(NodeFailed, match="exit code 4"):
        await run("echo hi; exit 4", tmp_path)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await run("sleep 1000", tmp_path)


async def test_a_script_that_cannot_start_fails_the_node(tmp_path: Path) -> None:
    with pytest.raises(NodeFailed, match="cannot start") as failed:
        await run("echo \0", tmp_path, call=node(tmp_path, BAD="nul\0byte"))
    assert failed.value.retryable is False


def test_parse_outputs_names_the_line_of_an_unterminated_block() -> None:
    with pytest.raises(ValueError, match="line 2: no line 'EOF'"):
        parse_outputs("a=1\nnotes<<EOF\ntext\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_outputs("=value\n")


@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,20}", fullmatch=True),
        st.text(st.characters(exclude_characters="\n\r"), max_size=30),
    ),
    st.dictionaries(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
        st.lists(st.text(st.characters(exclude_characters="\n\r"), max_size=10), max_size=4),
    ),
)
def test_parse_outputs_reads_back_what_a_script_writes(
    single: dict[str, str], multi: dict[str, list[str]]
) -> None:
    text = "".join(f"{key}={value}\n" for key, value in single.items())
    text += "".join(f"{k}<<LOOM_EOF\n" + "".join(f"{v}\n" for v in lines) + "LOOM_EOF\n"
                    for k, lines in multi.items()
                    if "LOOM_EOF" not in lines)  # fmt: skip
    expected: dict[str, str] = dict(single)
    expected.update({k: "\n".join(v) for k, v in multi.items() if "LOOM_EOF" not in v})
    assert parse_outputs(text) == expected


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("true", True),
        ("  make test  ", True),
        ("ls -la /tmp --color=never", True),
        ("echo hi", False),  # a builtin
        ("true --help", False),  # /bin/true --help would print help; the builtin does not
        ('echo "$HOME"', False),
        ("ls *.txt", False),
        ("a=1 env", False),
        ("make; make install", False),
        ("make\nmake install", False),
        ("./build.sh", False),
        ("no-such-program-xyz", False),
        ("cat > out", False),
    ],
)
def test_only_plain_simple_commands_skip_the_shell(script: str, expected: bool) -> None:
    executor = ShellExecutor()
    direct = executor._direct_argv(script, executor._base_env["PATH"])
    assert (direct is not None) == expected, direct


async def test_a_directly_executed_command_behaves_as_under_bash(tmp_path: Path) -> None:
    executor = ShellExecutor()
    lines: list[tuple[str, str]] = []
    call = NodeCall("e", "n", 1, workdir=tmp_path)
    result = await executor.run(
        call, "ls -a", extra_env={}, shell=None, log=lambda s, t: lines.append((s, t))
    )
    assert result.exit_code == 0 and ("stdout", ".loom_output") in lines
    with pytest.raises(NodeFailed) as info:
        await executor.run(call, "false", extra_env={}, shell=None, log=lambda s, t: None)
    assert info.value.exit_code == 1
    with pytest.raises(NodeFailed) as info:
        await executor.run(
            call,
            "no-such-program-xyz",
            extra_env={},
            shell=None,
            log=lambda s, t: lines.append((s, t)),
        )
    assert info.value.exit_code == 127
    assert any("no-such-program-xyz" in text and stream == "stderr" for stream, text in lines)


async def test_a_closed_valve_holds_the_output_and_the_node_waits_for_it(tmp_path: Path) -> None:
    """While the consumer is behind (the valve closed) the pipe is not read: the node
    blocks on its full pipe instead of growing memory; opened, every line arrives."""
    from loom_worker.executors._process import Valve

    valve = Valve()
    valve.close()
    log = Lines()
    workdir = tmp_path / "work"
    workdir.mkdir()
    call = NodeCall(execution_id="exec-1", node="talk", attempt=1, workdir=workdir, valve=valve)
    running = asyncio.create_task(
        run(f"seq 1 100000; echo done > {workdir / 'finished'}", tmp_path, log=log, call=call)
    )
    await asyncio.sleep(1.0)
    assert not running.done()
    assert log.items == []  # held: nothing read
    assert not (workdir / "finished").exists()  # the node waits on its full pipe
    valve.open()
    await asyncio.wait_for(running, 60)
    assert log.of("stdout") == [str(i) for i in range(1, 100001)]
    assert (workdir / "finished").exists()
