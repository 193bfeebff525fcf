"""Users on both databases: creation rules, the first admin under concurrency, the last
admin kept, pagination, audit entries without hashes."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from loom_db.audit import list_audit
from loom_db.database import Database
from loom_db.errors import Conflict, NotFound
from loom_db.models import api_tokens, refresh_families
from loom_db.models import users as users_table
from loom_db.tokens import create_api_token, create_family, rotate_family
from loom_db.types import utcnow
from loom_db.users import (
    UserRecord,
    create_user,
    delete_user,
    ensure_admin,
    get_password_hash,
    get_user,
    get_user_by_id,
    list_users,
    set_password,
    update_user,
)

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g"


async def _user(db: Database, name: str, role: str = "viewer") -> UserRecord:
    async with db.transaction() as conn:
        return await create_user(conn, name, HASH, role, by="root")


async def test_a_created_user_reads_back_without_its_hash(db: Database) -> None:
    created = await _user(db, "alice", "editor")
    async with db.read() as conn:
        user = await get_user(conn, "alice")
        assert await get_user_by_id(conn, created.id) == user
        with_hash, stored = await get_password_hash(conn, "alice")
    assert user == created == with_hash
    assert (user.username, user.role, user.disabled) == ("alice", "editor", False)
    assert user.created_at == user.updated_at
    assert stored == HASH
    assert not hasattr(user, "password_hash")


async def test_invalid_usernames_and_roles_are_refused(db: Database) -> None:
    async with db.transaction() as conn:
        for name in ("Alice", "-bob", "", "a b", "x" * 101, "ünï"):
            with pytest.raises(ValueError, match="invalid username"):
                await create_user(conn, name, HASH, "viewer", by=None)
        with pytest.raises(ValueError, match="invalid role"):
            await create_user(conn, "carol", HASH, "root", by=None)
        with pytest.raises(ValueError, match="password hash"):
            await create_user(conn, "carol", "", "viewer", by=None)
        assert (await create_user(conn, "x" * 100, HASH, "viewer", by=None)).username == "x" * 100
        assert (await create_user(conn, "0k_.-", HASH, "viewer", by=None)).role == "viewer"


async def test_an_existing_username_is_a_conflict(db: Database) -> None:
    await _user(db, "alice")
    async with db.transaction() as conn:
        with pytest.raises(Conflict, match="alice"):
            await create_user(conn, "alice", HASH, "admin", by=None)
        # the transaction is still usable after the refusal
        assert (await get_user(conn, "alice")).role == "viewer"


async def test_unknown_users_are_not_found(db: Database) -> None:
    async with db.transaction() as conn:
        with pytest.raises(NotFound):
            await get_user(conn, "ghost")
        with pytest.raises(NotFound):
            await get_user_by_id(conn, 999)
        with pytest.raises(NotFound):
            await get_password_hash(conn, "ghost")
        with pytest.raises(NotFound):
            await set_password(conn, "ghost", HASH, by=None)
        with pytest.raises(NotFound):
            await update_user(conn, "ghost", role="editor", by=None)
        with pytest.raises(NotFound):
            await delete_user(conn, "ghost", by=None)


async def test_ensure_admin_creates_admin_only_in_an_empty_system(db: Database) -> None:
    async with db.transaction() as conn:
        assert await ensure_admin(conn, HASH) is True
        assert await ensure_admin(conn, "other-hash") is False
        admin, stored = await get_password_hash(conn, "admin")
    assert (admin.role, stored) == ("admin", HASH)


async def test_ensure_admin_leaves_a_system_with_users_alone(db: Database) -> None:
    await _user(db, "alice", "admin")
    async with db.transaction() as conn:
        assert await ensure_admin(conn, HASH) is False
        with pytest.raises(NotFound):
            await get_user(conn, "admin")


async def test_replicas_starting_together_create_one_admin(db: Database) -> None:
    all_open = asyncio.Barrier(10)  # PostgreSQL only: SQLite's writers wait at BEGIN

    async def start() -> bool:
        async with db.transaction() as conn:
            if db.is_postgres:
                await conn.execute(text("SELECT 1"))
                await all_open.wait()  # every replica sees the empty table
            return await ensure_admin(conn, HASH)

    results = await asyncio.gather(*(start() for _ in range(10)))
    assert results.count(True) == 1
    async with db.read() as conn:
        assert (await conn.execute(select(func.count()).select_from(users_table))).scalar() == 1
        entries, _ = await list_audit(conn, object_type="user")
    assert [(e.actor, e.action, e.object_id) for e in entries] == [
        ("system", "user.create", "admin")
    ]


async def test_set_password_replaces_the_hash_and_audits_without_it(db: Database) -> None:
    await _user(db, "alice")
    async with db.transaction() as conn:
        await set_password(conn, "alice", "new-hash", by="alice")
        user, stored = await get_password_hash(conn, "alice")
        entries, _ = await list_audit(conn, object_id="alice")
    assert stored == "new-hash"
    assert user.updated_at > user.created_at
    assert [e.action for e in entries] == ["user.password", "user.create"]
    assert all("hash" not in repr(e.detail) for e in entries)


async def test_update_user_changes_role_and_disabled_and_audits(db: Database) -> None:
    await _user(db, "alice")
    async with db.transaction() as conn:
        user = await update_user(conn, "alice", role="editor", by="root")
        assert (user.role, user.disabled) == ("editor", False)
        user = await update_user(conn, "alice", disabled=True, by="root")
        assert (user.role, user.disabled) == ("editor", True)
        same = await update_user(conn, "alice", role="editor", disabled=True, by="root")
        assert same == user
        with pytest.raises(ValueError, match="invalid role"):
            await update_user(conn, "alice", role="superuser", by="root")
        entries, _ = await list_audit(conn, object_type="user", object_id="alice")
    assert [(e.action, e.detail) for e in entries] == [
        ("user.update", {"disabled": True}),
        ("user.update", {"role": "editor"}),
        ("user.create", {"role": "viewer"}),
    ]


async def test_disabling_a_user_revokes_its_sessions(db: Database) -> None:
    alice = await _user(db, "alice")
    async with db.transaction() as conn:
        await create_family(
            conn, family_id="f1", user_id=alice.id, jti="j1", expires_at=utcnow() + timedelta(1)
        )
        await update_user(conn, "alice", disabled=True, by="root")
        assert await rotate_family(conn, "f1", "j1", "j2") == "revoked"


async def test_the_last_enabled_admin_cannot_be_removed(db: Database) -> None:
    await _user(db, "root", "admin")
    async with db.transaction() as conn:
        with pytest.raises(Conflict, match="last enabled admin"):
            await update_user(conn, "root", role="editor", by="root")
        with pytest.raises(Conflict, match="last enabled admin"):
            await update_user(conn, "root", disabled=True, by="root")
        with pytest.raises(Conflict, match="last enabled admin"):
            await delete_user(conn, "root", by="root")
        # a disabled admin does not count as one
        await create_user(conn, "sleepy", HASH, "admin", by="root")
        await update_user(conn, "sleepy", disabled=True, by="root")
        with pytest.raises(Conflict):
            await update_user(conn, "root", role="viewer", by="root")
        # with another enabled admin, it can go
        await update_user(conn, "sleepy", disabled=False, by="root")
        assert (await update_user(conn, "root", role="viewer", by="sleepy")).role == "viewer"
        with pytest.raises(Conflict):
            await delete_user(conn, "sleepy", by="sleepy")


async def test_two_admins_demoting_each_other_at_once_leave_one(db: Database) -> None:
    await _user(db, "ann", "admin")
    await _user(db, "bob", "admin")

    both_open = asyncio.Barrier(2)  # PostgreSQL only: SQLite's second writer waits at BEGIN

    async def demote(name: str) -> str:
        try:
            async with db.transaction() as conn:
                if db.is_postgres:
                    await conn.execute(text("SELECT 1"))
                    await both_open.wait()
                await update_user(conn, name, role="viewer", by="other")
        except Conflict:
            return "refused"
        return "demoted"

    outcomes = await asyncio.gather(demote("ann"), demote("bob"))
    assert sorted(outcomes) == ["demoted", "refused"]
    async with db.read() as conn:
        roles = {u.username: u.role for u in (await list_users(conn))[0]}
    assert sorted(roles.values()) == ["admin", "viewer"]


async def test_deleting_a_user_deletes_its_tokens_and_families(db: Database) -> None:
    await _user(db, "root", "admin")
    alice = await _user(db, "alice", "editor")
    async with db.transaction() as conn:
        await create_api_token(
            conn,
            token_id="t1",
            user_id=alice.id,
            name="ci",
            token_hash="h" * 64,
            prefix="loom_abcd",
            role="editor",
            by="alice",
        )
        await create_family(
            conn, family_id="f1", user_id=alice.id, jti="j1", expires_at=utcnow() + timedelta(1)
        )
        await delete_user(conn, "alice", by="root")
        with pytest.raises(NotFound):
            await get_user(conn, "alice")
        for table in (api_tokens, refresh_families):
            count = select(func.count()).select_from(table)
            assert (await conn.execute(count)).scalar() == 0
        assert await rotate_family(conn, "f1", "j1", "j2") == "unknown"
        entries, _ = await list_audit(conn, object_id="alice", object_type="user")
    assert entries[0].action == "user.delete"
    assert entries[0].actor == "root"


async def test_list_users_pages_by_username_without_skips_or_repeats(db: Database) -> None:
    names = [f"user{i:02d}" for i in range(7)]
    for name in reversed(names):
        await _user(db, name)
    seen: list[str] = []
    cursor: str | None = None
    async with db.read() as conn:
        while True:
            page, cursor = await list_users(conn, limit=3, cursor=cursor)
            seen += [u.username for u in page]
            if cursor is None:
                break
        with pytest.raises(ValueError):
            await list_users(conn, cursor="garbage")
        with pytest.raises(ValueError):
            await list_users(conn, limit=0)
    assert seen == names
