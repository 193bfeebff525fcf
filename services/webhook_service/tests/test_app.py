"""The webhook app end to end over a real database: every auth scheme, the check order of
DESIGN §6, filters, params, duplicates, the delivery log."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import httpx
import pytest

from loom_db import Database, deliveries, executions, graphs, outbox
from loom_runtime import Runtime
from loom_webhook import github_signature, standard_signature
from loom_webhook.app import create_app

from .conftest import HOOK_SECRET, STANDARD_SECRET, make_settings

# A push as GitHub sends it (trimmed to the fields a graph typically reads).
PUSH: dict[str, Any] = {
    "ref": "refs/heads/main",
    "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
    "after": "0000000000000000000000000000000000000001",
    "repository": {"id": 1296269, "full_name": "octocat/Hello-World", "private": False},
    "pusher": {"name": "octocat", "email": "octocat@github.com"},
    "commits": [
        {"id": "0000000000000000000000000000000000000001", "message": "Fix all the bugs"},
        {"id": "0000000000000000000000000000000000000002", "message": "Café ☕ and ünïcode"},
    ],
    "head_commit": {"id": "0000000000000000000000000000000000000001"},
}


def github(
    body: bytes, *, event: str = "push", delivery: str | None = None, secret: str = HOOK_SECRET
) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": github_signature(secret, body),
    }


def standard(body: bytes, *, msg_id: str | None = None, at: int | None = None) -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time()) if at is None else at
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signature(STANDARD_SECRET, msg_id, timestamp, body),
    }


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()


async def stored(db: Database, execution_id: str) -> executions.ExecutionRecord:
    async with db.read() as conn:
        return await executions.get_execution(conn, execution_id)


async def log_of(db: Database, hook: str) -> list[deliveries.DeliveryRecord]:
    async with db.read() as conn:
        items, _ = await deliveries.list_deliveries(conn, "app", hook=hook)
    return items


# --- GitHub --------------------------------------------------------------------------


async def test_a_signed_github_push_starts_the_graph_with_params_from_the_payload(
    client: httpx.AsyncClient, db: Database
) -> None:
    body = dumps(PUSH)
    headers = github(body, delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958")

    answer = await client.post("/hooks/app/github", content=body, headers=headers)

    assert answer.status_code == 202, answer.text
    execution = await stored(db, answer.json()["execution_id"])
    assert execution.status == "queued"
    assert execution.trigger_type == "webhook"
    assert execution.params == {"ref": "refs/heads/main", "sha": PUSH["after"], "commits": 2}
    assert execution.trigger_info["delivery_id"] == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert execution.trigger_info["event"] == "push"
    assert execution.trigger_info["payload"] == PUSH
    assert execution.idempotency_key == ("webhook:app:github:72d3162e-cc78-11e3-81ab-4c9367dc0958")
    async with db.read() as conn:
        unsent = await outbox.fetch_unsent(conn)
    queued = [m for m in unsent if m.channel == "queue"]
    assert [m.key for m in queued] == [execution.id]
    assert b"execution.requested" in queued[0].envelope
    (logged,) = await log_of(db, "github")
    assert (logged.outcome, logged.status_code, logged.execution_id) == (
        "accepted",
        202,
        execution.id,
    )


async def test_github_form_encoded_delivery_is_read_from_its_payload_field(
    client: httpx.AsyncClient, db: Database
) -> None:
    from urllib.parse import urlencode

    body = urlencode({"payload": json.dumps(PUSH)}).encode()
    headers = github(body) | {"Content-Type": "application/x-www-form-urlencoded"}

    answer = await client.post("/hooks/app/github", content=body, headers=headers)

    assert answer.status_code == 202, answer.text
    assert (await stored(db, answer.json()["execution_id"])).params["ref"] == "refs/heads/main"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda h: h | {"X-Hub-Signature-256": "sha256=" + "0" * 64}, id="wrong"),
        pytest.param(lambda h: {k: v for k, v in h.items() if "Signature" not in k}, id="missing"),
        pytest.param(lambda h: h | {"X-Hub-Signature-256": "sha1=abc"}, id="malformed"),
    ],
)
async def test_a_bad_github_signature_is_401_saying_nothing_and_storing_nothing(
    client: httpx.AsyncClient, db: Database, mutate: Any
) -> None:
    body = dumps(PUSH)

    answer = await client.post("/hooks/app/github", content=body, headers=mutate(github(body)))

    assert answer.status_code == 401
    assert answer.json()["detail"] == "the delivery is not authenticated"
    async with db.read() as conn:
        assert (await executions.list_executions(conn))[0] == []
    (logged,) = await log_of(db, "github")
    assert (logged.outcome, logged.status_code) == ("unauthorized", 401)
    assert logged.detail  # the reason is kept for the hook's owner, not told to the sender


async def test_a_body_signed_with_another_secret_or_changed_after_signing_is_401(
    client: httpx.AsyncClient,
) -> None:
    body = dumps(PUSH)
    other = await client.post(
        "/hooks/app/github", content=body, headers=github(body, secret="not the secret")
    )
    tampered = await client.post(
        "/hooks/app/github", content=body.replace(b"main", b"evil"), headers=github(body)
    )

    assert (other.status_code, tampered.status_code) == (401, 401)


async def test_a_replayed_delivery_answers_200_duplicate_with_the_first_execution(
    client: httpx.AsyncClient, db: Database
) -> None:
    body = dumps(PUSH)
    headers = github(body)

    first = await client.post("/hooks/app/github", content=body, headers=headers)
    again = await client.post("/hooks/app/github", content=body, headers=headers)

    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json() == {"execution_id": first.json()["execution_id"], "duplicate": True}
    async with db.read() as conn:
        assert len((await executions.list_executions(conn))[0]) == 1


async def test_concurrent_copies_of_one_delivery_make_one_execution(
    client: httpx.AsyncClient, db: Database
) -> None:
    body = dumps(PUSH)
    headers = github(body)

    answers = await asyncio.gather(
        *(client.post("/hooks/app/github", content=body, headers=headers) for _ in range(20))
    )

    assert sorted({a.status_code for a in answers}) in ([200, 202], [202])
    assert [a.status_code for a in answers].count(202) == 1
    assert len({a.json()["execution_id"] for a in answers}) == 1
    async with db.read() as conn:
        assert len((await executions.list_executions(conn))[0]) == 1


async def test_github_ping_is_answered_without_an_execution(
    client: httpx.AsyncClient, db: Database
) -> None:
    body = dumps({"zen": "Design for failure.", "hook_id": 1})

    answer = await client.post(
        "/hooks/app/github", content=body, headers=github(body, event="ping")
    )

    assert answer.status_code == 200
    async with db.read() as conn:
        assert (await executions.list_executions(conn))[0] == []
    assert [d.outcome for d in await log_of(db, "github")] == ["ping"]


async def test_events_and_if_filters_skip_with_200_and_the_reason(
    client: httpx.AsyncClient, db: Database
) -> None:
    issue = dumps({"action": "opened"})
    tag = dumps(PUSH | {"ref": "refs/tags/v1.0"})

    by_event = await client.post(
        "/hooks/app/github", content=issue, headers=github(issue, event="issues")
    )
    by_if = await client.post("/hooks/app/github", content=tag, headers=github(tag))

    assert by_event.status_code == 200
    assert "event 'issues' is not in events (push)" in by_event.json()["skipped"]
    assert by_if.status_code == 200
    assert by_if.json()["skipped"].startswith("if is false")
    async with db.read() as conn:
        assert (await executions.list_executions(conn))[0] == []
    assert [d.outcome for d in await log_of(db, "github")] == ["skipped", "skipped"]


async def test_params_that_do_not_fit_the_graph_are_422(
    client: httpx.AsyncClient, db: Database
) -> None:
    no_after = dumps({k: v for k, v in PUSH.items() if k != "after"})
    wrong_type = dumps(PUSH | {"ref": 42})

    missing = await client.post("/hooks/app/github", content=no_after, headers=github(no_after))
    typed = await client.post("/hooks/app/token", content=wrong_type, headers=_bearer())

    assert missing.status_code == 422
    assert missing.json()["errors"][0]["path"] == "webhook.params"
    assert "'after' is undefined" in missing.json()["errors"][0]["message"]
    assert typed.status_code == 422
    assert typed.json()["errors"] == [
        {"path": "params.ref", "message": "expected string, got integer", "line": None}
    ]
    async with db.read() as conn:
        assert (await executions.list_executions(conn))[0] == []


async def test_an_if_that_cannot_be_evaluated_on_the_payload_is_422(
    client: httpx.AsyncClient,
) -> None:
    body = dumps({"no_ref": True})

    answer = await client.post("/hooks/app/github", content=body, headers=github(body))

    assert answer.status_code == 422
    assert answer.json()["errors"][0]["path"] == "webhook.if"


async def test_a_malformed_body_with_a_valid_signature_is_400(client: httpx.AsyncClient) -> None:
    body = b'{"ref": "refs/heads/main",'

    answer = await client.post("/hooks/app/github", content=body, headers=github(body))

    assert answer.status_code == 400
    assert "not valid JSON" in answer.json()["detail"]


# --- GitLab, Standard Webhooks, token, none ------------------------------------------


def _gitlab(token: str = HOOK_SECRET, uuid_: str | None = None) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Gitlab-Token": token,
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Event-UUID": uuid_ or str(uuid.uuid4()),
    }


def _bearer(secret: str = HOOK_SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {secret}"}


async def test_gitlab_token_valid_invalid_missing_and_replayed(
    client: httpx.AsyncClient,
) -> None:
    body = dumps({"object_kind": "push", "ref": "refs/heads/main"})
    headers = _gitlab()

    ok = await client.post("/hooks/app/gitlab", content=body, headers=headers)
    replayed = await client.post("/hooks/app/gitlab", content=body, headers=headers)
    wrong = await client.post("/hooks/app/gitlab", content=body, headers=_gitlab("nope"))
    missing_headers = {k: v for k, v in _gitlab().items() if k != "X-Gitlab-Token"}
    missing = await client.post("/hooks/app/gitlab", content=body, headers=missing_headers)
    other_event = _gitlab() | {"X-Gitlab-Event": "Merge Request Hook"}
    skipped = await client.post("/hooks/app/gitlab", content=body, headers=other_event)

    assert ok.status_code == 202
    assert replayed.json() == {"execution_id": ok.json()["execution_id"], "duplicate": True}
    assert (wrong.status_code, missing.status_code) == (401, 401)
    assert skipped.status_code == 200 and "Merge Request Hook" in skipped.json()["skipped"]


async def test_standard_webhooks_valid_invalid_missing_expired_and_replayed(
    client: httpx.AsyncClient,
) -> None:
    body = dumps({"type": "invoice.paid", "ref": "refs/heads/main"})
    headers = standard(body)

    ok = await client.post("/hooks/app/standard", content=body, headers=headers)
    replayed = await client.post("/hooks/app/standard", content=body, headers=headers)
    bad = standard(body) | {"webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}
    wrong = await client.post("/hooks/app/standard", content=body, headers=bad)
    missing_headers = {k: v for k, v in standard(body).items() if k != "webhook-signature"}
    missing = await client.post("/hooks/app/standard", content=body, headers=missing_headers)
    old = standard(body, at=int(time.time()) - 600)
    expired = await client.post("/hooks/app/standard", content=body, headers=old)
    several = standard(body)
    several["webhook-signature"] = "v1,bm9wZQ== " + several["webhook-signature"]
    rotated = await client.post("/hooks/app/standard", content=body, headers=several)

    assert ok.status_code == 202
    assert replayed.json() == {"execution_id": ok.json()["execution_id"], "duplicate": True}
    assert (wrong.status_code, missing.status_code, expired.status_code) == (401, 401, 401)
    assert rotated.status_code == 202


async def test_token_and_none_hooks(client: httpx.AsyncClient) -> None:
    body = dumps({"ref": "v2"})

    ok = await client.post("/hooks/app/token", content=body, headers=_bearer())
    wrong = await client.post("/hooks/app/token", content=body, headers=_bearer("guess"))
    missing = await client.post(
        "/hooks/app/token", content=body, headers={"Content-Type": "application/json"}
    )
    open_ = await client.post("/hooks/app", content=body, headers={"Idempotency-Key": "k-1"})
    open_again = await client.post("/hooks/app", content=body, headers={"Idempotency-Key": "k-1"})

    assert ok.status_code == 202
    assert (wrong.status_code, missing.status_code) == (401, 401)
    assert open_.status_code == 202
    assert open_again.json()["duplicate"] is True


# --- the check order and the edges -----------------------------------------------------


async def test_unknown_hook_unknown_graph_and_paused_graph_are_the_same_404(
    client: httpx.AsyncClient, db: Database
) -> None:
    body = dumps(PUSH)
    unknown_hook = await client.post("/hooks/app/nope", content=body, headers=github(body))
    unknown_graph = await client.post("/hooks/nope/github", content=body, headers=github(body))
    async with db.transaction() as conn:
        await graphs.set_enabled(conn, "app", False)
    paused = await client.post("/hooks/app/github", content=body, headers=github(body))

    assert {a.status_code for a in (unknown_hook, unknown_graph, paused)} == {404}
    assert unknown_hook.json() == unknown_graph.json() == paused.json()
    async with db.read() as conn:
        assert (await executions.list_executions(conn))[0] == []


async def test_the_checks_run_in_the_documented_order(runtime: Runtime, db: Database) -> None:
    settings = make_settings(webhook_max_bytes=2048)
    transport = httpx.ASGITransport(app=create_app(runtime, settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        big = b"{" + b" " * 4096 + b"}"
        # Too large beats a bad content type and a bad signature.
        too_large = await client.post(
            "/hooks/app/github", content=big, headers={"Content-Type": "text/plain"}
        )
        # A bad content type beats a bad signature.
        unsupported = await client.post(
            "/hooks/app/github", content=b"x", headers={"Content-Type": "text/plain"}
        )
        # A bad signature beats a duplicate.
        body = dumps(PUSH)
        headers = github(body)
        assert (
            await client.post("/hooks/app/github", content=body, headers=headers)
        ).status_code == 202
        forged = headers | {"X-Hub-Signature-256": github_signature("wrong", body)}
        unauthorized = await client.post("/hooks/app/github", content=body, headers=forged)
        # A redelivery answers duplicate with the first execution.
        duplicate = await client.post("/hooks/app/github", content=body, headers=headers)

    assert too_large.status_code == 413
    assert unsupported.status_code == 415
    assert unauthorized.status_code == 401
    assert duplicate.status_code == 200 and duplicate.json()["duplicate"] is True
    outcomes = [d.outcome for d in await log_of(db, "github")]
    assert sorted(outcomes) == sorted(
        ["too_large", "unsupported", "accepted", "unauthorized", "duplicate"]
    )


async def test_a_chunked_body_over_the_limit_is_413_without_reading_it_all(
    runtime: Runtime,
) -> None:
    settings = make_settings(webhook_max_bytes=64 * 1024)
    sent = 0

    async def endless() -> Any:
        nonlocal sent
        chunk = b" " * 16384
        for _ in range(100 * 64):  # up to 100 MiB
            sent += len(chunk)
            yield chunk

    transport = httpx.ASGITransport(app=create_app(runtime, settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answer = await client.post(
            "/hooks/app", content=endless(), headers={"Content-Type": "application/json"}
        )

    assert answer.status_code == 413
    assert sent < 1024 * 1024  # the app stopped reading at the limit


async def test_rate_limit_per_hook_answers_429_with_retry_after(
    runtime: Runtime, db: Database
) -> None:
    settings = make_settings(webhook_rate_limit=1, webhook_rate_burst=3)
    transport = httpx.ASGITransport(app=create_app(runtime, settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body = dumps({"ref": "main"})
        answers = [
            await client.post("/hooks/app/token", content=body, headers=_bearer()) for _ in range(6)
        ]
        other_hook = await client.post("/hooks/app", content=body)

    assert [a.status_code for a in answers] == [202, 202, 202, 429, 429, 429]
    assert int(answers[-1].headers["Retry-After"]) >= 1
    assert other_hook.status_code == 202  # each hook has its own bucket
    outcomes = [d.outcome for d in await log_of(db, "token")]
    assert outcomes.count("rate_limited") == 1  # one line per hook and second, not per request


async def test_a_hook_whose_secret_is_not_stored_refuses_every_delivery(
    client: httpx.AsyncClient, db: Database
) -> None:
    from loom_db import secrets

    async with db.transaction() as conn:
        await secrets.delete_secret(conn, "HOOK_SECRET")
    body = dumps(PUSH)

    answer = await client.post("/hooks/app/github", content=body, headers=github(body))

    assert answer.status_code == 401


async def test_a_new_graph_version_takes_effect_on_the_next_delivery(
    client: httpx.AsyncClient, db: Database
) -> None:
    body = dumps({"ref": "x"})
    assert (await client.post("/hooks/app", content=body)).status_code == 202
    async with db.transaction() as conn:
        await graphs.apply_graph(
            conn,
            "name: app\nparams: {ref: {type: string}}\ntriggers:\n"
            "  - webhook: {auth: none, params: {ref: 'v2-${{ payload.ref }}'}}\n"
            "nodes: {a: {run: 'true'}}\n",
        )

    answer = await client.post("/hooks/app", content=body)

    assert answer.status_code == 202
    execution = await stored(db, answer.json()["execution_id"])
    assert (execution.graph_version, execution.params) == (2, {"ref": "v2-x"})
    assert (await client.post("/hooks/app/github", content=body)).status_code == 404


async def test_health_ready_and_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/hooks/app", content=dumps({"ref": "m"}))

    assert (await client.get("/healthz")).json()["status"] == "ok"
    ready = await client.get("/readyz")
    metrics = await client.get("/metrics")

    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    assert 'loom_webhook_deliveries_total{outcome="accepted"} 1.0' in metrics.text
    assert (await client.get("/hooks/app")).status_code == 405
