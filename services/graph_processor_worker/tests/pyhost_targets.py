"""Functions the `python` executor tests call in pool processes (this directory is put
on the pool's `sys_path`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

logger = logging.getLogger("pyhost_targets")


def add(a: int, b: int = 0) -> int:
    return a + b


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0.01)
    return a + b


def chatty() -> str:
    print("printed first")
    logger.warning("logged second")
    print("printed", "third", file=sys.stderr)
    logger.info("info is shown too")
    sys.stdout.write("partial ")
    sys.stdout.write("line")
    return "done"


def raw_writes() -> None:
    os.write(2, b"raw to fd 2\n")
    os.write(1, b"raw to fd 1\n")
    subprocess.run(["echo", "from a subprocess"], check=True)


def boom() -> None:
    raise ValueError("boom")


def returns_a_set() -> Any:
    return {"tags": {1, 2}}


def exit_hard(code: int) -> None:
    os._exit(code)


def kill_myself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def environment() -> dict[str, str]:
    return dict(os.environ)


def set_environment(name: str, value: str) -> None:
    os.environ[name] = value


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def start_subprocess_and_sleep(pid_file: str) -> None:
    child = subprocess.Popen(["sleep", "1000"])
    with open(pid_file, "w") as file:
        file.write(f"{os.getpid()} {child.pid}")
    time.sleep(1000)


def ignore_sigterm_and_sleep(pid_file: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pid_file, "w") as file:
        file.write(str(os.getpid()))
    time.sleep(1000)


def loaded_modules() -> list[str]:
    return sorted(sys.modules)
