"""How `loom run` shows an execution on a terminal: log lines prefixed by node, a live
progress line, and a summary table. Colours and the progress line only on a terminal;
piped output is plain text, one line per log line."""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import TextIO

import click

from loom_common import Graph
from loom_worker.engine import Execution, NodeRecord
from loom_worker.events import NODE_TERMINAL, Event, ExecutionEvent, LogEvent, NodeEvent

_COLOURS = (
    "cyan",
    "magenta",
    "blue",
    "yellow",
    "green",
    "bright_cyan",
    "bright_magenta",
    "bright_blue",
)
_STATUS_COLOURS = {
    "succeeded": "green",
    "failed": "red",
    "timed_out": "red",
    "cancelled": "yellow",
    "skipped": "bright_black",
    "running": "blue",
    "pending": "bright_black",
}


class Console:
    def __init__(
        self,
        graph: Graph,
        *,
        color: bool | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.tty = self.err.isatty()
        self.color = self.out.isatty() if color is None else color
        self.graph = graph
        self._width = max((len(n) for n in graph.nodes), default=4)
        self._colour_of: dict[str, str] = {}
        self._records: dict[str, str] = {}
        self._progress_shown = False

    # --- events -----------------------------------------------------------------------

    def event(self, event: Event) -> None:
        if isinstance(event, LogEvent):
            self._log(event)
        elif isinstance(event, NodeEvent):
            self._node(event)
        elif isinstance(event, ExecutionEvent):
            self._execution(event)
            if event.status != "running":
                return
        if not self.tty:
            self.out.flush()  # piped: line by line, so a reader sees lines as they come
        self._progress()

    def notice(self, text: str) -> None:
        self._clear_progress()
        self.err.write(self._style(f"loom: {text}", fg="yellow") + "\n")
        self.err.flush()

    def _prefix(self, node: str) -> str:
        name = node.split("[", 1)[0]
        colour = self._colour_of.setdefault(name, _COLOURS[len(self._colour_of) % len(_COLOURS)])
        self._width = max(self._width, len(node))
        return self._style(node.ljust(self._width), fg=colour) + self._style(" | ", dim=True)

    def _log(self, event: LogEvent) -> None:
        self._clear_progress()
        text = event.text
        if event.stream == "stderr":
            text = self._style(text, fg="red") if self.color else text
        elif event.stream == "loom":
            text = self._style(f"[loom] {text}", dim=True)
        self.out.write(self._prefix(event.node) + text + "\n")

    def _node(self, event: NodeEvent) -> None:
        if not event.fanout:
            self._records[event.node] = event.status
        if event.status == "running":
            if event.attempt > 1:
                self._line(event.node, f"attempt {event.attempt} started")
            return
        if event.status == "succeeded":
            return
        if event.status in NODE_TERMINAL or event.retry_in is not None:
            detail = f" ({event.error})" if event.error and event.status != "skipped" else ""
            word = self._style(event.status, fg=_STATUS_COLOURS.get(event.status), bold=True)
            self._line(event.node, f"{word}{detail}")

    def _line(self, node: str, text: str) -> None:
        self._clear_progress()
        self.out.write(self._prefix(node) + self._style("» ", dim=True) + text + "\n")

    def _execution(self, event: ExecutionEvent) -> None:
        if event.status == "running":
            return
        self._clear_progress()

    # --- progress line ----------------------------------------------------------------

    def _progress(self) -> None:
        if not self.tty:
            return
        statuses = list(self._records.values())
        seen = {n.split("[", 1)[0] for n in self._records}
        total = len(statuses) + sum(1 for n in self.graph.nodes if n not in seen)
        done = sum(1 for s in statuses if s in NODE_TERMINAL)
        running = statuses.count("running")
        failed = sum(1 for s in statuses if s in ("failed", "timed_out"))
        line = f"{done}/{total} done, {running} running, {failed} failed"
        self.out.flush()
        self.err.write("\r\x1b[K" + self._style(line, dim=True))
        self.err.flush()
        self._progress_shown = True

    def _clear_progress(self) -> None:
        if self._progress_shown:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._progress_shown = False

    # --- summary ----------------------------------------------------------------------

    def summary(self, execution: Execution) -> None:
        self._clear_progress()
        rows = [r for r in execution.records.values() if not r.fanout or r.status != "succeeded"]
        rows = [
            r
            for r in rows
            if not (
                r.fanout
                and any(
                    o.name == r.name and o.index is not None for o in execution.records.values()
                )
            )
        ]
        order = {name: i for i, name in enumerate(self.graph.order)}
        rows.sort(key=lambda r: (order.get(r.name, 0), r.index if r.index is not None else -1))
        table = [("NODE", "STATUS", "ATTEMPTS", "DURATION")]
        table += [(r.node, r.status, str(r.attempt or "-"), _duration(r)) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        self.out.write("\n")
        for i, row in enumerate(table):
            cells = [cell.ljust(widths[c]) for c, cell in enumerate(row)]
            if i == 0:
                line = self._style("  ".join(cells), bold=True)
            else:
                cells[1] = self._style(cells[1], fg=_STATUS_COLOURS.get(row[1]))
                line = "  ".join(cells)
            self.out.write(line.rstrip() + "\n")
        status = execution.status or "unknown"
        error = f": {execution.error}" if execution.error else ""
        elapsed = ""
        if rows:
            starts = [r.started_at for r in rows if r.started_at]
            ends = [r.finished_at for r in rows if r.finished_at]
            if starts and ends:
                elapsed = f" in {_seconds(max(ends) - min(starts))}"
        self.out.write(
            f"\n{execution.graph.name} "
            + self._style(status, fg=_STATUS_COLOURS.get(status), bold=True)
            + f"{elapsed}{error}\n"
        )
        self.out.flush()

    def _style(self, text: str, **style: object) -> str:
        if not self.color:
            return text
        return click.style(text, **style)  # type: ignore[arg-type]


def _duration(record: NodeRecord) -> str:
    if record.started_at is None or record.finished_at is None:
        return "-"
    return _seconds(record.finished_at - record.started_at)


def _seconds(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{seconds % 60:02.0f}s"
