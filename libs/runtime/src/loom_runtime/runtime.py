"""What a service is handed (DESIGN §2): the database, the brokers, the keys and the
metrics registry. A service's factory takes a `Runtime`; `open_runtime(settings)` builds
one for a service started alone (`python -m loom_<service>`), and `loom up` builds ONE and
hands it to every service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from loom_auth import require_signing_key
from loom_common.settings import LoomSettings
from loom_db import Database, database_from_settings
from loom_db.keys import Keys, derive_keys
from loom_db.relay import OutboxRelay
from loom_messaging import Broker, open_broker

__all__ = ["Runtime", "open_runtime"]


@dataclass
class Runtime:
    """The collaborators of a service. `events` is the event-stream broker when
    `LOOM_EVENTS_URL` differs from `LOOM_QUEUE_URL` (else None: `broker` carries both)."""

    settings: LoomSettings
    database: Database
    broker: Broker
    keys: Keys
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )
    events: Broker | None = None

    @property
    def signing_key(self) -> bytes:
        return self.keys.signing_key

    @property
    def brokers(self) -> list[Broker]:
        """Every distinct broker (what `/readyz` checks)."""
        return [self.broker] if self.events is None else [self.broker, self.events]

    @property
    def event_broker(self) -> Broker:
        """The broker of the event stream and the control channel."""
        return self.broker if self.events is None else self.events


@asynccontextmanager
async def open_runtime(
    settings: LoomSettings, who: str, *, relay: bool = True
) -> AsyncIterator[Runtime]:
    """The runtime of a service started alone: its database, its brokers (started) and,
    with `relay`, one outbox relay (several relays share the outbox safely: SKIP LOCKED);
    all closed on exit. `who` names the service in errors ("the webhook service").

    Raises `SettingsError` without a usable `LOOM_SECRET_KEY`, `BrokerUnavailable` when
    a broker cannot be reached at start."""
    require_signing_key(settings, who)
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
        if relay:
            publishers = broker.publishers()
            if events is not None:
                publishers["events"] = events.publishers()["events"]
            await stack.enter_async_context(OutboxRelay(database, publishers))
        yield Runtime(settings=settings, database=database, broker=broker, keys=keys, events=events)
