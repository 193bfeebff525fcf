"""The commands that need no server: `loom run`, `loom validate`, `loom schema`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from loom_cli.console import Console
from loom_common import (
    Graph,
    GraphSpec,
    ParamError,
    ParamSpec,
    SettingsError,
    SpecError,
    configure_logging,
    load_graph,
    load_settings,
    parse_param_text,
    resolve_params,
)
from loom_worker.engine import Engine

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a pipeline's early writer


def _load(path: Path) -> tuple[Graph | None, list[str]]:
    """The graph in `path`, or the lines `FILE:LINE: PATH: message` saying why not."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        return None, [f"{path}: cannot read: {exc.strerror or exc}"]
    try:
        return load_graph(text, filename=str(path)), []
    except SpecError as exc:
        lines = []
        for issue in exc.issues:
            where = f"{path}:{issue.line}" if issue.line is not None else str(path)
            lines.append(f"{where}: {issue.path + ': ' if issue.path else ''}{issue.message}")
        return None, lines


def validate_command(files: Iterable[Path]) -> int:
    status = EXIT_OK
    for path in files:
        graph, errors = _load(path)
        for line in errors:
            print(line)
        if graph is None:
            status = EXIT_INVALID
        else:
            print(f"{path}: ok ({len(graph.nodes)} nodes, {len(graph.triggers)} triggers)")
    return status


def schema_command() -> None:
    schema = GraphSpec.model_json_schema(by_alias=True)
    sys.stdout.write(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode() + "\n")


def _parse_pairs(pairs: Iterable[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not name:
            raise ValueError(f"{what} {pair!r}: expected NAME=VALUE")
        if not sep:
            if what != "--secret":
                raise ValueError(f"{what} {pair!r}: expected KEY=VALUE")
            if name not in os.environ:
                raise ValueError(f"--secret {name}: no value given and ${name} is not set")
            value = os.environ[name]
        out[name] = value
    return out


def parse_params(pairs: Iterable[str], declared: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """`-p KEY=VALUE` pairs, each value read by its param's declared type (text for a param
    the graph does not declare: `resolve_params` or the server names it). Raises
    `ParamError` for a value that does not fit its type, `ValueError` for a pair that is
    not KEY=VALUE."""
    given: dict[str, Any] = {}
    for name, text in _parse_pairs(pairs, "-p").items():
        try:
            given[name] = parse_param_text(declared.get(name), text)
        except ValueError as exc:
            raise ParamError({name: str(exc)}) from None
    return given


def run_command(
    path: Path,
    param_pairs: Iterable[str],
    secret_pairs: Iterable[str],
    *,
    slots: int | None,
    color: bool | None,
) -> int:
    err = sys.stderr
    try:
        settings = load_settings(worker_slots=slots)
    except SettingsError as exc:
        print(f"loom: {exc}", file=err)
        return EXIT_INVALID
    configure_logging(settings.log_format, settings.log_level)
    graph, errors = _load(path)
    if graph is None:
        for line in errors:
            print(line, file=err)
        return EXIT_INVALID
    try:
        params = resolve_params(graph.spec.params, parse_params(param_pairs, graph.spec.params))
        secrets = _parse_pairs(secret_pairs, "--secret")
    except ParamError as exc:
        for name, problem in exc.problems.items():
            print(f"loom: param '{name}': {problem}", file=err)
        return EXIT_INVALID
    except ValueError as exc:
        print(f"loom: {exc}", file=err)
        return EXIT_INVALID
    console = Console(graph, color=color)
    return asyncio.run(
        _run(graph, params, secrets, console, settings.worker_slots, str(path.resolve().parent))
    )


async def _run(
    graph: Graph,
    params: dict[str, Any],
    secrets: dict[str, str],
    console: Console,
    slots: int,
    graph_dir: str,
) -> int:
    loop = asyncio.get_running_loop()
    async with Engine(slots=slots, python_path=(graph_dir,)) as engine:
        execution = engine.start(graph, params=params, secrets=secrets)
        interrupted: int | None = None

        def interrupt(signum: int) -> None:
            nonlocal interrupted
            if interrupted is not None:  # a second signal: stop waiting for processes to die
                raise KeyboardInterrupt
            interrupted = signum
            console.notice("interrupted: cancelling (Ctrl-C again to quit at once)")
            execution.cancel()

        loop.add_signal_handler(signal.SIGINT, interrupt, signal.SIGINT)
        loop.add_signal_handler(signal.SIGTERM, interrupt, signal.SIGTERM)
        reader_gone = False
        try:
            async for event in execution:
                try:
                    console.event(event)
                except BrokenPipeError:  # `loom run ... | head`: the reader is gone, stop
                    reader_gone = True
                    execution.cancel()
                    break
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
            await execution.aclose()
        if reader_gone:
            # Python would complain about flushing stdout at exit: point it at nothing.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        console.summary(execution)
    if interrupted is not None:
        return EXIT_INTERRUPTED if interrupted == signal.SIGINT else EXIT_TERMINATED
    return EXIT_OK if execution.status == "succeeded" else EXIT_FAILED
