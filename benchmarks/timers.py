"""B6: the timer with 10,000 cron triggers spread evenly over each minute, in one run.

Three figures, on PostgreSQL, each with a baseline measured in the same run:
1. **Fire delay** of one timer (`python -m loom_timer`): for every tick of a window, the
   creation time of its execution minus its scheduled time, p50 and p99 in ms. Trigger
   i is `cron: "S * * * * *"` with S = i mod 60 (10 triggers per graph), so each second
   has N/60 ticks. Baseline: a bare asyncio loop (`--baseline-run`, a process of its
   own) that sleeps until each scheduled second and creates the same executions with
   the same statements (`executions.create_execution`, one transaction each, the same
   pool, an outbox relay): the work no timer can avoid. `ratio` = ours / baseline (lower
   is better). Target: p99 <= 100 ms (DESIGN §10).
2. **CPU while idle**: the timer's CPU seconds per wall second (all its threads,
   `/proc/PID/task/*/schedstat`) while it holds the N triggers, applied first as
   `cron: "S 0 0 1 1 *"` (once a year: no tick due). Baseline: the same process holding
   no trigger. Reported (no target). The same timer process then follows the graphs
   being applied again as every-minute triggers (`followed_change_s`: from the first
   apply to every job replaced, through `graph.changed` and resyncs by difference) and
   measures figure 1, so the window is the steady state, not the start-up catch-up.
3. **Three replicas**: three timer processes for a shorter window, on the first 1,000
   triggers (the other graphs paused: three replicas racing for 10,000 triggers' ticks
   would measure these 2 cores, not the guarantee); the ticks of the window missing or
   fired more than once (target 0); their p50/p99 delay is reported beside.

    uv run python benchmarks/timers.py [--quick] [--repeat K] [--triggers N]
        [--window S] [--database-url URL]

Needs PostgreSQL: --database-url or LOOM_TEST_POSTGRES_URL (`postgresql+psycopg://...`).
Creates a throwaway database (`loom_bench_<random>`, migrated, dropped at the end); the
timers run on memory brokers with their default settings. Full run: N = 10,000, a 60 s
window (every trigger fires once), ~4 minutes in all; --quick: N = 600, 6 s windows,
under a minute. --repeat K runs the fire-delay window and its baseline K times (default
1) and keeps the best p99 of each. Prints one JSON object per line and figure (§10).
"""

from __future__ import annotations

import argparse
import asyncio
import math
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
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import orjson
import psycopg
from sqlalchemy.engine import URL, make_url

from loom_db.testing import scratch_database

HOST = "127.0.0.1"
PER_GRAPH = 10
START_TIMEOUT = 180.0
"""Seconds a timer has to start, read its triggers and finish its start-up catch-up."""
LEAD = 1
"""Whole seconds, at least, between deciding a window and its first tick."""
SECOND = timedelta(seconds=1)
REPLICA_TRIGGERS = 1000


class BenchError(Exception):
    """The benchmark cannot measure what it means to (a process failed, ticks missing)."""


# --- the graphs ----------------------------------------------------------------------------


def graph_yaml(index: int, total: int, *, idle: bool) -> str:
    """Graph `g{index}`: triggers `t0`..`t9`, trigger i of all at second i mod 60."""
    lines = []
    for k in range(PER_GRAPH):
        i = index * PER_GRAPH + k
        if i >= total:
            break
        minute = "0 0 1 1 *" if idle else "* * * * *"
        lines.append(f"  - {{id: t{k}, cron: '{i % 60} {minute}'}}")
    triggers = "\n".join(lines)
    return f"name: g{index}\ntriggers:\n{triggers}\nnodes:\n  a: {{run: 'true'}}\n"


def apply_graphs(url: str, total: int, *, idle: bool) -> None:
    asyncio.run(_apply_graphs(url, total, idle=idle))


async def _apply_graphs(url: str, total: int, *, idle: bool) -> None:
    from loom_db import create_database, graphs

    db = create_database(url)
    count = math.ceil(total / PER_GRAPH)

    async def apply(indexes: range) -> None:
        for index in indexes:
            async with db.transaction() as conn:
                await graphs.apply_graph(conn, graph_yaml(index, total, idle=idle))

    try:
        await asyncio.gather(*(apply(range(k, count, 4)) for k in range(4)))
    finally:
        await db.dispose()


