"""RedisRateLimiter against a real redis-server, checked on its own grant timestamps.

Each grant is stamped with the slot's instant on the Redis server's clock (the
schedule the limiter hands out), so the limits are checked exactly whatever
the machine's load: a slow process sends later, never earlier.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
from collections import defaultdict
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from botmsg_async import BotMessageClient, CoordinationError, InvalidRequestError
from botmsg_async.shared import RedisRateLimiter, account_name
from botmsg_async.testing import FakeBotMessageServer
from tests.redis_server import RedisServer

from ._procs import grant_worker

Grants = list[tuple[str, float]]


def _most_in_any_window(stamps: list[float], width: float) -> int:
    stamps = sorted(stamps)
    most = start = 0
    for end, t in enumerate(stamps):
        while t - stamps[start] >= width - 1e-6:
            start += 1
        most = max(most, end - start + 1)
    return most


def _limiter(server: RedisServer, grants: Grants, **options: float | None) -> RedisRateLimiter:
    return RedisRateLimiter(
        server.url,
        name="t",
        on_grant=lambda department, at: grants.append((department, at)),
        rate=options.get("rate"),
        per_department_rate=options.get("per_department_rate"),
        burst=options.get("burst"),
    )


async def _take(limiter: RedisRateLimiter, departments: list[str], tasks: int) -> None:
    todo = iter(departments)

    async def task() -> None:
        for department in todo:
            await limiter.acquire(department)

    await asyncio.gather(*(task() for _ in range(tasks)))


def _check_rate(stamps: list[float], rate: float, burst: float) -> None:
    """No window of any width holds more than rate x width + burst grants."""
    for width in (0.05, 0.1, 0.25, 0.5, 1.0):
        assert _most_in_any_window(stamps, width) <= rate * width + burst, width


async def test_three_limiters_share_one_rate_fairly(redis_server: RedisServer) -> None:
    """Three limiters (as three workers) on one name: one rate and burst, every one served."""
    grants: list[Grants] = [[], [], []]
    limiters = [_limiter(redis_server, g, rate=200, burst=5) for g in grants]
    try:
        await asyncio.gather(*(_take(lim, ["d"] * 60, tasks=8) for lim in limiters))
    finally:
        for lim in limiters:
            await lim.aclose()
    stamps = [t for g in grants for _, t in g]
    assert len(stamps) == 180
    _check_rate(stamps, rate=200, burst=5)
    # First come, first served at Redis: each worker gets its share as they all wait.
    first_half = sorted(stamps)[:90]
    for g in grants:
        assert sum(t in first_half for _, t in g) >= 15


async def test_leases_keep_the_rate_exact(redis_server: RedisServer) -> None:
    """At a high rate a round trip leases several slots; the schedule stays exact."""
    grants: Grants = []
    async with _limiter(redis_server, grants, rate=2000, burst=20) as limiter:
        assert limiter._max_lease > 1
        await _take(limiter, ["d"] * 600, tasks=64)
    _check_rate([t for _, t in grants], rate=2000, burst=20)


async def test_per_department_rates_are_exact(redis_server: RedisServer) -> None:
    """Per-department limits across two limiters: each department keeps its own rate."""
    for rate in (None, 1000.0):  # alone, and under a global limit that does not bind
        await _flush(redis_server)
        grants: list[Grants] = [[], []]
        limiters = [_limiter(redis_server, g, rate=rate, per_department_rate=50) for g in grants]
        departments = [f"d{i % 3}" for i in range(60)]
        try:
            await asyncio.gather(*(_take(lim, departments, tasks=8) for lim in limiters))
        finally:
            for lim in limiters:
                await lim.aclose()
        by_department: defaultdict[str, list[float]] = defaultdict(list)
        for department, t in (pair for g in grants for pair in g):
            by_department[department].append(t)
        assert sorted(by_department) == ["d0", "d1", "d2"]
        for stamps in by_department.values():
            assert len(stamps) == 40
            _check_rate(stamps, rate=50, burst=5)


async def _flush(server: RedisServer) -> None:
    async with aioredis.Redis.from_url(server.url) as r:
        await r.flushall()


async def test_a_pause_set_by_one_holder_stops_every_holder(redis_server: RedisServer) -> None:
    """One limiter's pause(0.5): no other limiter grants a slot until the pause ends."""
    grants: Grants = []
    flowing = asyncio.Event()

    def granted(department: str, at: float) -> None:
        grants.append((department, at))
        if len(grants) >= 20:
            flowing.set()

    async with (
        RedisRateLimiter(redis_server.url, name="t", rate=200, on_grant=granted) as other,
        _limiter(redis_server, [], rate=200) as told,
        aioredis.Redis.from_url(redis_server.url) as r,
    ):
        taking = asyncio.create_task(_take(other, ["d"] * 200, tasks=16))
        await flowing.wait()
        await told.pause(0.5)
        end = int(await r.get(f"botmsg:{{{told.name}}}:pause") or 0) / 1e6
        assert await told.paused_for() > 0.4
        await taking
    inside = [t for _, t in grants if end - 0.5 + 0.05 <= t < end]
    assert inside == []
    assert any(t >= end for _, t in grants)


