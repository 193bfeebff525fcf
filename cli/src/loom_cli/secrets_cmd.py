"""`loom secrets set|list|delete`: the secrets graphs read as `${{ secrets.NAME }}` and
hooks verify signatures with (DESIGN §5; admins only). A value is never printed, and is
read from standard input or a prompt rather than the command line (shell history)."""

from __future__ import annotations

import sys

import click

from loom_cli.remote import (
    EXIT_STATUS_HELP,
    all_items,
    print_table,
    quoted,
    remote_options,
    remote_session,
)

__all__ = ["secrets"]


@click.group("secrets", epilog=EXIT_STATUS_HELP)
def secrets() -> None:
    """Manage the server's secrets (admins)."""


@secrets.command("set", epilog=EXIT_STATUS_HELP)
@click.argument("name")
@click.option(
    "--from-stdin",
    is_flag=True,
    help="Read the value from standard input (all of it, without its final newline).",
)
@remote_options
def set_secret(
    name: str, from_stdin: bool, server: str | None, token: str | None, output: str | None
) -> None:
    """Store secret NAME (created or replaced); the value is asked for, or read with
    --from-stdin (`printf %s "$VALUE" | loom secrets set NAME --from-stdin`)."""
    if from_stdin:
        value = sys.stdin.read().removesuffix("\n")
    else:
        value = click.prompt(f"value of {name}", hide_input=True, confirmation_prompt=True)
    if not value:
        raise click.UsageError("a secret's value cannot be empty")
    with remote_session(server, token, output) as remote:
        remote.client.call("PUT", f"/secrets/{quoted(name)}", json={"value": value})
        if remote.json_output:
            remote.print_json({"name": name})
            return
        click.echo(f"stored secret {name}")


@secrets.command("list", epilog=EXIT_STATUS_HELP)
@remote_options
def list_secrets(server: str | None, token: str | None, output: str | None) -> None:
    """The names of the stored secrets (never their values)."""
    with remote_session(server, token, output) as remote:
        items = all_items(remote, "/secrets")
        if remote.json_output:
            remote.print_json(items)
            return
        print_table(("NAME",), [(str(item.get("name")),) for item in items])


@secrets.command("delete", epilog=EXIT_STATUS_HELP)
@click.argument("name")
@remote_options
def delete_secret(name: str, server: str | None, token: str | None, output: str | None) -> None:
    """Delete secret NAME."""
    with remote_session(server, token, output) as remote:
        remote.client.call("DELETE", f"/secrets/{quoted(name)}")
        if remote.json_output:
            remote.print_json({"name": name, "deleted": True})
            return
        click.echo(f"deleted secret {name}")
