"""Process plumbing shared by the `run` and `python` executors.

Why not `asyncio.create_subprocess_exec`: its transports, stream protocols and (on 3.11)
one watcher thread per process cost about a third of the spawn rate of a short `bash -c`
node (measured: ~950/s against ~1,400/s for this module on the same 2 cores). Here a
process is a plain `subprocess.Popen` into a new session; its exit is awaited on a pidfd
(`loop.add_reader`, no thread) and its pipes are read with `os.read` from reader callbacks.

The leader is reaped only after its exit has been noticed and its process group SIGKILLed
where needed: while it is an unreaped zombie, its pid (= the group id) cannot be reused, so
`killpg` can never hit a stranger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence

__all__ = ["MAX_LINE_BYTES", "Child", "LineReader", "Valve", "describe_exit"]

MAX_LINE_BYTES = 1 << 20
"""A line longer than this is passed on in pieces of this size, so that a process writing
without newlines cannot grow the reader's buffer without bound (the engine splits lines
over 16 KiB anyway)."""

_READ_SIZE = 1 << 16
_DRAIN_LIMIT = 1 << 20
"""At most this much is read synchronously when a pipe is closed before its EOF."""


def describe_exit(returncode: int) -> str:
    """`exit code 3` or `killed by SIGKILL`."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"


class Child:
    """A process started in a new session: its pid is also its process group id.

    Raises what `subprocess.Popen` raises (`OSError` for a missing program or cwd).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        stdin: int,
        stdout: int,
        stderr: int,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._popen = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.pid = self._popen.pid
        self._exited = asyncio.Event()
        self._reap_on_exit = False
        self._pidfd = -1
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: a thread waits instead
            threading.Thread(target=self._wait_in_thread, daemon=True).start()
        else:
            self._loop.add_reader(self._pidfd, self._on_exit)

    @property
    def has_exited(self) -> bool:
        return self._exited.is_set()

    @property
    def returncode(self) -> int | None:
        """Set once reaped: negative for a signal death, as in `subprocess`."""
        return self._popen.returncode

    async def wait(self) -> None:
        """Until the process has exited (it stays unreaped: see `reap`)."""
        await self._exited.wait()

    def killpg(self, sig: int) -> None:
        """Signal the whole process group; a no-op once the group is gone or reaped."""
        if self._popen.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def reap(self) -> int:
        """Collect the exit status; only after `wait()` returned."""
        if self._popen.returncode is None:
            self._popen.wait()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        return self._popen.returncode

    async def stop(self, grace: float) -> int:
        """SIGTERM the group, SIGKILL it after `grace` seconds, reap; return the exit code.

        The group is SIGKILLed even when the leader has exited by then (its children may
        ignore SIGTERM). Cancelled again while waiting, it still SIGKILLs the group and
        reaps the leader as soon as it is gone.
        """
        self.killpg(signal.SIGTERM)
        try:
            if grace > 0 and not self.has_exited:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(grace):
                        await self.wait()
        finally:
            self.killpg(signal.SIGKILL)
            if not self.has_exited:
                self._reap_on_exit = True
        await self.wait()
        return self.reap()

    def _on_exit(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
        self._exited.set()
        if self._reap_on_exit:
            self.reap()

    def _wait_in_thread(self) -> None:
        # WNOWAIT: notice the exit but leave the zombie for `reap` (see the module docstring)
        with contextlib.suppress(ChildProcessError):  # reaped by someone else: exited too
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._on_exit)


class Valve:
    """Lets the pipes of a node's processes be read, or holds them. Whoever consumes the
    lines (the worker's store) closes it when it falls behind; the node then blocks on its
    full pipe, as a program writing to a slow terminal does, so the lines waiting in
    memory stay bounded and each line's timestamp stays close to its delivery."""

    def __init__(self) -> None:
        self.is_open = True
        self._readers: set[LineReader] = set()

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            for reader in self._readers:
                reader.hold()

    def open(self) -> None:
        if not self.is_open:
            self.is_open = True
            for reader in list(self._readers):
                reader.release()

    def attach(self, reader: LineReader) -> None:
        self._readers.add(reader)

    def detach(self, reader: LineReader) -> None:
        self._readers.discard(reader)


class LineReader:
    """Reads a pipe from the event loop and calls `emit(line)` for each line.

    Lines are decoded as UTF-8 (`errors="replace"`), without their `\\n` or `\\r\\n`; a last
    line without a newline is still emitted. Takes ownership of `fd` (closes it). With a
    `valve`, reading pauses while the valve is closed (until `unvalve()`).
    """

    def __init__(self, fd: int, emit: Callable[[str], None], *, valve: Valve | None = None) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._emit = emit
        self._buf = b""
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._valve = valve
        self._reading = False
        if valve is not None:
            valve.attach(self)
        if valve is None or valve.is_open:
            self.release()

    def hold(self) -> None:
        """Stop reading until `release` (the pipe fills, and its writer waits)."""
        if self._reading and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def release(self) -> None:
        if not self._reading and self._fd >= 0:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def unvalve(self) -> None:
        """Read on whatever the valve says (the process has exited: what is left in its
        pipe is read to the end)."""
        if self._valve is not None:
            self._valve.detach(self)
            self._valve = None
        self.release()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait(self) -> None:
        """Until EOF (or `close`)."""
        await self._closed.wait()

    def drain(self) -> None:
        """Read and emit whatever is in the pipe right now, without waiting for more."""
        received = 0
        while self._fd >= 0 and received < _DRAIN_LIMIT:
            data = self._read()
            if data is None:
                return
            if not data:
                self.close()
                return
            received += len(data)
            self._feed(data)

    def flush(self) -> None:
        """Emit a pending partial line."""
        if self._buf:
            line, self._buf = self._buf, b""
            self._emit(line.decode("utf-8", "replace"))

    def close(self, *, drain: bool = False) -> None:
        """Stop reading (after emitting what is in the pipe now, with `drain`) and close."""
        if self._fd < 0:
            return
        if drain:
            self.drain()
            if self._fd < 0:
                return
        if self._valve is not None:
            self._valve.detach(self)
        self.hold()
        os.close(self._fd)
        self._fd = -1
        self.flush()
        self._closed.set()

    def _read(self) -> bytes | None:
        try:
            return os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _on_readable(self) -> None:
        data = self._read()
        if data is None:
            return
        if data:
            self._feed(data)
        else:
            self.close()

    def _feed(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if b"\n" in data:
            lines = buf.split(b"\n")
            buf = lines.pop()
            emit = self._emit
            for line in lines:
                if line.endswith(b"\r"):
                    line = line[:-1]
                emit(line.decode("utf-8", "replace"))
        while len(buf) > MAX_LINE_BYTES:
            cut = MAX_LINE_BYTES
            while cut > MAX_LINE_BYTES - 3 and buf[cut] & 0xC0 == 0x80:  # keep a UTF-8 char whole
                cut -= 1
            self._emit(buf[:cut].decode("utf-8", "replace"))
            buf = buf[cut:]
        self._buf = buf
