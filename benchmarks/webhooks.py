"""B4: GitHub-signed webhook deliveries accepted with PostgreSQL durability, against a
hello-world route, in one run (DESIGN §10).

Each delivery is a realistic `push` (about 1.5 KB of JSON) with its own
`X-GitHub-Delivery` id and its `X-Hub-Signature-256`, POSTed to
`/hooks/bench/github` of `python -m loom_webhook` on PostgreSQL (memory queue and
events): the service looks the hook up, verifies the signature, checks the `events` and
`if` filters, renders the params from the payload and commits the execution, its outbox
row and the delivery log line before it answers 202. The baseline: an unauthenticated
hello-world Starlette route served by Hypercorn with the same settings
(`loom_runtime.hypercorn_config`), in a process of its own, in the same run. Target:
`ratio` >= 0.30; `value` is the accepted deliveries per second, with the p99 latency.

    uv run python benchmarks/webhooks.py [--quick] [--repeat K] [--concurrency C]
        [--seconds D] [--database-url URL]

Needs PostgreSQL: --database-url or LOOM_TEST_POSTGRES_URL. Creates a throwaway
database (dropped at the end). C keep-alive connections (16) send deliveries back to back
for D seconds (10; --quick 2); each round runs hello then webhooks; K rounds (3; --quick
2); each figure is the best of its K runs against the best hello run. Any answer but 202
fails the run, and at the end every accepted delivery must be one stored execution.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import sys
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import orjson
import psycopg
from _httpload import LoadResult, request
from rest import (
    HELLO_TARGET,
    HOST,
    BenchError,
    best,
    check_once,
    cpu_seconds,
    emit,
    free_port,
    load_main,
    measure,
    server,
)
from sqlalchemy.engine import URL, make_url

from loom_db.testing import scratch_database

GRAPH_YAML = """\
name: bench
description: The webhook benchmark's graph
params:
  ref: {type: string}
  sha: {type: string}
  pusher: {type: string}
triggers:
  - webhook:
      name: github
      auth: github
      secret: GITHUB_HOOK_SECRET
      events: [push]
      if: ${{ payload.ref.startswith('refs/heads/') }}
      params:
        ref: ${{ payload.ref }}
        sha: ${{ payload.after }}
        pusher: ${{ payload.pusher.name }}
nodes:
  build:
    run: echo "building ${{ params.sha }}"
