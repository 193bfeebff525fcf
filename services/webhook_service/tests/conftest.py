"""Fixtures of the webhook service's tests: the app over a real database (SQLite and
PostgreSQL, from `loom_db.testing`) and the memory broker, driven in-process through
httpx's ASGI transport, with graphs whose hooks use every auth scheme."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from loom_db import Database, graphs, secrets
from loom_db.keys import derive_keys
from loom_db.testing import (  # noqa: F401  (fixtures, found by pytest by name)
    _postgres_schema,
    _sqlite_template,
    postgres_url,
)
from loom_db.testing import db as db  # the fixture, re-exported under its own name
from loom_messaging import open_broker
from loom_runtime import Runtime
from loom_webhook.app import create_app
from loom_webhook.settings import WebhookSettings

SECRET_KEY = "webhook-test-secret-key-" + "w" * 32
HOOK_SECRET = "It's a Secret to Everybody"
STANDARD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

GRAPH = """
name: app
params:
  ref: {type: string}
  sha: {type: string, default: none}
  commits: {type: integer, default: 0}
triggers:
  - webhook:
      name: github
      auth: github
      secret: HOOK_SECRET
      events: [push]
      if: ${{ payload.ref.startswith('refs/heads/') }}
      params:
        ref: ${{ payload.ref }}
        sha: ${{ payload.after }}
        commits: ${{ payload.commits | length }}
  - webhook:
      name: gitlab
      auth: gitlab
      secret: HOOK_SECRET
      events: [Push Hook]
      params: {ref: "${{ payload.ref }}"}
  - webhook:
      name: standard
      auth: standard
      secret: STANDARD_SECRET
      params: {ref: "${{ payload.ref }}"}
  - webhook:
      name: token
      auth: token
      secret: HOOK_SECRET
      params: {ref: "${{ payload.ref }}"}
  - webhook:
      auth: none
      params: {ref: "${{ payload.ref }}"}
nodes:
  build:
    run: echo "${{ params.ref }}"
"""


def make_settings(**overrides: object) -> WebhookSettings:
    values: dict[str, object] = {
        "secret_key": SECRET_KEY,
        "broker_prefix": f"test-{uuid.uuid4().hex[:8]}",
        "webhook_rate_limit": 0,
    }
    values.update(overrides)
    return WebhookSettings(**values)  # type: ignore[arg-type]


async def install(database: Database, source: str = GRAPH) -> None:
    """The graph and the secrets its hooks name."""
    keys = derive_keys(SECRET_KEY)
    async with database.transaction() as conn:
        await graphs.apply_graph(conn, source)
        await secrets.put_secret(conn, keys, "HOOK_SECRET", HOOK_SECRET)
        await secrets.put_secret(conn, keys, "STANDARD_SECRET", STANDARD_SECRET)


@pytest.fixture
def settings() -> WebhookSettings:
    return make_settings()


@pytest.fixture
async def runtime(db: Database, settings: WebhookSettings) -> AsyncIterator[Runtime]:
    await install(db)
    async with open_broker(f"memory://webhook-{uuid.uuid4().hex}") as broker:
        yield Runtime(settings=settings, database=db, broker=broker, keys=derive_keys(SECRET_KEY))


@pytest.fixture
async def client(runtime: Runtime, settings: WebhookSettings) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime, settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://hooks.test") as opened:
        yield opened
