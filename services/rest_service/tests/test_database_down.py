"""With its PostgreSQL stopped, the API answers 503 problem details (never a 500), stays
alive, and works again once the database is back, by itself."""

from __future__ import annotations

import uuid

import httpx

from loom_auth import hash_password
from loom_db import create_database, users
from loom_db.keys import derive_keys
from loom_db.migrate import upgrade
from loom_db.testing import private_postgres
from loom_messaging import open_broker
from loom_rest import RestSettings, Runtime, create_app

SECRET = "database-down-secret-key-" + "d" * 30
PASSWORD = "a long enough password"


async def test_database_stopped_gives_503_problem_details_then_recovers() -> None:
    settings = RestSettings(secret_key=SECRET, broker_prefix=f"t{uuid.uuid4().hex[:8]}")  # type: ignore[arg-type]
    with private_postgres() as server:
        database = create_database(server.url)
        try:
            await upgrade(database)
            async with database.transaction() as conn:
                await users.create_user(conn, "ada", hash_password(PASSWORD), "editor", by=None)
            async with open_broker(f"memory://{uuid.uuid4().hex}") as broker:
                runtime = Runtime(
                    settings=settings, database=database, broker=broker, keys=derive_keys(SECRET)
                )
                transport = httpx.ASGITransport(app=create_app(runtime))
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    login = {"username": "ada", "password": PASSWORD}
                    token = (await client.post("/api/v1/auth/login", json=login)).json()
                    auth = {"Authorization": f"Bearer {token['access_token']}"}
                    assert (await client.get("/api/v1/executions", headers=auth)).status_code == 200

                    server.stop()
                    for method, path, body in [
                        ("GET", "/api/v1/executions", None),
                        ("GET", "/api/v1/graphs", None),
                        ("POST", "/api/v1/graphs/hello/executions", {"params": {}}),
                        ("POST", "/api/v1/auth/login", login),
                        ("GET", "/readyz", None),
                    ]:
                        answer = await client.request(method, path, json=body, headers=auth)
                        assert answer.status_code == 503, (path, answer.text)
                        assert answer.headers["content-type"] == "application/problem+json"
                        assert answer.json()["status"] == 503
                    assert (await client.get("/healthz")).status_code == 200

                    server.start()
                    answer = await client.get("/api/v1/executions", headers=auth)
                    assert answer.status_code == 200, answer.text
                    assert (await client.get("/readyz")).status_code == 200
        finally:
            await database.dispose()
