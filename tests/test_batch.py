"""send_many / stream_many: order, concurrency, flat memory, rate, stopping, cancelling."""

from __future__ import annotations

import asyncio
import gc
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import pytest
from aiohttp import web
from aioresponses import CallbackResult, aioresponses

from botmsg_async import (
    AuthenticationError,
    BatchFailedError,
    BatchOptions,
    BatchStream,
    BotMessageClient,
    InvalidRequestError,
    ItemResult,
    NotAttemptedError,
    Outcome,
    Progress,
    RetryPolicy,
    SendRequest,
    SendResult,
    Status,
    TextMessage,
)

from .conftest import (
    SUCCESS,
    ScriptedServer,
    answer,
    client_tasks,
    drop,
    failure,
    ok,
    slow,
    virtual_time,
)

MakeClient = Callable[..., BotMessageClient]
#: Batches on the virtual clock go over aioresponses: no real I/O, so the clock
#: can jump to the next timer and rates and pauses are exact.
MOCKED = "https://api.example.com"
ANY_SEND = re.compile(r"^https://api\.example\.com/communications/.*$")


def on_virtual_time(make_client: MakeClient, **options: Any) -> BotMessageClient:
    """A client for ``MOCKED`` whose waits and deadlines run on the loop's (virtual) clock."""
    loop = asyncio.get_running_loop()
    return make_client(MOCKED, sleep=asyncio.sleep, clock=lambda: loop.time(), **options)


def items(n: int, text: str = "hello") -> Iterator[tuple[str, str, str]]:
    for i in range(n):
        yield (f"dept-{i % 10}", f"user-{i}", text)


def user_of(request: web.Request) -> int:
    return int(request.match_info["tail"].split("/")[4].removeprefix("user-"))


async def test_ten_thousand_sent_in_order(server: ScriptedServer, make_client: MakeClient) -> None:
    """10,000 items over loopback all end SENT, reported in input order."""
    async with make_client(server.base_url) as client:
        report = await client.send_many(items(10_000), concurrency=64)
    assert report.sent == 10_000 == report.total == len(report.results)
    assert [r.index for r in report.results] == list(range(10_000))
    assert all(r.user_uuid == f"user-{r.index}" for r in report.results)
    assert report.messages_per_second > 0
    assert report.stopped_by is None
    report.raise_for_failures()
    assert len(server.seen) == 10_000


