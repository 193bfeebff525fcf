"""The outbox relay (DESIGN §1): publishes outbox rows to the broker and marks them sent.

One per process. It is woken right after a commit that wrote outbox rows (`OutboxWaker`:
in-process, and `LISTEN/NOTIFY` on PostgreSQL) and polls every `poll_interval` seconds as
a fallback. loom_db never imports loom_messaging (DESIGN §2): the broker side arrives as
one async *batch publisher* per channel, for instance::

    async def broadcast(items):
        for body, key in items:
            await broker.control.broadcast(body, key)

    relay = OutboxRelay(db, {"queue": broker.queue.publish_batch,
                             "control": broadcast,
                             "events": broker.events.publish_batch})
    async with relay:
        ...

A pass repeats until no unsent row is left: fetch a batch (oldest first), publish it in
row order (consecutive rows of one channel go to that channel's publisher as one call),
mark the published rows sent. How the rows are claimed depends on the database:

* **PostgreSQL**: fetch, publish and mark sent in ONE transaction. `fetch_unsent` locks
  the rows with `FOR UPDATE SKIP LOCKED`, so several relays (one per process, any number
  of processes) never publish the same row in one pass, and a relay that dies mid-pass
  releases its rows by rolling back. Only the outbox rows are locked: writers are not
  blocked. Relays working at once publish their batches side by side, so order holds
  within one relay's pass, not across relays (the work queue promises no order anyway).
* **SQLite**: its single write lock would stop every writer of the process while a
  publish waits for the broker, so the rows are read in a short read transaction, then
  published with no transaction held, then marked sent in a short write transaction.
  SQLite has no row locks, so this is safe with ONE relay per database (`loom up` runs
  exactly one, and passes of one relay never overlap); a crash between the publish and
  the mark publishes those rows again.

Either way delivery is at-least-once, and consumers deduplicate (by execution id).

When a publisher raises (any exception: the broker is down, a confirm timed out, or it
did not answer within `publish_timeout`), the rows it was given stay unsent, rows before
them in the batch that were published are marked sent, the outage is logged once, and
the relay retries with exponential backoff from `retry_backoff[0]` to `retry_backoff[1]`
seconds until the broker takes them: then everything kept is drained, in order. Database
outages (`DatabaseUnavailable`, `TransactionConflict`) are handled the same way; any
other error stops the relay and is re-raised by `aclose()`.

Sent rows older than `keep_sent` (a day) are purged every `purge_interval` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import timedelta
from itertools import groupby

from loom_common import CHANNEL_OF
from loom_db.database import Database
from loom_db.errors import DatabaseUnavailable, TransactionConflict
from loom_db.outbox import OutboxMessage, OutboxWaker, fetch_unsent, mark_sent, purge_sent
from loom_db.types import utcnow

__all__ = ["OutboxRelay", "Publisher"]

_log = logging.getLogger("loom.db.relay")

Publisher = Callable[[Sequence[tuple[bytes, str]]], Awaitable[None]]
"""Publishes (envelope bytes, key) pairs in order; returns once the broker has them all."""

_TRANSIENT = (DatabaseUnavailable, TransactionConflict)


class OutboxRelay:
    """Moves outbox rows to the broker (see the module docstring for the guarantees).

    `publish` maps every outbox channel ("queue", "control", "events") to its publisher.
    Without `waker`, the relay makes its own (`OutboxWaker.for_database(db)`) and runs
    its LISTEN loop while the relay runs; a given waker is the caller's to start and
    close. Use `async with relay:` (or `start()` / `aclose()`), or run `run()` as a task.

    Raises `ValueError` when a channel has no publisher or a setting is out of range.
    """

    def __init__(
        self,
        db: Database,
        publish: Mapping[str, Publisher],
        *,
        waker: OutboxWaker | None = None,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        retry_backoff: tuple[float, float] = (0.2, 5.0),
        publish_timeout: float = 30.0,
        keep_sent: timedelta = timedelta(days=1),
        purge_interval: float = 3600.0,
    ) -> None:
        missing = sorted(set(CHANNEL_OF.values()) - set(publish))
        if missing:
            raise ValueError(f"no publisher for the outbox channel(s) {', '.join(missing)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if poll_interval <= 0 or publish_timeout <= 0 or purge_interval <= 0:
            raise ValueError("poll_interval, publish_timeout and purge_interval must be > 0")
        low, high = retry_backoff
        if not 0 < low <= high:
            raise ValueError(f"retry_backoff must be (min, max) with 0 < min <= max: {low, high}")
        self.db = db
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retry_backoff = (low, high)
        self.publish_timeout = publish_timeout
        self.keep_sent = keep_sent
        self.purge_interval = purge_interval
        self._publishers = dict(publish)
        self._own_waker = waker is None
        self._waker = waker if waker is not None else OutboxWaker.for_database(db)
        self._lock = asyncio.Lock()  # passes of one relay never overlap (SQLite relies on it)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failing_since: float | None = None
        self._next_purge = 0.0
        self.published = 0
        """Rows published and marked sent by this relay since it was made."""

    @property
    def failing(self) -> bool:
        """Whether the last pass failed (broker or database down): rows are being kept."""
        return self._failing_since is not None

    def wake(self) -> None:
        """Make the relay look at the outbox now (what a commit's callback does)."""
        self._waker.wake()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Run `run()` in a task (once)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="loom-outbox-relay")

    async def aclose(self) -> None:
        """Stop the relay. The batch being published is finished first (for at most
        `publish_timeout` seconds; after that it is abandoned and its rows are published
        again later), so a clean shutdown does not duplicate messages. Rows still unsent
        stay for the next relay. Re-raises the error that stopped `run()`, if one did."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        try:
            async with asyncio.timeout(self.publish_timeout):
                await self._lock.acquire()  # between batches: nothing half-published
        except TimeoutError:
            _log.warning("outbox relay: abandoning a batch that did not finish in time")
        else:
            self._lock.release()  # the task waits on it, on the waker or on a backoff
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our own caller is being cancelled, not just the relay
        finally:
            self._stopping = False

    async def __aenter__(self) -> OutboxRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run(self) -> None:
        """Drain, then wait for a wake-up or the poll interval, forever (until cancelled).
        Failures are retried with backoff (see the module docstring)."""
        async with AsyncExitStack() as stack:
            if self._own_waker:
                await self._waker.start()
                stack.push_async_callback(self._waker.aclose)
            backoff = self.retry_backoff[0]
            while True:
                try:
                    _, error = await self._drain(interruptible=True)
                except _TRANSIENT as exc:
                    self._failed(f"database unavailable: {exc}")
                except Exception:
                    _log.exception("the outbox relay stopped on an unexpected error")
                    raise
                else:
                    if error is None:
                        self._recovered()
                        backoff = self.retry_backoff[0]
                        await self._purge_if_due()
                        await self._waker.wait(self.poll_interval)
                        continue
                    self._failed(f"publishing failed: {_describe(error)}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry_backoff[1])

    async def drain(self) -> int:
        """Publish every unsent row now; returns how many were published. For tests and
        shutdown. Raises what a publisher raised (the rows from there on stay unsent),
        `DatabaseUnavailable` or `TransactionConflict`."""
        count, error = await self._drain(interruptible=False)
        if error is not None:
            raise error
        return count

    # --- passes ---------------------------------------------------------------------------

    async def _drain(self, *, interruptible: bool) -> tuple[int, Exception | None]:
        """Batches until none is left or a publish fails: (rows published, its error).
        An interruptible drain also stops between batches when `aclose()` was called."""
        total = 0
        async with self._lock:
            while not (interruptible and self._stopping):
                if self.db.is_postgres:
                    fetched, sent, error = await self._locked_batch()
                else:
                    fetched, sent, error = await self._unlocked_batch()
                total += sent
                self.published += sent
                if error is not None or fetched < self.batch_size:
                    # A batch short of the limit was the last: anything committed since
                    # then has woken the waker, so the next pass picks it up.
                    return total, error
            return total, None

    async def _locked_batch(self) -> tuple[int, int, Exception | None]:
        """PostgreSQL: fetch (SKIP LOCKED), publish, mark sent, in one transaction."""
        async with self.db.transaction() as conn:
            rows = await fetch_unsent(conn, self.batch_size)
            sent, error = await self._publish(rows)
            await mark_sent(conn, sent)
        return len(rows), len(sent), error

    async def _unlocked_batch(self) -> tuple[int, int, Exception | None]:
        """SQLite: read, publish with no transaction held, then mark sent."""
        async with self.db.read() as conn:
            rows = await fetch_unsent(conn, self.batch_size)
        sent, error = await self._publish(rows)
        if sent:
            async with self.db.transaction() as conn:
                await mark_sent(conn, sent)
        return len(rows), len(sent), error

    async def _publish(self, rows: Sequence[OutboxMessage]) -> tuple[list[int], Exception | None]:
        """Publish `rows` in order, one call per run of one channel: (ids published, the
        error that stopped it)."""
        sent: list[int] = []
        for channel, group in groupby(rows, key=lambda row: row.channel):
            run = list(group)
            try:
                publisher = self._publishers.get(channel)
                if publisher is None:  # written by a newer Loom, or by hand
                    raise LookupError(f"no publisher for the outbox channel {channel!r}")
                async with asyncio.timeout(self.publish_timeout):
                    await publisher([(row.envelope, row.key) for row in run])
            # Whatever the broker side raises, the rows stay unsent and are retried: the
            # outbox exists so that a broker outage loses nothing. Reported by the caller.
            except Exception as exc:
                return sent, exc
            sent.extend(row.id for row in run)
        return sent, None

    async def _purge_if_due(self) -> None:
        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + self.purge_interval
        try:
            async with self.db.transaction() as conn:
                purged = await purge_sent(conn, utcnow() - self.keep_sent)
        except _TRANSIENT as exc:
            retry = min(60.0, self.purge_interval)
            _log.warning("purging sent outbox rows failed (%s); next try in %.0fs", exc, retry)
            self._next_purge = time.monotonic() + retry
            return
        if purged:
            _log.info("purged %d sent outbox rows older than %s", purged, self.keep_sent)

    # --- outage reporting: once per outage ------------------------------------------------

    def _failed(self, reason: str) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            _log.warning(
                "outbox relay: %s; keeping the messages and retrying (backoff %g to %gs)",
                reason,
                *self.retry_backoff,
            )
        else:
            _log.debug("outbox relay: still failing: %s", reason)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            _log.warning(
                "outbox relay: publishing again after %.1fs; the kept messages are sent",
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
