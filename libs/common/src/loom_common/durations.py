"""Durations as people write them: `90s`, `10m`, `1h30m`, `2d`, `500ms`, or a number of seconds."""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["format_duration", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
MAX_SECONDS = 3650 * 86400.0
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(value: object) -> timedelta:
    """Parse `value` into a non-negative timedelta; `ValueError` says what was expected."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"expected a duration like 90s, 10m or 1h30m, got {value!r}")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds, units = 0, 0.0, []
            for match in _PART.finditer(text):
                if match.start() != pos:
                    break
                units.append(match.group(2))
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if not text or pos != len(text) or len(set(units)) != len(units):
                raise ValueError(f"expected a duration like 90s, 10m or 1h30m, got {value!r}")
    else:
        raise ValueError(f"expected a duration like 90s, 10m or 1h30m, got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    if not seconds <= MAX_SECONDS:  # also catches NaN
        raise ValueError(f"a duration must be at most 3650d, got {value!r}")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """The shortest readable form that parses back to the same duration (to the
    millisecond): `1h30m`, `90ms`, `1s500ms`, `0s`."""
    millis = round(delta.total_seconds() * 1000)
    out, rest = "", millis // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    if millis % 1000:
        out += f"{millis % 1000}ms"
    return out or "0s"
