"""The commands that talk to a Loom server over its REST API (DESIGN §5, §12): `loom login`,
`loom apply`, `loom graphs [enable|disable]`, `loom trigger`, `loom executions`,
`loom cancel`, `loom dlq list|replay`.

Each takes `--server`/`LOOM_SERVER`, `--token`/`LOOM_TOKEN` (an API token, for scripts)
and `-o/--output json`; without them the server and tokens stored by `loom login` are
used. Errors are printed as `loom: <title>: <detail>` (then each `errors[]` entry), and
the exit status says what kind of failure it was (`EXIT_STATUS_HELP`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

import click
from pydantic import ValidationError

from loom_cli.client import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_UNREACHABLE,
    Client,
    ClientError,
    Problem,
    TokenPair,
    normalize_server,
)
from loom_cli.config import (
    Credentials,
    credentials_lock,
    credentials_path,
    load_credentials,
    save_credentials,
)
from loom_cli.local import parse_params
from loom_common import ParamError, ParamSpec

__all__ = ["EXIT_STATUS_HELP", "REMOTE_COMMANDS"]

EXIT_STATUS_HELP = """\b
Exit status: 0 ok; 1 the server said no (not found, conflict, ...);
2 invalid input (usage, or the server answered 400/413/422);
3 not logged in, login expired or refused (401), or not allowed (403);
4 cannot reach the server, or it failed (5xx)."""

YAML = "application/yaml"
NOT_LOOM = "the server's answer is not what a Loom server sends: is the URL right?"
F = TypeVar("F", bound=Callable[..., Any])


# --- the connection every command shares ------------------------------------------------


@dataclass
class Remote:
    client: Client
    json_output: bool

    def print_json(self, value: Any) -> None:
        click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def remote_options(func: F) -> F:
    options = (
        click.option(
            "--server",
            metavar="URL",
            envvar="LOOM_SERVER",
            default=None,
            help="The Loom server (default: LOOM_SERVER, else the one of `loom login`).",
        ),
        click.option(
            "--token",
            metavar="TOKEN",
            envvar="LOOM_TOKEN",
            default=None,
            help="An API token to use instead of the login (default: LOOM_TOKEN).",
        ),
        click.option(
            "-o",
            "--output",
            type=click.Choice(["table", "json"]),
            default=None,
            help="json: print the server's JSON (for lists, the items), for scripts and jq.",
        ),
    )
    for option in reversed(options):
        func = option(func)
    return func


def _inherited(name: str, value: str | None) -> str | None:
    """An option of a subcommand that was not given takes its group's (`loom graphs -o
    json enable x`)."""
    if value is not None:
        return value
    parent = click.get_current_context().parent
    found = parent.params.get(name) if parent is not None else None
    return found if isinstance(found, str) else None


def _client(server: str | None, token: str | None) -> Client:
    """A client for the server asked for, with the token to use: `--token` / LOOM_TOKEN,
    else the login stored for that server (never sent to another server)."""
    wanted = normalize_server(server) if server else None
    if token:
        stored = load_credentials()
        target = wanted or (stored.server if stored else None)
        if target is None:
            raise ClientError("which server? give --server URL or set LOOM_SERVER", EXIT_INVALID)
        return Client(target, token)
    stored = load_credentials()
    if stored is None or (wanted is not None and wanted != stored.server):
        target = wanted or "URL"
        raise ClientError(
            f"not logged in{' to ' + wanted if wanted else ''}: run `loom login --server "
            f"{target}` (or set LOOM_TOKEN to an API token)",
            EXIT_AUTH,
        )
    creds = stored

    def store(pair: TokenPair) -> None:
        save_credentials(
            Credentials(
                server=creds.server,
                ws_url=creds.ws_url,
                access_token=pair.access_token,
                refresh_token=pair.refresh_token,
                username=creds.username,
            )
        )

    @contextmanager
    def guard() -> Iterator[TokenPair | None]:
        with credentials_lock():
            latest = load_credentials()
            if latest is None or latest.server != creds.server or not latest.refresh_token:
                yield None
            else:
                yield TokenPair(latest.access_token, latest.refresh_token)

    return Client(
        creds.server,
        creds.access_token,
        refresh_token=creds.refresh_token,
        on_refresh=store,
        refresh_guard=guard,
    )


@contextmanager
def remote_session(server: str | None, token: str | None, output: str | None) -> Iterator[Remote]:
    """The session of one command; a `ClientError` ends the command with its message and
    exit status."""
    server, token, output = (
        _inherited("server", server),
        _inherited("token", token),
        _inherited("output", output),
    )
    client: Client | None = None
    try:
        client = _client(server, token)
        yield Remote(client, output == "json")
    except ClientError as exc:
        _fail(exc)
    finally:
        if client is not None:
            client.close()


