"""Fixtures of the REST service's tests: the app over a real database (SQLite and
PostgreSQL, from `loom_db.testing`) and the memory broker (RabbitMQ too, for the tests
that ask), driven in-process through httpx's ASGI transport, with a logged-in client for
each role.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from loom_auth import PasswordParams, hash_password, new_api_token
from loom_db import Database, tokens, users
from loom_db.keys import derive_keys
from loom_db.testing import (  # noqa: F401  (fixtures, found by pytest by name)
    _postgres_schema,
    _sqlite_template,
    fresh_postgres_database,
    postgres_url,
)
from loom_db.testing import db as db  # the fixture, re-exported under its own name
from loom_messaging import Broker, open_broker
from loom_rest import RestSettings, Runtime, create_app

SECRET_KEY = "test-secret-key-" + "x" * 40
PASSWORD = "correct horse battery staple"
ROLES = ("viewer", "editor", "admin")
FAST_PASSWORDS = PasswordParams(time_cost=1, memory_cost=1024, parallelism=1)
"""argon2id at its cheapest: the tests check what the API does with passwords, and the
production parameters (64 MiB, 3 passes) would make each login take a second here."""


def make_settings(**overrides: object) -> RestSettings:
    values: dict[str, object] = {
        "secret_key": SECRET_KEY,
        "admin_password": PASSWORD,
        "broker_prefix": f"test-{uuid.uuid4().hex[:8]}",
    }
    values.update(overrides)
    return RestSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """A memory broker of its own. A test parametrized indirectly with
    `@pytest.mark.parametrize("broker", ["memory", "rabbitmq"], indirect=True)` runs on the
    shared RabbitMQ too (LOOM_TEST_AMQP_URL), under a prefix of its own that is deleted
    afterwards; without that URL it is skipped, or fails under LOOM_TEST_REQUIRE_SERVICES=1."""
    backend = getattr(request, "param", "memory")
    if backend == "memory":
        async with open_broker(f"memory://rest-{uuid.uuid4().hex}") as opened:
            yield opened
        return
    assert backend == "rabbitmq", backend
    url = os.environ.get("LOOM_TEST_AMQP_URL")
    if not url:
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail("LOOM_TEST_AMQP_URL is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("LOOM_TEST_AMQP_URL is not set: RabbitMQ tests skipped")
    from loom_messaging.rabbitmq import delete_prefix

    prefix = f"resttest-{uuid.uuid4().hex[:10]}"
    try:
        async with open_broker(url, prefix=prefix) as opened:
            yield opened
    finally:
        await delete_prefix(url, prefix)


@pytest.fixture
def settings() -> RestSettings:
    return make_settings()


@pytest.fixture
def runtime(db: Database, broker: Broker, settings: RestSettings) -> Runtime:
    assert settings.secret_key is not None
    return Runtime(
        settings=settings,
        database=db,
        broker=broker,
        keys=derive_keys(settings.secret_key.get_secret_value()),
        password_params=FAST_PASSWORDS,
    )


@pytest.fixture
async def anonymous(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """A client with no credentials."""
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://loom.test") as client:
        yield client


@dataclass
class Clients:
    """A logged-in client per role (JWT from the login route) and per API-token role."""

    anonymous: httpx.AsyncClient
    viewer: httpx.AsyncClient
    editor: httpx.AsyncClient
    admin: httpx.AsyncClient
    api: dict[str, httpx.AsyncClient]

    def as_(self, who: str) -> httpx.AsyncClient:
        if who.startswith("api-"):
            return self.api[who.removeprefix("api-")]
        return getattr(self, who)  # type: ignore[no-any-return]


async def create_users(database: Database) -> None:
    """One user per role, named after it, with `PASSWORD`."""
    hashed = hash_password(PASSWORD, FAST_PASSWORDS)
    async with database.transaction() as conn:
        for role in ROLES:
            await users.create_user(conn, role, hashed, role, by=None)


async def login(client: httpx.AsyncClient, username: str) -> str:
    answer = await client.post(
        "/api/v1/auth/login", json={"username": username, "password": PASSWORD}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


async def api_token(database: Database, username: str, role: str) -> str:
    token = new_api_token()
    async with database.transaction() as conn:
        user = await users.get_user(conn, username)
        await tokens.create_api_token(
            conn,
            token_id=str(uuid.uuid4()),
            user_id=user.id,
            name=f"test-{role}",
            token_hash=token.token_hash,
            prefix=token.prefix,
            role=role,
            by=username,
        )
    return token.token


@pytest.fixture
async def clients(runtime: Runtime, anonymous: httpx.AsyncClient) -> AsyncIterator[Clients]:
    await create_users(runtime.database)
    app = anonymous._transport.app  # type: ignore[attr-defined]
    opened: list[httpx.AsyncClient] = []

    def client(token: str) -> httpx.AsyncClient:
        made = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://loom.test",
            headers={"Authorization": f"Bearer {token}"},
        )
        opened.append(made)
        return made

    by_role = {role: client(await login(anonymous, role)) for role in ROLES}
    api = {role: client(await api_token(runtime.database, "admin", role)) for role in ROLES}
    try:
        yield Clients(anonymous, by_role["viewer"], by_role["editor"], by_role["admin"], api)
    finally:
        for made in opened:
            await made.aclose()