"""
TARGET = "/hooks/bench/github"
HOOK_SECRET = "It's a Secret to Everybody"
PREPARED_PER_SECOND = 2_000
"""Deliveries made before each run, per second of it (more than the service accepts)."""


def push_payload(i: int) -> bytes:
    sha = hashlib.sha1(str(i).encode()).hexdigest()
    return orjson.dumps(
        {
            "ref": "refs/heads/main",
            "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            "after": sha,
            "repository": {
                "id": 1296269,
                "name": "Hello-World",
                "full_name": "octocat/Hello-World",
                "private": False,
                "html_url": "https://github.com/octocat/Hello-World",
                "default_branch": "main",
            },
            "pusher": {"name": "octocat", "email": "octocat@github.com"},
            "sender": {"login": "octocat", "id": 1, "type": "User"},
            "commits": [
                {
                    "id": sha,
                    "message": f"Change {i}: fix the flaky test in the parser",
                    "timestamp": "2026-11-23T10:15:00Z",
                    "author": {"name": "Mona Lisa", "email": "mona@github.com"},
                    "added": [],
                    "removed": [],
                    "modified": ["src/parser.py", "tests/test_parser.py"],
                }
            ],
            "head_commit": {"id": sha, "message": f"Change {i}"},
        }
    )


def deliveries(port: int) -> Callable[[], bytes]:
    """A function giving each call a new signed delivery."""
    key = HOOK_SECRET.encode()

    def next_delivery() -> bytes:
        delivery = str(uuid.uuid4())
        body = push_payload(int(delivery[:8], 16))
        mac = hmac.new(key, body, hashlib.sha256).hexdigest()
        return request(
            "POST",
            HOST,
            port,
            TARGET,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "GitHub-Hookshot/bench",
                "X-GitHub-Event": "push",
                "X-GitHub-Delivery": delivery,
                "X-Hub-Signature-256": f"sha256={mac}",
            },
            body=body,
        )

    return next_delivery


def prepare_database(url: str, secret_key: str) -> None:
    from loom_db.migrate import upgrade_sync

    upgrade_sync(url)
    asyncio.run(_install(url, secret_key))


async def _install(url: str, secret_key: str) -> None:
    from loom_db import graphs
    from loom_db import secrets as stored_secrets
    from loom_db.database import create_database
    from loom_db.keys import derive_keys

    db = create_database(url)
    try:
        async with db.transaction() as conn:
            await graphs.apply_graph(conn, GRAPH_YAML, by="admin")
            await stored_secrets.put_secret(
                conn, derive_keys(secret_key), "GITHUB_HOOK_SECRET", HOOK_SECRET
            )
    finally:
        await db.dispose()


def count_executions(url: str) -> int:
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT idempotency_key) FROM executions"
        ).fetchone()
    assert row is not None
    if row[0] != row[1]:
        raise BenchError(f"{row[0]} executions but {row[1]} distinct delivery keys")
    return int(row[0])


def webhook_env(url: str, port: int, secret_key: str, pool_size: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update(
        LOOM_DATABASE_URL=url,
        LOOM_DATABASE_POOL_SIZE=str(pool_size),
        LOOM_SECRET_KEY=secret_key,
        LOOM_WEBHOOK_HOST=HOST,
        LOOM_WEBHOOK_PORT=str(port),
        LOOM_WEBHOOK_RATE_LIMIT="0",  # the benchmark floods one hook on purpose
        LOOM_QUEUE_URL="memory://",
        LOOM_EVENTS_URL="memory://",
        LOOM_LOG_LEVEL="WARNING",
    )
    return env


async def bench(
    hook_port: int,
    hello_port: int,
    pids: tuple[int, int],
    *,
    concurrency: int,
    seconds: float,
    repeat: int,
) -> tuple[LoadResult, LoadResult, int, tuple[float, float]]:
    """(webhooks, hello, accepted, CPU ms): the first two the best of `repeat` runs;
    `accepted` counts every 202 of every run (warm-up included); the CPU milliseconds per
    request of the webhook service (`pids[0]`) and of the hello server (`pids[1]`) over
    the measured runs."""
    hello = request("GET", HOST, hello_port, HELLO_TARGET)
    signed = deliveries(hook_port)
    await check_once(hello_port, hello, f"GET {HELLO_TARGET}", 200)
    await check_once(hook_port, signed(), f"POST {TARGET}", 202)
    accepted = 1
    warm = min(1.0, seconds / 2)
    await measure(hello_port, hello, "warm-up hello", concurrency=concurrency, seconds=warm)
    warmed = await _deliveries(hook_port, signed, concurrency, warm)
    accepted += warmed.completed
    hellos: list[LoadResult] = []
    hooks: list[LoadResult] = []
    cpu = [0.0, 0.0]
    for _ in range(repeat):
        before = cpu_seconds(pids[1])
        hellos.append(
            await measure(hello_port, hello, "hello", concurrency=concurrency, seconds=seconds)
        )
        cpu[1] += cpu_seconds(pids[1]) - before
        before = cpu_seconds(pids[0])
        result = await _deliveries(hook_port, signed, concurrency, seconds)
        cpu[0] += cpu_seconds(pids[0]) - before
        accepted += result.completed
        hooks.append(result)
    per_delivery = 1000 * cpu[0] / sum(result.completed for result in hooks)
    per_hello = 1000 * cpu[1] / sum(result.completed for result in hellos)
    return best(hooks), best(hellos), accepted, (per_delivery, per_hello)


async def _deliveries(
    port: int, signed: Callable[[], bytes], concurrency: int, seconds: float
) -> LoadResult:
    result = await measure(port, signed, f"POST {TARGET}", concurrency=concurrency, seconds=seconds)
    if set(result.statuses) != {202}:
        raise BenchError(f"POST {TARGET}: answers other than 202: {result.statuses}")
    return result


def run(base: URL, *, quick: bool, concurrency: int, seconds: float, repeat: int) -> None:
    secret_key = secrets.token_urlsafe(48)
    with ExitStack() as stack:
        url = stack.enter_context(scratch_database(base, "loom_bench"))
        prepare_database(url, secret_key)
        hook_port, hello_port = free_port(), free_port()
        service = stack.enter_context(
            server(
                [sys.executable, "-m", "loom_webhook"],
                webhook_env(url, hook_port, secret_key, pool_size=concurrency),
                "the webhook service",
                hook_port,
            )
        )
        hello_env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
        hello_server = stack.enter_context(
            server(
                [sys.executable, str(Path(__file__).resolve()), "--serve-hello", str(hello_port)],
                hello_env,
                "the hello-world server",
                hello_port,
                HELLO_TARGET,
            )
        )
        hooks, hello, accepted, cpu_ms = asyncio.run(
            bench(
                hook_port,
                hello_port,
                (service.pid, hello_server.pid),
                concurrency=concurrency,
                seconds=seconds,
                repeat=repeat,
            )
        )
        stored = count_executions(url)
    if stored != accepted:
        raise BenchError(f"{accepted} deliveries answered 202 but {stored} executions stored")
    emit(
        {
            "benchmark": "B4",
            "name": "GitHub-signed push deliveries accepted (202), PostgreSQL",
            "value": round(hooks.rate, 1),
            "unit": "accepted/s",
            "baseline": round(hello.rate, 1),
            "baseline_name": "hello-world Starlette JSON route, same Hypercorn settings",
            "ratio": round(hooks.rate / hello.rate, 3),
            "target": ">= 0.30 ratio",
            "n": hooks.completed,
            "p99": round(hooks.percentile_ms(0.99), 2),
            "p50": round(hooks.percentile_ms(0.50), 2),
            "baseline_p99": round(hello.percentile_ms(0.99), 2),
            "service_cpu_ms_per_delivery": round(cpu_ms[0], 3),
            "baseline_cpu_ms_per_request": round(cpu_ms[1], 3),
            "stored": stored,
            "concurrency": concurrency,
            "seconds": seconds,
            "repeat": repeat,
            "quick": quick,
        }
    )


def main() -> None:
    load_main(__doc__, "B4", run)


if __name__ == "__main__":
    main()
