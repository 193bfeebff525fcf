"""Bdb: the database fast path of the worker, against raw psycopg in the same run.

1. Log lines: N lines (200,000; --quick 40,000) appended in batches of 500, one
   transaction per batch, through `loom_db.logs.append_logs` on PostgreSQL, against raw
   psycopg `COPY` of the same rows in the same batches and transactions. Figure: lines/s
   (target >= 50,000 and >= 0.5 of raw COPY).
2. Node state changes: M upserts (10,000; --quick 2,000: every instance `running`, then
   `succeeded` with outputs) in batches of 100 through `loom_db.node_runs.record_nodes`,
   against raw psycopg `executemany` of the same `INSERT ... ON CONFLICT DO UPDATE`.
   Figure: changes/s (reported; the issue sets no target).

    uv run python benchmarks/db_logs.py [--quick] [--repeat K] [--database-url URL]

Needs PostgreSQL: --database-url or LOOM_TEST_POSTGRES_URL (`postgresql+psycopg://...`).
Creates a throwaway database (schema by `metadata.create_all`) and drops it at the end.
Each side starts from empty tables, and runs K times, alternating (best of K), so a noisy
neighbour hurts both sides alike. Prints one JSON object per line and figure (DESIGN §10).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import orjson
import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import create_engine, insert
from sqlalchemy.engine import URL, make_url

from loom_db.database import Database, create_database
from loom_db.logs import LogLineIn, append_logs
from loom_db.models import executions, metadata
from loom_db.node_runs import NodeChange, record_nodes

LOG_BATCH = 500
NODE_BATCH = 100
EXECUTION = "5f0c2a4e-0000-4000-8000-00000000b0db"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T = TypeVar("T")

RAW_COPY = "COPY log_lines (execution_id, seq, node, stream, ts, text) FROM STDIN (FORMAT BINARY)"
RAW_COPY_TYPES = ["text", "int8", "text", "text", "timestamptz", "text"]
RAW_UPSERT = """
INSERT INTO node_runs (execution_id, node, name, "index", attempt, status, started_at,
                       finished_at, exit_code, outputs, error, child_execution_id)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (execution_id, node, attempt) DO UPDATE SET
    name = excluded.name, "index" = excluded."index", status = excluded.status,
    exit_code = excluded.exit_code, outputs = excluded.outputs, error = excluded.error,
    started_at = coalesce(excluded.started_at, node_runs.started_at),
    finished_at = coalesce(excluded.finished_at, node_runs.finished_at),
    child_execution_id = coalesce(excluded.child_execution_id, node_runs.child_execution_id)
