"""The client commands (`loom login`, `apply`, `graphs`, `trigger`, `executions`, `cancel`,
`dlq`) against a REAL REST service, started with `loom serve rest` on SQLite and memory
brokers (RabbitMQ for `dlq`): what a user sees printed, the exit status a script sees, and
the state the server keeps."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import pytest
from click.testing import CliRunner, Result

from loom_cli.main import cli
from loom_db.migrate import upgrade_sync
from loom_messaging import encode, open_broker
from loom_messaging.rabbitmq import delete_prefix

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery staple"
SECRET_KEY = "cli-test-secret-key-" + "k" * 40


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def admin_token(self) -> str:
        answer = httpx.post(
            f"{self.url}/api/v1/auth/login", json={"username": "admin", "password": PASSWORD}
        )
        answer.raise_for_status()
        return str(answer.json()["access_token"])

    def api_token(self, role: str) -> str:
        answer = httpx.post(
            f"{self.url}/api/v1/tokens",
            json={"name": f"cli-{role}-{uuid.uuid4().hex[:6]}", "role": role},
            headers={"Authorization": f"Bearer {self.admin_token()}"},
        )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["token"])


@contextmanager
def serve_rest(home: Path, **env: str) -> Iterator[Server]:
    """`loom serve rest` on a fresh SQLite database and the brokers `env` names; stopped
    with SIGTERM at the end, which must end it with status 0 (a graceful shutdown)."""
    url = f"sqlite+aiosqlite:///{home / 'loom.db'}"
    upgrade_sync(url)
    port = free_port()
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LOOM_")},
        "LOOM_DATABASE_URL": url,
        "LOOM_SECRET_KEY": SECRET_KEY,
        "LOOM_ADMIN_PASSWORD": PASSWORD,
        "LOOM_REST_HOST": "127.0.0.1",
        "LOOM_REST_PORT": str(port),
        "LOOM_QUEUE_URL": "memory://",
        "LOOM_EVENTS_URL": "memory://",
        "LOOM_BROKER_PREFIX": f"cli-{uuid.uuid4().hex[:8]}",
        **env,
    }
    log = home / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "loom_cli", "serve", "rest"],
            cwd=home,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"the service died:\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no /healthz within 30s:\n{log.read_text()}"
            time.sleep(0.1)
        yield Server(base, process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    assert status == 0, f"SIGTERM ended the service with {status}:\n{log.read_text()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The REST service on SQLite and memory brokers."""
    with serve_rest(tmp_path_factory.mktemp("server")) as started:
        yield started


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    return tmp_path / "config"


class Loom(Protocol):
    def __call__(self, *args: str, input: str | None = None, **env: str) -> Result: ...


@pytest.fixture
def loom(config_dir: Path) -> Loom:
    """Run `loom ARGS` in-process with its own config directory and no LOOM_* variables
    but those given."""

    def run(*args: str, input: str | None = None, **env: str) -> Result:
        environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("LOOM_")}
        environ.update({"LOOM_CONFIG_DIR": str(config_dir), **env})
        return CliRunner(env=environ).invoke(cli, list(args), input=input)

    return run


@pytest.fixture
def logged_in(loom: Loom, server: Server, config_dir: Path) -> Path:
    result = loom("login", "--server", server.url, "--username", "admin", LOOM_PASSWORD=PASSWORD)
    assert result.exit_code == 0, result.output
    return config_dir / "credentials.json"