def disable_graphs_beyond(url: str, keep: int) -> None:
    """Pause the graphs past the first `keep` triggers (a multiple of PER_GRAPH)."""
    asyncio.run(_disable_graphs_beyond(url, keep))


async def _disable_graphs_beyond(url: str, keep: int) -> None:
    from loom_db import create_database, graphs

    db = create_database(url)
    try:
        async with db.read() as conn:
            names = {t.graph for t in await graphs.list_triggers(conn)}
        paused = sorted(name for name in names if int(name[1:]) * PER_GRAPH >= keep)
        for name in paused:
            async with db.transaction() as conn:
                await graphs.set_enabled(conn, name, False)
    finally:
        await db.dispose()


def expected_ticks(total: int, start: datetime, end: datetime) -> set[tuple[str, str, str]]:
    """(graph, trigger id, fire_time) of every tick in [start, end)."""
    ticks = set()
    tick = start
    while tick < end:
        for i in range(tick.second, total, 60):
            fire_time = tick.strftime("%Y-%m-%dT%H:%M:%SZ")
            ticks.add((f"g{i // PER_GRAPH}", f"t{i % PER_GRAPH}", fire_time))
        tick += SECOND
    return ticks


# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def timer_env(url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update(
        LOOM_DATABASE_URL=url,
        LOOM_SECRET_KEY=secrets.token_urlsafe(48),
        LOOM_QUEUE_URL="memory://",
        LOOM_EVENTS_URL="memory://",
        LOOM_BROKER_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
        LOOM_TIMER_HOST=HOST,
        LOOM_TIMER_PORT=str(port),
        LOOM_LOG_LEVEL="WARNING",
    )
    return env


def cpu_seconds(pid: int) -> float:
    """CPU seconds of every thread of a process (Linux: `schedstat`, in nanoseconds;
    `stat`'s clock ticks are too coarse for an idle process)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return total / 1e9


def _output(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


@dataclass
class Timer:
    process: subprocess.Popen[bytes]
    port: int
    log: IO[bytes]

    def metric(self, name: str) -> float | None:
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        for line in text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return None

    def wait_loaded(self, triggers: int) -> None:
        """Until it answers, follows `triggers` triggers and has caught up."""
        deadline = time.monotonic() + START_TIMEOUT
        for metric, value in (("loom_timer_triggers", triggers), ("loom_timer_caught_up", 1)):
            while not self._answers(metric, value):
                if time.monotonic() > deadline:
                    raise BenchError(f"a timer did not load {triggers} triggers in time")
                time.sleep(0.2)

    def _answers(self, metric: str, value: float) -> bool:
        if self.process.poll() is not None:
            raise BenchError(f"a timer exited at start:\n{_output(self.log)}")
        try:
            return self.metric(metric) == value
        except (urllib.error.URLError, OSError):
            return False  # not listening yet


@contextmanager
def timers(url: str, count: int, triggers: int) -> Iterator[list[Timer]]:
    """`count` timer processes, loaded; SIGTERM at the end, which must exit 0."""
    with ExitStack() as stack:
        started = []
        for _ in range(count):
            log = stack.enter_context(tempfile.TemporaryFile())
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, "-m", "loom_timer"],
                env=timer_env(url, port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            stack.callback(_kill, process)
            started.append(Timer(process, port, log))
        for timer in started:
            timer.wait_loaded(triggers)
        yield started
        for timer in started:
            timer.process.send_signal(signal.SIGTERM)
        for timer in started:
            try:
                code = timer.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise BenchError(f"a timer ignored SIGTERM:\n{_output(timer.log)}") from None
            if code != 0:
                raise BenchError(f"a timer exited {code} on SIGTERM:\n{_output(timer.log)}")


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


# --- measuring -----------------------------------------------------------------------------


def window(seconds: float) -> tuple[datetime, datetime]:
    """[start, end): whole seconds, starting LEAD s from now."""
    now = datetime.now(UTC)
    start = now.replace(microsecond=0) + timedelta(seconds=LEAD + 1)
    return start, start + timedelta(seconds=math.ceil(seconds))


def sleep_until(instant: datetime) -> None:
    time.sleep(max(0.0, (instant - datetime.now(UTC)).total_seconds()))


def conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def fired(url: str, start: datetime, end: datetime) -> list[tuple[str, str, str, datetime]]:
    """(graph, trigger id, fire_time, created_at) of the timer executions of the window."""
    iso = "%Y-%m-%dT%H:%M:%SZ"
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT graph, trigger_info->>'trigger_id', trigger_info->>'fire_time', created_at"
            " FROM executions WHERE trigger_type = 'timer'"
            " AND trigger_info->>'fire_time' >= %s AND trigger_info->>'fire_time' < %s",
            (start.strftime(iso), end.strftime(iso)),
        ).fetchall()
    return [(graph, trigger, fire_time, created) for graph, trigger, fire_time, created in rows]


def wait_fired(
    url: str, start: datetime, end: datetime, expected: int
) -> list[tuple[str, str, str, datetime]]:
    """The window's executions once all `expected` exist, or what exists after a grace
    of two windows (two minutes at least) past its end: an overloaded timer is late."""
    grace = max(120.0, 2 * (end - start).total_seconds())
    deadline = end + timedelta(seconds=grace)
    while True:
        rows = fired(url, start, end)
        if len(rows) >= expected or datetime.now(UTC) > deadline:
            return rows
        time.sleep(0.5)


def created_between(url: str, start: datetime, end: datetime) -> int:
    """Timer executions created in [start, end), whatever their tick."""
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM executions WHERE trigger_type = 'timer'"
            " AND created_at >= %s AND created_at < %s",
            (start, end),
        ).fetchone()
    return int(row[0]) if row else 0


def delays_ms(rows: Sequence[tuple[str, str, str, datetime]]) -> list[float]:
    return sorted(
        (created - datetime.fromisoformat(fire_time.replace("Z", "+00:00"))).total_seconds() * 1000
        for _, _, fire_time, created in rows
    )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    return values[max(0, math.ceil(q * len(values)) - 1)]


@dataclass
class Delays:
    p50: float
    p99: float
    n: int
    """Ticks of the window fired (and measured)."""
    missing: int
    """Ticks of the window not fired by the end of the grace (`wait_fired`)."""
    busy_cpu: float | None = None
    """The firing process's CPU seconds per wall second during the window."""
    fired_per_s: float | None = None
    """Timer executions created per second during the window (any tick)."""


