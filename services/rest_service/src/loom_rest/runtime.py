"""What the REST app is given (DESIGN §2): the database, the brokers, the metrics registry,
the settings and the keys. `create_app(runtime)` takes one; `open_runtime(settings)` builds
one for `python -m loom_rest` (`loom up` builds its own from the parts it shares).
"""

from __future__ import annotations

import logging
import secrets as _secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from loom_auth import LoginLimiter, PasswordParams, hash_password
from loom_auth.passwords import DEFAULT_PARAMS
from loom_db import Database, users
from loom_rest.settings import RestSettings
from loom_runtime import Runtime as BaseRuntime
from loom_runtime import open_runtime as open_base_runtime

__all__ = ["Runtime", "ensure_first_admin", "open_runtime"]

_log = logging.getLogger("loom.rest")


@dataclass
class Runtime(BaseRuntime):
    """The collaborators of one REST app: those of every service, its settings, and the
    login limiter and password parameters."""

    settings: RestSettings
    login_limiter: LoginLimiter | None = None
    password_params: PasswordParams = DEFAULT_PARAMS
    """argon2id parameters for new hashes (tests pass cheap ones; a change rehashes
    stored passwords at their next login)."""

    def __post_init__(self) -> None:
        if self.login_limiter is None:
            attempts = self.settings.rest_login_attempts
            self.login_limiter = LoginLimiter(attempts, max_attempts_per_address=4 * attempts)

    @classmethod
    def of(cls, base: BaseRuntime, settings: RestSettings) -> Runtime:
        """The REST runtime over a shared one (`loom up`)."""
        return cls(
            settings=settings,
            database=base.database,
            broker=base.broker,
            keys=base.keys,
            registry=base.registry,
            events=base.events,
        )


async def ensure_first_admin(database: Database, settings: RestSettings) -> str | None:
    """Create user `admin` on an empty database (DESIGN §5). Returns the generated
    password when one was generated and this call created the user (the caller shows it
    once), else None. Safe with replicas starting together: one of them creates it."""
    async with database.read() as conn:
        if await users.has_users(conn):
            return None
    given = settings.admin_password
    password = given.get_secret_value() if given is not None else _secrets.token_urlsafe(18)
    async with database.transaction() as conn:
        created = await users.ensure_admin(conn, hash_password(password))
    if not created:
        return None
    if given is None:
        return password
    _log.info("created user admin with the password from LOOM_ADMIN_PASSWORD")
    return None


@asynccontextmanager
async def open_runtime(settings: RestSettings) -> AsyncIterator[Runtime]:
    """The runtime of a stand-alone REST service (`loom_runtime.open_runtime`), with user
    `admin` created on an empty database. Raises `SettingsError` without a usable
    `LOOM_SECRET_KEY`, `BrokerUnavailable` when a broker cannot be reached at start."""
    async with open_base_runtime(settings, "the REST service") as base:
        password = await ensure_first_admin(base.database, settings)
        if password is not None:
            _log.warning(
                "created user admin with the generated password %s (shown once: change it "
                "with PUT /api/v1/me/password or set LOOM_ADMIN_PASSWORD before the first start)",
                password,
            )
        yield Runtime.of(base, settings)
