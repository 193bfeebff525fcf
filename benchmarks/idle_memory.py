"""B7: the memory of each service process when idle, against a bare HTTP server, in one run.

Each service is started alone as its own process (`python -m loom_rest`, `loom_webhook`,
`loom_timer`, `loom_worker`, `loom_websocket`) on a fresh migrated database (SQLite in a
temporary directory; PostgreSQL with --database-url or LOOM_TEST_POSTGRES_URL, in a
throwaway `loom_bench_<random>` database) with memory brokers and a free port. Once its
`/readyz` answers 200 it is left idle for S seconds (5; --quick 2), then its RSS and USS
(private memory: `Private_Clean + Private_Dirty`) are read from `/proc/PID/smaps_rollup`,
in MiB; then it gets SIGTERM, which must end it with 0. Target: <= 120 MB RSS each
(DESIGN §10). Each process is started once unmeasured first: the first start after an
install compiles and caches the bytecode of every module it imports (uv installs none),
which leaves a few MB more resident than a deployed image, compiled at build, holds.

The baseline, measured the same way in the same run: a hello-world Starlette app served by
Hypercorn (`--serve-hello PORT`, this file importing nothing of Loom), the floor of any
Python HTTP service on this stack; each line also gives `bare_python`, the RSS of
`python -c 'import time; time.sleep(60)'`. With --repeat K each service (and baseline) is
started K times and the largest RSS of the K is reported.

    uv run python benchmarks/idle_memory.py [--quick] [--repeat K] [--idle S]
        [--only rest,webhook,timer,worker,websocket] [--database-url URL]

Prints one JSON object per line and service (DESIGN §10).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
MIB = 1024 * 1024
SERVICES = ("rest", "webhook", "timer", "worker", "websocket")
TARGET_MB = 120.0


class BenchError(Exception):
    """The benchmark cannot measure what it means to (a process failed to start or stop)."""


# --- the baseline server (`--serve-hello PORT`, run in a subprocess) ---------------------


def serve_hello(port: int) -> None:
    """Serve `/readyz` with Starlette on Hypercorn until SIGTERM; nothing of Loom imported."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/readyz", ready)])
    config = Config()
    config.bind = [f"{HOST}:{port}"]
    config.accesslog = None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    asyncio.run(main())


# --- processes --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def service_env(url: str, service: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update(
        LOOM_DATABASE_URL=url,
        LOOM_SECRET_KEY=secrets.token_urlsafe(48),
        LOOM_ADMIN_PASSWORD=secrets.token_urlsafe(24),
        LOOM_QUEUE_URL="memory://",
        LOOM_EVENTS_URL="memory://",
        LOOM_LOG_LEVEL="WARNING",
        LOOM_WORKER_SLOTS="2",
        **{f"LOOM_{service.upper()}_HOST": HOST, f"LOOM_{service.upper()}_PORT": str(port)},
    )
    return env


@dataclass
class Memory:
    rss: float
    """MiB resident."""
    uss: float
    """MiB private to the process (Private_Clean + Private_Dirty)."""


def memory_of(pid: int) -> Memory:
    """RSS and USS of one process, in MiB (Linux `/proc/PID/smaps_rollup`, in kB)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0])
    private = fields["Private_Clean"] + fields["Private_Dirty"]
    return Memory(rss=fields["Rss"] * 1024 / MIB, uss=private * 1024 / MIB)


def _output(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


@contextmanager
def started(
    args: Sequence[str], env: dict[str, str], what: str, port: int | None
) -> Iterator[subprocess.Popen[bytes]]:
    """A process, once its `/readyz` answers 200 (at once when `port` is None); SIGTERM at
    the end, which must end it with 0 within START_TIMEOUT."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            if port is not None:
                _wait_ready(process, log, what, port)
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=START_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                    raise BenchError(f"{what} ignored SIGTERM:\n{_output(log)}") from None
        if port is not None and process.returncode != 0:
            raise BenchError(f"{what} exited {process.returncode} on SIGTERM:\n{_output(log)}")