def _fail(exc: ClientError) -> NoReturn:
    click.echo(f"loom: {exc.message}", err=True)
    for line in exc.lines:
        click.echo(line, err=True)
    sys.exit(exc.exit_code)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def _when(value: Any) -> str:
    """An API time (ISO 8601, UTC) as `2026-05-01 12:00:03Z`."""
    if not isinstance(value, str):
        return "-"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def all_items(
    remote: Remote, path: str, limit: int | None = None, **query: str | None
) -> list[Any]:
    """Every item of a paginated list (up to `limit`), following `next_cursor`."""
    items: list[Any] = []
    cursor: str | None = None
    while True:
        size = 500 if limit is None else min(500, limit - len(items))
        page = remote.client.get(path, {**query, "limit": size, "cursor": cursor})
        items.extend(page.get("items") or [])
        cursor = page.get("next_cursor")
        if not cursor or (limit is not None and len(items) >= limit):
            return items


def quoted(name: str) -> str:
    return quote(name, safe="")


# --- login ------------------------------------------------------------------------------


@click.command("login", epilog=EXIT_STATUS_HELP)
@click.option(
    "--server",
    metavar="URL",
    envvar="LOOM_SERVER",
    default=None,
    help="The Loom server, e.g. http://localhost:8080 (default: LOOM_SERVER, else the last one).",
)
@click.option(
    "--username",
    "-u",
    envvar="LOOM_USERNAME",
    default=None,
    help="Who to log in as (default: LOOM_USERNAME, else asked).",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default=None,
    help="json: print where the login was stored, as JSON.",
)
def login(server: str | None, username: str | None, output: str | None) -> None:
    """Log in to a Loom server; store the tokens for the other commands.

    The password is read from LOOM_PASSWORD, else asked (not echoed). The tokens are
    stored, readable only by you, in $LOOM_CONFIG_DIR, else $XDG_CONFIG_HOME/loom, else
    ~/.config/loom (credentials.json).
    """
    stored = load_credentials()
    try:
        if server is None and stored is None:
            raise ClientError(
                "which server? give --server URL (e.g. http://localhost:8080)", EXIT_INVALID
            )
        target = normalize_server(server) if server else stored.server  # type: ignore[union-attr]
        if username is None:
            default = stored.username if stored and stored.server == target else None
            username = click.prompt("Username", default=default)
        password = os.environ.get("LOOM_PASSWORD") or click.prompt("Password", hide_input=True)
        with Client(target) as client:
            pair = client.login(username, password)
            index = client.get("/", auth=False)
            ws_url = index.get("ws_url") if isinstance(index, dict) else None
        path = save_credentials(
            Credentials(
                server=target,
                ws_url=ws_url if isinstance(ws_url, str) else None,
                access_token=pair.access_token,
                refresh_token=pair.refresh_token or None,
                username=username,
            )
        )
    except ClientError as exc:
        _fail(exc)
    except OSError as exc:
        click.echo(f"loom: cannot store the login in {credentials_path()}: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    if output == "json":
        click.echo(
            json.dumps(
                {
                    "server": target,
                    "username": username,
                    "ws_url": ws_url,
                    "credentials": str(path),
                },
                indent=2,
            )
        )
    else:
        click.echo(f"logged in to {target} as {username} (stored in {path})")


# --- apply ------------------------------------------------------------------------------


@click.command("apply", epilog=EXIT_STATUS_HELP)
@click.option(
    "-f",
    "--file",
    "files",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="A graph file (YAML or JSON; - for stdin); repeatable.",
)
@remote_options
def apply(
    files: tuple[Path, ...], server: str | None, token: str | None, output: str | None
) -> None:
    """Create or update graphs from their files (YAML or JSON).

    Prints `created|updated|unchanged NAME version N` for each file. An invalid file's
    problems are printed as FILE:LINE: PATH: message (as `loom validate` does) and the
    other files are still applied.
    """
    status = EXIT_OK
    with remote_session(server, token, output) as remote:
        for path in files:
            status = max(status, _apply_file(remote, path))
    sys.exit(status)


def _apply_file(remote: Remote, path: Path) -> int:
    label = "<stdin>" if str(path) == "-" else str(path)
    try:
        source = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        click.echo(f"{label}: cannot read: {exc.strerror or exc}", err=True)
        return EXIT_INVALID
    client = remote.client
    headers = {"Content-Type": YAML}
    try:
        # The server reads the name (and every problem, with its line) the same way it
        # will when the graph is applied: no second YAML reader here to disagree with it.
        checked = client.call("POST", "/graphs/validate", content=source, headers=headers)
        name = str(checked.json()["name"])
        try:
            before: Any = client.get(f"/graphs/{quoted(name)}")
        except Problem as exc:
            if exc.status != 404:
                raise
            before = None
        answer = client.call("PUT", f"/graphs/{quoted(name)}", content=source, headers=headers)
        graph = answer.json()
    except Problem as exc:
        if exc.exit_code not in (EXIT_FAILED, EXIT_INVALID):
            raise
        _print_spec_problem(label, exc)
        return exc.exit_code
    except (ValueError, KeyError, TypeError):
        raise ClientError(NOT_LOOM, EXIT_UNREACHABLE) from None
    if remote.json_output:
        remote.print_json(graph)
        return EXIT_OK
    version = graph.get("version")
    if answer.status_code == 201 or before is None:
        outcome = "created"
    elif version == before.get("latest_version", before.get("version")):
        outcome = "unchanged"
    else:
        outcome = "updated"
    click.echo(f"{outcome} {graph.get('name', name)} version {version}")
    return EXIT_OK


def _print_spec_problem(label: str, problem: Problem) -> None:
    if problem.status != 422 or not problem.errors:
        click.echo(f"loom: {label}: {problem.message}", err=True)
        for line in problem.lines:
            click.echo(line, err=True)
        return
    for error in problem.errors:
        where = f"{label}:{error.line}" if error.line is not None else label
        path = error.path if error.path and error.path != "(document)" else ""
        click.echo(f"{where}: {path + ': ' if path else ''}{error.message}", err=True)


# --- graphs -----------------------------------------------------------------------------


@click.group("graphs", invoke_without_command=True, epilog=EXIT_STATUS_HELP)
@remote_options
@click.pass_context
def graphs(ctx: click.Context, server: str | None, token: str | None, output: str | None) -> None:
    """List graphs (name, version, enabled, triggers); enable or disable one."""
    if ctx.invoked_subcommand is not None:
        return
    with remote_session(server, token, output) as remote:
        items = all_items(remote, "/graphs")
        if remote.json_output:
            remote.print_json(items)
            return
        rows = [
            (
                str(g.get("name")),
                str(g.get("version")),
                "yes" if g.get("enabled") else "no",
                ", ".join(str(t.get("kind")) for t in g.get("triggers") or []) or "-",
            )
            for g in items
        ]
        print_table(("NAME", "VERSION", "ENABLED", "TRIGGERS"), rows)


def _set_enabled(
    name: str, enabled: bool, server: str | None, token: str | None, output: str | None
) -> None:
    with remote_session(server, token, output) as remote:
        graph = _json_of(
            remote.client.call("PATCH", f"/graphs/{quoted(name)}", json={"enabled": enabled})
        )
        if remote.json_output:
            remote.print_json(graph)
        elif enabled:
            click.echo(f"enabled {name}: its triggers are active")
        else:
            click.echo(f"disabled {name}: its triggers are paused")


@graphs.command("enable", epilog=EXIT_STATUS_HELP)
@click.argument("name")
@remote_options
def enable(name: str, server: str | None, token: str | None, output: str | None) -> None:
    """Resume every trigger of graph NAME."""
    _set_enabled(name, True, server, token, output)


@graphs.command("disable", epilog=EXIT_STATUS_HELP)
@click.argument("name")
@remote_options
def disable(name: str, server: str | None, token: str | None, output: str | None) -> None:
    """Pause every trigger of graph NAME (its webhooks answer 404, its timers stop)."""
    _set_enabled(name, False, server, token, output)


# --- executions -------------------------------------------------------------------------


@click.command("trigger", epilog=EXIT_STATUS_HELP)
@click.argument("graph")
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A param, read by its declared type as `loom run` does (repeatable).",
)
@click.option(
    "--idempotency-key",
    metavar="KEY",
    default=None,
    help="Trigger at most once per key: the same key again returns the same execution.",
)
@click.option(
    "--follow",
    is_flag=True,
    help="Then print its lines as `loom logs -f` does and exit with its status (0 succeeded).",
)
@remote_options
def trigger(
    graph: str,
    params: tuple[str, ...],
    idempotency_key: str | None,
    follow: bool,
    server: str | None,
    token: str | None,
    output: str | None,
) -> None:
    """Start an execution of GRAPH; prints its id and status (with --follow, then its lines)."""
    with remote_session(server, token, output) as remote:
        spec = remote.client.get(f"/graphs/{quoted(graph)}").get("spec") or {}
        declared: dict[str, ParamSpec] = {}
        for name, param in (spec.get("params") or {}).items():
            try:
                declared[name] = ParamSpec.model_validate(param)
            except ValidationError:
                continue  # a newer server's param: sent as text, the server judges it
        try:
            values = parse_params(params, declared)
        except ParamError as exc:
            for name, problem in exc.problems.items():
                click.echo(f"loom: param '{name}': {problem}", err=True)
            sys.exit(EXIT_INVALID)
        except ValueError as exc:
            raise ClientError(str(exc), EXIT_INVALID) from None
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        answer = remote.client.call(
            "POST", f"/graphs/{quoted(graph)}/executions", json={"params": values}, headers=headers
        )
        execution = _json_of(answer)
        if remote.json_output:
            remote.print_json(execution)
        else:
            again = (
                " (triggered before with this idempotency key)" if answer.status_code == 200 else ""
            )
            click.echo(f"execution {execution.get('id')} {execution.get('status')}{again}")
        if follow:
            from loom_cli.follow import follow_execution  # here: follow imports this module

            sys.exit(follow_execution(remote, str(execution.get("id"))))


