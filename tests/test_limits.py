"""The in-process rate limiter, on a virtual clock: exact rates, bursts and pauses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from benchmarks.stamps import most_in_window
from botmsg_async import BotMessageClient, InvalidRequestError, LocalRateLimiter
from botmsg_async._limits import PauseOnly, _PerKeyBuckets, _smooth_bucket

from .conftest import DEPT, USER, FakeClock, ScriptedServer, answer, virtual_time

MakeClient = Callable[..., BotMessageClient]


async def _grants(limiter: LocalRateLimiter, keys: list[str], workers: int) -> list[float]:
    loop = asyncio.get_running_loop()
    todo = iter(keys)
    stamps: list[float] = []

    async def worker() -> None:
        for key in todo:
            await limiter.acquire(key)
            stamps.append(loop.time())

    await asyncio.gather(*(worker() for _ in range(workers)))
    return stamps


async def test_global_rate_is_exact_on_a_virtual_clock() -> None:
    """rate=100: 1,010 grants take 10 s after the burst; no 1 s window holds more than 110."""
    loop = asyncio.get_running_loop()
    with virtual_time(loop):
        limiter = LocalRateLimiter(rate=100)
        begun = loop.time()
        stamps = await _grants(limiter, ["d"] * 1_010, workers=64)
    assert len(stamps) == 1_010
    assert max(stamps) - begun == pytest.approx(10.0, rel=0.01)
    assert most_in_window(stamps, 1.0) <= 100 + 10


async def test_per_department_rate_holds_each_department_alone() -> None:
    """per_department_rate=5: a busy department waits, the others are not slowed."""
    loop = asyncio.get_running_loop()
    with virtual_time(loop):
        limiter = LocalRateLimiter(per_department_rate=5)
        begun = loop.time()
        slow = await _grants(limiter, ["busy"] * 51, workers=8)
        quick = await _grants(limiter, [f"d{i}" for i in range(200)], workers=8)
    assert max(slow) - begun == pytest.approx(10.0, rel=0.02)
    assert most_in_window(slow, 1.0) <= 5 + 1
    assert max(quick) - max(slow) < 0.01  # 200 departments at once: no wait


async def test_pause_is_shared_and_only_extends() -> None:
    """A pause is seen by every holder, and a shorter one never cuts a longer one short."""
    now = [100.0]
    limiter = LocalRateLimiter(clock=lambda: now[0])
    assert await limiter.paused_for() == 0.0
    await limiter.pause(30.0)
    await limiter.pause(5.0)
    assert await limiter.paused_for() == 30.0
    now[0] += 29.0
    assert await limiter.paused_for() == pytest.approx(1.0)
    now[0] += 2.0
    assert await limiter.paused_for() == 0.0


@pytest.mark.parametrize(
    ("rate", "per_department"),
    [
        (0, None),
        (-1.0, None),
        (None, 0.0),
        (float("nan"), None),
        (float("inf"), None),
        (None, float("inf")),
        (5e-324, None),
        (None, 1e-310),
        ("5", None),  # was a bare TypeError, naming neither rate
        (None, "5"),
        (True, None),
    ],
)
def test_bad_rates_are_refused(rate: float | None, per_department: float | None) -> None:
    """A rate that is not a finite number > 0 (with a finite period) is refused, naming it."""
    with pytest.raises(InvalidRequestError) as info:
        LocalRateLimiter(rate, per_department)
    assert info.value.field in ("rate_limit", "per_department_rate_limit")


async def test_idle_department_buckets_are_forgotten() -> None:
    """Idle per-department buckets are dropped, so a million departments do not grow memory."""
    loop = asyncio.get_running_loop()
    with virtual_time(loop):
        buckets = _PerKeyBuckets(1000.0, _smooth_bucket)
        for i in range(2_000):
            await buckets.acquire(f"dept-{i}")
            if i % 100 == 99:
                await asyncio.sleep(3.0)  # past the idle time: the older ones go
    assert len(buckets) <= 100


async def test_clients_sharing_a_limiter_share_a_429_pause(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A 429 seen by one client pauses another client that holds the same limiter."""
    now = [1000.0]

    def clock() -> float:
        return now[0]

    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds
        await asyncio.sleep(0)

    server.script = [answer(429, "slow", {"Retry-After": "7"})]
    limiter = LocalRateLimiter(clock=clock)
    first = make_client(server.base_url, rate_limiter=limiter, clock=clock, sleep=sleep)
    second = make_client(server.base_url, rate_limiter=limiter, clock=clock, sleep=sleep)
    async with first, second:
        assert (await first.send(DEPT, USER, "hi")).attempts == 2
        waited = len(waits)
        await limiter.pause(7.0)  # as the first client's 429 did, again
        assert (await second.send(DEPT, USER, "hi")).attempts == 1
    assert sum(waits[waited:]) >= 7.0  # the second client waited out the shared pause


