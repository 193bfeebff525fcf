from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from loom_auth import LoginLimiter, problem_response, retry_after


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_five_failures_in_a_minute_block_the_username_until_the_first_leaves_the_window(
    clock: FakeClock,
) -> None:
    limiter = LoginLimiter(max_attempts=5, window=60.0, clock=clock)
    for _ in range(5):
        assert limiter.check("alice", "10.0.0.1") is None
        limiter.record_failure("alice", "10.0.0.1")
        clock.advance(10)
    # failures at 1000..1040; now 1050; the first leaves the window at 1060
    assert limiter.check("alice", "10.0.0.1") == pytest.approx(10.0)
    clock.advance(9.5)
    assert limiter.check("alice", "10.0.0.1") == pytest.approx(0.5)
    clock.advance(0.5)
    assert limiter.check("alice", "10.0.0.1") is None
    # the window slides: one more failure blocks again until the second one leaves
    limiter.record_failure("alice", "10.0.0.1")
    assert limiter.check("alice", "10.0.0.1") == pytest.approx(10.0)


def test_the_username_is_blocked_from_every_address(clock: FakeClock) -> None:
    limiter = LoginLimiter(max_attempts=3, window=60.0, clock=clock)
    for n in range(3):
        limiter.record_failure("alice", f"10.0.0.{n}")
    assert limiter.check("alice", "192.168.1.1") == pytest.approx(60.0)
    assert limiter.check("ALICE", "192.168.1.1") == pytest.approx(60.0)
    assert limiter.check("bob", "10.0.0.1") is None


def test_an_address_spraying_usernames_is_blocked(clock: FakeClock) -> None:
    limiter = LoginLimiter(max_attempts=5, window=60.0, max_attempts_per_address=10, clock=clock)
    for n in range(10):
        limiter.record_failure(f"user{n}", "203.0.113.9")
        clock.advance(1)
    assert limiter.check("someone-new", "203.0.113.9") == pytest.approx(50.0)
    assert limiter.check("someone-new", "203.0.113.10") is None


def test_success_resets_the_username_but_not_the_address(clock: FakeClock) -> None:
    limiter = LoginLimiter(max_attempts=3, window=60.0, max_attempts_per_address=4, clock=clock)
    for _ in range(2):
        assert limiter.begin("alice", "10.0.0.1") is None  # two wrong passwords
    assert limiter.begin("alice", "10.0.0.1") is None  # the right one
    limiter.record_success("alice", "10.0.0.1")
    assert limiter.check("alice", "10.0.0.2") is None
    assert limiter.begin("mallory", "10.0.0.1") is None
    assert limiter.begin("mallory", "10.0.0.1") is None
    assert limiter.check("carol", "10.0.0.1") is not None  # 4 failures on the address


def test_concurrent_attempts_are_counted_before_any_password_is_verified(
    clock: FakeClock,
) -> None:
    """30 guesses arriving together: `begin` lets exactly the limit through, though
    none of them has been verified (and failed) yet."""
    limiter = LoginLimiter(max_attempts=5, window=60.0, clock=clock)
    admitted = [limiter.begin("alice", f"10.0.0.{n}") is None for n in range(30)]
    assert admitted.count(True) == 5


def test_memory_is_bounded_and_stale_keys_are_evicted(clock: FakeClock) -> None:
    limiter = LoginLimiter(max_attempts=5, window=60.0, max_keys=100, clock=clock)
    for n in range(5000):
        limiter.record_failure(f"user{n}", f"198.51.{n // 256}.{n % 256}")
    assert len(limiter) <= 200
    for _ in range(5):
        limiter.record_failure("target", "10.9.9.9")
    assert limiter.check("target", "10.9.9.9") is not None  # the latest keys are kept
    clock.advance(61)
    limiter.record_failure("late", "10.0.0.1")
    assert len(limiter) == 2  # everything older than the window went at once


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        LoginLimiter(max_attempts=0)
    with pytest.raises(ValueError):
        LoginLimiter(window=0)
    with pytest.raises(ValueError):
        LoginLimiter(max_keys=0)


@pytest.mark.parametrize(("wait", "header"), [(0.01, "1"), (1.0, "1"), (14.2, "15"), (60.0, "60")])
def test_retry_after_rounds_up_to_whole_seconds(wait: float, header: str) -> None:
    assert retry_after(wait) == header


def test_a_login_route_answers_429_with_retry_after(clock: FakeClock) -> None:
    limiter = LoginLimiter(max_attempts=2, window=30.0, clock=clock)

    async def login(request: Request) -> Response:
        body = await request.json()
        address = request.client.host if request.client else "unknown"
        wait = limiter.begin(body["username"], address)
        if wait is not None:
            return problem_response(
                429,
                "Too Many Requests",
                "too many failed logins; try again later",
                headers={"Retry-After": retry_after(wait)},
            )
        if body["password"] != "right password":
            return problem_response(401, "Unauthorized", "wrong username or password")
        limiter.record_success(body["username"], address)
        return JSONResponse({"ok": True})

    client = TestClient(Starlette(routes=[Route("/login", login, methods=["POST"])]))
    wrong = {"username": "alice", "password": "guess"}
    assert client.post("/login", json=wrong).status_code == 401
    clock.advance(12.5)
    assert client.post("/login", json=wrong).status_code == 401
    refused = client.post("/login", json={"username": "alice", "password": "right password"})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "18"  # 30 - 12.5 = 17.5, rounded up
    assert refused.headers["content-type"] == "application/problem+json"
    clock.advance(17.5)
    ok = client.post("/login", json={"username": "alice", "password": "right password"})
    assert ok.status_code == 200
