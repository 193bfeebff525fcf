"""B1 and B2: the engine's own overhead, against a baseline measured in the same run.

B1  a chain of N `python` nodes calling a no-op, through the pure engine (events to a null
    sink), against the same N sequential calls made straight to the same kind of process
    (Loom's PythonPool). Figure: orchestration overhead in ms per node (target <= 0.2).
B2  N independent `run: "true"` nodes, against spawning `true` N times straight from
    asyncio with the same parallelism (the engine's slots). Figure: the ratio of the rates
    (target >= 0.8).

    uv run python benchmarks/engine.py [--quick] [--repeat K]

Prints one JSON object per line and figure (DESIGN §10). Each side runs K times
(alternating, best of K) so a noisy neighbour hurts both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import orjson

from loom_common import Graph, load_graph
from loom_worker.engine import Engine
from loom_worker.executors import NodeCall, PythonPool

HERE = Path(__file__).resolve().parent


def chain_graph(n: int) -> Graph:
    lines = ["name: b1-chain", "nodes:"]
    for i in range(n):
        needs = f", needs: [n{i - 1}]" if i else ""
        lines.append(f"  n{i}: {{python: '_targets:noop'{needs}}}")
    return load_graph("\n".join(lines) + "\n")


def fanout_graph(n: int) -> Graph:
    lines = ["name: b2-true", "nodes:"] + [f"  n{i}: {{run: 'true'}}" for i in range(n)]
    return load_graph("\n".join(lines) + "\n")


async def run_engine(engine: Engine, graph: Graph) -> float:
    execution = engine.start(graph, params={})
    start = time.perf_counter()
    async for _ in execution:
        pass
    elapsed = time.perf_counter() - start
    if execution.status != "succeeded":
        raise SystemExit(f"{graph.name}: the execution {execution.status}: {execution.error}")
    return elapsed


async def b1(n: int, repeat: int, quick: bool) -> dict[str, object]:
    graph = chain_graph(n)
    slots = os.cpu_count() or 1
    async with PythonPool(slots, sys_path=(str(HERE),)) as pool:
        engine = Engine(slots=slots, python=pool)
        call = NodeCall("bench", "n", 1)

        def sink(stream: str, text: str) -> None:
            return None

        async def direct() -> float:
            start = time.perf_counter()
            for _ in range(n):
                await pool.call("_targets:noop", {}, call=call, log=sink)
            return time.perf_counter() - start

        await direct()  # start the processes and import the target
        engine_times, direct_times = [], []
        for _ in range(repeat):
            direct_times.append(await direct())
            engine_times.append(await run_engine(engine, graph))
        await engine.aclose()
    best_engine, best_direct = min(engine_times), min(direct_times)
    overhead_ms = (best_engine - best_direct) / n * 1000
    return {
        "benchmark": "B1",
        "name": f"engine chain of {n} no-op python nodes",
        "value": round(overhead_ms, 4),
        "unit": "ms/node overhead",
        "engine_ms_per_node": round(best_engine / n * 1000, 4),
        "baseline": round(best_direct / n * 1000, 4),
        "baseline_name": "the same calls straight to PythonPool, ms/call",
        "ratio": round(best_direct / best_engine, 3),
        "target": "<= 0.2 ms/node",
        "n": n,
        "repeat": repeat,
        "quick": quick,
    }


async def b2(n: int, repeat: int, quick: bool) -> dict[str, object]:
    graph = fanout_graph(n)
    slots = os.cpu_count() or 1

    async def raw() -> float:
        gate = asyncio.Semaphore(slots)

        async def spawn() -> None:
            async with gate:
                proc = await asyncio.create_subprocess_exec(
                    "true",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                await proc.communicate()

        start = time.perf_counter()
        await asyncio.gather(*(spawn() for _ in range(n)))
        return time.perf_counter() - start

    engine_times, raw_times = [], []
    async with Engine(slots=slots) as engine:
        await raw()
        for _ in range(repeat):
            raw_times.append(await raw())
            engine_times.append(await run_engine(engine, graph))
    engine_rate, raw_rate = n / min(engine_times), n / min(raw_times)
    return {
        "benchmark": "B2",
        "name": f"shell fan-out {n} x true",
        "value": round(engine_rate, 1),
        "unit": "nodes/s",
        "baseline": round(raw_rate, 1),
        "baseline_name": f"raw asyncio spawn of true, {slots} at once (stdout/stderr piped)",
        "ratio": round(engine_rate / raw_rate, 3),
        "target": ">= 0.8 ratio",
        "n": n,
        "slots": slots,
        "repeat": repeat,
        "quick": quick,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, for CI")
    parser.add_argument("--repeat", type=int, default=None, help="runs per side (best of)")
    parser.add_argument("--only", choices=["B1", "B2"], default=None)
    args = parser.parse_args()
    n = 200 if args.quick else 1000
    repeat = args.repeat or (2 if args.quick else 3)
    for name, bench in (("B1", b1), ("B2", b2)):
        if args.only in (None, name):
            result = await bench(n, repeat, args.quick)
            sys.stdout.write(orjson.dumps(result).decode() + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