async def test_a_clients_limiter_paces_single_sends(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """send() takes a slot from the client's limiter: the limiter sees every department."""
    seen: list[str] = []

    class Recording(LocalRateLimiter):
        async def acquire(self, department_uuid: str) -> None:
            seen.append(department_uuid)
            await super().acquire(department_uuid)

    async with make_client(server.base_url, rate_limiter=Recording()) as client:
        await client.send("dept-a", USER, "hi")
        await client.send_many([("dept-b", USER, "x"), ("dept-c", USER, "y")], concurrency=1)
    assert seen == ["dept-a", "dept-b", "dept-c"]


async def test_a_department_with_waiters_is_not_forgotten() -> None:
    """A bucket other departments' sends find idle while sends wait on it stays: rate holds."""
    loop = asyncio.get_running_loop()
    with virtual_time(loop):
        limiter = LocalRateLimiter(per_department_rate=1)
        begun = loop.time()
        stamps: list[float] = []

        async def busy() -> None:
            await limiter.acquire("busy")
            stamps.append(loop.time())

        async def later() -> None:
            # Past the idle time of a bucket that still has eight sends waiting.
            await asyncio.sleep(3.0)
            await limiter.acquire("other")
            await busy()

        await asyncio.gather(*(busy() for _ in range(10)), later())
    assert len(stamps) == 11
    assert max(stamps) - begun == pytest.approx(10.0, rel=0.02)
    assert most_in_window(stamps, 1.0) <= 1 + 1


async def test_both_rates_hold_when_a_busy_department_queues_behind_the_global_rate() -> None:
    """rate=10, per_department_rate=5, a backlog for one department: neither limit is passed."""
    loop = asyncio.get_running_loop()
    with virtual_time(loop):
        limiter = LocalRateLimiter(rate=10, per_department_rate=5)
        stamps: dict[str, list[float]] = {}

        async def send(key: str) -> None:
            await limiter.acquire(key)
            stamps.setdefault(key, []).append(loop.time())

        keys = ["busy"] * 100 + [f"d{i}" for i in range(100)]
        await asyncio.gather(*(send(key) for key in keys))
    every = [t for grants in stamps.values() for t in grants]
    assert len(every) == 200
    # A slot of the global rate is taken when the send goes, not while it still waits for
    # its department's: else the sends parked behind their department pass later, beside
    # the others' (15 in a second here).
    assert most_in_window(every, 1.0) <= 10 + 1
    assert most_in_window(stamps["busy"], 1.0) <= 5 + 1


async def test_a_pause_read_at_once_is_honoured_without_a_coroutine_or_a_slot(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A PauseOnly whose pause_left answers: no slot taken, paused_for never awaited, pause kept."""
    clock = FakeClock()
    inner = LocalRateLimiter(clock=clock)
    taken: list[str] = []

    class ReadAtOnce(PauseOnly):
        until = 0.0

        async def acquire(self, department_uuid: str) -> None:
            taken.append(department_uuid)  # PauseOnly takes no slot: never asked

        async def paused_for(self) -> float:
            raise AssertionError("the pause is read with pause_left, not awaited")

        def pause_left(self) -> float | None:
            return max(0.0, self.until - clock.now)

    limiter = ReadAtOnce(inner)
    async with make_client(
        server.base_url, rate_limiter=limiter, clock=clock, sleep=clock.sleep
    ) as client:
        assert (await client.send(DEPT, USER, "hi")).attempts == 1
        assert clock.waits == []
        limiter.until = clock.now + 7.0  # another holder's 429
        assert (await client.send(DEPT, USER, "hi")).attempts == 1
    assert sum(clock.waits) >= 7.0
    assert taken == []


async def test_a_pause_only_limiter_that_cannot_read_at_once_is_awaited(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """PauseOnly's own pause_left is None: the client awaits paused_for, and keeps the pause."""
    clock = FakeClock()
    inner = LocalRateLimiter(clock=clock)
    async with make_client(
        server.base_url, rate_limiter=PauseOnly(inner), clock=clock, sleep=clock.sleep
    ) as client:
        await inner.pause(5.0)
        assert (await client.send(DEPT, USER, "hi")).attempts == 1
    assert sum(clock.waits) >= 5.0


#: Rates no limiter can keep: not a number, not above 0, or not finite both ways (an
#: int too large for a float; a rate whose period, 1/rate, is infinite).
_UNUSABLE_RATES = [10**400, 1e-320, float("inf"), float("nan"), -1, 0, "5", True]
_RATE_IDS = ["10**400", "1e-320", "inf", "nan", "-1", "0", "str", "True"]


def _limiters() -> dict[str, Callable[[object], object]]:
    """Each rate limiter of the SDK, built with ``rate`` as its global rate."""
    import os

    from botmsg_async.bulk import ProcessRateLimiter
    from botmsg_async.shared import RedisRateLimiter

    def process(rate: object) -> object:
        fd = ProcessRateLimiter.create()
        try:
            return ProcessRateLimiter(fd, rate=rate)  # type: ignore[arg-type]
        finally:
            os.close(fd)

    return {
        "local": lambda rate: LocalRateLimiter(rate),  # type: ignore[arg-type]
        "process": process,
        # Refused before any connection: nothing listens on port 1.
        "redis": lambda rate: RedisRateLimiter("redis://127.0.0.1:1", rate=rate),  # type: ignore[arg-type]
    }


@pytest.mark.parametrize("kind", ["local", "process", "redis"])
@pytest.mark.parametrize("rate", _UNUSABLE_RATES, ids=_RATE_IDS)
def test_every_limiter_refuses_a_rate_it_cannot_keep_naming_it(kind: str, rate: object) -> None:
    """A rate that is not a finite number > 0 both ways is an InvalidRequestError naming it."""
    with pytest.raises(InvalidRequestError) as caught:
        _limiters()[kind](rate)
    assert caught.value.field in ("rate", "rate_limit")
