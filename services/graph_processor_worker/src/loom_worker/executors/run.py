"""The `run` executor: a shell script in its own process group, with an allow-listed environment.

The script runs as `bash --noprofile --norc -eo pipefail -c SCRIPT` (or `sh -e -c SCRIPT`),
its stdout and stderr stream to the log line by line, and its outputs are the `key=value`
lines (or `key<<DELIMITER` blocks) it writes to the file named by `$LOOM_OUTPUT`.

A script that is one simple command with plain words (`true`, `make test`,
`release-tool build --region eu`) is executed directly, without starting a shell, as GNU
make does: for such a command `bash -c` would only `exec` it after paying its own start-up
(about a third of the cost of a short node here), so the result is the same process, the
same exit status and the same output. Anything with shell syntax (quotes, `$`, globs,
pipes, redirections, `;`, newlines, assignments), a shell builtin or keyword, or a program
not found on `PATH` goes to the shell. See docs/decisions/0004-direct-exec-of-simple-commands.md.

The node's processes do not outlive it: once the script's own process has exited, its
process group is SIGKILLed, so a background child (`sleep 1000 &`) is gone too, and nobody
waits for the EOF of a pipe such a child still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Literal

from ._process import Child, LineReader, Valve, describe_exit
from .base import LogSink, NodeCall, NodeFailed, NodeResult, base_env

__all__ = ["MAX_OUTPUT_BYTES", "OUTPUT_FILE_NAME", "ShellExecutor", "parse_outputs"]

OUTPUT_FILE_NAME = ".loom_output"
"""The name of `$LOOM_OUTPUT` inside the attempt's workdir."""

MAX_OUTPUT_BYTES = 1 << 20
"""A larger `$LOOM_OUTPUT` fails the node: outputs travel through the database."""

_PIPE_LINGER = 0.2
"""How long the pipes may stay open after the script exited before the group is killed."""

_PIPE_AFTER_KILL = 1.0
"""How long to wait for EOF after that kill (a `setsid` escapee may hold a pipe forever)."""


_PLAIN_COMMAND = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,:+@%/-]*(?:[ \t]+[A-Za-z0-9_.,:+@%/=-]+)*")
"""One line of plain words: no quoting, expansion, globbing, redirection or control."""

_SHELL_WORDS = frozenset(
    """alias bg bind break builtin caller case cd command compgen complete compopt continue
    coproc declare dirs disown do done echo elif else enable esac eval exec exit export false
    fc fg fi for function getopts hash help history if in jobs kill let local logout mapfile
    popd printf pushd pwd read readarray readonly return select set shift shopt source
    suspend test then time times trap true type typeset ulimit umask unalias unset until
    wait while""".split()
)
"""Builtins and keywords: these mean something else (or nothing) outside a shell."""