"""


def log_lines(n: int) -> list[LogLineIn]:
    nodes = ("build[0]", "build[1]", "test", "deploy")
    return [
        LogLineIn(
            seq,
            nodes[seq % 4],
            "stderr" if seq % 10 == 0 else "stdout",
            T0 + timedelta(microseconds=seq * 37),
            f"[{seq:>7}] compiling module_{seq % 997}.py ... ok " + "#" * (seq % 40),
        )
        for seq in range(1, n + 1)
    ]


def node_changes(m: int) -> list[NodeChange]:
    """m/2 instances, each `running` and then (after all have started) `succeeded`."""
    instances = m // 2
    running = [
        NodeChange(f"work[{i}]", "work", i, 1, "running", started_at=T0 + timedelta(milliseconds=i))
        for i in range(instances)
    ]
    done = [
        NodeChange(
            f"work[{i}]",
            "work",
            i,
            1,
            "succeeded",
            finished_at=T0 + timedelta(seconds=1, milliseconds=i),
            exit_code=0,
            outputs={"artifact": f"build-{i}.tar.gz", "size": i * 1024},
        )
        for i in range(instances)
    ]
    return running + done


def batches(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def reset(conninfo: str) -> None:
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("TRUNCATE log_lines, node_runs")
        await conn.execute("VACUUM ANALYZE log_lines")
        await conn.execute("VACUUM ANALYZE node_runs")


async def timed(conninfo: str, run: Callable[[], Awaitable[None]]) -> float:
    await reset(conninfo)
    start = time.perf_counter()
    await run()
    return time.perf_counter() - start


async def best_of(
    conninfo: str,
    repeat: int,
    ours: Callable[[], Awaitable[None]],
    raw: Callable[[], Awaitable[None]],
) -> tuple[float, float]:
    await timed(conninfo, raw)  # warm both paths (connections, caches, compiled statements)
    await timed(conninfo, ours)
    our_times, raw_times = [], []
    for _ in range(repeat):
        raw_times.append(await timed(conninfo, raw))
        our_times.append(await timed(conninfo, ours))
    return min(our_times), min(raw_times)


async def bench_logs(db: Database, conninfo: str, n: int, repeat: int) -> tuple[float, float]:
    groups = batches(log_lines(n), LOG_BATCH)
    raw_groups = [
        [(EXECUTION, line.seq, line.node, line.stream, line.ts, line.text) for line in group]
        for group in groups
    ]

    async def ours() -> None:
        for group in groups:
            async with db.transaction() as conn:
                await append_logs(conn, EXECUTION, group)

    async with await psycopg.AsyncConnection.connect(conninfo) as pg:

        async def raw() -> None:
            for group in raw_groups:
                async with pg.transaction(), pg.cursor() as cur, cur.copy(RAW_COPY) as copy:
                    copy.set_types(RAW_COPY_TYPES)
                    for row in group:
                        await copy.write_row(row)

        return await best_of(conninfo, repeat, ours, raw)


async def bench_nodes(db: Database, conninfo: str, m: int, repeat: int) -> tuple[float, float]:
    groups = batches(node_changes(m), NODE_BATCH)
    raw_groups = [
        [
            (
                EXECUTION,
                ch.node,
                ch.name,
                ch.index,
                ch.attempt,
                ch.status,
                ch.started_at,
                ch.finished_at,
                ch.exit_code,
                Jsonb(ch.outputs),
                ch.error,
                ch.child_execution_id,
            )
            for ch in group
        ]
        for group in groups
    ]

    async def ours() -> None:
        for group in groups:
            async with db.transaction() as conn:
                await record_nodes(conn, EXECUTION, group)

    async with await psycopg.AsyncConnection.connect(conninfo) as pg:

        async def raw() -> None:
            for group in raw_groups:
                async with pg.transaction(), pg.cursor() as cur:
                    await cur.executemany(RAW_UPSERT, group)

        return await best_of(conninfo, repeat, ours, raw)


def create_scratch(base: URL) -> URL:
    name = f"loom_bench_{uuid.uuid4().hex[:12]}"
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = base.set(database=name)
    engine = create_engine(url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                insert(executions).values(
                    id=EXECUTION,
                    graph="bench",
                    graph_version=1,
                    status="running",
                    params={},
                    trigger_type="manual",
                    trigger_info={},
                    created_at=T0,
                )
            )
    finally:
        engine.dispose()
    return url


def drop_scratch(base: URL, url: URL) -> None:
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')


def emit(result: dict[str, object]) -> None:
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


async def run(url: URL, *, quick: bool, repeat: int) -> None:
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    db = create_database(url.render_as_string(hide_password=False))
    try:
        n = 40_000 if quick else 200_000
        ours, raw = await bench_logs(db, conninfo, n, repeat)
        rate, raw_rate = n / ours, n / raw
        emit(
            {
                "benchmark": "Bdb",
                "name": f"log lines through loom_db.append_logs, {n} in batches of {LOG_BATCH}",
                "value": round(rate, 1),
                "unit": "lines/s",
                "baseline": round(raw_rate, 1),
                "baseline_name": "raw psycopg COPY, same batches",
                "ratio": round(rate / raw_rate, 3),
                "target": ">= 50000 lines/s and >= 0.5 ratio",
                "n": n,
                "repeat": repeat,
                "quick": quick,
            }
        )
        m = 2_000 if quick else 10_000
        ours, raw = await bench_nodes(db, conninfo, m, repeat)
        rate, raw_rate = m / ours, m / raw
        emit(
            {
                "benchmark": "Bdb",
                "name": (
                    f"node state changes through loom_db.record_nodes, {m} upserts "
                    f"in batches of {NODE_BATCH}"
                ),
                "value": round(rate, 1),
                "unit": "changes/s",
                "baseline": round(raw_rate, 1),
                "baseline_name": "raw psycopg executemany of the same upserts, same batches",
                "ratio": round(rate / raw_rate, 3),
                "target": "reported (no target set)",
                "n": m,
                "repeat": repeat,
                "quick": quick,
            }
        )
    finally:
        await db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, for CI")
    parser.add_argument("--repeat", type=int, default=None, help="runs per side (best of)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LOOM_TEST_POSTGRES_URL"),
        help="a postgresql+psycopg:// URL of a server to create a scratch database on "
        "(default: LOOM_TEST_POSTGRES_URL)",
    )
    args = parser.parse_args()
    if not args.database_url:
        parser.error("needs PostgreSQL: --database-url or LOOM_TEST_POSTGRES_URL")
    base = make_url(args.database_url).set(drivername="postgresql+psycopg")
    repeat = args.repeat or (2 if args.quick else 3)
    url = create_scratch(base)
    try:
        asyncio.run(run(url, quick=args.quick, repeat=repeat))
    finally:
        drop_scratch(base, url)


if __name__ == "__main__":
    main()