def write(tmp_path: Path, text: str, name: str = "graph.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def graph_file(tmp_path: Path, name: str, description: str = "a test graph") -> Path:
    return write(
        tmp_path,
        f"""
        name: {name}
        description: {description}
        params:
          count: {{type: integer, default: 1}}
          who: {{type: string, default: world}}
        nodes:
          hello:
            run: echo "hello ${{{{ params.who }}}} ${{{{ params.count }}}}"
        """,
        f"{name}.yaml",
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- login ------------------------------------------------------------------------------


def test_login_stores_the_tokens_in_a_file_only_the_user_can_read(
    logged_in: Path, server: Server
) -> None:
    assert stat.S_IMODE(logged_in.stat().st_mode) == 0o600
    stored = json.loads(logged_in.read_text())
    assert stored["server"] == server.url
    assert stored["username"] == "admin"
    assert stored["ws_url"].startswith("ws://127.0.0.1:")
    assert stored["access_token"] and stored["refresh_token"]


def test_login_asks_for_the_password_without_echoing_it(
    loom: Loom, server: Server, config_dir: Path
) -> None:
    result = loom("login", "--server", f"{server.url}/api/v1/", input="admin\n" + PASSWORD + "\n")

    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    assert f"logged in to {server.url} as admin" in result.stdout
    assert json.loads((config_dir / "credentials.json").read_text())["server"] == server.url


def test_login_with_a_wrong_password_exits_3_and_stores_nothing(
    loom: Loom, server: Server, config_dir: Path
) -> None:
    result = loom("login", "--server", server.url, "-u", "admin", LOOM_PASSWORD="wrong")

    assert result.exit_code == 3
    assert result.stderr.startswith("loom: Unauthorized: ")
    assert not (config_dir / "credentials.json").exists()


# --- apply ------------------------------------------------------------------------------


def test_apply_creates_then_leaves_unchanged_then_updates(
    loom: Loom, logged_in: Path, tmp_path: Path
) -> None:
    created = loom("apply", "-f", str(ROOT / "examples" / "hello.yaml"))
    again = loom("apply", "-f", str(ROOT / "examples" / "hello.yaml"))
    changed = write(tmp_path, (ROOT / "examples" / "hello.yaml").read_text() + "\n# x\n")
    changed.write_text(changed.read_text().replace("Say hello", "Say hi"))
    updated = loom("apply", "-f", str(changed))

    assert (created.exit_code, created.stdout) == (0, "created hello version 1\n")
    assert (again.exit_code, again.stdout) == (0, "unchanged hello version 1\n")
    assert (updated.exit_code, updated.stdout) == (0, "updated hello version 2\n")


def test_apply_of_a_broken_file_exits_2_naming_file_and_line_and_applies_the_others(
    loom: Loom, logged_in: Path, tmp_path: Path
) -> None:
    broken = write(tmp_path, "name: broken\nnodes:\n  a:\n    run: 'true'\n    needs: [b]\n")
    good = graph_file(tmp_path, unique("good"))

    result = loom("apply", "-f", str(broken), "-f", str(good))

    assert result.exit_code == 2
    assert f"{broken}:5: nodes.a.needs[0]: unknown node 'b'" in result.stderr.splitlines()
    assert result.stdout == f"created {good.stem} version 1\n"


def test_apply_of_a_yaml_syntax_error_names_its_line(
    loom: Loom, logged_in: Path, tmp_path: Path
) -> None:
    broken = write(tmp_path, "name: x\nnodes:\n  a: {run: 'true'\n")

    result = loom("apply", "-f", str(broken))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"{broken}:")
    assert result.stderr.split(":")[1].isdigit()


def test_apply_json_output_is_the_servers_graph(
    loom: Loom, logged_in: Path, tmp_path: Path
) -> None:
    name = unique("json")
    result = loom("apply", "-o", "json", "-f", str(graph_file(tmp_path, name)))

    assert result.exit_code == 0, result.output
    graph = json.loads(result.stdout)
    assert (graph["name"], graph["version"], graph["enabled"]) == (name, 1, True)


# --- graphs -----------------------------------------------------------------------------


def test_graphs_lists_disables_and_enables(loom: Loom, logged_in: Path, tmp_path: Path) -> None:
    name = unique("toggle")
    assert loom("apply", "-f", str(graph_file(tmp_path, name))).exit_code == 0

    def row() -> list[str]:
        listed = loom("graphs")
        assert listed.exit_code == 0, listed.output
        assert listed.stdout.split()[:4] == ["NAME", "VERSION", "ENABLED", "TRIGGERS"]
        return next(line.split() for line in listed.stdout.splitlines() if line.startswith(name))

    assert row() == [name, "1", "yes", "-"]
    disabled = loom("graphs", "disable", name)
    assert (disabled.exit_code, disabled.stdout) == (
        0,
        f"disabled {name}: its triggers are paused\n",
    )
    assert row() == [name, "1", "no", "-"]
    enabled = loom("graphs", "enable", name, "-o", "json")
    assert enabled.exit_code == 0
    assert json.loads(enabled.stdout)["enabled"] is True
    listed = json.loads(loom("graphs", "-o", "json").stdout)
    assert {"name": name, "enabled": True}.items() <= next(
        g for g in listed if g["name"] == name
    ).items()


def test_enabling_an_unknown_graph_exits_1_with_the_servers_words(
    loom: Loom, logged_in: Path
) -> None:
    result = loom("graphs", "enable", "no-such-graph")

    assert result.exit_code == 1
    assert result.stderr.startswith("loom: Not Found: ")
    assert "no-such-graph" in result.stderr


# --- trigger, executions, cancel --------------------------------------------------------


def test_trigger_reads_params_by_their_declared_type_and_lists_the_execution(
    loom: Loom, logged_in: Path, tmp_path: Path
) -> None:
    name = unique("trig")
    assert loom("apply", "-f", str(graph_file(tmp_path, name))).exit_code == 0

    triggered = loom("trigger", name, "-p", "count=3", "-p", "who=bob")

    assert triggered.exit_code == 0, triggered.output
    word, execution_id, status = triggered.stdout.split()
    assert (word, status) == ("execution", "queued")
    listed = loom("executions", "--graph", name, "-o", "json")
    assert listed.exit_code == 0, listed.output
    [execution] = json.loads(listed.stdout)
    assert execution["id"] == execution_id
    assert execution["params"] == {"count": 3, "who": "bob"}
    assert execution["trigger"]["type"] == "manual"
    table = loom("executions", "-g", name).stdout.splitlines()
    assert table[0].split() == ["ID", "GRAPH", "STATUS", "TRIGGER", "CREATED"]
    assert table[1].split()[:4] == [execution_id, name, "queued", "manual"]


def test_trigger_with_a_param_of_the_wrong_type_exits_2_and_starts_nothing(
    loom: Loom, logged_in: Path, tmp_path: Path
) -> None:
    name = unique("badp")
    assert loom("apply", "-f", str(graph_file(tmp_path, name))).exit_code == 0

    wrong_type = loom("trigger", name, "-p", "count=three")
    unknown = loom("trigger", name, "-p", "cuont=3")

    assert wrong_type.exit_code == 2
    assert wrong_type.stderr == "loom: param 'count': expected integer, got 'three'\n"
    assert unknown.exit_code == 2
    assert "body.params.cuont" in unknown.stderr
    assert json.loads(loom("executions", "-g", name, "-o", "json").stdout) == []


def test_trigger_twice_with_one_idempotency_key_starts_one_execution(
    loom: Loom, logged_in: Path, tmp_path: Path
) -> None:
    name = unique("idem")
    assert loom("apply", "-f", str(graph_file(tmp_path, name))).exit_code == 0

    first = loom("trigger", name, "--idempotency-key", "k1", "-o", "json")
    second = loom("trigger", name, "--idempotency-key", "k1")

    assert first.exit_code == second.exit_code == 0
    execution_id = json.loads(first.stdout)["id"]
    assert second.stdout.startswith(f"execution {execution_id} ")
    assert "idempotency key" in second.stdout
    assert len(json.loads(loom("executions", "-g", name, "-o", "json").stdout)) == 1


def test_triggering_an_unknown_graph_exits_1(loom: Loom, logged_in: Path) -> None:
    result = loom("trigger", "no-such-graph")

    assert result.exit_code == 1
    assert result.stderr.startswith("loom: Not Found: ")


def test_cancel_ends_a_queued_execution(loom: Loom, logged_in: Path, tmp_path: Path) -> None:
    name = unique("cancel")
    assert loom("apply", "-f", str(graph_file(tmp_path, name))).exit_code == 0
    execution_id = json.loads(loom("trigger", name, "-o", "json").stdout)["id"]

    result = loom("cancel", execution_id)

    assert result.exit_code == 0, result.output
    assert result.stdout == f"cancel requested for execution {execution_id} (cancelled)\n"
    [execution] = json.loads(loom("executions", "-g", name, "-o", "json").stdout)
    assert execution["status"] == "cancelled"
    assert loom("executions", "-g", name, "--status", "queued", "-o", "json").stdout.strip() == "[]"


def test_executions_limit_caps_the_list(loom: Loom, logged_in: Path, tmp_path: Path) -> None:
    name = unique("many")
    assert loom("apply", "-f", str(graph_file(tmp_path, name))).exit_code == 0
    ids = [json.loads(loom("trigger", name, "-o", "json").stdout)["id"] for _ in range(3)]

    result = loom("executions", "-g", name, "--limit", "2", "-o", "json")

    assert [e["id"] for e in json.loads(result.stdout)] == ids[::-1][:2]


# --- dlq -------------------------------------------------------------------------------
# Dead letters are made by a consumer of the server's work queue. A memory broker lives in
# one process, so these tests run the server on the shared RabbitMQ under a prefix of
# their own, and dead-letter messages for real from here.


@dataclass
class RabbitServer:
    server: Server
    amqp_url: str
    prefix: str

    def env(self, role: str = "admin") -> dict[str, str]:
        return {"LOOM_SERVER": self.server.url, "LOOM_TOKEN": self.server.api_token(role)}


@pytest.fixture(scope="module")
def rabbit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """The REST service with its work queue on RabbitMQ (LOOM_TEST_AMQP_URL)."""
    amqp_url = os.environ.get("LOOM_TEST_AMQP_URL")
    if not amqp_url:
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail("LOOM_TEST_AMQP_URL is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("LOOM_TEST_AMQP_URL is not set: `loom dlq` tests skipped")
    prefix = f"clitest-{uuid.uuid4().hex[:10]}"
    home = tmp_path_factory.mktemp("rabbit-server")
    try:
        with serve_rest(home, LOOM_QUEUE_URL=amqp_url, LOOM_BROKER_PREFIX=prefix) as started:
            yield RabbitServer(started, amqp_url, prefix)
    finally:
        asyncio.run(delete_prefix(amqp_url, prefix))


async def _dead_letter(rabbit: RabbitServer, reason: str) -> tuple[str, str]:
    """Publish a body that is not JSON and an `execution.requested`, then consume both as
    a worker would: the first is refused, the second given up on with `reason`. Returns
    their keys (the second is its execution id)."""
    junk_key, execution_id = unique("junk"), unique("e")
    async with open_broker(rabbit.amqp_url, prefix=rabbit.prefix) as broker:
        before = len(await broker.queue.dead_letters(1000))
        await broker.queue.publish(b"\xffnot json", junk_key)
        message = {"execution_id": execution_id, "graph": "build"}
        await broker.queue.publish(encode("execution.requested", message), execution_id)
        async with broker.queue.consume() as deliveries:
            async with asyncio.timeout(10):
                delivery = await anext(aiter(deliveries))
            await delivery.dead_letter(reason)
        deadline = time.monotonic() + 10
        while len(await broker.queue.dead_letters(1000)) < before + 2:
            assert time.monotonic() < deadline, "the undecodable message was not dead-lettered"
            await asyncio.sleep(0.05)
    return junk_key, execution_id


async def _receive(rabbit: RabbitServer) -> tuple[str, dict[str, object]]:
    """The next message of the work queue (acked): its key and data."""
    async with open_broker(rabbit.amqp_url, prefix=rabbit.prefix) as broker:
        async with broker.queue.consume() as deliveries:
            async with asyncio.timeout(10):
                delivery = await anext(aiter(deliveries))
            await delivery.ack()
    return delivery.key, delivery.envelope.data


def test_dlq_list_of_a_server_without_dead_letters_is_empty(loom: Loom, logged_in: Path) -> None:
    table = loom("dlq", "list")
    as_json = loom("dlq", "-o", "json", "list")

    assert (table.exit_code, table.stdout.split()) == (
        0,
        ["ID", "KEY", "TYPE", "DEAD-LETTERED", "REASON"],
    )
    assert (as_json.exit_code, json.loads(as_json.stdout)) == (0, [])


def test_dlq_lists_dead_letters_and_replays_one_onto_the_work_queue(
    loom: Loom, rabbit_server: RabbitServer
) -> None:
    env = rabbit_server.env()
    junk_key, execution_id = asyncio.run(_dead_letter(rabbit_server, "graph 'build' was\ngone"))

    table = loom("dlq", "list", **env)
    as_json = loom("dlq", "list", "-o", "json", **env)

    assert table.exit_code == as_json.exit_code == 0, table.output + as_json.output
    by_key = {item["key"]: item for item in json.loads(as_json.stdout)}
    letter, junk = by_key[execution_id], by_key[junk_key]
    assert letter["type"] == "execution.requested"
    assert letter["data"] == {"execution_id": execution_id, "graph": "build"}
    assert junk["type"] is None and junk["preview_encoding"] == "base64"
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "KEY", "TYPE", "DEAD-LETTERED", "REASON"]
    row = next(line for line in lines if line.startswith(letter["id"]))
    assert row.split()[1:3] == [execution_id, "execution.requested"]
    assert row.endswith("graph 'build' was gone")  # the reason, on its row
    junk_row = next(line for line in lines if line.startswith(junk["id"]))
    assert junk_row.split()[1:3] == [junk_key, "-"] and "not JSON" in junk_row

    replayed = loom("dlq", "replay", letter["id"], **env)

    assert (replayed.exit_code, replayed.stdout) == (
        0,
        f"replayed dead letter {letter['id']}: it is back on the work queue\n",
    )
    assert asyncio.run(_receive(rabbit_server)) == (execution_id, letter["data"])
    remaining = {
        item["key"] for item in json.loads(loom("dlq", "list", "-o", "json", **env).stdout)
    }
    assert junk_key in remaining and execution_id not in remaining
    again = loom("dlq", "replay", letter["id"], **env)
    assert again.exit_code == 1
    assert again.stderr.startswith("loom: Not Found: ")
    junk_replayed = loom("dlq", "replay", "-o", "json", junk["id"], **env)
    assert junk_replayed.exit_code == 0, junk_replayed.output
    assert json.loads(junk_replayed.stdout) == {"id": junk["id"], "replayed": True}


def test_dlq_list_limit_shows_the_oldest_and_says_there_may_be_more(
    loom: Loom, rabbit_server: RabbitServer
) -> None:
    asyncio.run(_dead_letter(rabbit_server, "given up"))
    env = rabbit_server.env()

    limited = loom("dlq", "list", "--limit", "1", **env)
    everything = json.loads(loom("dlq", "list", "-o", "json", **env).stdout)

    assert limited.exit_code == 0, limited.output
    assert len(everything) >= 2
    assert len(limited.stdout.splitlines()) == 2  # the header and the oldest
    assert limited.stdout.splitlines()[1].startswith(everything[0]["id"])
    assert "there may be more" in limited.stderr
    assert loom("dlq", "list", "--limit", "0", **env).exit_code == 2


def test_dlq_is_for_admins_and_others_exit_3(loom: Loom, rabbit_server: RabbitServer) -> None:
    for role in ("viewer", "editor"):
        env = rabbit_server.env(role)

        listed = loom("dlq", "list", **env)
        replayed = loom("dlq", "replay", "anything", **env)

        for result in (listed, replayed):
            assert result.exit_code == 3, role
            assert result.stderr.startswith("loom: Forbidden: ")


# --- tokens, refresh, errors ------------------------------------------------------------


def test_an_expired_access_token_is_refreshed_once_and_the_new_pair_stored(
    loom: Loom, logged_in: Path
) -> None:
    stored = json.loads(logged_in.read_text())
    logged_in.write_text(json.dumps({**stored, "access_token": "expired.or.garbage"}))

    result = loom("graphs")

    assert result.exit_code == 0, result.output
    renewed = json.loads(logged_in.read_text())
    assert renewed["access_token"] not in (stored["access_token"], "expired.or.garbage")
    assert renewed["refresh_token"] != stored["refresh_token"]
    assert stat.S_IMODE(logged_in.stat().st_mode) == 0o600
    assert loom("graphs").exit_code == 0


def test_a_spent_login_exits_3_asking_to_log_in_again(loom: Loom, logged_in: Path) -> None:
    stored = json.loads(logged_in.read_text())
    logged_in.write_text(
        json.dumps({**stored, "access_token": "x.y.z", "refresh_token": "not-a-refresh-token"})
    )

    result = loom("graphs")

    assert result.exit_code == 3
    assert "run `loom login` again" in result.stderr


def test_not_logged_in_exits_3(loom: Loom, server: Server) -> None:
    without_server = loom("graphs")
    with_server = loom("executions", "--server", server.url)

    assert without_server.exit_code == with_server.exit_code == 3
    assert "not logged in" in without_server.stderr
    assert f"loom login --server {server.url}" in with_server.stderr


def test_the_stored_login_is_never_sent_to_another_server(loom: Loom, logged_in: Path) -> None:
    result = loom("graphs", "--server", f"http://127.0.0.1:{free_port()}")

    assert result.exit_code == 3
    assert "not logged in to http://127.0.0.1:" in result.stderr


def test_an_api_token_from_the_environment_needs_no_login(
    loom: Loom, server: Server, tmp_path: Path
) -> None:
    editor = server.api_token("editor")
    name = unique("ci")

    applied = loom(
        "apply", "-f", str(graph_file(tmp_path, name)), LOOM_SERVER=server.url, LOOM_TOKEN=editor
    )
    triggered = loom("trigger", name, "--server", server.url, "--token", editor)

    assert applied.exit_code == 0, applied.output
    assert triggered.exit_code == 0, triggered.output


def test_a_viewer_token_cannot_trigger_and_exits_3(
    loom: Loom, server: Server, tmp_path: Path
) -> None:
    name = unique("ro")
    editor = {"LOOM_SERVER": server.url, "LOOM_TOKEN": server.api_token("editor")}
    assert loom("apply", "-f", str(graph_file(tmp_path, name)), **editor).exit_code == 0
    env = {"LOOM_SERVER": server.url, "LOOM_TOKEN": server.api_token("viewer")}

    listed = loom("graphs", **env)
    triggered = loom("trigger", name, **env)

    assert listed.exit_code == 0, listed.output
    assert triggered.exit_code == 3
    assert triggered.stderr.startswith("loom: Forbidden: ")


def test_an_unreachable_server_exits_4_with_one_clear_message(loom: Loom, config_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    listed = loom("graphs", "--server", url, "--token", "loom_whatever")
    login = loom("login", "--server", url, "-u", "admin", LOOM_PASSWORD="x")

    for result in (listed, login):
        assert result.exit_code == 4
        assert result.stderr.startswith(f"loom: cannot reach the Loom server at {url} (is it")
        assert len(result.stderr.splitlines()) == 1
    assert not (config_dir / "credentials.json").exists()


def test_serve_names_the_services_it_knows(loom: Loom) -> None:
    result = loom("serve", "nope")

    assert result.exit_code == 2
    assert "'nope' is not one of 'rest', " in result.stderr


def test_a_command_that_raced_another_refresh_adopts_its_pair_and_stays_logged_in(
    loom: Loom, logged_in: Path, monkeypatch: pytest.MonkeyPatch, config_dir: Path
) -> None:
    """Two commands start with the same expired token; the first refreshes. The second
    must not present the spent refresh token (the server would end the session)."""
    from loom_cli.remote import _client

    stored = json.loads(logged_in.read_text())
    logged_in.write_text(json.dumps({**stored, "access_token": "expired.or.garbage"}))
    monkeypatch.setenv("LOOM_CONFIG_DIR", str(config_dir))
    with _client(None, None) as second:  # reads the expired pair, as a command would
        assert loom("graphs").exit_code == 0  # the first command refreshes and stores

        assert second.get("/graphs") is not None  # 401, then the stored pair is adopted
        assert second.refresh_token == json.loads(logged_in.read_text())["refresh_token"]
    assert loom("graphs").exit_code == 0  # the session is alive