def summarize(
    rows: Sequence[tuple[str, str, str, datetime]],
    expected: int,
    *,
    busy_cpu: float | None = None,
    fired_per_s: float | None = None,
) -> Delays:
    values = delays_ms(rows)
    if not values:
        raise BenchError(f"none of the {expected} ticks of the window fired")
    p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
    missing = expected - len(values)
    return Delays(p50, p99, len(values), missing, busy_cpu, fired_per_s)


def measure_timer(url: str, timer: Timer, total: int, seconds: float) -> Delays:
    """One window of the running `timer`."""
    start, end = window(seconds)
    sleep_until(start)
    cpu0, wall0 = cpu_seconds(timer.process.pid), time.monotonic()
    sleep_until(end)
    busy = (cpu_seconds(timer.process.pid) - cpu0) / (time.monotonic() - wall0)
    expected = len(expected_ticks(total, start, end))
    rows = wait_fired(url, start, end, expected)
    rate = created_between(url, start, end) / (end - start).total_seconds()
    return summarize(rows, expected, busy_cpu=busy, fired_per_s=rate)


def measure_baseline(url: str, total: int, seconds: float) -> Delays:
    process = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--baseline-run", url, str(seconds)],
        env={k: v for k, v in os.environ.items() if not k.startswith("LOOM_")},
        capture_output=True,
        text=True,
        timeout=seconds + START_TIMEOUT,
        check=False,
    )
    if process.returncode != 0:
        raise BenchError(f"the baseline failed:\n{process.stderr[-4000:]}")
    bounds = orjson.loads(process.stdout.splitlines()[0])
    start, end = (datetime.fromisoformat(bounds[k]) for k in ("start", "end"))
    expected = len(expected_ticks(total, start, end))
    rows = wait_fired(url, start, end, expected)
    rate = created_between(url, start, end) / (end - start).total_seconds()
    return summarize(rows, expected, busy_cpu=bounds["busy_cpu"], fired_per_s=rate)


def idle_cpu(timer: Timer, seconds: float) -> float:
    """CPU seconds per wall second over `seconds`, after a second to settle."""
    time.sleep(1.0)
    cpu0, wall0 = cpu_seconds(timer.process.pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(timer.process.pid) - cpu0) / (time.monotonic() - wall0)


