"""`loom up`: the whole system in one process (DESIGN §2, §12).

ONE runtime (one database engine, one set of brokers, one outbox relay, one metrics
registry) is handed to every service: the REST API and the webhooks share `--port`
(`/hooks/...` goes to the webhook app, everything else to the API), the live logs listen
on `--ws-port`, and the timer and the worker run beside them. SQLite in `--data-dir` and
the in-memory brokers unless `--database-url/--queue-url/--events-url` (or `LOOM_*`) say
otherwise. On the first start it creates the data directory, a secret key in it (0600)
and user `admin`, and prints the login.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

from loom_common import SettingsError, configure_logging, load_service_settings
from loom_rest.settings import RestSettings
from loom_timer.settings import TimerSettings
from loom_webhook.settings import WebhookSettings
from loom_websocket.settings import WebsocketSettings
from loom_worker.settings import WorkerSettings

__all__ = ["UpSettings", "up_command"]

_log = logging.getLogger("loom.up")

SECRET_FILE = "secret_key"


class UpSettings(RestSettings, WebhookSettings, TimerSettings, WorkerSettings, WebsocketSettings):
    """Every service's settings at once: each service is handed this same object."""


def kept_secret_key(data_dir: Path) -> str:
    """The secret key kept in `data_dir` (0600), made on the first start."""
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def load_up_settings(
    data_dir: Path, host: str, port: int, ws_port: int, **flags: str | None
) -> UpSettings:
    """Every service's settings (defaults < loom.toml < LOOM_* < flags), where `loom up`
    fills in what nothing set: the secret key and the SQLite database in `data_dir`, and
    the WebSocket URL the API announces. Raises `SettingsError`, `OSError`."""
    given: dict[str, Any] = {
        **flags,
        "rest_host": host,
        "rest_port": port,
        "webhook_host": host,
        "webhook_port": port,
        "websocket_host": host,
        "websocket_port": ws_port,
    }
    settings = load_service_settings(UpSettings, **given)
    filled: dict[str, Any] = {}
    if settings.secret_key is None:
        filled["secret_key"] = kept_secret_key(data_dir)
    if settings.database_url == UpSettings.model_fields["database_url"].default:
        filled["database_url"] = f"sqlite+aiosqlite:///{data_dir.resolve() / 'loom.db'}"
    if settings.rest_public_ws_url is None:
        filled["rest_public_ws_url"] = f"ws://{_shown(host)}:{ws_port}"
    return load_service_settings(UpSettings, **(given | filled)) if filled else settings


def up_command(
    *,
    host: str,
    port: int,
    ws_port: int,
    data_dir: Path,
    database_url: str | None,
    queue_url: str | None,
    events_url: str | None,
) -> int:
    started = time.monotonic()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        settings = load_up_settings(
            data_dir,
            host,
            port,
            ws_port,
            database_url=database_url,
            queue_url=queue_url,
            events_url=events_url,
        )
    except (SettingsError, OSError) as exc:
        print(f"loom up: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for wanted, flag in ((settings.rest_port, "--port"), (settings.websocket_port, "--ws-port")):
        problem = _unavailable(settings.rest_host, wanted)
        if problem is not None:
            print(
                f"loom up: cannot listen on {settings.rest_host}:{wanted} ({problem}): "
                f"is Loom already running? Choose another with {flag}",
                file=sys.stderr,
            )
            return 2
    configure_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(_up(settings, started))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a service that cannot start: one line, not a traceback
        from loom_common import LoomError

        if not isinstance(exc, LoomError | OSError):
            raise
        print(f"loom up: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


async def _up(settings: UpSettings, started: float) -> None:
    from loom_db.migrate import upgrade
    from loom_rest.app import create_app as rest_app
    from loom_rest.runtime import Runtime as RestRuntime
    from loom_rest.runtime import ensure_first_admin
    from loom_runtime import hypercorn_config, open_runtime, serve_app, stop_on_signals
    from loom_timer.service import TimerService
    from loom_webhook.app import create_app as webhook_app
    from loom_websocket import LiveLogs
    from loom_worker.service import Worker

    stop = stop_on_signals()
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per migration step
    await upgrade(settings.database_url)
    async with open_runtime(settings, "loom up") as runtime:
        password = await ensure_first_admin(runtime.database, settings)
        api = rest_app(RestRuntime.of(runtime, settings))
        hooks = webhook_app(runtime, settings)
        config = hypercorn_config(settings.rest_host, settings.rest_port, settings.shutdown_grace)
        live = LiveLogs(runtime, settings)
        worker = Worker(runtime, settings)
        async with TimerService(runtime, settings) as timers:
            tasks = {
                asyncio.create_task(serve_app(_Mount(api, hooks), config, stop), name="http"),
                asyncio.create_task(live.serve(stop), name="websocket"),
                asyncio.create_task(worker.run(stop), name="worker"),
                asyncio.create_task(timers.wait(), name="timer"),
            }
            ready = asyncio.create_task(_ready(live, worker))
            done, _ = await asyncio.wait({ready, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            if ready in done:
                _banner(settings, password, time.monotonic() - started)
            else:
                ready.cancel()
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            for task in tasks:
                if task.get_name() == "timer":
                    task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            raise result
    _log.info("loom stopped")


async def _ready(live: Any, worker: Any) -> None:
    await live.started.wait()
    await worker.ready.wait()


class _Mount:
    """`/hooks/...` to the webhook app, the rest (and the lifespan) to the API."""

    def __init__(self, api: Any, hooks: Any) -> None:
        self.api = api
        self.hooks = hooks

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/hooks/"):
            await self.hooks(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def _unavailable(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on, or None (checked before anything starts, so
    that a port in use is one clear line rather than a failure halfway through)."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _shown(host: str) -> str:
    """The host to print in a URL (a wildcard address is reached on localhost)."""
    if host in ("0.0.0.0", "::", ""):
        return "localhost"
    return f"[{host}]" if ":" in host else host


def _banner(settings: UpSettings, password: str | None, seconds: float) -> None:
    host = _shown(settings.rest_host)
    base = f"http://{host}:{settings.rest_port}"
    lines = [
        f"Loom is up ({seconds:.1f}s)",
        f"  API        {base}/api/v1/",
        f"  webhooks   {base}/hooks/{{graph}}",
        f"  live logs  ws://{host}:{settings.websocket_port}/ws/executions/{{id}}",
        f"  database   {_redacted(settings.database_url)}",
    ]
    if password is not None:
        lines.append(f"  login      admin / {password}   (shown once: keep it)")
    lines += [
        "",
        "Next:",
        f"  loom login --server {base} --username admin",
        "  loom apply -f examples/hello.yaml",
        "  loom trigger hello --follow",
        "",
        "Ctrl-C stops.",
    ]
    print("\n".join(lines), flush=True)


def _redacted(url: str) -> str:
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url
