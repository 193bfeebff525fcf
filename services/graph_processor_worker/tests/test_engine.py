"""The engine's semantics, with real processes: ordering, slots, retries, timeouts,
cancel, skips, fan-out, outputs, prior states, masking, log caps."""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from loom_common.graph import load_graph
from loom_common.params import resolve_params
from loom_worker.engine import Engine, Execution
from loom_worker.events import Event, ExecutionEvent, LogEvent, NodeEvent, PriorNode

HERE = str(Path(__file__).parent)


@pytest.fixture
async def engine_http_server() -> AsyncIterator[str]:
    """A tiny real HTTP/1.1 server on loopback: `/slow` answers after 0.5 s, the rest at once
    with a JSON echo of the path."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            if path == "/slow":
                await asyncio.sleep(0.5)
            body = orjson.dumps({"path": path})
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def run(
    text: str,
    params: dict[str, Any] | None = None,
    *,
    slots: int = 2,
    cancel_after: str | None = None,
    **start: Any,
) -> tuple[Execution, list[Event]]:
    graph = load_graph(textwrap.dedent(text))
    max_log_bytes = start.pop("max_log_bytes", 10 * 1024 * 1024)
    async with Engine(slots=slots, python_path=(HERE,), max_log_bytes=max_log_bytes) as engine:
        execution = engine.start(
            graph, params=resolve_params(graph.spec.params, params or {}), **start
        )
        events: list[Event] = []
        async for event in execution:
            events.append(event)
            if (
                cancel_after
                and isinstance(event, NodeEvent)
                and event.node == cancel_after
                and event.status == "running"
            ):
                execution.cancel()
    return execution, events


def logs(events: list[Event], node: str | None = None) -> list[str]:
    return [e.text for e in events if isinstance(e, LogEvent) and node in (None, e.node)]


def statuses(execution: Execution) -> dict[str, str]:
    return {name: record.status for name, record in execution.records.items()}


async def test_diamond_runs_in_dependency_order_and_passes_outputs() -> None:
    execution, events = await run(
        """
        name: g
        nodes:
          a: {run: 'echo "v=1" >> "$LOOM_OUTPUT"'}
          b: {needs: [a], run: 'echo "b=${{ nodes.a.outputs.v }}" >> "$LOOM_OUTPUT"'}
          c: {needs: [a], run: 'echo "c=${{ nodes.a.outputs.v }}2" >> "$LOOM_OUTPUT"'}
          d: {needs: [b, c], run: 'echo "${{ nodes.b.outputs.b }}-${{ nodes.c.outputs.c }}"'}
        """
    )
    assert execution.status == "succeeded"
    assert logs(events, "d") == ["1-12"]
    order = [e.node for e in events if isinstance(e, NodeEvent) and e.status == "succeeded"]
    assert order[0] == "a" and order[-1] == "d"
    assert isinstance(events[0], ExecutionEvent) and events[0].status == "running"
    assert isinstance(events[-1], ExecutionEvent) and events[-1].status == "succeeded"


async def test_seq_is_gapless_and_continues_after_a_given_seq() -> None:
    execution, events = await run(
        "name: g\nnodes:\n  a: {run: 'echo 1; echo 2; echo 3 >&2'}\n", after_seq=41
    )
    seqs = [e.seq for e in events if isinstance(e, LogEvent)]
    assert seqs == [42, 43, 44]
    assert execution.last_seq == 44


async def test_no_more_nodes_run_at_once_than_slots() -> None:
    nodes = "".join(f"  n{i}: {{run: 'sleep 0.2'}}\n" for i in range(6))
    _, events = await run("name: g\nnodes:\n" + nodes, slots=2)
    running = peak = 0
    for event in events:
        if isinstance(event, NodeEvent):
            running += {"running": 1, "succeeded": -1}.get(event.status, 0)
            peak = max(peak, running)
    assert peak == 2


async def test_http_nodes_take_no_slot(engine_http_server: str) -> None:
    _, events = await run(
        f"""
        name: g
        nodes:
          slow: {{run: 'sleep 1'}}
          call: {{http: {{url: '{engine_http_server}/slow'}}}}
        """,
        slots=1,
    )
    first_two = [e for e in events if isinstance(e, NodeEvent)][:2]
    assert {e.node for e in first_two} == {"slow", "call"}
    assert all(e.status == "running" for e in first_two)


async def test_retries_back_off_within_full_jitter_bounds() -> None:
    execution, events = await run(
        """
        name: g
        nodes:
          flaky:
            run: exit 3
            retries: 3
            retry_delay: 40ms
            retry_max_delay: 100ms
        """
    )
    failed = [e for e in events if isinstance(e, NodeEvent) and e.status == "failed"]
    assert [e.attempt for e in failed] == [1, 2, 3, 4]
    caps = [0.04, 0.08, 0.1]
    for event, cap in zip(failed, caps, strict=False):
        assert event.retry_in is not None and 0 <= event.retry_in <= cap
    assert failed[-1].retry_in is None and failed[-1].exit_code == 3
    assert execution.records["flaky"].attempt == 4
    assert execution.status == "failed"


async def test_a_flaky_node_succeeds_on_its_third_try(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    execution, _ = await run(
        f"""
        name: g
        nodes:
          flaky:
            retries: 5
            retry_delay: 10ms
            run: |
              n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo $n > {counter}
              [ $n -ge 3 ]
        """
    )
    assert execution.status == "succeeded"
    assert execution.records["flaky"].attempt == 3


async def test_errors_that_cannot_heal_are_not_retried() -> None:
    execution, events = await run(
        "name: g\nnodes:\n  p: {python: 'no_such_module_xyz:f', retries: 3}\n"
    )
    attempts = [e.attempt for e in events if isinstance(e, NodeEvent) and e.status == "failed"]
    assert attempts == [1]
    assert "no_such_module_xyz" in (execution.records["p"].error or "")


async def test_node_timeout_fails_the_execution_unless_continue_on_failure() -> None:
    execution, _ = await run("name: g\nnodes:\n  a: {run: 'sleep 30', timeout: 300ms}\n")
    assert execution.status == "failed"
    assert execution.records["a"].status == "timed_out"
    execution, _ = await run(
        "name: g\nnodes:\n  a: {run: 'sleep 30', timeout: 300ms, continue_on_failure: true}\n"
        "  b: {run: 'echo after', needs: [a]}\n"
    )
    assert execution.status == "succeeded"
    assert statuses(execution) == {"a": "timed_out", "b": "succeeded"}


async def test_execution_timeout_ends_timed_out_and_cancels_the_rest() -> None:
    execution, _ = await run(
        "name: g\ntimeout: 400ms\nnodes:\n  a: {run: 'sleep 30'}\n  b: {run: 'true', needs: [a]}\n"
    )
    assert execution.status == "timed_out"
    assert statuses(execution) == {"a": "timed_out", "b": "cancelled"}


async def test_cancel_kills_processes_and_cancels_pending_nodes(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    execution, _ = await run(
        f"""
        name: g
        nodes:
          long: {{run: 'echo $$ > {pidfile}; sleep 30'}}
          next: {{run: 'true', needs: [long]}}
        """,
        cancel_after="long",
    )
    assert execution.status == "cancelled"
    assert statuses(execution) == {"long": "cancelled", "next": "cancelled"}
    if pidfile.exists() and pidfile.read_text().strip():
        pid = int(pidfile.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_skips_propagate_and_status_functions_decide() -> None:
    execution, _ = await run(
        """
        name: g
        nodes:
          a: {run: exit 1}
          b: {run: 'true', needs: [a]}
          c: {run: 'true', needs: [b]}
          cleanup: {run: 'true', needs: [c], if: '${{ always() }}'}
          on_fail: {run: 'true', needs: [a], if: failure()}
          off: {run: 'true', if: "${{ 1 == 2 }}"}
        """
    )
    assert statuses(execution) == {
        "a": "failed",
        "b": "skipped",
        "c": "skipped",
        "cleanup": "succeeded",
        "on_fail": "succeeded",
        "off": "skipped",
    }
    assert execution.status == "failed"


async def test_continue_on_failure_counts_as_done_for_success() -> None:
    execution, _ = await run(
        """
        name: g
        nodes:
          a: {run: exit 1, continue_on_failure: true}
          b: {run: 'true', needs: [a]}
        """
    )
    assert statuses(execution) == {"a": "failed", "b": "succeeded"}
    assert execution.status == "succeeded"


async def test_fan_out_instances_outputs_and_max_parallel() -> None:
    execution, events = await run(
        """
        name: g
        params:
          regions: {type: array, default: [eu, us, ap, sa]}
        nodes:
          build:
            for_each: ${{ params.regions }}
            max_parallel: 2
            run: 'sleep 0.1; echo "r=${{ item }}-${{ index }}" >> "$LOOM_OUTPUT"'
          report:
            needs: [build]
            run: echo "${{ nodes.build.outputs | map(attribute='r') | join(',') }}"
        """,
        slots=4,
    )
    assert execution.status == "succeeded"
    assert logs(events, "report") == ["eu-0,us-1,ap-2,sa-3"]
    running = peak = 0
    for event in events:
        if isinstance(event, NodeEvent) and event.name == "build" and not event.fanout:
            running += {"running": 1, "succeeded": -1}.get(event.status, 0)
            peak = max(peak, running)
    assert peak == 2
    assert {f"build[{i}]" for i in range(4)} <= set(execution.records)


async def test_empty_fan_out_succeeds_with_no_instances() -> None:
    execution, events = await run(
        """
        name: g
        nodes:
          build: {for_each: [], run: 'true'}
          after: {needs: [build], run: 'echo "${{ nodes.build.status }} ${{ nodes.build.outputs }}"'}
        """
    )
    assert execution.status == "succeeded"
    assert logs(events, "after") == ["succeeded []"]


async def test_fan_out_fails_if_any_instance_fails() -> None:
    execution, _ = await run(
        "name: g\nnodes:\n  b: {for_each: [0, 1, 0], run: 'exit ${{ item }}'}\n"
    )
    assert execution.records["b"].status == "failed"
    assert execution.records["b[1]"].status == "failed"
    assert execution.records["b[0]"].status == "succeeded"


async def test_prior_states_are_kept_and_running_nodes_rerun_as_next_attempt() -> None:
    execution, events = await run(
        """
        name: g
        nodes:
          a: {run: 'echo SHOULD-NOT-RUN'}
          b: {needs: [a], run: 'echo "got ${{ nodes.a.outputs.x }}"'}
        """,
        prior={
            "a": PriorNode("succeeded", {"x": "42"}, 1),
            "b": PriorNode("running", None, 2),
        },
    )
    assert execution.status == "succeeded"
    assert logs(events) == ["got 42"]
    assert [e.attempt for e in events if isinstance(e, NodeEvent) and e.node == "b"] == [3, 3]
    assert not [e for e in events if isinstance(e, NodeEvent) and e.node == "a"]


async def test_prior_fan_out_instances_are_not_rerun() -> None:
    execution, events = await run(
        "name: g\nnodes:\n  b: {for_each: [x, y], run: 'echo run ${{ item }}'}\n",
        prior={"b[0]": PriorNode("succeeded", {}, 1)},
    )
    assert execution.status == "succeeded"
    assert logs(events) == ["run y"]


async def test_secret_values_are_masked_in_logs() -> None:
    execution, events = await run(
        """
        name: g
        env: {TOKEN: "${{ secrets.TOKEN }}"}
        nodes:
          a: {run: 'echo "token is $TOKEN"; echo "${{ secrets.TOKEN }}" >&2'}
          p: {python: 'engine_targets:echo', with: {t: "${{ secrets.TOKEN }}"}}
        """,
        secrets={"TOKEN": "hunter2-s3cret"},
    )
    assert execution.status == "succeeded"
    text = "\n".join(logs(events))
    assert "hunter2-s3cret" not in text
    assert "token is ***" in text


async def test_log_cap_drops_the_rest_with_one_line_saying_so() -> None:
    execution, events = await run(
        "name: g\nnodes:\n  a: {run: 'for i in $(seq 1 500); do echo line $i; done'}\n",
        max_log_bytes=1000,
    )
    lines = logs(events)
    assert "log limit of 1000 bytes reached" in lines[-1]
    assert len(lines) < 200
    assert execution.status == "succeeded"


async def test_lines_over_16_kib_are_split() -> None:
    _, events = await run(
        "name: g\nnodes:\n  p: {python: 'engine_targets:long_line', with: {size: 40000}}\n"
    )
    pieces = [line for line in logs(events, "p") if line.startswith("x")]
    assert [len(p) for p in pieces] == [16384, 16384, 40000 - 32768]


async def test_python_nodes_return_results_downstream() -> None:
    execution, events = await run(
        """
        name: g
        nodes:
          p: {python: 'engine_targets:echo', with: {n: 3, names: [a, b]}}
          q: {needs: [p], run: 'echo "${{ nodes.p.outputs.result.n + 1 }} ${{ nodes.p.outputs.result.names }}"'}
        """
    )
    assert execution.status == "succeeded"
    assert logs(events, "q") == ['4 ["a","b"]']


async def test_graph_nodes_are_refused_and_sql_needs_its_secret() -> None:
    execution, _ = await run(
        "name: g\nnodes:\n  s: {sql: {connection: DB, query: 'select 1'}}\n  c: {graph: other}\n"
    )
    assert execution.status == "failed"
    assert execution.records["s"].error == "secret 'DB' is not available"
    assert "worker service" in (execution.records["c"].error or "")


async def test_an_undefined_secret_fails_the_node_with_its_name() -> None:
    execution, _ = await run("name: g\nnodes:\n  a: {run: 'echo ${{ secrets.NOPE }}'}\n")
    assert execution.status == "failed"
    assert "'NOPE' is undefined" in (execution.records["a"].error or "")


INJECTIONS = [
    "$(touch {marker})",
    "`touch {marker}`",
    "; touch {marker}",
    "\ntouch {marker}\n",
    '" ; touch {marker}; echo "',
    "' ; touch {marker}; echo '",
    "$({marker})",
    "&& touch {marker}",
    "| touch {marker}",
]


@pytest.mark.parametrize("payload", INJECTIONS)
async def test_template_values_never_become_shell_code(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    value = payload.format(marker=marker)
    execution, events = await run(
        """
        name: g
        params:
          name: {type: string}
        nodes:
          dq: {run: 'echo "hello ${{ params.name }}"'}
          bare: {run: 'echo ${{ params.name }}'}
          sq: {run: "echo 'x${{ params.name }}x'"}
          heredoc:
            run: |
              cat <<EOF
              ${{ params.name }}
              EOF
        """,
        {"name": value},
    )
    assert execution.status == "succeeded"
    assert not marker.exists()
    first_line = value.split("\n")[0] if "\n" not in value.strip("\n") else None
    text = "\n".join(logs(events, "dq"))
    assert text == f"hello {value}"
    assert "\n".join(logs(events, "bare")) == value
    assert "\n".join(logs(events, "sq")) == f"x{value}x"
    del first_line


async def test_hello_bob() -> None:
    _, events = await run(
        "name: g\nparams: {name: {type: string}}\nnodes:\n  a: {run: 'echo \"hello ${{ params.name }}\"'}\n",
        {"name": "bob"},
    )
    assert logs(events) == ["hello bob"]


async def test_raw_pastes_text_on_purpose() -> None:
    _, events = await run(
        "name: g\nparams: {cmd: {type: string}}\nnodes:\n  a: {run: '${{ params.cmd | raw }}'}\n",
        {"cmd": "echo pasted; echo twice"},
    )
    assert logs(events) == ["pasted", "twice"]


async def test_node_env_sees_only_the_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_SECRET_KEY", "do-not-leak")
    monkeypatch.setenv("SOME_WORKER_VAR", "nope")
    _, events = await run("name: g\nenv: {APP: one}\nnodes:\n  a: {run: env, env: {NODE: two}}\n")
    names = {line.split("=", 1)[0] for line in logs(events, "a")}
    assert "LOOM_SECRET_KEY" not in names and "SOME_WORKER_VAR" not in names
    assert {"APP", "NODE", "PATH", "LOOM_OUTPUT", "LOOM_EXECUTION_ID"} <= names


async def test_breaking_off_iteration_cancels_the_execution(tmp_path: Path) -> None:
    graph = load_graph("name: g\nnodes:\n  a: {run: 'sleep 30'}\n")
    async with Engine(slots=1) as engine:
        async with engine.start(graph, params={}) as execution:
            async for event in execution:
                if isinstance(event, NodeEvent) and event.status == "running":
                    break
    assert execution.status == "cancelled"
    assert execution.records["a"].status == "cancelled"


async def test_an_if_without_a_status_function_implies_success() -> None:
    execution, _ = await run(
        """
        name: g
        params: {go: {type: boolean, default: true}}
        nodes:
          a: {run: exit 1}
          deploy: {needs: [a], if: "${{ params.go }}", run: 'true'}
          off: {run: 'true', if: false}
          on: {run: 'true', if: true}
        """
    )
    assert statuses(execution)["deploy"] == "skipped"
    assert statuses(execution)["off"] == "skipped"
    assert statuses(execution)["on"] == "succeeded"


async def test_failure_looks_at_every_ancestor() -> None:
    execution, _ = await run(
        """
        name: g
        nodes:
          build: {run: exit 1}
          deploy: {needs: [build], run: 'true'}
          alert: {needs: [deploy], if: failure(), run: 'true'}
        """
    )
    assert statuses(execution) == {"build": "failed", "deploy": "skipped", "alert": "succeeded"}


async def test_secrets_are_masked_in_errors_and_outputs_too() -> None:
    pem = "-----BEGIN KEY-----\nAAAAsecretline1\nBBBBsecretline2\n-----END KEY-----"
    execution, events = await run(
        """
        name: g
        nodes:
          a:
            run: |
              echo "o=${{ secrets.T }}" >> "$LOOM_OUTPUT"
              printf '%s\\n' "${{ secrets.PEM }}"
          p: {python: 'engine_targets:fail_with', with: {message: "bad token ${{ secrets.T }}"}}
        """,
        secrets={"T": "hunter2-s3cret", "PEM": pem},
    )
    node_events = [e for e in events if isinstance(e, NodeEvent)]
    assert "hunter2-s3cret" not in repr(node_events)
    assert "hunter2-s3cret" not in repr(execution.records)
    assert not any("secretline" in line for line in logs(events))
    assert execution.records["p"].error == "ValueError: bad token ***"


async def test_instance_names_that_look_alike_do_not_collide() -> None:
    execution, _ = await run(
        "name: g\nnodes:\n  a: {for_each: [1], run: 'echo a'}\n  a_0_: {run: 'echo other'}\n"
    )
    assert execution.status == "succeeded"


async def test_env_values_read_as_in_run_scripts() -> None:
    _, events = await run(
        """
        name: g
        params:
          flag: {type: boolean, default: false}
          l: {type: array, default: [a, b]}
        env: {F: "${{ params.flag }}", L: "${{ params.l }}"}
        nodes:
          a: {run: 'echo "$F $L"'}
        """
    )
    assert logs(events, "a") == ['false ["a","b"]']


async def test_execution_timeout_reports_every_fan_out_instance_in_order() -> None:
    execution, events = await run(
        """
        name: g
        timeout: 1s
        nodes:
          f: {for_each: [1, 2, 3], max_parallel: 1, run: 'sleep 30'}
        """
    )
    assert execution.status == "timed_out"
    node_events = [e for e in events if isinstance(e, NodeEvent) and e.status != "running"]
    assert [e.node for e in node_events] == ["f[0]", "f[1]", "f[2]", "f"]
    assert node_events[-1].fanout
    assert "1s elapsed" in (execution.error or "")