def follow_change(url: str, timer: Timer, total: int) -> float:
    """Apply the graphs again, ticking every minute, while `timer` runs: seconds until it
    has replaced every job (through `graph.changed` and its resyncs, by difference)."""
    replaced = 'loom_timer_job_changes_total{change="replaced"}'
    before = timer.metric(replaced) or 0.0
    started = time.monotonic()
    apply_graphs(url, total, idle=False)
    deadline = time.monotonic() + START_TIMEOUT
    while (timer.metric(replaced) or 0.0) - before < total:
        if time.monotonic() > deadline:
            raise BenchError(f"the timer did not follow {total} changed triggers")
        time.sleep(0.1)
    return time.monotonic() - started


def measure_replicas(url: str, total: int, seconds: float) -> tuple[int, int, int, Delays]:
    """(missing, fired twice, expected, delays) of a window of three replicas."""
    with timers(url, 3, total):
        start, end = window(seconds)
        sleep_until(end)
        expected = expected_ticks(total, start, end)
        rows = wait_fired(url, start, end, len(expected))
    got = Counter((graph, trigger, fire_time) for graph, trigger, fire_time, _ in rows)
    missing = len(expected - set(got))
    twice = sum(count - 1 for count in got.values())
    return missing, twice, len(expected), summarize(rows, len(expected))


# --- the baseline process (`--baseline-run URL SECONDS`) ------------------------------------


def baseline_run(url: str, seconds: float) -> None:
    """Sleep until each tick of a window and create its executions: the first stdout line
    is the window and the CPU used during it, as JSON."""
    asyncio.run(_baseline_run(url, seconds))


async def _baseline_run(url: str, seconds: float) -> None:
    from loom_common import format_instant
    from loom_db import create_database, executions, graphs
    from loom_db.graphs import TriggerRecord
    from loom_db.relay import OutboxRelay
    from loom_messaging import open_broker
    from loom_timer import Schedule

    db = create_database(url)
    broker = open_broker(f"memory://baseline-{uuid.uuid4().hex}", prefix="bench")
    async with broker, OutboxRelay(db, broker.publishers()):
        async with db.read() as conn:
            triggers = await graphs.list_triggers(conn, kind="cron")
        start, end = window(seconds)
        due: dict[datetime, list[TriggerRecord]] = {}
        for trigger in triggers:
            schedule = Schedule.from_spec(trigger.spec)
            tick = schedule.next_after(start - SECOND)
            while tick is not None and tick < end:
                due.setdefault(tick, []).append(trigger)
                tick = schedule.next_after(tick)

        async def create(trigger: TriggerRecord, tick: datetime) -> None:
            async with db.transaction() as conn:
                await executions.create_execution(
                    conn,
                    graph=trigger.graph,
                    graph_version=trigger.graph_version,
                    params={},
                    trigger_type="timer",
                    trigger_info={"fire_time": format_instant(tick), "trigger_id": trigger.id},
                    idempotency_key=executions.timer_key(trigger.graph, trigger.id, tick),
                )
            db.notify_committed()

        await asyncio.sleep(max(0.0, (start - datetime.now(UTC)).total_seconds()))
        cpu0, wall0 = time.process_time(), time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        for tick in sorted(due):
            await asyncio.sleep(max(0.0, (tick - datetime.now(UTC)).total_seconds()))
            tasks.extend(asyncio.create_task(create(t, tick)) for t in due[tick])
        await asyncio.sleep(max(0.0, (end - datetime.now(UTC)).total_seconds()))
        busy = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        await asyncio.gather(*tasks)
    await db.dispose()
    window_json = {"start": start.isoformat(), "end": end.isoformat(), "busy_cpu": busy}
    sys.stdout.write(orjson.dumps(window_json).decode() + "\n")


# --- the run ---------------------------------------------------------------------------------


def emit(result: dict[str, object]) -> None:
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


