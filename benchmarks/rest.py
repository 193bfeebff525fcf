"""Brest: the REST service's throughput against a hello-world route, in one run.

Two figures, requests/s with the p99 latency, on PostgreSQL:
1. `GET /api/v1/executions?limit=50`, authenticated (a bearer access token of `admin`),
   each answer a full page of 50 executions (500 are seeded). Target: >= 0.30 of the
   hello-world route's rate.
2. `POST /api/v1/graphs/bench/executions` with `{"params": {...}}` and no Idempotency-Key,
   authenticated: each request creates an execution (and its outbox row). Reported; no
   target.
The baseline of both: an unauthenticated hello-world Starlette route (a small JSON) served
by Hypercorn with the service's own settings (`loom_rest.serve.hypercorn_config`), in a
process of its own, measured in the same run.

    uv run python benchmarks/rest.py [--quick] [--repeat K] [--concurrency C]
        [--seconds D] [--database-url URL]

Needs PostgreSQL: --database-url or LOOM_TEST_POSTGRES_URL (`postgresql+psycopg://...`).
Creates a throwaway database (`loom_bench_<random>`, migrated, dropped at the end), starts
`python -m loom_rest` on it (memory queue and events) and the hello-world server
(`python benchmarks/rest.py --serve-hello PORT`) as subprocesses, and drives both from this
process with a raw asyncio HTTP/1.1 keep-alive client (`_httpload.py`): C connections
(16), each sending requests back to back for D seconds (10; --quick 2). Each round runs
hello, GET, hello, POST; K rounds (3; --quick 2), and each figure is the best of its K runs
against the best of the K hello runs just before them. Any non-2xx answer fails the run.
Prints one JSON object per line and figure (DESIGN §10).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

import orjson
import psycopg
from _httpload import LoadError, LoadResult, fetch, load, request
from sqlalchemy.engine import URL, make_url

from loom_db.testing import scratch_database

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
GRAPH = "bench"
GRAPH_YAML = """\
name: bench
description: The REST benchmark's graph
params:
  name: {type: string, default: world}
nodes:
  greet:
    run: echo "hello ${{ params.name }}"
"""
SEEDED = 500
PAGE = 50
POST_BODY = orjson.dumps({"params": {"name": "bench"}})
GET_TARGET = f"/api/v1/executions?limit={PAGE}"
POST_TARGET = f"/api/v1/graphs/{GRAPH}/executions"
HELLO_TARGET = "/hello"
START_TIMEOUT = 60.0


class BenchError(Exception):
    """The benchmark cannot measure what it means to (a server failed, a non-2xx, ...)."""


# --- the baseline server (`--serve-hello PORT`, run in a subprocess) ---------------------


def serve_hello(port: int) -> None:
    """Serve one unauthenticated JSON route with the REST service's Hypercorn settings."""
    from hypercorn.asyncio import serve
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from loom_runtime import hypercorn_config

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    app = Starlette(routes=[Route(HELLO_TARGET, hello)])

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        config = hypercorn_config(HOST, port, 5.0)
        await asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]

    asyncio.run(main())


# --- set-up: the database, the servers -----------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def prepare_database(url: str) -> None:
    """Migrate, apply the graph, seed SEEDED executions (one transaction), analyze."""
    from loom_db.migrate import upgrade_sync

    upgrade_sync(url)
    asyncio.run(_seed(url))
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


async def _seed(url: str) -> None:
    from loom_db.database import create_database
    from loom_db.executions import create_execution
    from loom_db.graphs import apply_graph

    db = create_database(url)
    try:
        async with db.transaction() as conn:
            graph, _ = await apply_graph(conn, GRAPH_YAML, by="admin")
            for i in range(SEEDED):
                await create_execution(
                    conn,
                    graph=GRAPH,
                    graph_version=graph.version,
                    params={"name": f"seed-{i}"},
                    trigger_type="manual",
                    trigger_info={"user": "admin"},
                )
    finally:
        await db.dispose()


