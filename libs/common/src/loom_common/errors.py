"""Errors of loom_common.

::

    Exception
     └── LoomError
          ├── SpecError (ValueError)        a graph document is invalid; `.issues` has each problem
          ├── CronError (ValueError)        a cron expression, duration or timezone is invalid
          ├── ExpressionError (ValueError)  a `${{ }}` expression did not compile or evaluate
          ├── ParamError (ValueError)       params given to a graph do not match its declaration
          └── SettingsError (ValueError)    the configuration (loom.toml, LOOM_*) is invalid
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CronError",
    "ExpressionError",
    "LoomError",
    "ParamError",
    "SettingsError",
    "SpecError",
    "SpecIssue",
]


class LoomError(Exception):
    """Base of every error Loom raises on purpose."""


@dataclass(frozen=True, slots=True)
class SpecIssue:
    """One problem in a graph document: where (`path`, `line`) and what (`message`)."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path or "<document>"
        at = f" at line {self.line}" if self.line is not None else ""
        return f"{where}: {self.message}{at}"


class SpecError(LoomError, ValueError):
    """A graph document is invalid. `issues` holds every problem found, in document order."""

    def __init__(self, issues: Iterable[SpecIssue]) -> None:
        self.issues = sorted(issues, key=lambda i: (i.line if i.line is not None else 0, i.path))
        super().__init__("\n".join(str(i) for i in self.issues) or "invalid graph")


class CronError(LoomError, ValueError):
    """An invalid cron expression, duration, instant or timezone; the message says which part."""


class ExpressionError(LoomError, ValueError):
    """A `${{ }}` expression could not be evaluated (undefined name, bad operation)."""


class ParamError(LoomError, ValueError):
    """Params do not fit the graph's declaration; `problems` lists each, by param name."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{name}: {msg}" for name, msg in problems.items()))


class SettingsError(LoomError, ValueError):
    """Invalid configuration; the message names the setting and its source."""
