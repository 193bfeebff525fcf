"""What the REST app is given (DESIGN §2): the database, the brokers, the metrics registry,
the settings and the keys. `create_app(runtime)` takes one; `open_runtime(settings)` builds
one for `python -m loom_rest` (`loom up` builds its own from the parts it shares).
"""

from __future__ import annotations

import logging
import secrets as _secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from loom_auth import LoginLimiter, PasswordParams, hash_password, require_signing_key
from loom_auth.passwords import DEFAULT_PARAMS
from loom_db import Database, database_from_settings, users
from loom_db.keys import Keys, derive_keys
from loom_db.relay import OutboxRelay
from loom_messaging import Broker, open_broker
from loom_rest.settings import RestSettings

__all__ = ["Runtime", "ensure_first_admin", "open_runtime"]

_log = logging.getLogger("loom.rest")


@dataclass(slots=True)
class Runtime:
    """The collaborators of one REST app. `events` is the event-stream broker when
    `LOOM_EVENTS_URL` differs from `LOOM_QUEUE_URL` (else None: `broker` carries both);
    the app only checks it for `/readyz`."""

    settings: RestSettings
    database: Database
    broker: Broker
    keys: Keys
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )
    events: Broker | None = None
    login_limiter: LoginLimiter | None = None
    password_params: PasswordParams = DEFAULT_PARAMS
    """argon2id parameters for new hashes (tests pass cheap ones; a change rehashes
    stored passwords at their next login)."""

    def __post_init__(self) -> None:
        if self.login_limiter is None:
            attempts = self.settings.rest_login_attempts
            self.login_limiter = LoginLimiter(attempts, max_attempts_per_address=4 * attempts)

    @property
    def signing_key(self) -> bytes:
        return self.keys.signing_key

    @property
    def brokers(self) -> list[Broker]:
        return [self.broker] if self.events is None else [self.broker, self.events]


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
    """The runtime of a stand-alone REST service: its database, its brokers (started), and
    one outbox relay; all closed on exit. Raises `SettingsError` without a usable
    `LOOM_SECRET_KEY`, `BrokerUnavailable` when a broker cannot be reached at start."""
    require_signing_key(settings, "the REST service")
    assert settings.secret_key is not None
    keys = derive_keys(settings.secret_key.get_secret_value())
    async with AsyncExitStack() as stack:
        database = database_from_settings(settings)
        stack.push_async_callback(database.dispose)
        prefix = settings.broker_prefix
        broker = await stack.enter_async_context(open_broker(settings.queue_url, prefix=prefix))
        events = None
        if settings.events_url != settings.queue_url:
            events = await stack.enter_async_context(
                open_broker(settings.events_url, prefix=prefix)
            )
        publishers = broker.publishers()
        if events is not None:
            publishers["events"] = events.publishers()["events"]
        await stack.enter_async_context(OutboxRelay(database, publishers))
        password = await ensure_first_admin(database, settings)
        if password is not None:
            _log.warning(
                "created user admin with the generated password %s (shown once: change it "
                "with PUT /api/v1/me/password or set LOOM_ADMIN_PASSWORD before the first start)",
                password,
            )
        yield Runtime(settings=settings, database=database, broker=broker, keys=keys, events=events)