def _wait_ready(process: subprocess.Popen[bytes], log: IO[bytes], what: str, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited {process.returncode} at start:\n{_output(log)}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening, or not ready yet
        time.sleep(0.1)
    raise BenchError(f"{what} did not answer GET /readyz with 200 within {START_TIMEOUT:.0f} s")


def idle_memory(
    args: Sequence[str], env: dict[str, str], what: str, port: int | None, idle: float
) -> Memory:
    """The memory of a process left idle for `idle` seconds after it is ready."""
    with started(args, env, what, port) as process:
        time.sleep(idle)
        if process.poll() is not None:
            raise BenchError(f"{what} exited {process.returncode} while idle")
        return memory_of(process.pid)


def largest(samples: list[Memory]) -> Memory:
    return max(samples, key=lambda m: m.rss)


# --- the database -------------------------------------------------------------------------


@contextmanager
def database(postgres: str | None) -> Iterator[str]:
    """A fresh database URL, migrated with `python -m loom_db upgrade`."""
    with ExitStack() as stack:
        if postgres:
            from loom_db.testing import scratch_database

            url = stack.enter_context(scratch_database(postgres, "loom_bench"))
        else:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="loom-b7-"))
            url = f"sqlite+aiosqlite:///{directory}/loom.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
        migrated = subprocess.run(
            [sys.executable, "-m", "loom_db", "upgrade", "--database-url", url],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        if migrated.returncode != 0:
            raise BenchError(f"python -m loom_db upgrade failed:\n{migrated.stderr[-4000:]}")
        yield url


# --- the run ------------------------------------------------------------------------------


def emit(result: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def run(
    postgres: str | None, services: Sequence[str], *, idle: float, repeat: int, quick: bool
) -> None:
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    bare_args = [sys.executable, "-c", "import time; time.sleep(600)"]
    hello_args = [sys.executable, str(Path(__file__).resolve()), "--serve-hello"]
    bare, hello = [], []
    port = free_port()
    idle_memory([*hello_args, str(port)], plain_env, "the hello server", port, 0.0)
    for _ in range(repeat):
        bare.append(idle_memory(bare_args, plain_env, "bare python", None, idle))
        port = free_port()
        hello.append(
            idle_memory([*hello_args, str(port)], plain_env, "the hello server", port, idle)
        )
    baseline, bare_python = largest(hello), largest(bare)
    with database(postgres) as url:
        for service in services:
            args, what = [sys.executable, "-m", f"loom_{service}"], f"loom_{service}"
            samples = []
            for sample in range(repeat + 1):  # the first warms the bytecode cache
                port = free_port()
                memory = idle_memory(
                    args, service_env(url, service, port), what, port, idle if sample else 0.0
                )
                if sample:
                    samples.append(memory)
            ours = largest(samples)
            emit(
                {
                    "benchmark": "B7",
                    "name": f"idle {service}",
                    "value": round(ours.rss, 1),
                    "unit": "MB",
                    "uss": round(ours.uss, 1),
                    "baseline": round(baseline.rss, 1),
                    "baseline_uss": round(baseline.uss, 1),
                    "baseline_name": "hello-world Starlette app on Hypercorn, idle",
                    "bare_python": round(bare_python.rss, 1),
                    "ratio": round(ours.rss / baseline.rss, 3),
                    "target": f"<= {TARGET_MB:.0f} MB RSS",
                    "n": repeat,
                    "idle_s": idle,
                    "database": "postgresql" if postgres else "sqlite",
                    "quick": quick,
                }
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, for CI")
    parser.add_argument(
        "--repeat", type=int, default=1, help="starts per service (largest RSS of; 1)"
    )
    parser.add_argument(
        "--idle", type=float, default=None, help="seconds idle before reading (5; --quick 2)"
    )
    parser.add_argument(
        "--only",
        default=",".join(SERVICES),
        help=f"services to measure, comma-separated ({','.join(SERVICES)})",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LOOM_TEST_POSTGRES_URL"),
        help="a postgresql+psycopg:// URL of a server to create a scratch database on "
        "(default: LOOM_TEST_POSTGRES_URL; unset: SQLite in a temporary directory)",
    )
    parser.add_argument("--serve-hello", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_hello is not None:
        serve_hello(args.serve_hello)
        return
    services = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(services) - set(SERVICES))
    if unknown or not services:
        parser.error(f"--only: choose among {', '.join(SERVICES)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    idle = args.idle if args.idle is not None else (2.0 if args.quick else 5.0)
    try:
        run(args.database_url, services, idle=idle, repeat=args.repeat, quick=args.quick)
    except BenchError as exc:
        print(f"B7 failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