async def test_concurrency_fully_used_never_exceeded(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """With a slow server, in-flight requests reach the limit and never pass it."""

    full = asyncio.Event()

    async def hold_until_full(request: web.Request) -> web.StreamResponse:
        # No answer until the limit is reached, however long 150 connections take
        # to open; if it never is, the outer timeout fails the test.
        if server.in_flight >= 150:
            full.set()
        await full.wait()
        return await ok(request)

    server.default = hold_until_full
    async with make_client(server.base_url) as client, asyncio.timeout(120):
        report = await client.send_many(items(450), concurrency=150)
    assert report.sent == 450
    assert server.max_in_flight == 150


async def test_stream_is_lazy_and_bounded(server: ScriptedServer, make_client: MakeClient) -> None:
    """stream_many reads the input only as results are taken, with a fixed number of tasks."""
    pulled = 0

    def counting() -> Iterator[tuple[str, str, str]]:
        nonlocal pulled
        for item in items(2_000):
            pulled += 1
            yield item

    async with make_client(server.base_url) as client:
        baseline = len(client_tasks())
        taken = 0
        async with client.stream_many(counting(), concurrency=8) as stream:
            async for _ in stream:
                taken += 1
                assert pulled - taken <= 8 + 8 + 1  # in flight + queued + one being handed over
                # The workers, their runner, and aiohttp's writer task per request in flight.
                assert len(client_tasks()) - baseline <= 8 + 1 + 8
                if taken == 500:
                    # A slow consumer: wait until every item read so far has been
                    # sent and answered. Workers that read on would keep this from
                    # happening until the input ran out; bounded ones are all parked.
                    async with asyncio.timeout(60):
                        while stream.in_flight or len(server.seen) < pulled:  # noqa: ASYNC110
                            await asyncio.sleep(0.001)
                    assert pulled - taken <= 17
    assert taken == 2_000


async def test_huge_generator_streams_in_flat_memory(make_client: MakeClient) -> None:
    """A 200,000-item generator streams with bounded tasks and read-ahead (send stubbed out)."""
    client = make_client("http://127.0.0.1:9")
    sent = SendResult(Status.SUCCESS)

    async def fake_send(*args: object, **kwargs: object) -> SendResult:
        await asyncio.sleep(0)
        return sent

    client.send = fake_send  # type: ignore[method-assign]
    pulled = taken = peak_tasks = 0

    def counting() -> Iterator[tuple[str, str, str]]:
        nonlocal pulled
        for item in items(200_000):
            pulled += 1
            yield item

    async with client, client.stream_many(counting(), concurrency=32) as stream:
        async for _ in stream:
            taken += 1
            if taken % 1000 == 0:
                peak_tasks = max(peak_tasks, len(asyncio.all_tasks()))
                assert pulled - taken <= 65
    assert taken == 200_000
    assert peak_tasks <= 32 + 3


async def test_async_iterable_input(server: ScriptedServer, make_client: MakeClient) -> None:
    """An async generator of SendRequests works, read by many workers at once."""

    async def source() -> AsyncIterator[SendRequest]:
        for i in range(300):
            await asyncio.sleep(0)
            yield SendRequest("d", f"user-{i}", TextMessage(f"m{i}"))

    async with make_client(server.base_url) as client:
        report = await client.send_many(source(), concurrency=16)
    assert report.sent == 300
    assert [r.user_uuid for r in report.results] == [f"user-{i}" for i in range(300)]


def _start_stamps() -> tuple[list[tuple[str, float]], Callable[[int, SendRequest], None]]:
    """Record (department, loop time) as each item starts: the limiter's grant instants."""
    stamps: list[tuple[str, float]] = []

    def on_start(index: int, request: SendRequest) -> None:
        stamps.append((str(request.department_uuid), asyncio.get_running_loop().time()))

    return stamps, on_start


async def test_rate_limit_is_applied_to_the_batch(
    mock_http: aioresponses, make_client: MakeClient
) -> None:
    """rate_limit=100: 150 items take (150 - 10) / 100 s, never over rate + burst a second.

    Stamped at each item's start (its grant from the limiter), on a virtual clock.
    """
    mock_http.post(ANY_SEND, payload=SUCCESS, repeat=True)
    loop = asyncio.get_running_loop()
    stamps, on_start = _start_stamps()
    with virtual_time(loop):
        async with on_virtual_time(make_client) as client:
            report = await client.send_many(
                items(150), concurrency=32, rate_limit=100, on_start=on_start
            )
    assert report.sent == 150
    times = sorted(t for _, t in stamps)
    assert times[-1] - times[0] == pytest.approx((150 - 10) / 100, rel=0.01)
    assert all(b - a >= 1.0 for a, b in zip(times, times[110:], strict=False))


async def test_per_department_rate_limit(mock_http: aioresponses, make_client: MakeClient) -> None:
    """per_department_rate_limit holds one department back without holding back the others."""
    mock_http.post(ANY_SEND, payload=SUCCESS, repeat=True)
    loop = asyncio.get_running_loop()
    stamps, on_start = _start_stamps()
    work = [("slow-dept", f"u{i}", "x") for i in range(30)] + [
        (f"d{i}", "u", "x") for i in range(100)
    ]
    with virtual_time(loop):
        async with on_virtual_time(make_client) as client:
            begun = loop.time()
            report = await client.send_many(
                work, concurrency=32, per_department_rate_limit=50, on_start=on_start
            )
    assert report.sent == 130
    slow = sorted(t for dept, t in stamps if dept == "slow-dept")
    # 50/s with a burst of 5: the 30th starts (30 - 5) / 50 s after the first.
    assert slow[-1] - slow[0] == pytest.approx((30 - 5) / 50, rel=0.01)
    others = sorted(t for dept, t in stamps if dept != "slow-dept")
    assert others[-1] - begun < 0.01  # the other departments did not wait for it


async def test_auth_failure_stops_rest_skipped(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """After a 401 no new item starts; the rest are reported SKIPPED, not dropped."""
    server.default = answer(401, "no")
    seen: list[ItemResult] = []
    async with make_client(server.base_url) as client:
        report = await client.send_many(items(1000), concurrency=4, on_result=seen.append)
    assert isinstance(report.stopped_by, AuthenticationError)
    assert report.failed <= 4
    assert report.failed + report.skipped == 1000
    assert len(server.seen) == report.failed
    assert len(seen) == 1000 == len(report.results)
    assert {r.outcome for r in report.results} == {Outcome.FAILED, Outcome.SKIPPED}
    with pytest.raises(BatchFailedError) as info:
        report.raise_for_failures()
    assert info.value.skipped == report.skipped
    assert info.value.__cause__ is report.stopped_by


async def test_mixed_outcomes_are_honest(server: ScriptedServer, make_client: MakeClient) -> None:
    """SENT on SUCCESS, FAILED on a final error, UNKNOWN when delivery is unknown."""

    async def by_user(request: web.Request) -> web.StreamResponse:
        kind = user_of(request) % 4
        if kind == 1:
            return await failure("INVALID_USER", "no such user")(request)
        if kind == 2:
            return await answer(502, "<html>bad gateway</html>")(request)
        if kind == 3:
            return await drop(request)
        return await ok(request)

    server.default = by_user
    async with make_client(server.base_url) as client:
        report = await client.send_many(items(200), concurrency=10)
    assert (report.sent, report.failed, report.unknown, report.skipped) == (50, 50, 100, 0)
    for r in report.results:
        expected = [Outcome.SENT, Outcome.FAILED, Outcome.UNKNOWN, Outcome.UNKNOWN][r.index % 4]
        assert r.outcome is expected
        assert (r.result is not None) == (expected is Outcome.SENT)
        assert (r.error is not None) == (expected is not Outcome.SENT)
    assert len(server.seen) == 200  # the default policy sent nothing twice


async def test_consecutive_failures_stop(server: ScriptedServer, make_client: MakeClient) -> None:
    """stop_after_consecutive_failures stops the batch after that many failures in a row."""
    server.default = failure("INVALID_USER", "no")
    async with make_client(server.base_url) as client:
        report = await client.send_many(
            items(500), concurrency=1, stop_after_consecutive_failures=5
        )
    assert report.failed == 5
    assert report.skipped == 495
    assert report.stopped_by is not None


async def test_bad_items_fail_alone(server: ScriptedServer, make_client: MakeClient) -> None:
    """An invalid item is FAILED with InvalidRequestError; the others are sent."""
    work: list[object] = [("d", "u1", "ok"), ("d", "u/2", "x"), "garbage", ("d", "u3", "")]
    async with make_client(server.base_url) as client:
        report = await client.send_many(work, concurrency=2)  # type: ignore[arg-type]
    assert [r.outcome for r in report.results] == [Outcome.SENT] + [Outcome.FAILED] * 3
    assert all(isinstance(r.error, InvalidRequestError) for r in report.results[1:])
    assert len(server.seen) == 1


class _DeclinesFirst:
    """A ``Sender`` that chooses not to attempt the first ``n`` users (as a job's run
    does for items another run started), and sends the rest with ``client``."""

    def __init__(self, client: BotMessageClient, n: int) -> None:
        self._client = client
        self._n = n

    async def send(
        self,
        department_uuid: str,
        user_uuid: str,
        message: str | TextMessage,
        *,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
    ) -> SendResult:
        if int(user_uuid.removeprefix("user-")) < self._n:
            raise NotAttemptedError("not attempted: another run has it")
        return await self._client.send(
            department_uuid, user_uuid, message, retry=retry, idempotency_key=idempotency_key
        )

    def ensure_open(self) -> None:
        self._client.ensure_open()

    def pause_remaining(self) -> float:
        return self._client.pause_remaining()

    async def wait_out_pause(self) -> None:
        await self._client.wait_out_pause()


async def test_not_attempted_items_do_not_trip_the_breaker(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Items a sender chose not to attempt (NotAttemptedError) fail alone: no breaker."""
    async with make_client(server.base_url) as client:
        options = BatchOptions(concurrency=1, stop_after_consecutive_failures=5)
        async with BatchStream(_DeclinesFirst(client, 30), items(40), options) as stream:
            results = [r async for r in stream]
    assert stream.stopped_by is None
    outcomes = {r.index: r.outcome for r in results}
    assert [outcomes[i] for i in range(40)] == [Outcome.FAILED] * 30 + [Outcome.SENT] * 10
    assert len(server.seen) == 10


async def test_keep_options(server: ScriptedServer, make_client: MakeClient) -> None:
    """keep='failures' keeps only non-SENT results, keep='none' only counts."""
    server.script.append(failure("BAD", "no"))
    async with make_client(server.base_url, retry=RetryPolicy.none()) as client:
        failures = await client.send_many(items(50), concurrency=1, keep="failures")
        nothing = await client.send_many(items(50), concurrency=4, keep="none")
    assert (failures.sent, failures.failed, len(failures.results)) == (49, 1, 1)
    assert (nothing.sent, nothing.results) == (50, [])


async def test_progress_reports_completed(mock_http: aioresponses, make_client: MakeClient) -> None:
    """on_progress gets snapshots of completed sends, and a final one."""

    async def in_ten_ms(url: object, **kwargs: object) -> CallbackResult:
        await asyncio.sleep(0.01)
        return CallbackResult(payload=SUCCESS)

    mock_http.post(ANY_SEND, callback=in_ten_ms, repeat=True)
    snapshots: list[Progress] = []
    with virtual_time(asyncio.get_running_loop()):
        async with on_virtual_time(make_client) as client:
            await client.send_many(
                items(60), concurrency=4, on_progress=snapshots.append, progress_interval=0.02
            )
    # 15 rounds of 10 ms on the virtual clock: a snapshot every 20 ms, and the last.
    assert len(snapshots) >= 7
    assert snapshots[-1].sent == 60
    assert snapshots[-1].in_flight == 0
    assert all(s.in_flight <= 4 for s in snapshots)
    assert [s.done for s in snapshots] == sorted(s.done for s in snapshots)


async def test_cancel_mid_batch(server: ScriptedServer, make_client: MakeClient) -> None:
    """Cancelling send_many cancels in-flight sends and leaves no task running."""
    server.default = slow(10)
    results: list[ItemResult] = []
    async with make_client(server.base_url) as client:
        before = client_tasks()
        task = asyncio.create_task(
            client.send_many(items(100), concurrency=10, on_result=results.append)
        )
        while len(server.seen) < 10:  # noqa: ASYNC110 - polling a test server's log is enough
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = client_tasks()
    assert after == before
    assert results == []  # nothing unconfirmed was reported, let alone SENT


async def test_break_out_of_stream_stops_workers(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Leaving the async-with early stops the workers: no more requests are made."""
    async with make_client(server.base_url) as client:
        before = client_tasks()
        async with client.stream_many(items(10_000), concurrency=4) as stream:
            async for _ in stream:
                break
        # No worker is left, so no request can start any more.
        assert client_tasks() == before
    assert len(server.seen) < 20


async def test_cancelled_bare_async_for_stops_workers(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Cancelling a consumer iterating without ``async with`` still stops every worker."""
    server.default = slow(10)

    async def consume(client: BotMessageClient) -> None:
        async for _ in client.stream_many(items(10_000), concurrency=4):
            pass

    async with make_client(server.base_url) as client:
        before = client_tasks()
        task = asyncio.create_task(consume(client))
        while len(server.seen) < 4:  # noqa: ASYNC110 - polling a test server's log is enough
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(5):  # let the cancelled workers unwind
            await asyncio.sleep(0)
        # No worker is left, so no request can start any more.
        assert client_tasks() == before
    assert len(server.seen) == 4


async def test_timed_out_read_inside_async_with_keeps_the_stream(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Inside ``async with``, a read cancelled by a timeout loses nothing; outside, it stops."""
    # No answer until the first read has timed out: the timeout cannot lose the race.
    answering = asyncio.Event()

    async def when_allowed(request: web.Request) -> web.StreamResponse:
        await answering.wait()
        return await ok(request)

    server.default = when_allowed
    async with make_client(server.base_url) as client:
        async with client.stream_many(items(6), concurrency=3) as stream:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(stream), 0.01)
            answering.set()
            got = [item async for item in stream]
        assert sorted(r.index for r in got) == list(range(6))
        assert all(r.outcome is Outcome.SENT for r in got)

        answering.clear()
        bare = client.stream_many(items(6), concurrency=3)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(bare), 0.01)
        with pytest.raises(RuntimeError, match="async with"):
            await anext(bare)
        await bare.aclose()


async def test_batch_waits_out_a_429_pause_within_the_rate_limit(
    mock_http: aioresponses, make_client: MakeClient
) -> None:
    """After a 429 pause the batch resumes at its rate limit, not in a burst of every worker."""
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []

    def first_429(url: object, **kwargs: object) -> CallbackResult:
        arrivals.append(loop.time())
        if len(arrivals) == 1:
            return CallbackResult(status=429, body="slow down", headers={"Retry-After": "0.5"})
        return CallbackResult(payload=SUCCESS)

    mock_http.post(ANY_SEND, callback=first_429, repeat=True)
    # The pause (the client's sleep and clock) and the rate limiter both run on
    # the loop's clock, here a virtual one.
    with virtual_time(loop):
        async with on_virtual_time(make_client) as client:
            report = await client.send_many(
                items(30), concurrency=20, rate_limit=20, retry=RetryPolicy(backoff_initial=0)
            )
    assert report.sent == 30
    # At 20/s with a burst of two, a tenth of a second sees four sends at most;
    # before the fix, the ten or so workers that got a token during the pause all
    # went at once.
    busiest = max(sum(1 for t in arrivals if a <= t < a + 0.1) for a in arrivals)
    assert busiest <= 4, busiest


async def test_items_failing_before_io_still_let_the_loop_run(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A batch of items refused before any I/O does not starve other tasks."""
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async with make_client(server.base_url) as client:
        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0)
        before = ticks
        report = await client.send_many((("d", f"u{i}", "") for i in range(5_000)), concurrency=4)
        during = ticks - before
        beat.cancel()
        with pytest.raises(asyncio.CancelledError):
            await beat
    assert report.failed == 5_000
    assert server.seen == []
    assert during >= 1_000


async def test_input_errors_propagate(server: ScriptedServer, make_client: MakeClient) -> None:
    """An exception from the input iterator ends the batch with that exception."""

    def broken() -> Iterator[tuple[str, str, str]]:
        yield ("d", "u", "x")
        raise OSError("disk gone")

    async with make_client(server.base_url) as client:
        with pytest.raises(OSError, match="disk gone"):
            await client.send_many(broken(), concurrency=2)


async def test_an_input_error_keeps_the_cause_it_was_raised_from(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """The input's error reaches the caller as raised, ``raise ... from`` cause and all."""
    root = KeyError("row 7")

    def broken() -> Iterator[tuple[str, str, str]]:
        yield ("d", "u", "x")
        raise OSError("disk gone") from root

    async with make_client(server.base_url) as client:
        with pytest.raises(OSError, match="disk gone") as info:
            await client.send_many(broken(), concurrency=2)
    assert info.value.__cause__ is root


@pytest.mark.parametrize("source_kind", ["plain", "async"])
async def test_an_input_error_lets_the_sends_in_flight_finish_first(
    server: ScriptedServer, make_client: MakeClient, source_kind: str
) -> None:
    """The input failing mid-batch: the sends in flight finish and are reported, then it raises."""
    arrived = 0
    all_in = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        # Answers only once all three are at the server: none can finish before the
        # input has failed, and each must still be answered and reported.
        nonlocal arrived
        arrived += 1
        if arrived == 3:
            all_in.set()
        await all_in.wait()
        return await ok(request)

    server.default = held

    def plain() -> Iterator[tuple[str, str, str]]:
        yield from items(3)
        raise OSError("disk gone")

    async def in_turn() -> AsyncIterator[tuple[str, str, str]]:
        for item in items(3):
            yield item
        raise OSError("disk gone")

    reported: list[ItemResult] = []
    source = plain() if source_kind == "plain" else in_turn()
    async with make_client(server.base_url) as client:
        with pytest.raises(OSError, match="disk gone"):
            await client.send_many(source, concurrency=8, on_result=reported.append)
    assert sorted(r.user_uuid for r in reported) == ["user-0", "user-1", "user-2"]
    assert {r.outcome for r in reported} == {Outcome.SENT}
    assert arrived == 3


class _JournalFull(Exception):
    """A callback's own error (a journal's refused write)."""


def _fail_one_callback(
    callback: str, reported: list[ItemResult], failed: asyncio.Event
) -> dict[str, Any]:
    """``on_start`` raising for item 2, or ``on_result`` for items 0 and 2; both record."""

    def on_start(index: int, request: SendRequest) -> None:
        if callback == "on_start" and index == 2:
            failed.set()
            raise _JournalFull(f"no room for the start of {index}")

    def on_result(item: ItemResult) -> None:
        reported.append(item)
        if callback == "on_result" and item.index in (0, 2):
            failed.set()
            raise _JournalFull(f"no room for the outcome of {item.index}")

    return {"concurrency": 3, "on_start": on_start, "on_result": on_result}


@pytest.mark.parametrize("api", ["send_many", "stream_many"])
@pytest.mark.parametrize("callback", ["on_start", "on_result"])
async def test_a_callback_error_lets_the_sends_in_flight_finish_first(
    server: ScriptedServer, make_client: MakeClient, callback: str, api: str
) -> None:
    """A callback raising mid-batch: the sends in flight end SENT, are reported, then it raises."""
    arrived: set[int] = set()
    all_in = asyncio.Event()
    failed = asyncio.Event()
    # on_start fails for item 2 while items 0 and 1 are at the server; on_result
    # fails for item 0 (answered once all three are in) while 1 and 2 are there.
    held_in = 2 if callback == "on_start" else 3

    async def held(request: web.Request) -> web.StreamResponse:
        user = user_of(request)
        arrived.add(user)
        if len(arrived) == held_in:
            all_in.set()
        await all_in.wait()
        if callback == "on_start" or user != 0:
            await failed.wait()  # in flight when the callback fails
        return await ok(request)

    server.default = held
    reported: list[ItemResult] = []
    options = _fail_one_callback(callback, reported, failed)
    streamed: list[ItemResult] = []
    streams: list[BatchStream] = []

    async def run_batch(client: BotMessageClient) -> None:
        if api == "send_many":
            await client.send_many(items(5), **options)
            return
        async with client.stream_many(items(5), **options) as stream:
            streams.append(stream)
            async for item in stream:
                streamed.append(item)

    try:
        async with make_client(server.base_url) as client:
            with pytest.raises(_JournalFull) as info:
                await run_batch(client)
    finally:
        all_in.set()
        failed.set()
    outcomes = {r.index: r.outcome for r in reported}
    if callback == "on_start":
        # Item 2 is not sent (its on_start precedes any I/O) and is reported SKIPPED.
        assert outcomes == {0: Outcome.SENT, 1: Outcome.SENT, 2: Outcome.SKIPPED}
        assert arrived == {0, 1}
        assert str(info.value) == "no room for the start of 2"
        assert getattr(info.value, "__notes__", []) == []
    else:
        # on_result heard of every item in flight, though it had failed for one.
        assert outcomes == {0: Outcome.SENT, 1: Outcome.SENT, 2: Outcome.SENT}
        assert arrived == {0, 1, 2}
        assert str(info.value) == "no room for the outcome of 0"
        assert info.value.__notes__ == [
            "and 1 later error(s) of the input or a callback, dropped while the sends in flight "
            "finished"
        ]
    assert len(reported) == 3  # each once; items 3 and 4 were never taken
    if api == "stream_many":
        assert sorted((r.index, r.outcome) for r in streamed) == sorted(outcomes.items())
        counts = streams[0].counts
        assert counts.sent + counts.skipped + counts.failed + counts.unknown == 3
        assert counts.sent == (2 if callback == "on_start" else 3)


async def test_an_on_progress_error_lets_the_sends_in_flight_finish_first(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """on_progress raising with sends in flight: they end SENT and are reported, then it raises."""
    failed = asyncio.Event()
    arrived: list[int] = []

    async def held(request: web.Request) -> web.StreamResponse:
        arrived.append(user_of(request))
        await failed.wait()  # in flight when on_progress fails
        return await ok(request)

    def on_progress(progress: Progress) -> None:
        if progress.in_flight:
            failed.set()
            raise _JournalFull("no room for the progress line")

    server.default = held
    reported: list[ItemResult] = []
    try:
        async with make_client(server.base_url) as client:
            with pytest.raises(_JournalFull):
                await client.send_many(
                    items(3),
                    concurrency=3,
                    on_result=reported.append,
                    on_progress=on_progress,
                    progress_interval=0.001,
                )
    finally:
        failed.set()
    assert arrived
    assert sorted(r.user_uuid for r in reported) == sorted(f"user-{i}" for i in arrived)
    assert {r.outcome for r in reported} == {Outcome.SENT}


@pytest.mark.parametrize("api", ["send_many", "stream_many", "plain"])
async def test_a_callback_error_stops_a_batch_whose_input_waits_for_more(
    server: ScriptedServer, make_client: MakeClient, api: str
) -> None:
    """on_result raising while the input waits for items that never come: the batch ends, raises."""
    from botmsg_async._batch import Items, NotYet, drain

    never = asyncio.Event()  # a queue, a job: more items may come, but do not

    async def waits() -> AsyncIterator[tuple[str, str, str]]:
        for item in items(2):
            yield item
        await never.wait()
        yield ("dept-0", "user-9", "late")

    def not_ready() -> Iterator[tuple[str, str, str] | NotYet]:
        yield from items(2)
        while True:
            yield NotYet(never)

    reported: list[ItemResult] = []

    def on_result(item: ItemResult) -> None:
        reported.append(item)
        raise _JournalFull(f"no room for the outcome of {item.index}")

    async def run_batch(client: BotMessageClient) -> None:
        if api == "send_many":
            await client.send_many(waits(), concurrency=4, on_result=on_result)
        elif api == "stream_many":
            async with client.stream_many(waits(), concurrency=4, on_result=on_result) as stream:
                async for _ in stream:
                    pass
        else:
            options = BatchOptions(concurrency=4, on_result=on_result)
            await drain(BatchStream(client, cast("Items", not_ready()), options), lambda row: None)

    async with make_client(server.base_url) as client:
        # Only a guard: before the fix the batch waited for the input for ever.
        async with asyncio.timeout(30):
            with pytest.raises(_JournalFull):
                await run_batch(client)
    assert sorted((r.index, r.outcome) for r in reported) == [(0, Outcome.SENT), (1, Outcome.SENT)]


async def test_the_first_error_is_raised_when_the_input_fails_after_a_callback(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """on_result fails, then the input it woke fails too: the batch raises on_result's error."""
    woken = asyncio.Event()

    async def fails_when_woken() -> AsyncIterator[tuple[str, str, str]]:
        yield ("dept-0", "user-0", "hello")
        await woken.wait()
        raise OSError("the source went away")

    def on_result(item: ItemResult) -> None:
        woken.set()
        raise _JournalFull("no room for the outcome of 0")

    async with make_client(server.base_url) as client:
        with pytest.raises(_JournalFull) as info:
            await client.send_many(fails_when_woken(), concurrency=2, on_result=on_result)
    assert getattr(info.value, "__notes__", []) == []


async def test_a_callback_error_ends_a_429_pause_and_sends_nothing_more(
    mock_http: aioresponses, make_client: MakeClient
) -> None:
    """An on_progress error during a 429 pause: the paused item is not sent again, none after."""
    loop = asyncio.get_running_loop()
    arrivals: list[str] = []

    def first_429(url: object, **kwargs: object) -> CallbackResult:
        arrivals.append(str(url).split("/")[-3])
        if len(arrivals) == 1:
            return CallbackResult(status=429, body="slow down", headers={"Retry-After": "100"})
        return CallbackResult(payload=SUCCESS)

    def on_progress(progress: Progress) -> None:
        if arrivals:
            raise _JournalFull("no room for the progress line")

    mock_http.post(ANY_SEND, callback=first_429, repeat=True)
    reported: list[ItemResult] = []
    started = loop.time()
    with virtual_time(loop):
        async with on_virtual_time(make_client) as client:
            with pytest.raises(_JournalFull):
                await client.send_many(
                    items(2),
                    concurrency=1,
                    on_result=reported.append,
                    on_progress=on_progress,
                    retry=RetryPolicy(backoff_initial=0),
                )
        waited = loop.time() - started
    # Item 0 was answered "not processed" once, and is reported so: never resent
    # after the pause, nor item 1 taken.
    assert arrivals == ["user-0"]
    assert [(r.index, r.outcome) for r in reported] == [(0, Outcome.FAILED)]
    assert waited < 100  # the error ended the pause's wait (on the virtual clock)


@pytest.mark.parametrize(
    ("answer_first", "rate_limit", "after_the_first"),
    [
        # A 429: the throttled item waits for the pause, and is not sent again.
        ({"status": 429, "body": "slow", "headers": {"Retry-After": "100"}}, None, Outcome.FAILED),
        # One message per 100 s: the items taken after the first wait for the limiter.
        ({"payload": SUCCESS}, 0.01, Outcome.SENT),
    ],
    ids=["429 pause", "rate limit"],
)
async def test_stop_ends_the_waits_and_starts_nothing_more(
    mock_http: aioresponses,
    make_client: MakeClient,
    answer_first: dict[str, Any],
    rate_limit: float | None,
    after_the_first: Outcome,
) -> None:
    """stream.stop() during a pause or a rate-limit wait: no new request, the waiters SKIPPED."""
    loop = asyncio.get_running_loop()
    arrivals: list[str] = []

    def answer(url: object, **kwargs: object) -> CallbackResult:
        arrivals.append(str(url).split("/")[-3])
        return CallbackResult(**(answer_first if len(arrivals) == 1 else {"payload": SUCCESS}))

    mock_http.post(ANY_SEND, callback=answer, repeat=True)
    results: list[ItemResult] = []
    started = loop.time()
    with virtual_time(loop):
        async with on_virtual_time(make_client) as client:
            stream = client.stream_many(
                items(10),
                concurrency=4,
                rate_limit=rate_limit,
                retry=RetryPolicy(backoff_initial=0),
                # Once the first item was answered, every other worker is waiting.
                on_progress=lambda progress: stream.stop() if arrivals else None,
            )
            async with stream:
                results = [item async for item in stream]
        waited = loop.time() - started
    assert arrivals == ["user-0"]
    outcomes = {r.index: r.outcome for r in results}
    assert outcomes.pop(0) is after_the_first
    # The items taken but not attempted are reported, as never started.
    assert set(outcomes.values()) <= {Outcome.SKIPPED}
    assert waited < 100  # the stop ended the waits (on the virtual clock)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("concurrency", 0),
        ("rate_limit", -1.0),
        ("stop_after_consecutive_failures", 0),
        # Each of these raised a TypeError that named no option, or (a callback that
        # cannot be called) failed the batch once its first items had been sent.
        ("rate_limit", "5"),
        ("rate_limit", True),
        ("per_department_rate_limit", "5"),
        ("stop_after_consecutive_failures", "3"),
        ("stop_after_consecutive_failures", float("nan")),  # never tripped
        ("max_pause", None),
        ("max_pause", "60"),
        ("progress_interval", None),
        ("on_result", []),  # a list, not its append
        ("on_start", "journal"),
        ("on_progress", 1),
    ],
)
async def test_bad_options_rejected(make_client: MakeClient, option: str, value: object) -> None:
    """Nonsense batch options raise InvalidRequestError naming them before anything is sent."""
    async with make_client("http://127.0.0.1:9") as client:
        with pytest.raises(InvalidRequestError, match=option):
            await client.send_many(items(3), **{option: value})  # type: ignore[arg-type]


async def test_on_start_precedes_each_send_and_skips_skipped(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """on_start fires right before an item's first request, never for skipped or bad items."""
    events: list[tuple[str, int]] = []

    async def record(request: web.Request) -> web.StreamResponse:
        events.append(("request", user_of(request)))
        return await (answer(401, "no") if user_of(request) == 5 else ok)(request)

    server.default = record
    work: list[object] = [*items(5), "bad", *((f"d{i}", f"user-{i}", "x") for i in range(5, 40))]
    async with make_client(server.base_url) as client:
        report = await client.send_many(
            work,  # type: ignore[arg-type]
            concurrency=1,
            on_start=lambda index, request: events.append(("start", index)),
        )
    starts = [i for kind, i in events if kind == "start"]
    assert starts == [0, 1, 2, 3, 4, 6]  # index 5 is the bad item; 7 on were skipped
    for number, (kind, _) in enumerate(events):
        if kind == "request":
            assert events[number - 1][0] == "start"
    assert report.skipped == 34  # indices 7 to 40, after the 401 at index 6


async def test_workers_are_no_more_than_the_items(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A huge concurrency for a few items starts a worker per item, not one per slot."""
    workers_seen: list[int] = []

    def on_start(index: int, request: SendRequest) -> None:
        workers = [
            t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__name__", "") == "_work"
        ]
        workers_seen.append(len(workers))

    async with make_client(server.base_url) as client:
        report = await client.send_many(items(3), concurrency=20_000, on_start=on_start)
    assert report.sent == 3
    # One per item, and one more that finds the input used up.
    assert max(workers_seen) <= 3 + 1


async def test_cancelled_read_of_the_async_for_iterator_inside_async_with_loses_nothing(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Inside ``async with``, a cancelled read of ``aiter(stream)`` leaves it readable on."""
    arrived = asyncio.Event()
    answering = asyncio.Event()

    async def when_allowed(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await answering.wait()
        return await ok(request)

    server.default = when_allowed
    async with (
        make_client(server.base_url) as client,
        client.stream_many(items(4), concurrency=2) as stream,
    ):
        reader = aiter(stream)  # what ``async for`` reads, as a per-read timeout would

        async def read_one() -> ItemResult:
            return await anext(reader)

        read = asyncio.create_task(read_one())
        await arrived.wait()  # the read waits on a send the server holds
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        answering.set()
        got = [item async for item in reader]
    # On the old code the iterator ended there, silently: [] while the batch ran on.
    assert sorted(r.index for r in got) == list(range(4))


async def _callback_failed(stream_started: asyncio.Event) -> None:
    """Wait for the failing callback, then for the batch's task to end (loop turns, no clock)."""
    await stream_started.wait()
    while any("_observed_run" in repr(t) for t in client_tasks()):  # noqa: ASYNC110
        await asyncio.sleep(0)


@pytest.mark.parametrize("managed", [True, False], ids=["async-with", "bare"])
async def test_callback_error_after_an_early_exit_is_never_left_unretrieved(
    server: ScriptedServer, make_client: MakeClient, managed: bool
) -> None:
    """A stream left early after on_result raised: the block raises it; nothing is logged."""
    loop = asyncio.get_running_loop()
    logged: list[str] = []
    loop.set_exception_handler(lambda _, context: logged.append(context["message"]))
    failing = asyncio.Event()

    def on_result(item: ItemResult) -> None:
        if item.index == 1:
            failing.set()
            raise ValueError("journal full")

    try:
        async with make_client(server.base_url) as client:
            stream = client.stream_many(items(3), concurrency=1, on_result=on_result)
            if managed:

                async def leave_the_block_early(stream: BatchStream) -> None:
                    async with stream:
                        async for _ in stream:
                            await _callback_failed(failing)
                            break

                with pytest.raises(ValueError, match="journal full"):
                    await leave_the_block_early(stream)
            else:
                async for _ in stream:
                    await _callback_failed(failing)
                    break
            del stream
            for _ in range(5):  # let the async-for's finalizer run
                await asyncio.sleep(0)
            gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert logged == []  # old code: "Task exception was never retrieved"


async def test_aclose_from_another_task_ends_a_waiting_read(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """``aclose()`` from another task (a stop button) ends a read waiting on the stream cleanly."""
    arrived = asyncio.Event()

    async def hold(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.Event().wait()  # never answers: the close cancels the send
        raise AssertionError("unreachable")

    server.default = hold
    async with make_client(server.base_url) as client:
        stream = client.stream_many(items(3), concurrency=1)

        async def consume() -> list[ItemResult]:
            return [item async for item in stream]

        consumer = asyncio.create_task(consume())
        await arrived.wait()  # the consumer waits on the held send
        await stream.aclose()
        assert await consumer == []  # old code: TypeError, awaiting the runner aclose took


async def test_a_plain_source_that_is_not_ready_makes_the_batch_wait(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A plain iterator yielding NotYet: the batch waits for its event, then reads on, in order."""
    from collections import deque

    from botmsg_async._batch import Items, NotYet, drain

    ready = asyncio.Event()
    buffer = deque(items(5))
    later = list(items(12))[5:]
    waits = 0

    def refill() -> None:
        buffer.extend(later)
        later.clear()
        ready.set()

    def source() -> Iterator[tuple[str, str, str] | NotYet]:
        nonlocal waits
        while True:
            if buffer:
                yield buffer.popleft()
            elif later:
                waits += 1
                # A batch that did not wait on the event would spin here for ever.
                assert waits < 100, "the batch does not wait for NotYet's event"
                if waits == 1:
                    asyncio.get_running_loop().call_later(0.01, refill)
                ready.clear()
                yield NotYet(ready)
            else:
                return

    rows: list[Any] = []
    async with make_client(server.base_url) as client:
        stream = BatchStream(client, cast("Items", source()), BatchOptions(concurrency=4))
        await drain(stream, rows.append)
    assert [row[0] for row in sorted(rows)] == list(range(12))
    assert {row[3] for row in rows} == {Outcome.SENT}
    assert sorted(row[2] for row in rows) == sorted(f"user-{i}" for i in range(12))
    assert 1 <= waits <= 4  # each idle worker waited once, none spun
    assert stream.counts.sent == 12


@pytest.mark.parametrize("source_kind", ["plain", "async"])
async def test_a_block_left_while_the_sends_after_an_input_error_finish_raises_it(
    server: ScriptedServer, make_client: MakeClient, source_kind: str
) -> None:
    """A `break` out of `async with` after the input failed, a send in flight: exit raises it."""
    release = asyncio.Event()
    failing = asyncio.Event()

    async def second_held(request: web.Request) -> web.StreamResponse:
        if user_of(request) == 1:
            await release.wait()  # in flight when the block is left
        return await ok(request)

    server.default = second_held

    def plain() -> Iterator[tuple[str, str, str]]:
        yield from items(2)
        failing.set()
        raise OSError("disk gone")

    async def in_turn() -> AsyncIterator[tuple[str, str, str]]:
        for item in items(2):
            yield item
        failing.set()
        raise OSError("disk gone")

    async def first_then_leave(client: BotMessageClient) -> None:
        source = plain() if source_kind == "plain" else in_turn()
        async with client.stream_many(source, concurrency=4) as stream:
            async for result in stream:
                assert result.user_uuid == "user-0"
                await failing.wait()
                break  # user-1 still in flight: the exit stops it

    try:
        async with make_client(server.base_url) as client:
            with pytest.raises(OSError, match="disk gone"):
                await first_then_leave(client)
    finally:
        release.set()


def _stray_cancel() -> asyncio.CancelledError:
    """A CancelledError raised by code of the caller's, not a cancellation of the batch."""
    return asyncio.CancelledError("a cancelled future's result(), read by a callback")


@pytest.mark.parametrize("api", ["send_many", "stream_many"])
@pytest.mark.parametrize(
    "culprit", ["on_start", "on_result", "on_progress", "plain source", "async source"]
)
async def test_a_callback_or_input_raising_cancelled_error_stops_the_batch_loudly(
    server: ScriptedServer, make_client: MakeClient, culprit: str, api: str
) -> None:
    """CancelledError out of a callback or the input is raised as an error, every item accounted."""
    reported: list[ItemResult] = []

    def on_start(index: int, request: SendRequest) -> None:
        if culprit == "on_start" and index == 2:
            raise _stray_cancel()

    def on_result(item: ItemResult) -> None:
        reported.append(item)
        if culprit == "on_result" and item.index == 2:
            raise _stray_cancel()

    def on_progress(progress: Progress) -> None:
        if culprit == "on_progress":
            raise _stray_cancel()  # at the latest by the call once the batch is done

    def plain() -> Iterator[tuple[str, str, str]]:
        for item in items(10):
            if culprit == "plain source" and item[1] == "user-3":
                raise _stray_cancel()
            yield item

    async def in_turn() -> AsyncIterator[tuple[str, str, str]]:
        for item in plain():
            if culprit == "async source" and item[1] == "user-3":
                # Awaiting something another task cancelled (a producer).
                cancelled = asyncio.get_running_loop().create_future()
                cancelled.cancel()
                await cancelled
            yield item

    options: dict[str, Any] = {
        "concurrency": 1,
        "on_start": on_start,
        "on_result": on_result,
        "on_progress": on_progress,
        "progress_interval": 3600.0,
    }
    streamed: list[ItemResult] = []

    async def run(client: BotMessageClient) -> None:
        source = in_turn() if culprit == "async source" else plain()
        if api == "send_many":
            await client.send_many(source, **options)
            return
        async with client.stream_many(source, **options) as stream:
            async for item in stream:
                streamed.append(item)

    async with make_client(server.base_url) as client:
        # On the old code the worker ended as if cancelled and the batch "succeeded":
        # no error, the items after it neither sent nor reported, or a bare
        # CancelledError reached a caller that nobody had cancelled.
        with pytest.raises(RuntimeError, match="CancelledError") as info:
            await run(client)
        assert isinstance(info.value.__cause__, asyncio.CancelledError)
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    # Every item taken is reported once, in on_result and in the stream alike.
    assert sorted(r.index for r in reported) == list(range(len(reported)))
    if api == "stream_many":
        assert streamed == reported
    if culprit != "on_progress":
        assert len(reported) == 3
        third = Outcome.SKIPPED if culprit == "on_start" else Outcome.SENT
        assert [r.outcome for r in reported] == [Outcome.SENT, Outcome.SENT, third]
    assert len(server.seen) == sum(r.outcome is Outcome.SENT for r in reported)


@pytest.mark.parametrize("limit", ["rate_limit", "per_department_rate_limit"])
async def test_a_stop_ends_the_wait_of_items_held_by_the_rate_limit(
    mock_http: aioresponses, make_client: MakeClient, limit: str
) -> None:
    """Refused credentials: items waiting for a rate-limit slot are SKIPPED at once, not paced."""

    async def refused_late(url: object, **kwargs: object) -> CallbackResult:
        await asyncio.sleep(0.5)  # the other items meanwhile wait for their slots
        return CallbackResult(status=401, body="no")

    mock_http.post(ANY_SEND, callback=refused_late, repeat=True)
    loop = asyncio.get_running_loop()
    with virtual_time(loop):
        async with on_virtual_time(make_client) as client:
            begun = loop.time()
            report = await client.send_many(
                [("d", f"u{i}", "x") for i in range(20)],
                concurrency=20,
                rate_limit=0.1 if limit == "rate_limit" else None,
                per_department_rate_limit=0.1 if limit != "rate_limit" else None,
            )
            took = loop.time() - begun
    assert (report.failed, report.skipped) == (1, 19)
    assert report.stopped_by is not None
    assert len(mock_http.requests) == 1
    # On the old code each of the 19 waited for its slot (10 s apart) before it was
    # SKIPPED: 190 s for a batch that sent nothing after its first answer.
    assert took < 1.0, took


async def test_a_stop_ends_the_wait_of_items_held_by_a_429_pause(
    mock_http: aioresponses, make_client: MakeClient
) -> None:
    """Refused credentials during a long 429 pause: the items waiting it out end at once."""
    second_in = asyncio.Event()

    async def by_user(url: object, **kwargs: object) -> CallbackResult:
        user = str(url).split("/")[-3]
        if user == "u0":
            await second_in.wait()
            return CallbackResult(status=429, body="slow down", headers={"Retry-After": "100"})
        if user == "u1":
            second_in.set()
            await asyncio.sleep(1)  # refused once the others wait out the pause
            return CallbackResult(status=401, body="no")
        return CallbackResult(payload=SUCCESS)

    async def the_rest_in_the_pause() -> AsyncIterator[tuple[str, str, str]]:
        yield ("d", "u0", "x")
        yield ("d", "u1", "x")
        await second_in.wait()
        await asyncio.sleep(0.1)  # u0's 429 is in: the pause has begun
        for i in range(2, 10):
            yield ("d", f"u{i}", "x")

    mock_http.post(ANY_SEND, callback=by_user, repeat=True)
    loop = asyncio.get_running_loop()
    with virtual_time(loop):
        async with on_virtual_time(make_client) as client:
            begun = loop.time()
            report = await client.send_many(
                the_rest_in_the_pause(),
                concurrency=10,
                retry=RetryPolicy(max_attempts=1),
            )
            took = loop.time() - begun
    outcomes = [r.outcome for r in report.results]
    assert outcomes == [Outcome.FAILED, Outcome.FAILED] + [Outcome.SKIPPED] * 8
    assert report.stopped_by is not None
    assert report.stopped_by.status == 401  # type: ignore[attr-defined]
    # On the old code the stop waited for the pause to end: 100 s and more.
    assert took < 2.0, took


@pytest.mark.parametrize("form", ["tuple", "SendRequest"])
@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("department_uuid", ["x"]),
        ("department_uuid", {"a": 1}),
        ("user_uuid", ["u"]),
        ("department_uuid", None),
        ("department_uuid", 7),
    ],
)
@pytest.mark.parametrize("limit", [None, "rate_limit", "per_department_rate_limit"])
async def test_an_item_with_an_id_that_is_not_text_fails_alone(
    server: ScriptedServer,
    make_client: MakeClient,
    form: str,
    field: str,
    bad: object,
    limit: str | None,
) -> None:
    """An id that is neither a str nor a UUID: that item FAILED, naming it; the others sent."""
    ids: dict[str, Any] = {"department_uuid": "d", "user_uuid": "u1"}
    ids[field] = bad
    item: Any = (
        (ids["department_uuid"], ids["user_uuid"], "hi")
        if form == "tuple"
        else SendRequest(ids["department_uuid"], ids["user_uuid"], "hi")
    )
    async with make_client(server.base_url) as client:
        # On the old code an unhashable department, under a per-department limit,
        # raised TypeError out of send_many: the items in flight were cancelled
        # (perhaps delivered, never reported) and the report was lost.
        report = await client.send_many(
            [("d", "u0", "hi"), item, ("d", "u2", "hi")],
            concurrency=2,
            rate_limit=1000 if limit == "rate_limit" else None,
            per_department_rate_limit=1000 if limit == "per_department_rate_limit" else None,
        )
    assert [r.outcome for r in report.results] == [Outcome.SENT, Outcome.FAILED, Outcome.SENT]
    failed = report.results[1]
    assert isinstance(failed.error, InvalidRequestError)
    assert failed.error.field == field
    # The id that is text is reported; the other as "" (it was reported as it was).
    assert (failed.department_uuid, failed.user_uuid) == (
        ("", "u1") if field == "department_uuid" else ("d", "")
    )
    assert len(server.seen) == 2


class _BrokenObserver:
    """A telemetry whose batch hook raises, against its contract (``_observe``)."""

    def send_started(self, *args: object) -> Any:
        raise AssertionError("no send starts")

    def limiter_waited(self, seconds: float) -> None:
        pass

    def batch_started(self, kind: str, concurrency: int) -> Any:
        raise _JournalFull("the observer is broken")


@pytest.mark.parametrize("api", ["send_many", "stream_many"])
async def test_a_batch_hook_that_raises_fails_the_batch_without_a_hang(
    server: ScriptedServer, make_client: MakeClient, api: str
) -> None:
    """A raising batch_started reaches the caller; a stream's reader is not left waiting."""

    async def run(client: BotMessageClient) -> None:
        if api == "send_many":
            await client.send_many(items(3))
            return
        async with client.stream_many(items(3)) as stream:
            await anext(stream)

    async with make_client(server.base_url, telemetry=_BrokenObserver()) as client:
        # A guard only: on the old code the stream's first read waited for ever.
        async with asyncio.timeout(60):
            with pytest.raises(_JournalFull):
                await run(client)
    assert server.seen == []


@pytest.mark.parametrize("managed", [False, True])
async def test_a_stream_closed_by_another_task_before_its_batch_ran_ends_the_read(
    server: ScriptedServer, make_client: MakeClient, managed: bool
) -> None:
    """aclose() from another task right after the first read began: that read ends, no hang."""
    async with make_client(server.base_url) as client:
        stream = client.stream_many(items(5))

        async def read() -> list[ItemResult]:
            if managed:
                async with stream:
                    return [item async for item in stream]
            return [item async for item in stream]

        reader = asyncio.create_task(read())
        await asyncio.sleep(0)  # the reader starts the batch and waits for its first result
        await stream.aclose()  # before the batch's task ran a step: it never will
        # A guard only: on the old code nothing woke the reader, which waited for ever.
        async with asyncio.timeout(60):
            got = await reader
    assert got == []
    assert server.seen == []


class _BreaksAfterSending(_DeclinesFirst):
    """A ``Sender`` with a defect: for user ``n`` it raises a plain RuntimeError once
    its request reached the service (the message may well be delivered)."""

    async def send(
        self,
        department_uuid: str,
        user_uuid: str,
        message: str | TextMessage,
        *,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
    ) -> SendResult:
        result = await self._client.send(
            department_uuid, user_uuid, message, retry=retry, idempotency_key=idempotency_key
        )
        if user_uuid == f"user-{self._n}":
            raise RuntimeError("a defect after the answer")
        return result


@pytest.mark.parametrize("api", ["drain", "stream"])
async def test_an_unexpected_error_of_a_send_is_unknown_and_the_rest_are_accounted(
    server: ScriptedServer, make_client: MakeClient, api: str
) -> None:
    """A send raising a non-BotMessageError: that item UNKNOWN, the rest in flight reported."""
    arrived: set[int] = set()
    all_in = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        arrived.add(user_of(request))
        if len(arrived) == 3:
            all_in.set()
        await all_in.wait()  # items 0, 1 and 2 are all in flight when 1 breaks
        return await ok(request)

    from botmsg_async._batch import drain

    server.default = held
    reported: list[ItemResult] = []
    options = BatchOptions(concurrency=3, on_result=reported.append)
    try:
        async with make_client(server.base_url) as client:
            stream = BatchStream(_BreaksAfterSending(client, 1), items(6), options)

            async def run() -> None:
                if api == "drain":
                    await drain(stream, lambda row: None)
                    return
                async with stream:
                    async for _ in stream:
                        pass

            with pytest.raises(RuntimeError, match="a defect after the answer"):
                await run()
    finally:
        all_in.set()
    outcomes = {r.index: r.outcome for r in reported}
    # It reached the service: it may be delivered, so it is unknown, never failed.
    assert outcomes[1] is Outcome.UNKNOWN
    assert outcomes[0] is Outcome.SENT
    assert outcomes[2] is Outcome.SENT
    assert len(reported) == len(outcomes)
    # Every other item that reached the service is reported SENT; any taken but not
    # started once it broke is SKIPPED; nothing reached the service unreported.
    assert arrived <= set(outcomes)
    for index, outcome in outcomes.items():
        if index != 1:
            assert outcome is (Outcome.SENT if index in arrived else Outcome.SKIPPED)
    assert stream.counts.unknown == 1
    assert stream.counts.sent == len(arrived) - 1
