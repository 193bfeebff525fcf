"""Python node targets for the engine tests (put on the pool's import path)."""

from __future__ import annotations

import time
from typing import Any


def noop() -> None:
    return None


def echo(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def long_line(size: int) -> int:
    print("x" * size)
    return size


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fail_with(message: str) -> None:
    raise ValueError(message)
