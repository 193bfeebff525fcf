"""The child side of `PythonPool`: runs `module:function` calls for the worker, one at a time.

Started as `python -P -m loom_worker.executors._pyhost [SYS_PATH ...]` (the directories are
put first on `sys.path`). It imports only the standard library and orjson, so it starts fast.

Protocol: frames of a 4-byte big-endian length and an orjson payload.

* requests, on the original stdin: `{"target", "kwargs", "env", "cwd"}`; EOF = exit;
* replies, on a private copy of the original stdout: `["out", line]` and `["err", line]`
  for the call's log lines, then `["ok", result]` or `["fail", error, retryable]`.

Then fd 0 becomes /dev/null and fd 1 a copy of fd 2, so nothing the function (or a C
library, or a subprocess) does can read or corrupt the protocol: raw writes to fd 1 and 2
reach the worker through the stderr pipe. `sys.stdout`, `sys.stderr` and the root logging
handler turn into `out`/`err` frames, line by line, in order.
"""

from __future__ import annotations

import importlib
import inspect
import io
import logging
import os
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import orjson

_HEADER = struct.Struct(">I")
_MAX_PENDING = 1 << 20  # a partial line longer than this is sent in pieces


class _Channel:
    """Sends frames; any thread of the function may print, so whole frames are locked."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, message: list[Any]) -> None:
        """Raises `TypeError` (orjson.JSONEncodeError) for what JSON cannot hold."""
        payload = orjson.dumps(message)
        data = memoryview(_HEADER.pack(len(payload)) + payload)
        with self._lock:
            while data:
                data = data[os.write(self._fd, data) :]


class _LineWriter(io.TextIOBase):
    """A text stream that sends each complete line as a frame of `kind`."""

    encoding = "utf-8"

    def __init__(self, channel: _Channel, kind: str, fd: int) -> None:
        super().__init__()
        self._channel = channel
        self._kind = kind
        self._fd = fd
        self._pending = ""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        # raw writes to it (a subprocess given sys.stdout) reach the worker as stderr
        return self._fd

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        pending = self._pending + text
        if "\n" in text:
            *lines, pending = pending.split("\n")
            for line in lines:
                self._channel.send([self._kind, line])
        while len(pending) > _MAX_PENDING:
            self._channel.send([self._kind, pending[:_MAX_PENDING]])
            pending = pending[_MAX_PENDING:]
        self._pending = pending
        return len(text)

    def finish(self) -> None:
        """End of a call: a last line without a newline is still a line."""
        if self._pending:
            line, self._pending = self._pending, ""
            self._channel.send([self._kind, line])


class _Refused(Exception):
    """The call cannot be made (bad target, import error, bad arguments): not retryable."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Host:
    def __init__(self, channel: _Channel, stdout: _LineWriter, stderr: _LineWriter) -> None:
        self._channel = channel
        self._stdout = stdout
        self._stderr = stderr
        self._home = os.getcwd()
        self._functions: dict[str, tuple[Callable[..., Any], inspect.Signature | None]] = {}

    def handle(self, request: dict[str, Any]) -> list[Any]:
        target: str = request["target"]
        try:
            function, signature = self._resolve(target)
            kwargs: dict[str, Any] = request["kwargs"]
            if signature is not None:
                try:
                    signature.bind(**kwargs)
                except TypeError as exc:
                    raise _Refused(f"bad arguments for {target}: {exc}") from exc
        except _Refused as exc:
            return ["fail", str(exc), False]
        environ = dict(os.environ)
        os.environ.update(request["env"])
        try:
            if request["cwd"] is not None:
                os.chdir(request["cwd"])
            result = function(**kwargs)
            if inspect.isawaitable(result):
                result = _run_awaitable(result)
        except BaseException as exc:  # reported to the worker, which decides about retries
            tb = exc.__traceback__
            traceback.print_exception(type(exc), exc, tb.tb_next if tb else None, file=self._stderr)
            return ["fail", _describe(exc), True]
        finally:
            sys.stdout, sys.stderr = self._stdout, self._stderr
            _restore_environ(environ)
            os.chdir(self._home)
        return ["ok", result]

    def reply(self, message: list[Any]) -> None:
        self._stdout.finish()
        self._stderr.finish()
        try:
            self._channel.send(message)
        except TypeError as exc:
            self._channel.send(["fail", f"the return value is not JSON-serialisable: {exc}", False])

    def _resolve(self, target: str) -> tuple[Callable[..., Any], inspect.Signature | None]:
        known = self._functions.get(target)
        if known is not None:
            return known
        module_name, _, name = target.partition(":")
        if not module_name or not name:
            raise _Refused(f"bad target {target!r}: expected 'module:function'")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            if not (isinstance(exc, ModuleNotFoundError) and exc.name == module_name):
                traceback.print_exception(exc, file=self._stderr)
            raise _Refused(f"cannot import module {module_name!r}: {_describe(exc)}") from exc
        function: Any = module
        for part in name.split("."):
            function = getattr(function, part, None)
            if function is None:
                raise _Refused(f"module {module_name!r} has no function {name!r}")
        if not callable(function):
            raise _Refused(f"{target} is not callable")
        try:
            signature: inspect.Signature | None = inspect.signature(function)
        except (TypeError, ValueError):  # some builtins have none: call and see
            signature = None
        self._functions[target] = (function, signature)
        return function, signature


def _restore_environ(saved: dict[str, str]) -> None:
    """Undo the call's `env` and whatever the function changed in `os.environ`."""
    current = dict(os.environ)
    if current == saved:
        return
    for name in current.keys() - saved.keys():
        del os.environ[name]
    for name, value in saved.items():
        if current.get(name) != value:
            os.environ[name] = value


def _run_awaitable(awaitable: Any) -> Any:
    import asyncio  # only for async functions: keeps the start of a host fast

    async def wait() -> Any:
        return await awaitable

    return asyncio.run(wait())


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def main() -> None:
    sys.path[0:0] = sys.argv[1:]
    requests = os.dup(0)
    channel = _Channel(os.dup(1))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    stdout = _LineWriter(channel, "out", 1)
    stderr = _LineWriter(channel, "err", 2)
    sys.stdout, sys.stderr = stdout, stderr
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    host = _Host(channel, stdout, stderr)
    while (header := _read_exactly(requests, _HEADER.size)) is not None:
        payload = _read_exactly(requests, _HEADER.unpack(header)[0])
        if payload is None:
            break
        host.reply(host.handle(orjson.loads(payload)))


if __name__ == "__main__":
    main()
