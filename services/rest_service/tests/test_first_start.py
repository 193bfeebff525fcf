"""The first start of an empty system creates one admin, also with replicas racing."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from loom_auth import verify_password
from loom_db import Database, users
from loom_rest import RestSettings, ensure_first_admin

SECRET = "first-start-secret-key-" + "f" * 30


async def test_admin_gets_the_configured_password_once(db: Database) -> None:
    settings = RestSettings(secret_key=SECRET, admin_password="the configured password")  # type: ignore[arg-type]
    assert await ensure_first_admin(db, settings) is None
    assert await ensure_first_admin(db, settings) is None
    async with db.read() as conn:
        user, hashed = await users.get_password_hash(conn, "admin")
        page, _ = await users.list_users(conn)
    assert user.role == "admin"
    assert verify_password(hashed, "the configured password")
    assert [u.username for u in page] == ["admin"]


async def test_replicas_starting_together_create_one_admin_with_one_generated_password(
    db: Database,
) -> None:
    settings = RestSettings(secret_key=SECRET)  # type: ignore[arg-type]
    passwords = await asyncio.gather(*(ensure_first_admin(db, settings) for _ in range(5)))
    shown = [p for p in passwords if p is not None]
    assert len(shown) == 1, "exactly one replica shows the generated password"
    async with db.read() as conn:
        _, hashed = await users.get_password_hash(conn, "admin")
    assert verify_password(hashed, shown[0])


def test_an_empty_admin_password_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="admin_password"):
        RestSettings(secret_key=SECRET, admin_password=SecretStr(""))
