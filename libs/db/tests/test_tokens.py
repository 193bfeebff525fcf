"""API tokens and refresh-token families on both databases: role ceilings, lookup rules,
rotation and reuse detection (also under concurrency), revocation, audit without secrets."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import orjson
import pytest
from sqlalchemy import select, text

from loom_db.audit import list_audit
from loom_db.database import Database
from loom_db.errors import Conflict, NotFound
from loom_db.models import api_tokens, refresh_families
from loom_db.tokens import (
    LAST_USED_RESOLUTION,
    ApiTokenRecord,
    create_api_token,
    create_family,
    family_user_id,
    find_api_token,
    list_api_tokens,
    revoke_api_token,
    revoke_family,
    revoke_user_families,
    rotate_family,
)
from loom_db.types import utcnow
from loom_db.users import UserRecord, create_user, update_user

HASH_A = "a" * 64
HASH_B = "b" * 64


async def _user(db: Database, name: str, role: str) -> UserRecord:
    async with db.transaction() as conn:
        return await create_user(conn, name, "pw-hash", role, by="root")


async def _token(
    db: Database,
    user: UserRecord,
    token_id: str,
    token_hash: str,
    role: str,
    expires_at: datetime | None = None,
) -> ApiTokenRecord:
    async with db.transaction() as conn:
        return await create_api_token(
            conn,
            token_id=token_id,
            user_id=user.id,
            name=f"token {token_id}",
            token_hash=token_hash,
            prefix="loom_" + token_id,
            role=role,
            expires_at=expires_at,
            by=user.username,
        )


async def _family(db: Database, user: UserRecord, family_id: str, jti: str) -> None:
    async with db.transaction() as conn:
        await create_family(
            conn,
            family_id=family_id,
            user_id=user.id,
            jti=jti,
            expires_at=utcnow() + timedelta(days=7),
        )


# --- API tokens ---------------------------------------------------------------------


async def test_a_token_is_found_by_its_hash_with_its_user(db: Database) -> None:
    alice = await _user(db, "alice", "editor")
    created = await _token(db, alice, "t1", HASH_A, "viewer")
    assert (created.role, created.prefix, created.last_used_at) == ("viewer", "loom_t1", None)
    async with db.transaction() as conn:
        found = await find_api_token(conn, HASH_A)
        assert await find_api_token(conn, HASH_B) is None
    assert found is not None
    token, user = found
    assert (token.id, token.role, token.user_id) == ("t1", "viewer", alice.id)
    assert token.last_used_at is not None
    assert user == alice
    assert not hasattr(token, "token_hash")


async def test_a_token_role_cannot_exceed_its_users_role(db: Database) -> None:
    alice = await _user(db, "alice", "editor")
    with pytest.raises(Conflict, match="cannot exceed"):
        await _token(db, alice, "t1", HASH_A, "admin")
    with pytest.raises(ValueError, match="invalid role"):
        await _token(db, alice, "t1", HASH_A, "owner")
    assert (await _token(db, alice, "t1", HASH_A, "editor")).role == "editor"
    async with db.transaction() as conn:
        with pytest.raises(NotFound):
            await create_api_token(
                conn,
                token_id="t9",
                user_id=999,
                name="x",
                token_hash=HASH_B,
                prefix="loom_x",
                role="viewer",
                by=None,
            )


async def test_a_demoted_users_tokens_are_demoted_too(db: Database) -> None:
    await _user(db, "root", "admin")
    alice = await _user(db, "alice", "admin")
    await _token(db, alice, "t1", HASH_A, "admin")
    async with db.transaction() as conn:
        await update_user(conn, "alice", role="viewer", by="root")
        found = await find_api_token(conn, HASH_A)
    assert found is not None
    assert found[0].role == "viewer"


async def test_duplicate_token_ids_and_hashes_are_conflicts(db: Database) -> None:
    alice = await _user(db, "alice", "viewer")
    await _token(db, alice, "t1", HASH_A, "viewer")
    with pytest.raises(Conflict):
        await _token(db, alice, "t1", HASH_B, "viewer")
    with pytest.raises(Conflict):
        await _token(db, alice, "t2", HASH_A, "viewer")


async def test_revoked_expired_and_disabled_users_tokens_are_not_found(db: Database) -> None:
    alice = await _user(db, "alice", "editor")
    bob = await _user(db, "bob", "editor")
    soon = utcnow() + timedelta(hours=1)
    await _token(db, alice, "revoked", "r" * 64, "viewer")
    await _token(db, alice, "expiring", "e" * 64, "viewer", expires_at=soon)
    await _token(db, bob, "bobs", "b" * 64, "viewer")
    with pytest.raises(ValueError, match="future"):
        await _token(db, alice, "past", "p" * 64, "viewer", expires_at=utcnow() - timedelta(1))
    async with db.transaction() as conn:
        await revoke_api_token(conn, "revoked", user_id=alice.id, by="alice")
        await update_user(conn, "bob", disabled=True, by="root")
        assert await find_api_token(conn, "r" * 64) is None
        assert await find_api_token(conn, "b" * 64) is None
        assert await find_api_token(conn, "e" * 64) is not None
        assert await find_api_token(conn, "e" * 64, now=soon) is None


async def test_last_used_is_written_at_most_once_a_minute(db: Database) -> None:
    alice = await _user(db, "alice", "viewer")
    await _token(db, alice, "t1", HASH_A, "viewer")
    start = utcnow()

    async def use(at: datetime) -> datetime | None:
        async with db.transaction() as conn:
            await find_api_token(conn, HASH_A, now=at)
            query = select(api_tokens.c.last_used_at).where(api_tokens.c.id == "t1")
            used: datetime | None = (await conn.execute(query)).scalar_one()
            return used

    assert await use(start) == start
    assert await use(start + timedelta(seconds=30)) == start
    assert await use(start + timedelta(seconds=59)) == start
    later = start + LAST_USED_RESOLUTION + timedelta(seconds=1)
    assert await use(later) == later


async def test_tokens_are_listed_newest_first_and_revoked_ones_on_request(db: Database) -> None:
    alice = await _user(db, "alice", "viewer")
    bob = await _user(db, "bob", "viewer")
    for n in range(3):
        await _token(db, alice, f"a{n}", f"{n}" * 64, "viewer")
    await _token(db, bob, "b0", HASH_B, "viewer")
    async with db.transaction() as conn:
        await revoke_api_token(conn, "a1", user_id=alice.id, by="alice")
        live = await list_api_tokens(conn, alice.id)
        every = await list_api_tokens(conn, alice.id, include_revoked=True)
    assert [t.id for t in live] == ["a2", "a0"]
    assert [t.id for t in every] == ["a2", "a1", "a0"]
    assert every[1].revoked_at is not None


async def test_a_user_revokes_only_their_own_tokens_and_an_admin_any(db: Database) -> None:
    alice = await _user(db, "alice", "viewer")
    bob = await _user(db, "bob", "viewer")
    await _token(db, alice, "t1", HASH_A, "viewer")
    async with db.transaction() as conn:
        with pytest.raises(NotFound):
            await revoke_api_token(conn, "t1", user_id=bob.id, by="bob")
        with pytest.raises(NotFound):
            await revoke_api_token(conn, "nope", by="root")
        revoked = await revoke_api_token(conn, "t1", by="root")
        assert revoked.revoked_at is not None
        again = await revoke_api_token(conn, "t1", user_id=alice.id, by="alice")
        assert again.revoked_at == revoked.revoked_at
        entries, _ = await list_audit(conn, object_type="api_token")
    assert [(e.actor, e.action) for e in entries] == [
        ("root", "api_token.revoke"),
        ("alice", "api_token.create"),
    ]


# --- refresh-token families ---------------------------------------------------------


async def test_a_family_rotates_and_a_reused_token_revokes_it(db: Database) -> None:
    alice = await _user(db, "alice", "viewer")
    await _family(db, alice, "f1", "j1")
    async with db.transaction() as conn:
        assert await rotate_family(conn, "f1", "j1", "j2") == "rotated"
        assert await rotate_family(conn, "f1", "j2", "j3") == "rotated"
    async with db.transaction() as conn:
        assert await rotate_family(conn, "f1", "j1", "x") == "reused"  # a spent token
    async with db.transaction() as conn:
        # the current token died with the family
        assert await rotate_family(conn, "f1", "j3", "j4") == "revoked"
        entries, _ = await list_audit(conn, object_type="refresh_family")
    assert [e.action for e in entries] == ["session.reuse"]


async def test_expired_and_unknown_families_do_not_rotate(db: Database) -> None:
    alice = await _user(db, "alice", "viewer")
    await _family(db, alice, "f1", "j1")
    async with db.transaction() as conn:
        later = utcnow() + timedelta(days=8)
        assert await rotate_family(conn, "f1", "j1", "j2", now=later) == "expired"
        assert await rotate_family(conn, "nope", "j1", "j2") == "unknown"
        assert await rotate_family(conn, "f1", "j1", "j2") == "rotated"
        with pytest.raises(Conflict):
            await create_family(conn, family_id="f1", user_id=alice.id, jti="j", expires_at=later)
        with pytest.raises(NotFound):
            await create_family(conn, family_id="f2", user_id=999, jti="j", expires_at=later)


async def test_concurrent_rotations_of_one_token_give_one_winner_and_revoke(
    db: Database,
) -> None:
    """The same refresh token presented twice at once: one rotation wins, the other is
    a reuse, and the family (with the winner's new token) is revoked."""
    alice = await _user(db, "alice", "viewer")
    await _family(db, alice, "f1", "j1")

    # On PostgreSQL both transactions are open before either rotates (SQLite has one
    # writer: the second waits at BEGIN, and a barrier there would deadlock).
    both_open = asyncio.Barrier(2)

    async def rotate(new_jti: str) -> str:
        async with db.transaction() as conn:
            if db.is_postgres:
                await conn.execute(text("SELECT 1"))
                await both_open.wait()
            return await rotate_family(conn, "f1", "j1", new_jti)

    outcomes = await asyncio.gather(rotate("ja"), rotate("jb"))
    assert sorted(outcomes) == ["reused", "rotated"]
    winner = "ja" if outcomes[0] == "rotated" else "jb"
    async with db.transaction() as conn:
        assert await rotate_family(conn, "f1", winner, "jc") == "revoked"
        row = (
            await conn.execute(select(refresh_families).where(refresh_families.c.id == "f1"))
        ).one()
    assert row.revoked_at is not None
    assert row.current_jti == winner


async def test_logout_revokes_one_family_and_logout_everywhere_all(db: Database) -> None:
    alice = await _user(db, "alice", "viewer")
    bob = await _user(db, "bob", "viewer")
    for family in ("f1", "f2", "f3"):
        await _family(db, alice, family, "j")
    await _family(db, bob, "fb", "j")
    async with db.transaction() as conn:
        with pytest.raises(NotFound):
            await revoke_family(conn, "f1", user_id=bob.id)
        with pytest.raises(NotFound):
            await revoke_family(conn, "nope")
        assert await revoke_family(conn, "f1", user_id=alice.id, by="alice") is True
        assert await revoke_family(conn, "f1", by="alice") is False
        assert await rotate_family(conn, "f1", "j", "k") == "revoked"
        assert await revoke_user_families(conn, alice.id, by="alice") == 2
        assert await revoke_user_families(conn, alice.id, by="alice") == 0
        assert await rotate_family(conn, "f2", "j", "k") == "revoked"
        assert await rotate_family(conn, "fb", "j", "k") == "rotated"
        entries, _ = await list_audit(conn, actor="alice")
    assert [e.action for e in entries] == [
        "session.revoke_all",
        "session.revoke",
        *["session.create"] * 3,  # a login is audited under the user's name
    ]


async def test_the_audit_log_never_holds_hashes_tokens_or_jtis(db: Database) -> None:
    alice = await _user(db, "alice", "editor")
    await _token(db, alice, "t1", HASH_A, "viewer")
    await _family(db, alice, "f1", "jti-secret-1")
    async with db.transaction() as conn:
        await rotate_family(conn, "f1", "jti-secret-1", "jti-secret-2")
        await rotate_family(conn, "f1", "jti-secret-1", "jti-secret-3")
        await revoke_api_token(conn, "t1", by="alice")
        entries, _ = await list_audit(conn, limit=100)
    dump = orjson.dumps([e.detail for e in entries]).decode()
    assert len(entries) >= 4
    for secret in (HASH_A, "jti-secret", "pw-hash"):
        assert secret not in dump


async def test_a_family_names_its_user_and_logout_everywhere_can_keep_one(db: Database) -> None:
    alice = await _user(db, "alice", "viewer")
    for family in ("f1", "f2", "f3"):
        await _family(db, alice, family, "j")
    async with db.transaction() as conn:
        assert await family_user_id(conn, "f2") == alice.id
        with pytest.raises(NotFound):
            await family_user_id(conn, "nope")
        assert await revoke_user_families(conn, alice.id, keep="f2", by="alice") == 2
        assert await rotate_family(conn, "f1", "j", "k") == "revoked"
        assert await rotate_family(conn, "f3", "j", "k") == "revoked"
        assert await rotate_family(conn, "f2", "j", "k") == "rotated"
        assert await family_user_id(conn, "f1") == alice.id  # a revoked family still names it