async def test_redis_down_fails_closed_and_recovers(own_redis_server: RedisServer) -> None:
    """Redis killed: acquire and send raise CoordinationError, nothing sent; back: they work."""
    async with (
        FakeBotMessageServer(username="bot", password="pw") as server,
        RedisRateLimiter(own_redis_server.url, rate=100, name="t") as limiter,
        BotMessageClient(server.base_url, "bot", "pw", rate_limiter=limiter) as client,
    ):
        await client.send("d", "u", "one")
        own_redis_server.kill()
        with pytest.raises(CoordinationError, match="not sent"):
            await client.send("d", "u", "two")
        report = await client.send_many([("d", "u", "three"), ("d", "u", "four")])
        assert report.counts.failed == 2
        assert all(isinstance(r.error, CoordinationError) for r in report.results)
        assert server.requests == 1
        own_redis_server.start()
        for _ in range(50):  # the limiter tries Redis again a second after a failure
            try:
                await client.send("d", "u", "two")
                break
            except CoordinationError:
                await asyncio.sleep(0.1)
        assert server.requests == 2


async def test_fail_open_limits_each_process_alone(
    own_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """fail_open=True: with Redis away, slots come from a per-process limiter, with a warning."""
    async with RedisRateLimiter(
        own_redis_server.url, rate=1000, name="t", fail_open=True
    ) as limiter:
        await limiter.acquire("d")
        own_redis_server.kill()
        with caplog.at_level(logging.WARNING, logger="botmsg_async"):
            for _ in range(5):
                await limiter.acquire("d")
        assert "fail_open" in caplog.text
        assert limiter._fallback is not None


@pytest.mark.usefixtures("broken_log_handler")
async def test_redis_away_logged_to_a_raising_handler_changes_nothing(
    own_redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """fail_open with Redis away, the warnings' handler raising: slots and pauses still work."""
    async with RedisRateLimiter(
        own_redis_server.url, rate=1000, name="t", fail_open=True
    ) as limiter:
        await limiter.acquire("d")
        own_redis_server.kill()
        await limiter.acquire("d")  # from the per-process fallback, not the handler's error
        await limiter.pause(0.01)  # a 429's pause, kept locally
    assert "the handler broke" in capsys.readouterr().err


def test_names_and_arguments_are_checked() -> None:
    """A default name hashes base URL and user (never the password); bad input is refused."""
    name = account_name("https://api.example.com/", "bot")
    assert name == account_name("https://api.example.com", "bot")
    assert name != account_name("https://api.example.com", "other")
    assert "bot" not in name
    with pytest.raises(InvalidRequestError):
        RedisRateLimiter("redis://localhost", rate=10)  # no name, no account
    with pytest.raises(InvalidRequestError):
        RedisRateLimiter("redis://localhost", rate=0, name="n")
    with pytest.raises(InvalidRequestError):
        RedisRateLimiter("redis://localhost", rate=1, name="a{b}")
    with pytest.raises(InvalidRequestError) as refused:
        RedisRateLimiter("http://:hunter2@x", rate=1, name="n")
    assert "hunter2" not in str(refused.value)


@pytest.mark.slow
def test_four_processes_share_one_rate(redis_server: RedisServer, tmp_path: Path) -> None:
    """4 processes x 16 tasks on one 100/s limit: no window above rate + burst, all served."""
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    outs = [tmp_path / f"grants-{i}.json" for i in range(4)]
    processes = [
        context.Process(
            target=grant_worker,
            args=(redis_server.url, 100.0, None, ["d"], 60, 16, str(out), go),
        )
        for out in outs
    ]
    for p in processes:
        p.start()
    go.set()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    per_process = [json.loads(out.read_text()) for out in outs]
    stamps = [t for grants in per_process for _, t in grants]
    assert len(stamps) == 240
    _check_rate(stamps, rate=100, burst=10)


async def test_one_slot_per_round_trip_and_cancellation(redis_server: RedisServer) -> None:
    """lease_time=0: one slot per trip, none dropped as stale; a waiter may be cancelled."""
    grants: Grants = []
    async with RedisRateLimiter(
        redis_server.url,
        name="t",
        rate=1_000_000,  # never waits: each slot is due at once
        lease_time=0,
        on_grant=lambda department, at: grants.append((department, at)),
    ) as limiter:
        reserve = limiter._reserve
        trips = 0

        async def counted(mode: int, department: str, slots: int) -> tuple[int, int, list[int]]:
            nonlocal trips
            trips += 1
            if trips > 500:  # slots dropped as stale as soon as granted: it would never end
                raise AssertionError("the limiter keeps dropping its own slots")
            return await reserve(mode, department, slots)

        limiter._reserve = counted  # type: ignore[method-assign,assignment]
        await _take(limiter, ["d"] * 50, tasks=1)
        assert len(grants) == 50
        assert trips == limiter.round_trips == 50
    async with RedisRateLimiter(redis_server.url, name="slow", rate=0.5) as slow:
        await slow.acquire("d")
        waiter = asyncio.create_task(slow.acquire("d"))  # its slot is 2 s away
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter


@pytest.mark.parametrize("junk", [b"1" + b"0" * 400, b"-5", b"1e999", b"\xff", b""])
async def test_junk_on_the_pause_channel_is_ignored(redis_server: RedisServer, junk: bytes) -> None:
    """A message on the pause channel that is no pause of ours is ignored; the listener lives."""
    async with aioredis.Redis.from_url(redis_server.url) as r:
        limiter = RedisRateLimiter(redis_server.url, name="t", rate=1000)
        try:
            await limiter.acquire("d")  # subscribed from here on
            channel = f"botmsg:{{{limiter.name}}}:pause"
            await r.publish(channel, junk)
            await r.publish(channel, str(30 * 10**6))  # a real pause after it: still heard

            async def heard() -> None:
                while not await limiter.paused_for():  # noqa: ASYNC110 - no event for a pause heard
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(heard(), 10)
            assert 20 < await limiter.paused_for() <= 30
        finally:
            await limiter.aclose()  # the listener ends cleanly: no error of the junk


_NOT_OURS = {
    "a word": ("abc", None),
    "centuries ahead, no TTL": ("9000000000000000", None),
    "centuries ahead, a TTL": ("9000000000000000", 60_000),
    "an overflow": ("1e999", 60_000),
    "not a number": ("nan", 60_000),
    "a hash": (None, None),
}


@pytest.mark.parametrize("key", ["pause", "rate", "dept:d"])
@pytest.mark.parametrize("junk", sorted(_NOT_OURS))
async def test_a_schedule_or_pause_key_not_of_ours_is_taken_for_absent(
    redis_server: RedisServer, key: str, junk: str
) -> None:
    """A schedule or pause key some other writer left (junk, centuries ahead, a hash) is
    read as absent: sends go on at the rate, never an error nor a wait for centuries."""
    value, ttl = _NOT_OURS[junk]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if seconds > 60:  # the old script: a wait for centuries (or a pause looped on)
            raise AssertionError(f"the limiter waits {seconds:.3g} s")

    async with aioredis.Redis.from_url(redis_server.url) as r:
        full = f"botmsg:{{t}}:{key}"
        if value is None:
            await r.hset(full, "a", "1")
        else:
            await r.set(full, value, px=ttl)
        async with RedisRateLimiter(
            redis_server.url, name="t", rate=100, per_department_rate=50, sleep=sleep
        ) as limiter:
            for _ in range(3):
                await limiter.acquire("d")
            await limiter.pause(0.5)  # the pause key too is read (and then written) whole
            assert 0 < await limiter.paused_for() <= 0.5
        assert all(seconds <= 1 for seconds in slept)
