"""Faults a running system survives without losing what it accepted (DESIGN §11, §14),
distributed mode, each on servers of this module's own (a private PostgreSQL and a
private RabbitMQ node, stopped and started here; never the shared ones):

* RabbitMQ stopped while 100 signed webhooks arrive: all answered 202 (the outbox keeps
  them), all run once it is back (the drain is timed);
* a worker SIGKILLed mid-run: the other one finishes the execution (lease expiry, the
  timer's reaper) and what had succeeded does not run again;
* the websocket service restarted under followers: they reconnect with `after=<last seq>`
  and lose no line, see none twice;
* PostgreSQL restarted under traffic: 503 meanwhile, the services recover by themselves,
  every request answered 2xx has its execution and it runs to the end.

One system serves the module (starting one costs seconds); each test leaves it whole
(servers up, every process running) for the next. The figures are printed (`-s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from sqlalchemy.engine import make_url
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from loom_db.testing import PrivatePostgres, private_postgres, require_services
from loom_messaging.testing import RabbitNode, rabbitmq_installed

from .harness import PASSWORD, Loom, distributed, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HOOK_SECRET = "faults-hook-secret"
WAIT_FOLLOW = 120.0


def _graph(name: str, nodes: str, *, hook: bool = False) -> str:
    triggers = (
        "triggers:\n  - webhook: {name: github, auth: github, secret: HOOK_SECRET, events: [push]}\n"
        if hook
        else ""
    )
    return f"name: {name}\n{triggers}nodes:\n{nodes}"


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def rabbit_log(node: RabbitNode) -> str:
    return "\n".join(
        f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
        for path in sorted((node.dir / "log").glob("*.log"))
    )


@dataclass
class Servers:
    postgres: PrivatePostgres
    rabbit: RabbitNode


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    if not rabbitmq_installed():
        if require_services():
            pytest.fail("rabbitmq-server is not installed and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("rabbitmq-server is not installed: fault tests need a private node")
    rabbit = RabbitNode()
    rabbit.start()
    try:
        with private_postgres() as postgres:
            yield Servers(postgres, rabbit)
    finally:
        rabbit.remove()


@pytest.fixture(scope="module")
def system(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loom]:
    """The distributed system on the private servers, logged in, the hook secret stored.
    The reaper runs every second (default 10 s) so a lost lease is found quickly."""
    tmp = tmp_path_factory.mktemp("faults")
    began = time.monotonic()
    started = distributed(
        tmp,
        postgres=servers.postgres.url,
        amqp=servers.rabbit.url,
        LOOM_TIMER_REAP_SECONDS="1",
    )
    try:
        loom = next(started)
    except AssertionError:
        print(rabbit_log(servers.rabbit))  # a service that cannot reach it says only that
        raise
    print(f"\n[faults] distributed system ready in {time.monotonic() - began:.1f}s")
    try:
        loom.cli("login", "--server", loom.api, "--username", "admin")
        put = loom.request("PUT", "/api/v1/secrets/HOOK_SECRET", json={"value": HOOK_SECRET})
        assert put.status_code in (200, 201, 204), put.text
        yield loom
    finally:
        started.close()


@pytest.fixture(autouse=True)
def whole(request: pytest.FixtureRequest, system: Loom, servers: Servers) -> Iterator[Loom]:
    """Each test starts on a whole system (servers up, every process running), and shows
    the tail of every process's log when it fails."""
    servers.rabbit.ensure_started()
    if not accepts(servers.postgres.port):
        servers.postgres.start()
    for proc in system.procs.values():
        if proc.popen is None or proc.popen.poll() is not None:
            proc.start()
        proc.wait_ready()
    yield system
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        print(system.logs())
        print(rabbit_log(servers.rabbit))


def apply(loom: Loom, tmp: Path, source: str) -> None:
    path = tmp / "graph.yaml"
    path.write_text(source)
    loom.cli("apply", "-f", str(path))


def database(loom: Loom) -> psycopg.Connection[Any]:
    """The system's own database, for what only it knows (which worker holds a lease,
    when an outbox row was sent)."""
    url = make_url(loom.env["LOOM_DATABASE_URL"]).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


def instant(value: str) -> float:
    """An API time (ISO 8601, `Z`) as a Unix timestamp."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def trigger(loom: Loom, graph: str) -> str:
    answer = loom.request("POST", f"/api/v1/graphs/{graph}/executions", json={"params": {}})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


# --- 1. the broker down: the outbox keeps every accepted trigger ------------------------


def test_webhooks_accepted_while_rabbitmq_is_down_all_run_once_it_is_back(
    system: Loom, servers: Servers, tmp_path: Path
) -> None:
    loom = system
    apply(loom, tmp_path, _graph("burst", "  hello: {run: echo hello}\n", hook=True))
    warm = loom.webhook("burst", "github", HOOK_SECRET, {"ref": "warm"})
    assert warm.status_code == 202, warm.text
    assert loom.finished(warm.json()["execution_id"])["status"] == "succeeded"

    servers.rabbit.stop()
    began = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda i: loom.webhook("burst", "github", HOOK_SECRET, {"ref": f"r{i}"}),
                range(100),
            )
        )
    accepting = time.monotonic() - began
    assert [a.status_code for a in answers] == [202] * 100, {a.status_code for a in answers}
    ids = {str(a.json()["execution_id"]) for a in answers}
    assert len(ids) == 100
    time.sleep(1)  # room for anything that could (wrongly) run without the broker
    waiting = [e for e in loom.executions("burst") if e["id"] in ids]
    assert len(waiting) == 100
    assert {e["status"] for e in waiting} == {"queued"}
    with database(loom) as conn:
        held = conn.execute(
            "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND key = ANY(%s)", [list(ids)]
        ).fetchone()
    assert held == (100,)

    took = servers.rabbit.start()
    back = time.time()

    def all_ended() -> list[dict[str, Any]] | None:
        found = [e for e in loom.executions("burst") if e["id"] in ids]
        ended = [e for e in found if e["status"] not in ("queued", "waiting", "running")]
        return ended if len(ended) == 100 else None

    ended = until(all_ended, what="the 100 executions to end after RabbitMQ came back")
    assert {e["status"] for e in ended} == {"succeeded"}

    with database(loom) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT sent_at), extract(epoch FROM min(sent_at)),"
            " extract(epoch FROM max(sent_at)) FROM outbox WHERE key = ANY(%s)",
            [list(ids)],
        ).fetchone()
    assert row is not None and row[0] == 100, row
    passes, last_sent = row[1], float(row[3])
    started = sorted(instant(e["started_at"]) for e in ended)
    last_finished = max(instant(e["finished_at"]) for e in ended)
    drained = last_finished - back
    print(
        f"\n[faults] broker down: 100 signed webhooks answered 202 in {accepting:.2f}s "
        "(8 client threads, one new httpx client per request: client-bound), all 100 held "
        f"unsent in the outbox, all queued\n[faults] RabbitMQ start took {took:.1f}s; after "
        f"it accepted connections: first execution started at +{started[0] - back:.2f}s "
        "(the relays retry with a backoff capped at 5s), all 100 outbox rows published and "
        f"marked sent by +{last_sent - back:.2f}s ({passes} relay pass(es)), all 100 started "
        f"by +{started[-1] - back:.2f}s and succeeded by +{drained:.2f}s: "
        f"{100 / drained:.1f} executions/s from the restart to all finished "
        f"({100 / (last_finished - started[0]):.1f}/s from the first start)"
    )


# --- 2. a worker killed mid-run -----------------------------------------------------------

RELAY = """\
  first:
    run: |
      echo "first ran" >> TRAIL
      echo "baton=$LOOM_EXECUTION_ID" >> "$LOOM_OUTPUT"
  slow:
    needs: [first]
    run: |
      echo "slow ran" >> TRAIL
      for i in $(seq 1 10); do echo "tick $i"; sleep 0.4; done
      echo "got ${{ nodes.first.outputs.baton }}"
"""


def test_a_worker_killed_mid_run_leaves_its_execution_to_the_other_one(
    system: Loom, tmp_path: Path
) -> None:
    loom = system
    trail = tmp_path / "trail"
    apply(loom, tmp_path, _graph("relay", RELAY.replace("TRAIL", str(trail))))
    execution_id = trigger(loom, "relay")
    until(
        lambda: "tick 2" in loom.stored_lines(execution_id),
        what="the slow node to be half-way",
    )
    with database(loom) as conn:
        row = conn.execute(
            "SELECT worker_id FROM executions WHERE id = %s", [execution_id]
        ).fetchone()
    assert row is not None and row[0] in loom.procs, row
    owner = str(row[0])

    killed = time.time()
    loom.procs[owner].kill()
    try:
        done = loom.finished(execution_id)  # the killed one stays dead until then
    finally:
        loom.procs[owner].start()
        loom.procs[owner].wait_ready()

    assert done["status"] == "succeeded", done
    nodes = {n["id"]: n for n in done["nodes"]}
    assert nodes["first"]["attempt"] == 1, nodes["first"]
    assert nodes["slow"]["attempt"] == 2, nodes["slow"]
    # `first` ran once; `slow` twice (it was running when its worker died: at least once).
    assert trail.read_text().splitlines() == ["first ran", "slow ran", "slow ran"]
    lines = loom.get(f"/api/v1/executions/{execution_id}/logs?limit=1000")["items"]
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
    texts = [line["text"] for line in lines]
    assert f"got {execution_id}" in texts
    assert texts.count("tick 10") == 1
    takeover = instant(nodes["slow"]["started_at"]) - killed
    print(
        f"\n[faults] worker {owner} SIGKILLed mid-node: the other worker restarted `slow` "
        f"{takeover:.1f}s later (lease 6s, reaper every 1s) and finished the execution "
        f"{instant(done['finished_at']) - killed:.1f}s after the kill; `first` not re-run"
    )


# --- 3. the websocket service restarted under followers ----------------------------------

CHATTER = """\
  talk:
    run: |
      for i in $(seq 1 600); do
        echo "line $i"
        sleep 0.02
        # Half-way, wait for the test to say the restart is over, so that lines are
        # still coming live to the reconnected followers however slow the machine is.
        if [ "$i" = 300 ]; then while [ ! -f RELEASE ]; do sleep 0.05; done; fi
      done