@click.command("executions", epilog=EXIT_STATUS_HELP)
@click.option("--graph", "-g", default=None, help="Only this graph's executions.")
@click.option("--status", "-s", default=None, help="Only executions in this status.")
@click.option(
    "--trigger", "trigger_type", default=None, help="Only this trigger type (manual, webhook, ...)."
)
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="At most this many, newest first.",
)
@remote_options
def executions(
    graph: str | None,
    status: str | None,
    trigger_type: str | None,
    limit: int,
    server: str | None,
    token: str | None,
    output: str | None,
) -> None:
    """List executions, newest first: id, graph, status, trigger, created."""
    with remote_session(server, token, output) as remote:
        items = all_items(
            remote, "/executions", limit, graph=graph, status=status, trigger=trigger_type
        )
        if remote.json_output:
            remote.print_json(items)
            return
        rows = [
            (
                str(e.get("id")),
                str(e.get("graph")),
                str(e.get("status")),
                str((e.get("trigger") or {}).get("type", "-")),
                _when(e.get("created_at")),
            )
            for e in items
        ]
        print_table(("ID", "GRAPH", "STATUS", "TRIGGER", "CREATED"), rows)


@click.command("cancel", epilog=EXIT_STATUS_HELP)
@click.argument("execution_id", metavar="ID")
@remote_options
def cancel(execution_id: str, server: str | None, token: str | None, output: str | None) -> None:
    """Ask an execution to stop.

    Its running nodes are cancelled and the ones not started yet are skipped.
    """
    with remote_session(server, token, output) as remote:
        answer = remote.client.call("POST", f"/executions/{quoted(execution_id)}/cancel")
        execution = _json_of(answer)
        if remote.json_output:
            remote.print_json(execution)
            return
        click.echo(
            f"cancel requested for execution {execution.get('id', execution_id)} "
            f"({execution.get('status')})"
        )


