"""The `python` executor: `module:function` calls in Loom's own killable, reused processes.

Not `concurrent.futures`: a node that times out or is cancelled must die alone, by its
process group, without disturbing the calls running in the other processes. Each process
(`_pyhost`) runs one call at a time and is reused; one that died or was killed is dropped,
and a fresh one starts when next needed. See `_pyhost` for the protocol.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import orjson

from ._process import Child, LineReader, describe_exit
from .base import LogSink, NodeCall, NodeFailed, NodeResult, base_env

__all__ = ["PythonPool"]

_logger = logging.getLogger(__name__)
_HEADER = struct.Struct(">I")
_CLOSE_TIMEOUT = 1.0
"""How long `aclose` lets a process exit by itself (its stdin closed) before killing it."""

_Reply = list[Any]


class _Host:
    """One `_pyhost` process: its request pipe, its reply pipe and its stderr pipe."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        request_r, self._request_w = os.pipe2(os.O_CLOEXEC)
        reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        try:
            self._child = Child(
                argv, env=env, cwd=None, stdin=request_r, stdout=reply_w, stderr=stderr_w
            )
        except BaseException:
            for fd in (self._request_w, reply_r, stderr_r):
                os.close(fd)
            raise
        finally:
            for fd in (request_r, reply_w, stderr_w):
                os.close(fd)
        self.pid = self._child.pid
        self._loop = asyncio.get_running_loop()
        os.set_blocking(self._request_w, False)
        os.set_blocking(reply_r, False)
        self._reply_r = reply_r
        self._loop.add_reader(reply_r, self._on_reply_readable)
        self._stderr = LineReader(stderr_r, self._on_stderr_line)
        self._buffer = bytearray()
        self._unsent = b""
        self._sink: LogSink | None = None
        self._reply: asyncio.Future[_Reply | None] | None = None
        self.alive = True
        """False once the reply pipe reached EOF: the process is exiting."""

    async def request(self, frame: bytes, sink: LogSink) -> _Reply | None:
        """Send one call; its reply, or None if the process died first.

        Cancelled, it leaves the log sink in place for `stop`, which then drains stderr.
        """
        if not self.alive:
            return None
        reply: asyncio.Future[_Reply | None] = self._loop.create_future()
        self._reply = reply
        self._sink = sink
        self._write(frame)
        result = await reply
        self._sink = None
        self._reply = None
        return result

    async def stop(self, grace: float) -> int:
        """Kill the process group (SIGTERM, SIGKILL after `grace`), reap; the exit code."""
        try:
            return await self._child.stop(grace)
        finally:
            self._close_pipes()

    async def finish(self) -> int:
        """The exit code of a process whose reply pipe reached EOF (it is exiting)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._child.wait()
        return await self.stop(0)

    async def close(self, grace: float) -> None:
        """Close stdin (the host exits when idle); kill it if it is still there after 1 s."""
        if self._request_w >= 0:
            self._unsent = b""
            self._loop.remove_writer(self._request_w)
            os.close(self._request_w)
            self._request_w = -1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._child.wait()
        await self.stop(grace if not self._child.has_exited else 0)

    def _close_pipes(self) -> None:
        if self._reply_r >= 0:
            self._read_replies()  # what it said before it died
            self._end_of_replies()
        self._stderr.close(drain=True)
        if self._request_w >= 0:
            self._loop.remove_writer(self._request_w)
            os.close(self._request_w)
            self._request_w = -1
        self._sink = None

    def _write(self, frame: bytes) -> None:
        try:
            written = os.write(self._request_w, frame)
        except BlockingIOError:
            written = 0
        except BrokenPipeError:  # it died: the reply pipe's EOF reports it
            return
        if written < len(frame):
            self._unsent = frame[written:]
            self._loop.add_writer(self._request_w, self._write_more)

    def _write_more(self) -> None:
        try:
            written = os.write(self._request_w, self._unsent)
        except BlockingIOError:
            return
        except BrokenPipeError:
            written = len(self._unsent)
        self._unsent = self._unsent[written:]
        if not self._unsent:
            self._loop.remove_writer(self._request_w)

    def _on_reply_readable(self) -> None:
        if not self._read_replies():
            self._end_of_replies()

    def _read_replies(self) -> bool:
        """Read and dispatch the frames available now; False at EOF."""
        while True:
            try:
                data = os.read(self._reply_r, 1 << 16)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                return False
            buffer = self._buffer
            buffer += data
            start = 0
            while len(buffer) - start >= 4:
                end = start + 4 + _HEADER.unpack_from(buffer, start)[0]
                if len(buffer) < end:
                    break
                self._dispatch(orjson.loads(buffer[start + 4 : end]))
                start = end
            del buffer[:start]
            if len(data) < 1 << 16:
                return True

    def _end_of_replies(self) -> None:
        self.alive = False
        self._loop.remove_reader(self._reply_r)
        os.close(self._reply_r)
        self._reply_r = -1
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(None)

    def _dispatch(self, message: _Reply) -> None:
        kind = message[0]
        if kind == "out" or kind == "err":
            stream = "stdout" if kind == "out" else "stderr"
            if self._sink is not None:
                self._sink(stream, message[1])
            else:
                self._log_between_calls(stream, message[1])
        elif self._reply is not None and not self._reply.done():
            self._stderr.drain()  # raw stderr written before the reply belongs to this call
            self._stderr.flush()
            self._reply.set_result(message)

    def _on_stderr_line(self, line: str) -> None:
        if self._sink is not None:
            self._sink("stderr", line)
        else:
            self._log_between_calls("stderr", line)

    def _log_between_calls(self, stream: str, line: str) -> None:
        # a thread the function left behind, say: no node to attribute it to
        _logger.info("python process %d, between calls, %s: %s", self.pid, stream, line)


class PythonPool:
    """At most `size` `_pyhost` processes, started on demand, each running one call at a time.

    The processes see only `base_env(environ)` (read once, here) and `PYTHONPATH` made of
    `sys_path` (made absolute), which they also put first on `sys.path`. Use as
    `async with PythonPool(...) as pool:` or call `aclose()`.
    """

    def __init__(
        self,
        size: int,
        *,
        environ: Mapping[str, str] | None = None,
        sys_path: Sequence[str] = (),
        kill_grace: float = 10.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        self._size = size
        self._kill_grace = kill_grace
        paths = [os.path.abspath(path) for path in sys_path]
        self._argv = [sys.executable, "-P", "-m", "loom_worker.executors._pyhost", *paths]
        self._env = base_env(environ)
        if paths:
            self._env["PYTHONPATH"] = os.pathsep.join(paths)
        self._hosts: set[_Host] = set()
        self._idle: list[_Host] = []
        self._waiters: collections.deque[asyncio.Future[_Host | None]] = collections.deque()
        self._closed = False

    async def __aenter__(self) -> PythonPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def call(
        self, target: str, kwargs: Mapping[str, Any], *, call: NodeCall, log: LogSink
    ) -> NodeResult:
        """Call `target` (`module:function`, sync or async) with `kwargs` in a pool process,
        with `call.env` (and `LOOM_EXECUTION_ID`) added to its `os.environ` and `call.workdir`
        as its cwd for this call only; `outputs={"result": <return value>}`.

        Raises `NodeFailed`: not retryable for a bad target, an import error, a missing
        function, arguments that do not fit it or JSON cannot hold, or a return value JSON
        cannot hold; retryable for an exception in the function (`"ValueError: boom"`, its
        traceback logged as stderr) and for a process that died during the call.
        Cancelled, it kills that process's group and re-raises. `RuntimeError` once closed.
        """
        module, _, function = target.partition(":")
        if not module or not function:
            raise NodeFailed(f"bad target {target!r}: expected 'module:function'", retryable=False)
        request = {
            "target": target,
            "kwargs": kwargs if isinstance(kwargs, dict) else dict(kwargs),
            "env": {**call.env, "LOOM_EXECUTION_ID": call.execution_id},
            "cwd": None if call.workdir is None else str(call.workdir),
        }
        try:
            payload = orjson.dumps(request)
        except TypeError as exc:
            message = f"the arguments of {target} are not JSON-serialisable: {exc}"
            raise NodeFailed(message, retryable=False) from exc
        host = await self._acquire()
        try:
            reply = await host.request(_HEADER.pack(len(payload)) + payload, log)
        except BaseException:
            try:
                await host.stop(self._kill_grace)
            finally:
                self._drop(host)
            raise
        if reply is None:
            try:
                returncode = await host.finish()
            finally:
                self._drop(host)
            raise NodeFailed(f"python process {_describe_exit(returncode)}", exit_code=returncode)
        self._release(host)
        if reply[0] == "ok":
            return NodeResult(outputs={"result": reply[1]})
        raise NodeFailed(reply[1], retryable=reply[2])

    async def aclose(self) -> None:
        """Stop every process: idle ones exit when their stdin closes; a process still
        there after a second (a call running) is killed. Waiting callers get `RuntimeError`."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError("PythonPool is closed"))
        hosts = list(self._hosts)
        self._hosts.clear()
        self._idle.clear()
        await asyncio.gather(*(host.close(self._kill_grace) for host in hosts))

    async def _acquire(self) -> _Host:
        while True:
            if self._closed:
                raise RuntimeError("PythonPool is closed")
            while self._idle:
                host = self._idle.pop()  # the most recently used: warm caches
                if host.alive:
                    return host
                self._hosts.discard(host)  # it died while idle; its slot is ours
                await host.finish()
            if len(self._hosts) < self._size:
                return self._start()
            waiter: asyncio.Future[_Host | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                host_or_slot = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # woken just as we were cancelled
                    woken = waiter.result()
                    if woken is None:
                        self._wake_one(None)
                    else:
                        self._release(woken)
                raise
            if host_or_slot is not None:
                return host_or_slot

    def _start(self) -> _Host:
        try:
            host = _Host(self._argv, self._env)
        except OSError as exc:
            raise NodeFailed(f"cannot start a python process: {exc}") from exc
        self._hosts.add(host)
        return host

    def _release(self, host: _Host) -> None:
        if host not in self._hosts:  # closed meanwhile
            return
        if not self._wake_one(host):
            self._idle.append(host)

    def _drop(self, host: _Host) -> None:
        """Forget a dead or doomed process; its slot goes to a waiter, if any."""
        if host in self._hosts:
            self._hosts.discard(host)
            self._wake_one(None)

    def _wake_one(self, host: _Host | None) -> bool:
        """Hand `host` (or, with None, a free slot) to the first waiter still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(host)
                return True
        return False


def _describe_exit(returncode: int) -> str:
    return f"exited with code {returncode}" if returncode >= 0 else describe_exit(returncode)
