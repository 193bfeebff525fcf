"""Running a service until SIGTERM / SIGINT: Hypercorn's settings, the stop signal, and
the entry point every `python -m loom_<service>` shares: its command line (`--help` lists
the service's settings, an unknown argument exits 2) and its start (a configuration error
exits 2 with one clear line)."""

from __future__ import annotations

import argparse
import ast
import asyncio
import inspect
import logging
import signal
import sys
import textwrap
from collections.abc import Callable, Coroutine, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

from hypercorn.asyncio import serve
from hypercorn.config import Config

from loom_common import LoomError, configure_logging
from loom_common.settings import LoomSettings

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

__all__ = ["hypercorn_config", "run_service", "serve_app", "stop_on_signals"]

S = TypeVar("S", bound=LoomSettings)


def hypercorn_config(host: str, port: int, grace: float) -> Config:
    """The Hypercorn settings services (and their benchmarks' baselines) run with."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = grace
    config.keep_alive_timeout = 75
    return config


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_app(app: Any, config: Config, stop: asyncio.Event) -> None:
    """Serve `app` until `stop` is set, then finish the requests in flight (up to the
    config's graceful timeout)."""
    # In a task of its own: Hypercorn's shutdown leaves cancellation requests counted on
    # the task that ran it, which would make the caller's cleanup look cancelled.
    await asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))


def run_service(
    name: str,
    load: Callable[[Path | None], S],
    run: Callable[[S], Coroutine[Any, Any, None]],
    *,
    settings_class: type[S],
    argv: Sequence[str] | None = None,
) -> None:
    """The body of a service's `main()`: read its command line, load its settings,
    configure logging, run it.

    `name` is the distribution (`loom-rest`; its module is `loom_rest`), `load` the
    service's settings loader (called with the `--config` file or None) and
    `settings_class` what it returns, whose fields `--help` lists. `argv` defaults to the
    command line when the program is `python -m <the service's module>`, and to no
    arguments otherwise: `loom serve rest` runs the same `main()` under a command line
    of its own.

    `--help` and `--version` print and exit 0 without reading any setting; an unknown
    argument exits 2 with argparse's one-line error. A `LoomError` while loading or
    starting (a missing key, an unreachable broker) exits 2 with one line naming the
    service."""
    module = name.replace("-", "_")
    args = _parser(name, module, settings_class).parse_args(
        _own_arguments(module) if argv is None else argv
    )
    try:
        settings = load(args.config)
    except LoomError as exc:
        print(f"{name}: {exc}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
    configure_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(run(settings))
    except LoomError as exc:
        logging.getLogger("loom").error("%s cannot start: %s", name, exc)
        raise SystemExit(2) from None


def _own_arguments(module: str) -> list[str]:
    """The command line's arguments when this process is `python -m <module>`, else none
    (they belong to the program that runs the service, e.g. `loom serve rest`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return sys.argv[1:] if spec is not None and spec.name == f"{module}.__main__" else []


def _parser(name: str, module: str, settings_class: type[LoomSettings]) -> argparse.ArgumentParser:
    """`python -m loom_<service> [--config FILE]`, with the settings in `--help`."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=_about(name, settings_class)
        + "\n\nRuns until SIGTERM or Ctrl-C, then finishes the work in flight (up to "
        "LOOM_SHUTDOWN_GRACE seconds). Configured by LOOM_* environment variables and the "
        "file loom.toml (in the working directory, or the one LOOM_CONFIG or --config "
        "names): its keys are the settings below in lower case without LOOM_ "
        f"(`{_example_key(settings_class)}`); the environment wins over the file.",
        epilog=_settings_help(settings_class)
        + "\n\nexit status: 0 stopped by SIGTERM or Ctrl-C; 2 bad arguments or settings "
        "(LOOM_SECRET_KEY, the same for every service, is required) or a broker that "
        "cannot be reached at start.",
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="the settings file to read instead of ./loom.toml (as LOOM_CONFIG does)",
    )
    parser.add_argument("--version", action="version", version=f"{name} {_version(name)}")
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the settings table as written; wraps the description's paragraphs."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = text.split("\n\n")
        filled = [
            paragraph
            if paragraph.startswith(" ") or "\n" in paragraph
            else textwrap.fill(paragraph, width, initial_indent=indent, subsequent_indent=indent)
            for paragraph in paragraphs
        ]
        return "\n\n".join(filled)


def _about(name: str, settings_class: type[LoomSettings]) -> str:
    """What the service is: its distribution's summary (its pyproject's description), or
    the first line of its settings' docstring."""
    try:
        summary = metadata.metadata(name)["Summary"]
    except (metadata.PackageNotFoundError, KeyError):
        summary = None
    if not summary:
        summary = (inspect.getdoc(settings_class) or "a Loom service").splitlines()[0]
    return f"{name}: {summary}"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _own_fields(settings_class: type[LoomSettings]) -> list[str]:
    return [n for n in settings_class.model_fields if n not in LoomSettings.model_fields]


def _example_key(settings_class: type[LoomSettings]) -> str:
    """A line of loom.toml setting one of the service's own settings: `rest_port = 8080`."""
    for field_name in _own_fields(settings_class):
        default = settings_class.model_fields[field_name].default
        if type(default) is int:
            return f"{field_name} = {default}"
    return 'log_level = "INFO"'


def _settings_help(settings_class: type[LoomSettings]) -> str:
    """Two tables, the service's own settings and those of every service: the variable,
    its type and default, and the field's docstring."""
    docs = _attribute_docs(settings_class)
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    sections = [
        ("settings of this service", _own_fields(settings_class)),
        ("settings of every Loom service", list(LoomSettings.model_fields)),
    ]
    lines: list[str] = []
    for title, names in sections:
        if not names:
            continue
        lines.append(f"{title}:" if not lines else f"\n{title}:")
        for field_name in names:
            info = settings_class.model_fields[field_name]
            variable = f"{prefix}{field_name.upper()}"
            lines.append(f"  {variable}  {_describe_value(info)}")
            if field_name in docs:
                lines.extend(
                    textwrap.wrap(
                        docs[field_name], 76, initial_indent="      ", subsequent_indent="      "
                    )
                )
    return "\n".join(lines)


def _describe_value(info: FieldInfo) -> str:
    """`int, default 8080`; `secret, unset by default`; `one of console, json, default
    console`."""
    kind = _type_name(info.annotation)
    if info.default_factory is not None:
        if info.default_factory in (list, dict):
            default = f"default {info.default_factory()!r}"
        else:
            default = "default computed at start"
    elif info.default is None:
        default = "unset by default"
    else:
        default = f"default {info.default}"
    return f"{kind}, {default}"


def _type_name(annotation: Any) -> str:
    if annotation is None or annotation is type(None):
        return "none"
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(annotation))
    if origin is not None and type(None) in get_args(annotation):  # `X | None`
        (inner,) = (arg for arg in get_args(annotation) if arg is not type(None))
        return _type_name(inner)
    if origin in (list, tuple, set, dict):
        return f"JSON {getattr(origin, '__name__', 'value')}"
    if getattr(annotation, "__name__", None) == "SecretStr":  # pydantic's
        return "secret"
    if annotation is Path:
        return "path"
    return str(getattr(annotation, "__name__", annotation))


def _attribute_docs(settings_class: type[LoomSettings]) -> dict[str, str]:
    """The docstrings written under the fields of `settings_class` and its bases (read
    from their source; none when the source is not installed)."""
    docs: dict[str, str] = {}
    for cls in reversed(settings_class.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, LoomSettings)):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs
