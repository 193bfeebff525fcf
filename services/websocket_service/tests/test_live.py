"""Following executions live (DESIGN §9) against a real worker, on SQLite and PostgreSQL:
every line once and in order across replay, live events, lost batches, slow-follower
closes and reconnects; the close codes; `/ws/events`; health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Sequence
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from sqlalchemy import text
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from loom_common import encode_envelope
from loom_db import Database
from loom_db.logs import LogLineIn, append_logs
from loom_messaging import Broker, decode

from .conftest import System, follow, printing, token, until


async def test_a_follower_gets_the_state_every_line_in_order_then_1000(
    db: Database, broker: Broker
) -> None:
    async with System(db, broker) as system:
        await system.apply(printing("talk", 3000))
        execution_id = await system.trigger("talk")
        got = await follow(system.url(execution_id), bearer=token())
        assert got.seqs == list(range(1, 3001)), (got.code, got.reason, got.nodes, got.execution)
        assert got.texts[0].startswith("line 1") and got.texts[-1].startswith("line 3000")
        assert got.execution[-1]["status"] == "succeeded"
        assert got.code == 1000
        assert got.nodes and got.nodes[-1] == {
            **got.nodes[-1],
            "node": "talk",
            "status": "succeeded",
        }

        # After the end: the stored state and lines, then 1000 at once.
        again = await follow(system.url(execution_id, after=2990), bearer=token())
        assert again.seqs == list(range(2991, 3001))
        assert [n["status"] for n in again.nodes] == ["succeeded"]
        assert again.execution == [
            {**again.execution[0], "type": "execution", "status": "succeeded"}
        ]
        assert again.code == 1000


async def test_followers_joining_at_random_moments_with_random_after_get_exactly_the_rest(
    db: Database, broker: Broker
) -> None:
    total = 20_000
    rng = random.Random(8)
    async with System(db, broker) as system:
        await system.apply(printing("many", total, pause_every=2500))
        execution_id = await system.trigger("many")

        async def late(delay: float, after: int) -> tuple[int, list[int], int | None]:
            await asyncio.sleep(delay)
            got = await follow(system.url(execution_id, after=after), bearer=token())
            return after, got.seqs, got.code

        plans = [(rng.uniform(0, 2.5), rng.choice([0, rng.randrange(0, total)])) for _ in range(12)]
        results = await asyncio.gather(*(late(d, a) for d, a in plans))
    for after, seqs, code in results:
        assert seqs == list(range(after + 1, total + 1)), f"after={after}"
        assert code == 1000


async def test_a_batch_lost_between_the_database_and_the_broker_is_filled_from_the_database(
    db: Database, broker: Broker
) -> None:
    publish = broker.events.publish_batch
    dropped: list[int] = []

    async def lossy(items: Sequence[tuple[bytes, str]]) -> None:
        kept = []
        for body, key in items:
            envelope = decode(body)
            if (
                envelope.type == "log.batch"
                and len(dropped) < 3
                and envelope.data["lines"][0]["seq"] > 1
            ):
                dropped.append(envelope.data["lines"][0]["seq"])
                continue
            kept.append((body, key))
        await publish(kept)

    broker.events.publish_batch = lossy  # type: ignore[method-assign]
    async with System(db, broker) as system:
        await system.apply(printing("lossy", 6000, pause_every=1000))
        execution_id = await system.trigger("lossy")
        got = await follow(system.url(execution_id), bearer=token())
    assert len(dropped) == 3
    assert got.seqs == list(range(1, 6001))
    assert got.code == 1000


async def test_a_lost_final_status_still_ends_the_follow_from_the_database(
    db: Database, broker: Broker
) -> None:
    publish = broker.events.publish_batch

    async def no_final(items: Sequence[tuple[bytes, str]]) -> None:
        await publish([(b, k) for b, k in items if decode(b).type == "log.batch"])

    broker.events.publish_batch = no_final  # type: ignore[method-assign]
    async with System(db, broker) as system:
        await system.apply(printing("quiet", 10))
        execution_id = await system.trigger("quiet")
        got = await asyncio.wait_for(follow(system.url(execution_id), bearer=token()), 60)
    assert got.seqs == list(range(1, 11))
    assert got.execution[-1]["status"] == "succeeded"
    assert got.code == 1000


async def test_a_follower_too_slow_is_closed_with_4008_and_resumes_with_after_losing_nothing(
    db: Database, broker: Broker
) -> None:
    total = 8000
    async with System(
        db, broker, websocket_high_water=64 * 1024, websocket_slow_seconds=1
    ) as system:
        await system.apply(printing("wide", total, width=1000))
        execution_id = await system.trigger("wide")
        headers = {"Authorization": f"Bearer {token()}"}
        seqs: list[int] = []
        # A small receive window, so the kernel does not absorb what the server sends.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.connect(("127.0.0.1", system.live.port))
        async with connect(
            system.url(execution_id),
            sock=sock,
            additional_headers=headers,
            compression=None,
            max_queue=1,
        ) as ws:
            first = orjson.loads(await ws.recv())
            while first["type"] != "logs":
                first = orjson.loads(await ws.recv())
            seqs += [line["seq"] for line in first["lines"]]
            await asyncio.sleep(3)  # not reading: the server's buffer for us fills up
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    frame = orjson.loads(message)
                    if frame["type"] == "logs":
                        seqs += [line["seq"] for line in frame["lines"]]
        assert ws.close_code == 4008
        assert f"after={seqs[-1]}" in (ws.close_reason or "")
        rest = await follow(system.url(execution_id, after=seqs[-1]), bearer=token())
    assert seqs + rest.seqs == list(range(1, total + 1))
    assert rest.code == 1000


async def test_a_burst_of_batches_does_not_close_followers_that_keep_reading(
    db: Database, broker: Broker
) -> None:
    """Many batches at once pass every connection's high-water mark for a moment: the
    followers leave the broadcast group until their connection drains, and are not
    closed with 4008 (they read as fast as they can)."""
    total, per_batch = 60_000, 500
    async with System(db, broker, worker=False, websocket_high_water=64 * 1024) as system:
        await system.apply(printing("burst", 1))
        execution_id = await system.trigger("burst")
        headers = {"Authorization": f"Bearer {token()}"}

        async def reader() -> tuple[list[int], int | None]:
            seqs: list[int] = []
            async with connect(
                system.url(execution_id),
                additional_headers=headers,
                compression=None,
                max_size=None,
            ) as ws:
                with contextlib.suppress(ConnectionClosed):
                    while len(seqs) < total:
                        frame = orjson.loads(await ws.recv())
                        if frame["type"] == "logs":
                            seqs += [line["seq"] for line in frame["lines"]]
                return seqs, ws.close_code

        readers = [asyncio.create_task(reader()) for _ in range(10)]
        await until(lambda: system.live.hub.in_step(execution_id) == 10)
        now = datetime.now(UTC)
        lines = [
            LogLineIn(i, "talk", "stdout", now, f"line {i} " + "y" * 100)
            for i in range(1, total + 1)
        ]
        async with db.transaction() as conn:
            await append_logs(conn, execution_id, lines)
        batches = [
            {
                "execution_id": execution_id,
                "lines": [
                    {
                        "seq": li.seq,
                        "node": li.node,
                        "stream": li.stream,
                        "ts": now.isoformat(),
                        "text": li.text,
                    }
                    for li in lines[i : i + per_batch]
                ],
            }
            for i in range(0, total, per_batch)
        ]
        await broker.events.publish_batch(
            [(encode_envelope("log.batch", b), execution_id) for b in batches]
        )
        results = await asyncio.wait_for(asyncio.gather(*readers), 120)
        slow = system.live.metrics.slow_closes._value.get()
        waits = system.live.metrics.drain_waits._value.get()
    for seqs, code in results:
        assert code is None  # still open: nobody was closed for being slow
        assert seqs == list(range(1, total + 1))
    assert slow == 0
    assert waits > 0  # the burst did pass the high-water mark


async def test_two_hundred_followers_of_one_execution_all_get_everything(
    db: Database, broker: Broker
) -> None:
    async with System(db, broker) as system:
        await system.apply(printing("crowd", 2000, pause_every=500))
        execution_id = await system.trigger("crowd")
        results = await asyncio.gather(
            *(follow(system.url(execution_id), bearer=token()) for _ in range(200))
        )
    for got in results:
        assert got.seqs == list(range(1, 2001))
        assert got.code == 1000


async def test_refusals_complete_the_handshake_then_close_with_a_code(
    db: Database, broker: Broker
) -> None:
    async with System(db, broker) as system:
        await system.apply(printing("refuse", 3))
        execution_id = await system.trigger("refuse")
        url = system.url(execution_id)
        assert (await follow(url)).code == 4401
        assert (await follow(url, bearer="not-a-token")).code == 4401
        expired = token(lifetime=60, now=0)
        assert (await follow(url, bearer=expired)).code == 4401
        assert (await follow(system.url("ex_nosuchexecution"), bearer=token())).code == 4404
        bad = await follow(f"{url}?after=-3", bearer=token())
        assert bad.code == 4400 and "after" in bad.reason
        # A viewer's token works, in the header or (for browsers) in the query.
        viewer = await follow(f"{url}?token={token('viewer')}")
        assert viewer.code == 1000 and viewer.seqs == [1, 2, 3]


async def test_dashboards_get_every_status_change_of_their_graph(
    db: Database, broker: Broker
) -> None:
    async with System(db, broker) as system:
        await system.apply(printing("watched", 2))
        await system.apply(printing("other", 2))
        async with (
            connect(f"{system.base}/ws/events?graph=watched&token={token()}") as mine,
            connect(f"{system.base}/ws/events?token={token()}") as every,
        ):
            await asyncio.sleep(0.2)
            watched = await system.trigger("watched")
            other = await system.trigger("other")

            async def statuses(ws: object, count: int) -> list[tuple[str, str]]:
                seen = []
                while len(seen) < count:
                    frame = orjson.loads(await ws.recv())  # type: ignore[attr-defined]
                    seen.append((frame["execution_id"], frame["status"]))
                return seen

            assert await asyncio.wait_for(statuses(mine, 2), 60) == [
                (watched, "running"),
                (watched, "succeeded"),
            ]
            everything = await asyncio.wait_for(statuses(every, 4), 60)
            assert sorted(everything) == sorted(
                [
                    (watched, "running"),
                    (watched, "succeeded"),
                    (other, "running"),
                    (other, "succeeded"),
                ]
            )


async def test_health_readiness_and_metrics_answer_plain_http(db: Database, broker: Broker) -> None:
    async with System(db, broker) as system:
        await system.apply(printing("counted", 5))
        execution_id = await system.trigger("counted")
        await follow(system.url(execution_id), bearer=token())
        base = f"http://127.0.0.1:{system.live.port}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/healthz")).json()["status"] == "ok"
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"]["event stream"] == "ok"
            metrics = (await http.get("/metrics")).text
            assert "loom_websocket_frames_sent_total" in metrics
            assert "loom_websocket_connections" in metrics
            missing = await http.get("/nowhere")
            assert missing.status_code == 404
            assert missing.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_stopping_the_service_closes_followers_with_1001(
    db: Database, broker: Broker
) -> None:
    async with System(db, broker) as system:
        await system.apply(printing("long", 100, pause_every=1))
        execution_id = await system.trigger("long")
        following = asyncio.create_task(follow(system.url(execution_id), bearer=token()))
        await asyncio.sleep(1.5)
        system.stop_live.set()
        got = await asyncio.wait_for(following, 30)
    assert got.code == 1001
    assert got.seqs == list(range(1, len(got.seqs) + 1))


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_an_execution_deleted_while_followed_closes_its_followers_with_4404(
    db: Database, broker: Broker
) -> None:
    async with System(db, broker, worker=False) as system:
        await system.apply(printing("doomed", 1))
        execution_id = await system.trigger("doomed")
        following = asyncio.create_task(follow(system.url(execution_id), bearer=token()))
        await until(lambda: system.live.hub.in_step(execution_id) == 1)
        async with db.transaction() as conn:
            await conn.execute(text("DELETE FROM executions WHERE id = :id"), {"id": execution_id})
        got = await asyncio.wait_for(following, 60)  # found by the idle check
    assert got.code == 4404
