"""Hostile statuses and batch-wide faults over a real loopback connection.

Every status a peer can put on the wire ends as the delivery table says; an
outage, a long 429 pause, a closed client or refused credentials after an
ambiguous answer end a batch honestly, with every item accounted for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from botmsg_async import (
    APIStatusError,
    AuthenticationError,
    BatchStoppedError,
    BotMessageClient,
    ClientClosedError,
    DeliveryUnknownError,
    Outcome,
    RetryPolicy,
    ServerError,
    UnexpectedStatusError,
)
from botmsg_async._delivery import may_resend

from ..conftest import DEPT, USER, FakeClock, ScriptedServer, answer

MakeClient = Callable[..., BotMessageClient]


class RawStatusServer:
    """Answers every request with a raw status line of our choosing, then closes."""

    def __init__(self, status_line: bytes) -> None:
        self.status_line = status_line
        self.requests = 0
        self._server: asyncio.Server | None = None
        self.base_url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            self.requests += 1
            writer.write(self.status_line + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")
            await writer.drain()
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class BlockedSleep:
    """A sleep that holds every caller until released; says when ``n`` are waiting."""

    def __init__(self, n: int = 1) -> None:
        self.n = n
        self.waiters = 0
        self.all_waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.waiters += 1
        if self.waiters >= self.n:
            self.all_waiting.set()
        await self.release.wait()


@pytest.mark.parametrize("status", [303, 520, 524, 598, 599, 500, 502, 504, 507])
async def test_ambiguous_statuses_are_unknown_and_never_resendable(
    server: ScriptedServer, make_client: MakeClient, status: int
) -> None:
    """A status that may follow processing is UNKNOWN: one attempt, never resent under a new key."""
    server.default = answer(status, "processed, then the proxy gave up")
    async with make_client(server.base_url) as client:
        with pytest.raises(DeliveryUnknownError) as info:
            await client.send(DEPT, USER, "hi")
    assert isinstance(info.value, ServerError | UnexpectedStatusError)
    assert isinstance(info.value, APIStatusError)
    assert info.value.status == status
    assert info.value.idempotency_key is not None
    assert len(server.seen) == 1
    assert not may_resend(info.value)


@pytest.mark.parametrize(
    "status_line", [b"HTTP/1.1 199 Odd", b"HTTP/1.1 600 Beyond", b"HTTP/1.1 999 Far"]
)
async def test_statuses_outside_the_usual_range_are_unknown(
    make_client: MakeClient, status_line: bytes
) -> None:
    """A 1xx as final status, or a number past 599, proves nothing: UNKNOWN, one attempt."""
    raw = RawStatusServer(status_line)
    await raw.start()
    try:
        async with make_client(raw.base_url) as client:
            with pytest.raises(DeliveryUnknownError) as info:
                await client.send(DEPT, USER, "hi")
    finally:
        await raw.close()
    assert raw.requests == 1
    assert not may_resend(info.value)


@pytest.mark.parametrize("status", [408, 425, 503])
async def test_not_processed_statuses_are_retried_and_resendable(
    server: ScriptedServer, make_client: MakeClient, status: int
) -> None:
    """408, 425 and 503 prove nothing was processed: retried, then SENT."""
    server.script = [answer(status, "later"), answer(status, "later")]
    async with make_client(server.base_url) as client:
        result = await client.send(DEPT, USER, "hi")
    assert result.attempts == 3
    keys = {headers["Idempotency-Key"] for _, headers, _ in server.seen}
    assert len(keys) == 1


@pytest.mark.parametrize("status", [400, 404, 422, 501, 505])
async def test_rejected_statuses_fail_at_once(
    server: ScriptedServer, make_client: MakeClient, status: int
) -> None:
    """Other 4xx, 501 and 505: not processed and not worth retrying now."""
    server.default = answer(status, "no")
    async with make_client(server.base_url) as client:
        with pytest.raises(APIStatusError) as info:
            await client.send(DEPT, USER, "hi")
    assert not isinstance(info.value, DeliveryUnknownError)
    assert len(server.seen) == 1


async def test_policy_named_status_is_retried_not_unknown(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A status the policy names as 'not processed' is retried like a 503."""
    server.script = [answer(520, "gateway never forwarded")]
    policy = RetryPolicy(not_processed_statuses={520})
    async with make_client(server.base_url, retry=policy) as client:
        result = await client.send(DEPT, USER, "hi")
    assert result.attempts == 2