# --- dead letters -----------------------------------------------------------------------


@click.group("dlq", epilog=EXIT_STATUS_HELP)
@remote_options
def dlq(server: str | None, token: str | None, output: str | None) -> None:
    """The work queue's dead letters: messages given up on, with why (admins only)."""


@dlq.command("list", epilog=EXIT_STATUS_HELP)
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(min=1, max=1000),
    default=100,
    show_default=True,
    help="At most this many, oldest first.",
)
@remote_options
def dlq_list(limit: int, server: str | None, token: str | None, output: str | None) -> None:
    """List dead letters, oldest first: id, key, type, when, and why.

    A message that is not an envelope shows no type; `-o json` has its preview.
    """
    with remote_session(server, token, output) as remote:
        page = remote.client.get("/dlq", {"limit": limit})
        items = page.get("items") if isinstance(page, dict) else None
        if not isinstance(items, list):
            raise ClientError(NOT_LOOM, EXIT_UNREACHABLE)
        if remote.json_output:
            remote.print_json(items)
            return
        rows = [
            (
                str(d.get("id")),
                str(d.get("key") or "-"),
                str(d.get("type") or "-"),
                _when(d.get("at")),
                " ".join(str(d.get("reason")).split()),  # one line per dead letter
            )
            for d in items
        ]
        print_table(("ID", "KEY", "TYPE", "DEAD-LETTERED", "REASON"), rows)
        if len(items) == limit:
            click.echo(f"(the oldest {limit}: there may be more, see --limit)", err=True)


@dlq.command("replay", epilog=EXIT_STATUS_HELP)
@click.argument("letter_id", metavar="ID")
@remote_options
def dlq_replay(letter_id: str, server: str | None, token: str | None, output: str | None) -> None:
    """Put dead letter ID back on the work queue, as a new message."""
    with remote_session(server, token, output) as remote:
        remote.client.call("POST", f"/dlq/{quoted(letter_id)}/replay")
        if remote.json_output:
            remote.print_json({"id": letter_id, "replayed": True})
            return
        click.echo(f"replayed dead letter {letter_id}: it is back on the work queue")


def _json_of(response: Any) -> Any:
    try:
        value = response.json()
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ClientError(NOT_LOOM, EXIT_UNREACHABLE)
    return value


REMOTE_COMMANDS: tuple[click.Command, ...] = (
    login,
    apply,
    graphs,
    trigger,
    executions,
    cancel,
    dlq,
)