def run(base: URL, *, quick: bool, total: int, seconds: float, repeat: int) -> None:
    idle_seconds = 2.0 if quick else 10.0
    replica_seconds = 4.0 if quick else 15.0
    # Three replicas each fire every tick's transaction (one wins): with 10,000 triggers
    # that is three times the load of one timer on these 2 cores, which measures the
    # machine, not the guarantee. They get the first REPLICA_TRIGGERS triggers.
    replica_triggers = min(total, REPLICA_TRIGGERS)
    from loom_db.migrate import upgrade_sync

    with scratch_database(base, "loom_bench") as url:
        upgrade_sync(url)
        with timers(url, 1, 0) as (empty,):
            idle_none = idle_cpu(empty, idle_seconds)
        apply_graphs(url, total, idle=True)
        # One timer from here on: it starts on the yearly triggers (idle), then follows
        # them becoming every-minute ones (each graph's version 2) and fires them.
        with timers(url, 1, total) as (timer,):
            idle_all = idle_cpu(timer, idle_seconds)
            followed = follow_change(url, timer, total)
            ours = [measure_timer(url, timer, total, seconds) for _ in range(repeat)]
        bare = [measure_baseline(url, total, seconds) for _ in range(repeat)]
        if replica_triggers < total:
            disable_graphs_beyond(url, replica_triggers)
        missing, twice, expected, replicas = measure_replicas(
            url, replica_triggers, replica_seconds
        )
    best, baseline = min(ours, key=lambda d: d.p99), min(bare, key=lambda d: d.p99)
    common: dict[str, object] = {"triggers": total, "repeat": repeat, "quick": quick}
    emit(
        {
            "benchmark": "B6",
            "name": f"fire delay, {total} cron triggers spread over each minute, one timer",
            "value": round(best.p99, 2),
            "unit": "ms",
            "p50": round(best.p50, 2),
            "p99": round(best.p99, 2),
            "baseline": round(baseline.p99, 2),
            "baseline_p50": round(baseline.p50, 2),
            "baseline_name": "bare asyncio loop sleeping until each tick, same INSERTs and pool",
            "ratio": round(best.p99 / baseline.p99, 3),
            "target": "p99 <= 100 ms",
            "n": best.n,
            "missing": best.missing,
            "window_s": seconds,
            "due_per_s": round(total / 60, 1),
            "fired_per_s": round(best.fired_per_s or 0.0, 1),
            "baseline_fired_per_s": round(baseline.fired_per_s or 0.0, 1),
            "busy_cpu": round(best.busy_cpu or 0.0, 3),
            "baseline_busy_cpu": round(baseline.busy_cpu or 0.0, 3),
            "followed_change_s": round(followed, 2),
            **common,
        }
    )
    emit(
        {
            "benchmark": "B6",
            "name": f"CPU while idle, {total} cron triggers, no tick due",
            "value": round(idle_all, 5),
            "unit": "CPU s/s",
            "baseline": round(idle_none, 5),
            "baseline_name": "the same timer process holding no trigger",
            "ratio": round(idle_all / idle_none, 3) if idle_none > 0 else None,
            "target": "reported (no target set)",
            "n": total,
            "window_s": idle_seconds,
            **common,
        }
    )
    emit(
        {
            "benchmark": "B6",
            "name": f"3 replicas, {replica_triggers} cron triggers: ticks missed or fired twice",
            "value": missing + twice,
            "unit": "ticks",
            "missing": missing,
            "fired_twice": twice,
            "baseline": None,
            "baseline_name": None,
            "ratio": None,
            "target": "0 (no duplicate with 3 replicas)",
            "n": expected,
            "p50": round(replicas.p50, 2),
            "p99": round(replicas.p99, 2),
            "window_s": replica_seconds,
            **common,
            "triggers": replica_triggers,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, for CI")
    parser.add_argument("--repeat", type=int, default=1, help="fire-delay windows (best of; 1)")
    parser.add_argument(
        "--triggers", type=int, default=None, help="cron triggers (10000; --quick 600)"
    )
    parser.add_argument(
        "--window", type=float, default=None, help="fire-delay window in s (60; --quick 6)"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LOOM_TEST_POSTGRES_URL"),
        help="a postgresql+psycopg:// URL of a server to create a scratch database on "
        "(default: LOOM_TEST_POSTGRES_URL)",
    )
    parser.add_argument(
        "--baseline-run", nargs=2, metavar=("URL", "SECONDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.baseline_run:
        baseline_run(args.baseline_run[0], float(args.baseline_run[1]))
        return
    if not args.database_url:
        parser.error("PostgreSQL is needed: --database-url or LOOM_TEST_POSTGRES_URL")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    total = args.triggers or (600 if args.quick else 10_000)
    seconds = args.window or (6.0 if args.quick else 60.0)
    try:
        base = make_url(args.database_url)
        run(base, quick=args.quick, total=total, seconds=seconds, repeat=args.repeat)
    except BenchError as exc:
        print(f"timers benchmark: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
