"""Login rate limiting per username and per client address (DESIGN §5: 429 + Retry-After).

A sliding-window log: for each key the limiter keeps the times of its last `limit`
failures (a `deque` with that `maxlen`), and a key is blocked while `limit` failures fall
within `window` seconds — until the oldest of them leaves the window, which is the wait
it reports. Usernames and addresses have separate limits: many people may share one
address (a NAT, a proxy), so its limit is higher.

In memory, per process: with several replicas an attacker gets `replicas × limit`
attempts per window, which still stops online guessing (argon2 bounds the rest).
Memory is bounded: at most `max_keys` keys of each kind, the least recently failed
evicted first. The clock is injectable so tests need no sleeping; the limiter does no
I/O and has no awaits, so it needs no lock on one event loop.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

__all__ = ["LoginLimiter", "retry_after"]


class _Window:
    """The failure log of one kind of key (usernames or addresses)."""

    def __init__(self, limit: int, window: float, max_keys: int) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()

    def wait(self, key: str, now: float) -> float | None:
        log = self.failures.get(key)
        if log is None or len(log) < self.limit:
            return None
        remaining = log[0] + self.window - now
        return remaining if remaining > 0 else None

    def record(self, key: str, now: float) -> None:
        log = self.failures.get(key)
        if log is None:
            log = self.failures[key] = deque(maxlen=self.limit)
        else:
            self.failures.move_to_end(key)
        log.append(now)
        self._evict(now)

    def reset(self, key: str) -> None:
        self.failures.pop(key, None)

    def forget_one(self, key: str) -> None:
        log = self.failures.get(key)
        if log:
            log.pop()
            if not log:
                del self.failures[key]

    def _evict(self, now: float) -> None:
        # Keys are ordered by their last failure, so the stale ones are at the front.
        while self.failures:
            key, log = next(iter(self.failures.items()))
            if log[-1] > now - self.window and len(self.failures) <= self.max_keys:
                break
            del self.failures[key]


class LoginLimiter:
    """Counts failed logins: `begin` before verifying a password (it counts the attempt),
    `record_success` after a good one. (`check` and `record_failure` are the two halves
    of `begin`.)

    `max_attempts` failures per username and `max_attempts_per_address` per client
    address are allowed within any `window` seconds. Raises `ValueError` for a limit
    below 1, a window or `max_keys` that is not positive.
    """

    def __init__(
        self,
        max_attempts: int = 5,
        window: float = 60.0,
        *,
        max_attempts_per_address: int = 20,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_attempts < 1 or max_attempts_per_address < 1:
            raise ValueError("the attempt limits must be at least 1")
        if window <= 0 or max_keys < 1:
            raise ValueError("window and max_keys must be positive")
        self._clock = clock
        self._usernames = _Window(max_attempts, window, max_keys)
        self._addresses = _Window(max_attempts_per_address, window, max_keys)

    def check(self, username: str, address: str) -> float | None:
        """Seconds the caller must wait before trying again (for `Retry-After`), or `None`
        when a login attempt may go ahead. Raises nothing."""
        now = self._clock()
        waits = [
            wait
            for wait in (
                self._usernames.wait(_user_key(username), now),
                self._addresses.wait(address, now),
            )
            if wait is not None
        ]
        return max(waits) if waits else None

    def begin(self, username: str, address: str) -> float | None:
        """`check`, and when the attempt may go ahead, count it as a failure at once
        (`record_success` forgets it). Counting before the password is verified means
        concurrent attempts cannot all pass the check while the slow verification of the
        first ones runs. Returns the wait as `check` does. Raises nothing."""
        wait = self.check(username, address)
        if wait is None:
            self.record_failure(username, address)
        return wait

    def record_failure(self, username: str, address: str) -> None:
        """Count a failed login (wrong password or unknown user) for both keys."""
        now = self._clock()
        self._usernames.record(_user_key(username), now)
        self._addresses.record(address, now)

    def record_success(self, username: str, address: str) -> None:
        """Forget the username's failures, and the one attempt `begin` counted for the
        address. The address keeps its other failures: otherwise one valid account would
        let an attacker reset the address limit at will."""
        self._usernames.reset(_user_key(username))
        self._addresses.forget_one(address)

    def __len__(self) -> int:
        """Keys held (usernames plus addresses), to observe the memory bound."""
        return len(self._usernames.failures) + len(self._addresses.failures)


def _user_key(username: str) -> str:
    # "Admin" and "admin" share a counter, so case changes do not multiply attempts.
    return username.casefold()


def retry_after(seconds: float) -> str:
    """The `Retry-After` header value for a wait from `LoginLimiter.check`: whole
    seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