class ShellExecutor:
    """Runs `run` nodes. One instance serves every node of a worker.

    `environ` is where the allow-listed `PATH`, `HOME`, `LANG` and `TZ` come from (default:
    this process's environment, read once, here); bash is looked up on that `PATH` once.
    """

    def __init__(
        self, *, kill_grace: float = 10.0, environ: Mapping[str, str] | None = None
    ) -> None:
        self._kill_grace = kill_grace
        self._base_env = base_env(environ)
        path = self._base_env["PATH"]
        self._bash = shutil.which("bash", path=path)
        self._sh = shutil.which("sh", path=path) or "/bin/sh"
        self._programs: dict[tuple[str, str], str | None] = {}

    async def run(
        self,
        call: NodeCall,
        script: str,
        *,
        extra_env: Mapping[str, str],
        shell: Literal["bash", "sh"] | None,
        log: LogSink,
    ) -> NodeResult:
        """Run `script`; return its outputs, or raise `NodeFailed` (non-zero exit, signal
        death, unreadable `$LOOM_OUTPUT`, a program that cannot start).

        Cancelled (timeout or cancel), it SIGTERMs the process group, SIGKILLs it after
        `kill_grace` seconds, reaps the script's process and re-raises `CancelledError`.
        """
        output_path, is_temporary = _create_output_file(call.workdir)
        env = {
            **self._base_env,
            **call.env,
            **extra_env,
            "LOOM_OUTPUT": output_path,
            "LOOM_EXECUTION_ID": call.execution_id,
        }
        argv = self._direct_argv(script, env["PATH"])
        if argv is None:
            argv = self._argv(shell, script)
        elif call.workdir is not None:
            env["PWD"] = str(call.workdir)  # what bash would have exported to the program
        try:
            returncode = await self._run_process(argv, env, call.workdir, log, call.valve)
            text = _read_output_file(output_path)
        finally:
            if is_temporary:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(output_path)
        if returncode != 0:
            try:
                outputs = parse_outputs(text)
            except ValueError:
                outputs = {}
            raise NodeFailed(describe_exit(returncode), exit_code=returncode, outputs=outputs)
        try:
            return NodeResult(outputs=parse_outputs(text), exit_code=0)
        except ValueError as exc:
            raise NodeFailed(f"$LOOM_OUTPUT {exc}", exit_code=0, retryable=False) from exc

    def _direct_argv(self, script: str, path: str) -> list[str] | None:
        """The argv to exec `script` without a shell, or None when it needs one."""
        text = script.strip()
        if not _PLAIN_COMMAND.fullmatch(text):
            return None
        words = text.split()
        program = words[0]
        if program in _SHELL_WORDS and not (program in ("true", "false") and len(words) == 1):
            return None
        if "/" in program and not program.startswith("/"):
            return None  # relative to the workdir: let the shell resolve it there
        key = (program, path)
        if key not in self._programs:
            self._programs[key] = shutil.which(program, path=path)
        resolved = self._programs[key]
        return None if resolved is None else [resolved, *words[1:]]

    def _argv(self, shell: Literal["bash", "sh"] | None, script: str) -> list[str]:
        if shell == "sh" or (shell is None and self._bash is None):
            return [self._sh, "-e", "-c", script]
        if self._bash is None:
            raise NodeFailed("shell: bash, but there is no bash on PATH", retryable=False)
        return [self._bash, "--noprofile", "--norc", "-eo", "pipefail", "-c", script]

    async def _run_process(
        self,
        argv: list[str],
        env: dict[str, str],
        workdir: Path | None,
        log: LogSink,
        valve: Valve | None = None,
    ) -> int:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            child = Child(
                argv,
                env=env,
                cwd=None if workdir is None else str(workdir),
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the script or env
            os.close(out_r)
            os.close(err_r)
            retryable = isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)
            raise NodeFailed(f"cannot start {argv[0]}: {exc}", retryable=retryable) from exc
        finally:
            os.close(out_w)
            os.close(err_w)
        stdout = LineReader(out_r, partial(log, "stdout"), valve=valve)
        stderr = LineReader(err_r, partial(log, "stderr"), valve=valve)
        try:
            await child.wait()
            stdout.unvalve()  # what is left in the pipes is read to the end
            stderr.unvalve()
            if not (stdout.closed and stderr.closed):
                await _wait_closed(stdout, stderr, _PIPE_LINGER)
            child.killpg(signal.SIGKILL)  # leftovers of the script: background children
            if not (stdout.closed and stderr.closed):
                await _wait_closed(stdout, stderr, _PIPE_AFTER_KILL)
        except BaseException:
            await child.stop(self._kill_grace)
            raise
        finally:
            stdout.close(drain=True)
            stderr.close(drain=True)
        return child.reap()


async def _wait_closed(stdout: LineReader, stderr: LineReader, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stdout.wait()
            await stderr.wait()


def _create_output_file(workdir: Path | None) -> tuple[str, bool]:
    """A fresh, empty `$LOOM_OUTPUT`: in the workdir, else a temporary file (is_temporary)."""
    if workdir is None:
        fd, path = tempfile.mkstemp(prefix="loom-output-")
        os.close(fd)
        return path, True
    path = os.path.abspath(os.path.join(workdir, OUTPUT_FILE_NAME))
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise NodeFailed(f"cannot create $LOOM_OUTPUT in the workdir: {exc}") from exc
    return path, False


def _read_output_file(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # the script deleted it: no outputs
        return ""
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_OUTPUT_BYTES and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_OUTPUT_BYTES:
        raise NodeFailed(f"$LOOM_OUTPUT is larger than {MAX_OUTPUT_BYTES} bytes", retryable=False)
    return data.decode("utf-8", "replace")


def parse_outputs(text: str) -> dict[str, str]:
    """Parse a `$LOOM_OUTPUT` file: `key=value` lines (split at the first `=`) and, as in
    GitHub Actions, `key<<DELIMITER` ... `DELIMITER` blocks for multi-line values.

    Blank lines are ignored; a later key wins. Raises `ValueError` naming the line.
    """
    outputs: dict[str, str] = {}
    lines = text.split("\n")
    number = 0
    while number < len(lines):
        line = lines[number].removesuffix("\r")
        number += 1
        if not line.strip():
            continue
        equals, heredoc = line.find("="), line.find("<<")
        if heredoc > 0 and (equals < 0 or heredoc < equals):
            key, delimiter = line[:heredoc], line[heredoc + 2 :]
            if not delimiter:
                raise ValueError(f"line {number}: empty delimiter after '{key}<<'")
            start = number
            while number < len(lines) and lines[number].removesuffix("\r") != delimiter:
                number += 1
            if number == len(lines):
                raise ValueError(f"line {start}: no line '{delimiter}' ends the value of '{key}'")
            outputs[key] = "\n".join(line.removesuffix("\r") for line in lines[start:number])
            number += 1
        elif equals > 0:
            outputs[line[:equals]] = line[equals + 1 :]
        else:
            raise ValueError(f"line {number}: expected 'key=value' or 'key<<DELIMITER'")
    return outputs