@contextmanager
def server(
    args: list[str], env: dict[str, str], what: str, port: int, ready_path: str = "/readyz"
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server subprocess until it answers `GET ready_path` with 200, then SIGTERM
    and wait for it at the end; its stderr goes to a temp file shown when it fails to
    start. Yields the process."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait_ready(proc, log, what, port, ready_path)
            yield proc
        finally:
            _stop(proc)


def _wait_ready(
    proc: subprocess.Popen[bytes], log: IO[bytes], what: str, port: int, path: str
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")[-4000:]
            raise BenchError(f"{what} exited with {proc.returncode} at start:\n{output}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise BenchError(f"{what} did not answer GET {path} within {START_TIMEOUT:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux `/proc`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rest_env(url: str, port: int, password: str, pool_size: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update(
        LOOM_DATABASE_URL=url,
        # Sized to the load, as an operator would: with fewer pooled connections than
        # concurrent requests the overflow connections are opened and closed constantly.
        LOOM_DATABASE_POOL_SIZE=str(pool_size),
        LOOM_SECRET_KEY=secrets.token_urlsafe(48),
        LOOM_ADMIN_PASSWORD=password,
        LOOM_REST_HOST=HOST,
        LOOM_REST_PORT=str(port),
        LOOM_QUEUE_URL="memory://",
        LOOM_EVENTS_URL="memory://",
        LOOM_LOG_LEVEL="WARNING",
    )
    return env


def login(port: int, password: str) -> str:
    """An access token of `admin`."""
    body = orjson.dumps({"username": "admin", "password": password})
    req = urllib.request.Request(
        f"http://{HOST}:{port}/api/v1/auth/login",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            token: str = orjson.loads(answer.read())["access_token"]
            return token
    except urllib.error.HTTPError as exc:
        raise BenchError(f"login as admin: {exc.code} {exc.read()[:500]!r}") from None


# --- measuring ----------------------------------------------------------------------------


async def check_once(port: int, raw: bytes, what: str, expect: int) -> bytes:
    status, body = await fetch(HOST, port, raw)
    if status != expect:
        raise BenchError(f"{what}: expected {expect}, got {status}: {body[:500]!r}")
    return body


async def measure(
    port: int, raw: bytes | Callable[[], bytes], what: str, *, concurrency: int, seconds: float
) -> LoadResult:
    result = await load(HOST, port, raw, concurrency=concurrency, seconds=seconds)
    if result.non_2xx:
        raise BenchError(
            f"{what}: {result.non_2xx} of {result.completed} answers were not 2xx "
            f"({result.statuses}); the first:\n{result.bad_example.decode(errors='replace')}"
        )
    if not result.completed:
        raise BenchError(f"{what}: no request completed in {seconds} s")
    return result


def best(results: list[LoadResult]) -> LoadResult:
    return max(results, key=lambda r: r.rate)


async def bench(
    rest_port: int,
    hello_port: int,
    token: str,
    *,
    concurrency: int,
    seconds: float,
    repeat: int,
) -> tuple[tuple[LoadResult, LoadResult], tuple[LoadResult, LoadResult]]:
    """((GET, its hello), (POST, its hello)), each the best of `repeat` runs."""
    auth = {"Authorization": f"Bearer {token}"}
    hello = request("GET", HOST, hello_port, HELLO_TARGET)
    get = request("GET", HOST, rest_port, GET_TARGET, headers=auth)
    post = request(
        "POST",
        HOST,
        rest_port,
        POST_TARGET,
        headers={**auth, "Content-Type": "application/json"},
        body=POST_BODY,
    )
    await check_once(hello_port, hello, "GET /hello", 200)
    page = orjson.loads(await check_once(rest_port, get, f"GET {GET_TARGET}", 200))
    if len(page["items"]) != PAGE:
        raise BenchError(f"GET {GET_TARGET} returned {len(page['items'])} items, not {PAGE}")
    await check_once(rest_port, post, f"POST {POST_TARGET}", 202)

    warm = min(1.0, seconds / 2)  # connections, pools, caches, code paths of each side
    sides = ((hello_port, hello, "hello"), (rest_port, get, "GET"), (rest_port, post, "POST"))
    for port, raw, what in sides:
        await measure(port, raw, f"warm-up {what}", concurrency=concurrency, seconds=warm)

    runs: dict[str, list[LoadResult]] = {"hello-get": [], "get": [], "hello-post": [], "post": []}
    for _ in range(repeat):
        for key, port, raw, what in (
            ("hello-get", hello_port, hello, f"GET {HELLO_TARGET}"),
            ("get", rest_port, get, f"GET {GET_TARGET}"),
            ("hello-post", hello_port, hello, f"GET {HELLO_TARGET}"),
            ("post", rest_port, post, f"POST {POST_TARGET}"),
        ):
            result = await measure(port, raw, what, concurrency=concurrency, seconds=seconds)
            runs[key].append(result)
    return (
        (best(runs["get"]), best(runs["hello-get"])),
        (best(runs["post"]), best(runs["hello-post"])),
    )


def emit(result: dict[str, object]) -> None:
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


def figure(
    name: str,
    target: str,
    ours: LoadResult,
    hello: LoadResult,
    settings: dict[str, object],
) -> dict[str, object]:
    return {
        "benchmark": "Brest",
        "name": name,
        "value": round(ours.rate, 1),
        "unit": "requests/s",
        "baseline": round(hello.rate, 1),
        "baseline_name": (
            "hello-world Starlette JSON route, unauthenticated, same Hypercorn settings"
        ),
        "ratio": round(ours.rate / hello.rate, 3),
        "target": target,
        "n": ours.completed,
        "p99_ms": round(ours.percentile_ms(0.99), 2),
        "baseline_p99_ms": round(hello.percentile_ms(0.99), 2),
        "p50_ms": round(ours.percentile_ms(0.50), 2),
        "baseline_p50_ms": round(hello.percentile_ms(0.50), 2),
        **settings,
    }


def run(base: URL, *, quick: bool, concurrency: int, seconds: float, repeat: int) -> None:
    password = secrets.token_urlsafe(24)
    with ExitStack() as stack:
        url = stack.enter_context(scratch_database(base, "loom_bench"))
        prepare_database(url)
        rest_port, hello_port = free_port(), free_port()
        stack.enter_context(
            server(
                [sys.executable, "-m", "loom_rest"],
                rest_env(url, rest_port, password, pool_size=concurrency),
                "the REST service",
                rest_port,
            )
        )
        hello_env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
        stack.enter_context(
            server(
                [sys.executable, str(Path(__file__).resolve()), "--serve-hello", str(hello_port)],
                hello_env,
                "the hello-world server",
                hello_port,
                HELLO_TARGET,
            )
        )
        token = login(rest_port, password)
        (get, hello_get), (post, hello_post) = asyncio.run(
            bench(
                rest_port,
                hello_port,
                token,
                concurrency=concurrency,
                seconds=seconds,
                repeat=repeat,
            )
        )
    settings: dict[str, object] = {
        "concurrency": concurrency,
        "database_pool_size": concurrency,
        "seconds": seconds,
        "repeat": repeat,
        "quick": quick,
    }
    emit(
        figure(
            f"GET {GET_TARGET} (authenticated, {PAGE} per page), PostgreSQL",
            ">= 0.30 ratio",
            get,
            hello_get,
            settings,
        )
    )
    emit(
        figure(
            "POST /api/v1/graphs/{name}/executions (authenticated, creates one), PostgreSQL",
            "reported (no target set)",
            post,
            hello_post,
            settings,
        )
    )


def load_main(doc: str | None, name: str, run_load: Callable[..., None]) -> None:
    """The command line of a load benchmark against a hello-world baseline (this one and
    `webhooks.py`): parse it, serve the baseline when asked (`--serve-hello PORT`), else
    call `run_load(base, quick=, concurrency=, seconds=, repeat=)`; a failure exits 1
    with one line naming the benchmark."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, for CI")
    parser.add_argument("--repeat", type=int, default=None, help="runs per side (best of)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections (16)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per run (10; --quick 2)"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LOOM_TEST_POSTGRES_URL"),
        help="a postgresql+psycopg:// URL of a server to create a scratch database on "
        "(default: LOOM_TEST_POSTGRES_URL)",
    )
    parser.add_argument("--serve-hello", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_hello is not None:
        serve_hello(args.serve_hello)
        return
    if not args.database_url:
        parser.error("needs PostgreSQL: --database-url or LOOM_TEST_POSTGRES_URL")
    if args.concurrency < 1 or (args.repeat is not None and args.repeat < 1):
        parser.error("--concurrency and --repeat must be at least 1")
    base = make_url(args.database_url).set(drivername="postgresql+psycopg")
    repeat = args.repeat or (2 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    try:
        run_load(
            base, quick=args.quick, concurrency=args.concurrency, seconds=seconds, repeat=repeat
        )
    except (BenchError, LoadError) as exc:
        print(f"{name} failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def main() -> None:
    load_main(__doc__, "Brest", run)


if __name__ == "__main__":
    main()