"""


@dataclass
class Follow:
    """What a reconnecting follower received: every log seq in the order it came (so a
    duplicate would show), the texts, and its connections."""

    seqs: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    connections: int = 0
    closes: list[int | None] = field(default_factory=list)
    status: str | None = None
    lost_at: float | None = None
    gap: float | None = None
    """Seconds from losing the connection to the first line after reconnecting."""


async def follow_reconnecting(loom: Loom, execution_id: str, seen: Follow) -> None:
    """A user's follower: reconnects with `after=<last seq>` when the server goes away
    (1001), the connection drops or is refused, backing off from 0.1 to 2 s."""
    delay = 0.1
    while True:
        after = seen.seqs[-1] if seen.seqs else 0
        url = f"{loom.ws}/ws/executions/{execution_id}?after={after}"
        code: int | None = None
        try:
            async with connect(
                url,
                additional_headers={"Authorization": f"Bearer {loom.token}"},
                compression=None,
                max_size=None,
                open_timeout=5,
            ) as ws:
                seen.connections += 1
                delay = 0.1
                with contextlib.suppress(ConnectionClosed):
                    async for message in ws:
                        frame = orjson.loads(message)
                        if frame["type"] == "logs":
                            if seen.lost_at is not None and seen.gap is None:
                                seen.gap = time.monotonic() - seen.lost_at
                            seen.seqs.extend(line["seq"] for line in frame["lines"])
                            seen.texts.extend(line["text"] for line in frame["lines"])
                        elif frame["type"] == "execution":
                            seen.status = frame["status"]
            code = ws.close_code
        except (OSError, TimeoutError, InvalidHandshake):
            code = None  # refused or not answering: the service is restarting
        seen.closes.append(code)
        if code == 1000:
            return
        assert code in (None, 1001, 1006, 1011, 1012), f"closed with {code}"
        if seen.lost_at is None:
            seen.lost_at = time.monotonic()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


def test_followers_lose_no_line_across_a_websocket_service_restart(
    system: Loom, tmp_path: Path
) -> None:
    loom = system
    release = tmp_path / "release"
    apply(loom, tmp_path, _graph("chatter", CHATTER.replace("RELEASE", str(release))))
    execution_id = trigger(loom, "chatter")

    follows = [Follow() for _ in range(3)]

    async def all_follow() -> None:
        await asyncio.wait_for(
            asyncio.gather(*(follow_reconnecting(loom, execution_id, f) for f in follows)), 120
        )

    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(all_follow())
        except BaseException as exc:  # re-raised by the test below
            errors.append(exc)

    followers = threading.Thread(target=run, name="followers")
    followers.start()
    env = {**os.environ, "LOOM_CONFIG_DIR": str(loom.tmp / "config"), "LOOM_PASSWORD": PASSWORD}
    env = {k: v for k, v in env.items() if not k.startswith("LOOM_TEST")}
    out, err = tmp_path / "cli.out", tmp_path / "cli.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        cli = subprocess.Popen(
            [sys.executable, "-m", "loom_cli", "logs", execution_id, "-f", "-o", "json"],
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        until(
            lambda: all(len(f.seqs) >= 50 for f in follows) and out.stat().st_size > 0,
            what="every follower to have lines",
        )
        began = time.monotonic()
        loom.restart("websocket")
        restart = time.monotonic() - began
        at_restart = [len(f.seqs) for f in follows]
        release.touch()
        followers.join(WAIT_FOLLOW)
        assert not followers.is_alive(), "the followers did not end"
        code = cli.wait(WAIT_FOLLOW)
    finally:
        release.touch()  # never leave the node waiting
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    if errors:
        raise errors[0]

    stored = loom.get(f"/api/v1/executions/{execution_id}/logs?limit=1000")["items"]
    texts = [line["text"] for line in stored]
    assert texts == [f"line {i}" for i in range(1, 601)]
    expected = list(range(1, len(stored) + 1))
    for n, seen in enumerate(follows):
        assert seen.connections >= 2, f"follower {n} never reconnected: {seen.closes}"
        assert 1001 in seen.closes, seen.closes  # the service said it was going away
        assert seen.seqs == expected, f"follower {n}: lost or repeated lines"
        assert seen.texts == texts
        assert seen.status == "succeeded"

    assert code == 0, err.read_text()
    items = [orjson.loads(line) for line in out.read_text().splitlines()]
    cli_seqs = [item["seq"] for item in items if item["type"] == "log"]
    assert cli_seqs == expected, "`loom logs -f` lost or repeated lines"
    assert "reconnecting" in err.read_text(), err.read_text()
    gaps = [f.gap for f in follows if f.gap is not None]
    print(
        f"\n[faults] websocket service restarted in {restart:.1f}s under 3 followers and "
        f"`loom logs -f`: each got all {len(expected)} lines once, in order; first line "
        f"after the loss came {min(gaps):.1f}-{max(gaps):.1f}s after it "
        f"(lines each had when the restart ended: {at_restart}; connections per "
        f"follower: {[f.connections for f in follows]})"
    )


# --- 4. PostgreSQL restarted under traffic -----------------------------------------------


@dataclass
class Answer:
    kind: str
    at: float
    took: float
    status: int | str
    execution_id: str | None = None


def test_postgres_restarted_under_traffic_gives_503_then_recovers_losing_nothing(
    system: Loom, servers: Servers, tmp_path: Path
) -> None:
    loom = system
    apply(loom, tmp_path, _graph("steady", "  note: {run: echo steady}\n", hook=True))
    loom.token  # noqa: B018 (logged in before the database goes)
    answers: list[Answer] = []
    stop = threading.Event()

    def send(kind: str) -> None:
        at = time.monotonic()
        try:
            if kind == "webhook":
                reply = loom.webhook("steady", "github", HOOK_SECRET, {"ref": "x"})
            else:
                reply = loom.request(
                    "POST", "/api/v1/graphs/steady/executions", json={"params": {}}
                )
        except httpx.HTTPError as exc:
            answers.append(Answer(kind, at, time.monotonic() - at, type(exc).__name__))
            return
        body = reply.json() if reply.status_code < 300 else {}
        answers.append(
            Answer(
                kind,
                at,
                time.monotonic() - at,
                reply.status_code,
                body.get("execution_id") or body.get("id"),
            )
        )

    def traffic() -> None:
        while not stop.is_set():
            send("webhook")
            send("rest")
            stop.wait(0.15)

    def seen(kind: str, status: int, since: float) -> Answer | None:
        return next(
            (a for a in list(answers) if a.kind == kind and a.status == status and a.at > since),
            None,
        )

    pids = {name: proc.popen.pid for name, proc in loom.procs.items() if proc.popen}
    sender = threading.Thread(target=traffic, name="traffic")
    sender.start()
    try:
        start = time.monotonic()
        until(
            lambda: seen("webhook", 202, start) and seen("rest", 202, start),
            what="traffic to flow",
        )
        time.sleep(1)
        stopping = time.monotonic()
        servers.postgres.stop()
        down = time.monotonic()
        until(
            lambda: seen("webhook", 503, down) and seen("rest", 503, down),
            timeout=30,
            what="503s while PostgreSQL is down",
        )
        time.sleep(max(0.0, 3 - (time.monotonic() - down)))
        ready = {
            name: httpx.get(f"{base}/readyz", timeout=10).status_code
            for name, base in (("rest", loom.api), ("webhook", loom.hooks))
        }
        servers.postgres.start()
        up = time.monotonic()
        until(
            lambda: seen("webhook", 202, up) and seen("rest", 202, up),
            timeout=60,
            what="2xx again after PostgreSQL came back",
        )
        back = (seen("webhook", 202, up), seen("rest", 202, up))
        assert back[0] is not None and back[1] is not None
        time.sleep(1)
    finally:
        stop.set()
        sender.join(60)

    assert ready == {"rest": 503, "webhook": 503}
    statuses = {(a.kind, a.status) for a in answers}
    assert statuses <= {("webhook", 202), ("webhook", 503), ("rest", 202), ("rest", 503)}, (
        sorted(statuses, key=str),
        [a for a in answers if a.status not in (202, 503)][:5],
    )
    # No process was restarted: they came back by themselves.
    assert {n: p.popen.pid for n, p in loom.procs.items() if p.popen} == pids
    assert all(p.popen is not None and p.popen.poll() is None for p in loom.procs.values())
    for proc in loom.procs.values():
        proc.wait_ready()

    accepted = [a for a in answers if a.status == 202]
    assert all(a.execution_id for a in accepted)
    ended = {a.execution_id: loom.finished(str(a.execution_id))["status"] for a in accepted}
    assert set(ended.values()) == {"succeeded"}, {
        i: s for i, s in ended.items() if s != "succeeded"
    }
    refused = [a for a in answers if a.status == 503]
    during = [a for a in answers if stopping <= a.at <= up]
    print(
        f"\n[faults] PostgreSQL down {up - stopping:.1f}s under traffic: {len(answers)} "
        f"requests, {len(accepted)} accepted (every one ran to success), {len(refused)} "
        f"answered 503 ({len(during)} sent while it was going or gone), none other; "
        f"slowest answer {max(a.took for a in answers):.2f}s; 2xx again "
        f"{back[0].at - up:.2f}s (webhook) / {back[1].at - up:.2f}s (REST) after it "
        "accepted connections; no process restarted"
    )
