"""Secrets on both databases: round trip, encryption at rest, rotation, wrong keys."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from loom_db.audit import list_audit
from loom_db.database import Database
from loom_db.errors import NotFound, SecretKeyMismatch
from loom_db.keys import derive_keys
from loom_db.models import secrets as secrets_table
from loom_db.secrets import (
    delete_secret,
    get_secret,
    get_secrets,
    list_secret_names,
    put_secret,
    rotate_secrets,
)

KEY_A = "key-a-" + "a" * 40
KEY_B = "key-b-" + "b" * 40


async def test_a_secret_round_trips_and_can_be_replaced(db: Database) -> None:
    keys = derive_keys(KEY_A)
    async with db.transaction() as conn:
        assert await put_secret(conn, keys, "API_TOKEN", "s3cret-välue", by="alice") is True
        assert await put_secret(conn, keys, "OTHER", "x") is True
    async with db.read() as conn:
        assert await get_secret(conn, keys, "API_TOKEN") == "s3cret-välue"
    async with db.transaction() as conn:
        assert await put_secret(conn, keys, "API_TOKEN", "replaced", by="bob") is False
    async with db.read() as conn:
        assert await get_secret(conn, keys, "API_TOKEN") == "replaced"
        assert await list_secret_names(conn) == ["API_TOKEN", "OTHER"]
        assert await get_secrets(conn, keys, ["API_TOKEN", "MISSING"]) == {"API_TOKEN": "replaced"}
        assert await get_secrets(conn, keys, []) == {}
        row = (
            await conn.execute(select(secrets_table).where(secrets_table.c.name == "API_TOKEN"))
        ).one()
        assert row.updated_by == "bob"
        assert row.created_at < row.updated_at


async def test_the_stored_bytes_never_contain_the_plaintext(db: Database) -> None:
    keys = derive_keys(KEY_A)
    plaintext = "correct horse battery staple"
    async with db.transaction() as conn:
        await put_secret(conn, keys, "PASSPHRASE", plaintext)
    async with db.read() as conn:
        stored = (
            await conn.execute(
                select(secrets_table.c.value).where(secrets_table.c.name == "PASSPHRASE")
            )
        ).scalar_one()
    assert isinstance(stored, bytes)
    assert plaintext.encode() not in stored
    assert b"horse" not in stored


async def test_unknown_secrets_are_not_found(db: Database) -> None:
    keys = derive_keys(KEY_A)
    async with db.transaction() as conn:
        with pytest.raises(NotFound, match="NOPE"):
            await get_secret(conn, keys, "NOPE")
        with pytest.raises(NotFound, match="NOPE"):
            await delete_secret(conn, "NOPE")


async def test_a_deleted_secret_is_gone_and_the_change_is_audited(db: Database) -> None:
    keys = derive_keys(KEY_A)
    async with db.transaction() as conn:
        await put_secret(conn, keys, "GONE", "value", by="alice")
        await delete_secret(conn, "GONE", by="alice")
    async with db.read() as conn:
        assert await list_secret_names(conn) == []
        entries, _ = await list_audit(conn, object_type="secret")
    assert [(e.actor, e.action, e.object_id) for e in entries] == [
        ("alice", "secret.delete", "GONE"),
        ("alice", "secret.create", "GONE"),
    ]
    assert all("value" not in str(e.detail) for e in entries)


@pytest.mark.parametrize(
    "name", ["", "1ABC", "has-dash", "has space", "x" * 101, "ü", "A;DROP TABLE"]
)
async def test_invalid_names_are_refused(db: Database, name: str) -> None:
    keys = derive_keys(KEY_A)
    async with db.transaction() as conn:
        with pytest.raises(ValueError, match="invalid secret name"):
            await put_secret(conn, keys, name, "value")
        assert await list_secret_names(conn) == []


async def test_longest_valid_name_is_accepted(db: Database) -> None:
    keys = derive_keys(KEY_A)
    name = "_" + "a" * 99
    async with db.transaction() as conn:
        await put_secret(conn, keys, name, "v")
        assert await get_secret(conn, keys, name) == "v"


async def test_rotation_moves_every_secret_to_the_newest_key(db: Database) -> None:
    old_only = derive_keys(KEY_A)
    async with db.transaction() as conn:
        await put_secret(conn, old_only, "ONE", "first")
        await put_secret(conn, old_only, "TWO", "second")

    rotating = derive_keys(f"{KEY_B},{KEY_A}")
    async with db.read() as conn:
        assert await get_secrets(conn, rotating, ["ONE", "TWO"]) == {
            "ONE": "first",
            "TWO": "second",
        }
    new_only = derive_keys(KEY_B)
    async with db.read() as conn:
        with pytest.raises(SecretKeyMismatch):
            await get_secret(conn, new_only, "ONE")

    async with db.transaction() as conn:
        assert await rotate_secrets(conn, rotating, by="admin") == 2

    async with db.read() as conn:
        assert await get_secrets(conn, new_only, ["ONE", "TWO"]) == {
            "ONE": "first",
            "TWO": "second",
        }
        with pytest.raises(SecretKeyMismatch):
            await get_secret(conn, old_only, "ONE")


async def test_a_wrong_key_is_a_clear_error_and_rotation_changes_nothing(db: Database) -> None:
    async with db.transaction() as conn:
        await put_secret(conn, derive_keys(KEY_A), "ONE", "first")
    wrong = derive_keys(KEY_B)
    async with db.read() as conn:
        with pytest.raises(
            SecretKeyMismatch, match="'ONE' cannot be decrypted with LOOM_SECRET_KEY"
        ):
            await get_secret(conn, wrong, "ONE")
    with pytest.raises(SecretKeyMismatch):
        async with db.transaction() as conn:
            await rotate_secrets(conn, wrong)
    async with db.read() as conn:
        assert await get_secret(conn, derive_keys(KEY_A), "ONE") == "first"
