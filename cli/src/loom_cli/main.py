"""The `loom` command."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import click

from loom_cli.db import db
from loom_cli.follow import logs
from loom_cli.local import run_command, schema_command, validate_command
from loom_cli.remote import REMOTE_COMMANDS
from loom_cli.secrets_cmd import secrets

__all__ = ["cli", "main"]

SERVICES = {
    "rest": "loom_rest.serve",
    "timer": "loom_timer.serve",
    "webhook": "loom_webhook.serve",
    "websocket": "loom_websocket.serve",
    "worker": "loom_worker.serve",
}
"""`loom serve NAME`: the module whose `main()` runs the service."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="loom", prog_name="loom")
def cli() -> None:
    """Loom runs graphs of shell, HTTP and Python nodes.

    \b
    Start with:  loom run examples/hello.yaml
    """


@cli.command("run")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A param, read by its declared type (repeatable).",
)
@click.option(
    "--secret",
    "secrets",
    multiple=True,
    metavar="NAME=VALUE",
    help="A secret for ${{ secrets.NAME }}; NAME alone reads the variable NAME "
    "from your environment (repeatable).",
)
@click.option(
    "--slots",
    type=click.IntRange(min=1),
    default=None,
    help="Nodes running at once (default: LOOM_WORKER_SLOTS or the CPU count).",
)
@click.option(
    "--color/--no-color", default=None, help="Colour the output (default: on a terminal)."
)
def run(
    file: Path,
    params: tuple[str, ...],
    secrets: tuple[str, ...],
    slots: int | None,
    color: bool | None,
) -> None:
    """Run a graph file here, without a server: live logs, then a summary.

    Exit status: 0 succeeded, 1 failed, 2 invalid graph or params, 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM).
    """
    sys.exit(run_command(file, params, secrets, slots=slots, color=color))


@cli.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check graph files; print every problem as FILE:LINE: PATH: message (exit 2 if any)."""
    sys.exit(validate_command(files))


@cli.command("schema")
def schema() -> None:
    """Print the JSON Schema of the graph spec."""
    schema_command()


@cli.command("up")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="The API and the webhooks.",
)
@click.option(
    "--ws-port",
    type=click.IntRange(0, 65535),
    default=8081,
    show_default=True,
    help="The live logs (WebSockets).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".loom"),
    show_default=True,
    help="Where the SQLite database and the generated secret key live.",
)
@click.option("--database-url", metavar="URL", help="Default: SQLite in the data directory.")
@click.option("--queue-url", metavar="URL", help="Default: memory:// (amqp://... or kafka://...).")
@click.option("--events-url", metavar="URL", help="Default: memory:// (kafka://... or amqp://...).")
def up(**options: Any) -> None:
    """Run the whole system in one process: API, webhooks, timers, a worker, live logs.

    The first start creates the data directory, a secret key in it and user `admin`
    (password from LOOM_ADMIN_PASSWORD, or generated and printed once). Ctrl-C stops.

    Exit status: 0 stopped, 2 bad settings or a service that cannot start.
    """
    from loom_cli.up import up_command

    sys.exit(up_command(**options))


@cli.command("serve")
@click.argument("service", metavar="SERVICE", type=click.Choice(sorted(SERVICES)))
def serve(service: str) -> None:
    """Run one Loom service, as its image does.

    The same as `python -m loom_<service>`: configured by LOOM_* variables and loom.toml,
    it runs until SIGTERM or Ctrl-C, then finishes the requests in flight.

    Exit status: 0 stopped cleanly, 2 bad settings (e.g. LOOM_SECRET_KEY missing).
    """
    # Imported only now: the other commands must not pay for the service's server stack.
    importlib.import_module(SERVICES[service]).main()


cli.add_command(db)
cli.add_command(secrets)
cli.add_command(logs)
for _command in REMOTE_COMMANDS:
    cli.add_command(_command)


def main() -> None:
    cli()