async def test_an_outage_stops_the_batch_instead_of_making_everything_unknown(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A service answering 502 to everything trips the default breaker: the rest SKIPPED."""
    server.default = answer(502, "<html>bad gateway</html>")
    async with make_client(server.base_url) as client:
        report = await client.send_many(
            ((DEPT, f"user-{i}", "hi") for i in range(2_000)), concurrency=4
        )
    assert isinstance(report.stopped_by, BatchStoppedError)
    assert report.stopped_by.reason == "consecutive_failures"
    assert isinstance(report.stopped_by.last_error, ServerError)
    assert 100 <= report.unknown <= 100 + 4
    assert report.skipped == 2_000 - report.unknown
    assert report.sent == report.failed == 0
    assert len(server.seen) == report.unknown


async def test_breaker_can_be_disabled(server: ScriptedServer, make_client: MakeClient) -> None:
    """stop_after_consecutive_failures=None lets every item be tried."""
    server.default = answer(502, "bad gateway")
    async with make_client(server.base_url) as client:
        report = await client.send_many(
            ((DEPT, f"user-{i}", "hi") for i in range(150)),
            concurrency=4,
            stop_after_consecutive_failures=None,
        )
    assert report.unknown == 150
    assert report.stopped_by is None


@pytest.fixture
def fake_time() -> FakeClock:
    """A controlled clock and sleep for a client: waits cost no real time."""
    return FakeClock()


def _throttle_once(retry_after: str) -> Callable[[web.Request], Any]:
    told = False

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal told
        if not told:
            told = True
            return web.json_response(
                {"detail": "slow"}, status=429, headers={"Retry-After": retry_after}
            )
        return web.json_response({"requestUuid": "r", "status": "SUCCESS", "messageUuid": "m"})

    return handler


async def test_a_long_429_pauses_the_batch_and_loses_nothing(
    server: ScriptedServer, make_client: MakeClient, fake_time: FakeClock
) -> None:
    """A 429 asking for 40 s (past the send deadline) pauses the batch; every item SENT."""
    server.default = _throttle_once("40")
    async with make_client(server.base_url, clock=fake_time, sleep=fake_time.sleep) as client:
        report = await client.send_many(
            ((DEPT, f"user-{i}", "hi") for i in range(300)), concurrency=8
        )
    assert report.sent == 300, report.results[:3]
    assert report.stopped_by is None
    assert sum(fake_time.waits) >= 40
    # The throttled item went again under the same key; nothing else twice.
    assert len(server.seen) == 301
    keys = [headers["Idempotency-Key"] for _, headers, _ in server.seen]
    assert len(set(keys)) == 300
    assert keys.count(keys[0]) == 2
    throttled = next(r for r in report.results if r.attempts == 2)
    assert throttled.outcome is Outcome.SENT


async def test_a_pause_past_max_pause_stops_the_batch(
    server: ScriptedServer, make_client: MakeClient, fake_time: FakeClock
) -> None:
    """A Retry-After past max_pause stops the batch: throttled item FAILED, the rest SKIPPED."""
    server.default = _throttle_once("4000")
    async with make_client(server.base_url, clock=fake_time, sleep=fake_time.sleep) as client:
        report = await client.send_many(
            ((DEPT, f"user-{i}", "hi") for i in range(50)), concurrency=1, max_pause=300
        )
    assert isinstance(report.stopped_by, BatchStoppedError)
    assert report.stopped_by.reason == "pause_too_long"
    assert report.failed == 1
    assert report.skipped == 49
    assert may_resend(report.results[0].error)
    assert len(server.seen) == 1


async def test_aclose_while_sends_wait_to_retry(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Closing the client during a retry wait: ClientClosedError, never aiohttp's RuntimeError."""
    server.default = answer(503, "later")
    sleep = BlockedSleep()
    client = make_client(server.base_url, sleep=sleep)
    send = asyncio.create_task(client.send(DEPT, USER, "hi"))
    await sleep.all_waiting.wait()
    await client.aclose()
    sleep.release.set()
    with pytest.raises(ClientClosedError) as info:
        await send
    assert info.value.attempts == 1
    assert len(server.seen) == 1


async def test_aclose_mid_batch_accounts_for_every_item(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Closed mid-batch: attempted items FAILED (503 proved nothing sent), the rest SKIPPED."""
    server.default = answer(503, "later")
    sleep = BlockedSleep(4)
    client = make_client(server.base_url, sleep=sleep)
    batch = asyncio.create_task(
        client.send_many(((DEPT, f"user-{i}", "hi") for i in range(40)), concurrency=4)
    )
    await sleep.all_waiting.wait()
    await client.aclose()
    sleep.release.set()
    report = await batch
    assert report.total == 40
    assert report.unknown == 0
    assert report.failed == len(server.seen) == 4
    assert report.skipped == 36
    assert all(isinstance(r.error, ClientClosedError) for r in report.results if r.error)
    assert isinstance(report.stopped_by, ClientClosedError)


async def test_aclose_after_an_ambiguous_attempt_is_unknown(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Closed while retrying a 500 (retry_ambiguous): the item is UNKNOWN, not FAILED."""
    server.default = answer(500, "oops")
    sleep = BlockedSleep()
    client = make_client(server.base_url, sleep=sleep, retry=RetryPolicy(retry_ambiguous=True))
    send = asyncio.create_task(client.send(DEPT, USER, "hi"))
    await sleep.all_waiting.wait()
    await client.aclose()
    sleep.release.set()
    with pytest.raises(DeliveryUnknownError) as info:
        await send
    assert isinstance(info.value.final_error, ClientClosedError)


async def test_refused_credentials_after_an_ambiguous_answer_stop_the_batch(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """retry_ambiguous: a 500 then 401s stays UNKNOWN, carries the 401, and stops the batch."""
    server.script = [answer(500, "oops")]
    server.default = answer(401, "who are you")
    policy = RetryPolicy(retry_ambiguous=True)
    async with make_client(server.base_url, retry=policy) as client:
        report = await client.send_many(
            ((DEPT, f"user-{i}", "hi") for i in range(100)), concurrency=1
        )
    first = report.results[0]
    assert first.outcome is Outcome.UNKNOWN
    assert isinstance(first.error, DeliveryUnknownError)
    assert isinstance(first.error.final_error, AuthenticationError)
    assert report.stopped_by is first.error
    assert report.skipped == 99
    assert len(server.seen) == 2


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop's exception handler was told during the test."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: seen.append(context))
    yield seen
    loop.set_exception_handler(previous)


async def test_break_from_bare_async_for_leaves_no_pending_task(
    server: ScriptedServer, make_client: MakeClient, loop_errors: list[dict[str, Any]]
) -> None:
    """break out of a bare async for, then aclose: no task is destroyed pending."""
    import gc

    client = make_client(server.base_url)
    async for _ in client.stream_many(((DEPT, f"u{i}", "hi") for i in range(1_000)), concurrency=8):
        break
    await client.aclose()
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0)
    assert [c.get("message") for c in loop_errors] == []
    assert len(server.seen) <= 2 * 8
