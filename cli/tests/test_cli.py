"""`loom run`, `loom validate` and `loom schema` as a user runs them: a real process,
its exit code and what it prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def loom(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loom_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def write(tmp_path: Path, text: str, name: str = "graph.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_run_prints_prefixed_logs_and_a_summary(tmp_path: Path) -> None:
    result = loom("run", "examples/hello.yaml", "-p", "name=bob")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "greet | hello bob" in lines
    assert "shout | HELLO BOB" in lines
    assert any(line.split()[:2] == ["NODE", "STATUS"] for line in lines)
    assert any(line.split()[:3] == ["done", "succeeded", "1"] for line in lines)
    assert "hello succeeded" in result.stdout
    assert "\x1b[" not in result.stdout  # piped output is plain


def test_run_exits_1_when_the_graph_fails(tmp_path: Path) -> None:
    path = write(tmp_path, "name: g\nnodes:\n  a: {run: 'echo oops >&2; exit 4'}\n")
    result = loom("run", str(path))
    assert result.returncode == 1
    assert "a | oops" in result.stdout
    assert "failed (exit code 4)" in result.stdout


def test_run_exits_2_on_an_invalid_graph_naming_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: g\nnodes:\n  a:\n    run: 'true'\n    needs: [b]\n")
    result = loom("run", str(path))
    assert result.returncode == 2
    assert f"{path}:5: nodes.a.needs[0]: unknown node 'b'" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "count=three"], "param 'count': expected integer, got 'three'"),
        (["-p", "cuont=3"], "param 'cuont': unknown param (did you mean 'count'?)"),
        (["-p", "count"], "-p 'count': expected KEY=VALUE"),
        (["-p", "mode=slow"], "param 'mode': 'slow' is not one of 'fast', 'safe'"),
    ],
)
def test_param_errors_exit_2_with_a_clear_message(
    tmp_path: Path, args: list[str], message: str
) -> None:
    path = write(
        tmp_path,
        """
        name: g
        params:
          count: {type: integer, default: 1}
          mode: {type: string, enum: [fast, safe], default: fast}
          flag: {type: boolean, default: false}
        nodes:
          a: {run: 'echo ${{ params.count + 1 }}'}
        """,
    )
    result = loom("run", str(path), *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_params_are_read_by_their_declared_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: g
        params:
          count: {type: integer}
          flag: {type: boolean, default: false}
          items: {type: array, default: []}
        nodes:
          a: {run: 'echo ${{ params.count + 1 }} ${{ not params.flag }} ${{ params.items | length }}'}
        """,
    )
    result = loom("run", str(path), "-p", "count=41", "-p", "flag=true", "-p", 'items=["x","y"]')
    assert result.returncode == 0, result.stderr
    assert "a | 42 false 2" in result.stdout
    missing = loom("run", str(path))
    assert missing.returncode == 2
    assert "param 'count': required param is missing" in missing.stderr


def test_secrets_are_masked(tmp_path: Path) -> None:
    path = write(tmp_path, "name: g\nnodes:\n  a: {run: 'echo token=${{ secrets.API }}'}\n")
    result = loom("run", str(path), "--secret", "API=s3cr3t-value")
    assert result.returncode == 0
    assert "a | token=***" in result.stdout
    assert "s3cr3t-value" not in result.stdout
    from_env = loom("run", str(path), "--secret", "API", env={"API": "from-env-123"})
    assert "a | token=***" in from_env.stdout and "from-env-123" not in from_env.stdout


def test_ctrl_c_cancels_kills_the_processes_and_exits_130(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    path = write(tmp_path, f"name: g\nnodes:\n  a: {{run: 'echo $$ > {pidfile}; sleep 60'}}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom_cli", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline, "the node never started"
        time.sleep(0.05)
    node_pid = int(pidfile.read_text())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "cancelled" in out
    with pytest.raises(ProcessLookupError):
        os.kill(node_pid, 0)


def test_validate_lists_every_problem_in_file_line_form(tmp_path: Path) -> None:
    good = write(tmp_path, "name: g\nnodes:\n  a: {run: 'true'}\n", "good.yaml")
    bad = write(
        tmp_path,
        "name: g\nnodes:\n  test: {run: 'true'}\n  deploy:\n    needs: [test, tset]\n    rn: x\n",
        "bad.yaml",
    )
    result = loom("validate", str(good), str(bad))
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert f"{good}: ok (1 nodes, 0 triggers)" in lines
    assert any(line.startswith(f"{bad}:6: nodes.deploy.rn: unknown field 'rn'") for line in lines)
    assert loom("validate", str(good)).returncode == 0


def test_validate_a_missing_file(tmp_path: Path) -> None:
    result = loom("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read" in result.stdout


def test_schema_is_json_schema_of_the_spec() -> None:
    result = loom("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert {"name", "nodes", "triggers", "params"} <= set(schema["properties"])
    assert "additionalProperties" in json.dumps(schema)


def test_a_reader_that_goes_away_stops_the_run(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "name: g\nnodes:\n  a: {run: 'for i in $(seq 1 300); do echo line $i; sleep 0.05; done'}\n",
    )
    with subprocess.Popen(
        [sys.executable, "-m", "loom_cli", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    ) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # like `| head -1`
        assert proc.wait(timeout=30) == 141
    assert first == b"a | line 1\n"


def test_sigterm_cancels_and_exits_143(tmp_path: Path) -> None:
    path = write(tmp_path, "name: g\nnodes:\n  a: {run: 'echo started; sleep 60'}\n")
    with subprocess.Popen(
        [sys.executable, "-m", "loom_cli", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "a | started\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
