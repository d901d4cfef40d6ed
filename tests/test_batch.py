"""send_many / stream_many: order, concurrency, flat memory, rate, stopping, cancelling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from aiohttp import web

from botmsg_async import (
    AuthenticationError,
    BatchFailedError,
    BotMessageClient,
    InvalidRequestError,
    ItemResult,
    Outcome,
    Progress,
    RetryPolicy,
    SendRequest,
    SendResult,
    Status,
    TextMessage,
)

from .conftest import ScriptedServer, answer, client_tasks, drop, failure, ok, slow

MakeClient = Callable[..., BotMessageClient]


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

    async def hold_until_full(request: web.Request) -> web.StreamResponse:
        # Answer only once the limit was reached (or after 5 s): on a loaded
        # machine 150 connections can take longer to open than a fixed delay.
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 5
        while server.max_in_flight < 150 and loop.time() < give_up:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return await slow(0.05)(request)

    server.default = hold_until_full
    async with make_client(server.base_url) as client:
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
                    await asyncio.sleep(0.05)  # a slow consumer: workers must wait, not read on
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
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """rate_limit=100 never starts more than rate + burst items in any second.

    Stamped at each item's start (its grant from the limiter, on the loop's clock);
    only the bound is asserted, since a slow machine can only start fewer. The exact
    rate is tested on a virtual clock in test_limits.py.
    """
    stamps, on_start = _start_stamps()
    async with make_client(server.base_url) as client:
        report = await client.send_many(
            items(150), concurrency=32, rate_limit=100, on_start=on_start
        )
    assert report.sent == 150
    times = sorted(t for _, t in stamps)
    assert all(b - a >= 1.0 for a, b in zip(times, times[110:], strict=False))


async def test_per_department_rate_limit(server: ScriptedServer, make_client: MakeClient) -> None:
    """per_department_rate_limit holds one department back without holding back the others."""
    stamps, on_start = _start_stamps()
    work = [("slow-dept", f"u{i}", "x") for i in range(30)] + [
        (f"d{i}", "u", "x") for i in range(100)
    ]
    async with make_client(server.base_url) as client:
        report = await client.send_many(
            work, concurrency=32, per_department_rate_limit=50, on_start=on_start
        )
    assert report.sent == 130
    slow = sorted(t for dept, t in stamps if dept == "slow-dept")
    # 50/s with a burst of 5: the 30th starts (30 - 5) / 50 s after the first, at least.
    assert slow[-1] - slow[0] >= (30 - 5) / 50 * 0.999
    others = sorted(t for dept, t in stamps if dept != "slow-dept")
    assert others[-1] < slow[-1]  # the other departments did not wait for it


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


async def test_keep_options(server: ScriptedServer, make_client: MakeClient) -> None:
    """keep='failures' keeps only non-SENT results, keep='none' only counts."""
    server.script.append(failure("BAD", "no"))
    async with make_client(server.base_url, retry=RetryPolicy.none()) as client:
        failures = await client.send_many(items(50), concurrency=1, keep="failures")
        nothing = await client.send_many(items(50), concurrency=4, keep="none")
    assert (failures.sent, failures.failed, len(failures.results)) == (49, 1, 1)
    assert (nothing.sent, nothing.results) == (50, [])


async def test_progress_reports_completed(server: ScriptedServer, make_client: MakeClient) -> None:
    """on_progress gets snapshots of completed sends, and a final one."""
    server.default = slow(0.01)
    snapshots: list[Progress] = []
    async with make_client(server.base_url) as client:
        await client.send_many(
            items(60), concurrency=4, on_progress=snapshots.append, progress_interval=0.02
        )
    assert len(snapshots) >= 3
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
        async with client.stream_many(items(10_000), concurrency=4) as stream:
            async for _ in stream:
                break
        count = len(server.seen)
        await asyncio.sleep(0.05)
    assert len(server.seen) == count < 20


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
        assert client_tasks() == before
        await asyncio.sleep(0.05)
    assert len(server.seen) == 4


async def test_timed_out_read_inside_async_with_keeps_the_stream(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Inside ``async with``, a read cancelled by a timeout loses nothing; outside, it stops."""
    server.default = slow(0.2)
    async with make_client(server.base_url) as client:
        async with client.stream_many(items(6), concurrency=3) as stream:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(stream), 0.01)
            got = [item async for item in stream]
        assert sorted(r.index for r in got) == list(range(6))
        assert all(r.outcome is Outcome.SENT for r in got)

        bare = client.stream_many(items(6), concurrency=3)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(bare), 0.01)
        with pytest.raises(RuntimeError, match="async with"):
            await anext(bare)
        await bare.aclose()


async def test_batch_waits_out_a_429_pause_within_the_rate_limit(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """After a 429 pause the batch resumes at its rate limit, not in a burst of every worker."""
    server.script.append(answer(429, "slow down", headers={"Retry-After": "0.5"}))
    arrivals: list[float] = []

    async def timed(request: web.Request) -> web.StreamResponse:
        arrivals.append(time.perf_counter())
        return await ok(request)

    server.default = timed
    # Real sleeps: the pause and aiolimiter both run on the loop's clock.
    async with make_client(server.base_url, sleep=asyncio.sleep) as client:
        report = await client.send_many(
            items(30), concurrency=20, rate_limit=20, retry=RetryPolicy(backoff_initial=0)
        )
    assert report.sent == 30
    # At 20/s with a burst of two, a tenth of a second sees about four sends at most;
    # before the fix, the ten or so workers that got a token during the pause all
    # went at once.
    busiest = max(sum(1 for t in arrivals if a <= t < a + 0.1) for a in arrivals)
    assert busiest <= 7, busiest


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


@pytest.mark.parametrize(
    ("option", "value"),
    [("concurrency", 0), ("rate_limit", -1.0), ("stop_after_consecutive_failures", 0)],
)
async def test_bad_options_rejected(make_client: MakeClient, option: str, value: object) -> None:
    """Nonsense batch options raise InvalidRequestError before anything is sent."""
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
