"""Retries: what is retried, how long we wait, deadlines, budget, keys, cancellation."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest
from aioresponses import aioresponses

from botmsg_async import (
    ApiError,
    APIStatusError,
    AuthenticationError,
    BotMessageClient,
    BotMessageError,
    DeliveryUnknownError,
    InvalidResponseError,
    RateLimitedError,
    ResponseLostError,
    RetryBudget,
    RetryEvent,
    RetryPolicy,
    SendFailedError,
    SendResult,
    ServerError,
    Status,
    TransportError,
)
from botmsg_async._http import parse_retry_after
from botmsg_async._retry import TRANSIENT_PATTERN, full_jitter

from .conftest import (
    DEPT,
    USER,
    FakeClock,
    ScriptedServer,
    Sleeps,
    answer,
    client_tasks,
    drop,
    failure,
    slow,
)

MakeClient = Callable[..., BotMessageClient]
TRANSIENT = failure("TEMPORARILY_UNAVAILABLE", "Service temporarily unavailable, try again")
PERMANENT = failure("INVALID_USER", "User does not exist")


def failed(*errors: tuple[str, str]) -> SendResult:
    return SendResult(Status.FAILURE, errors=tuple(ApiError(c, d) for c, d in errors))


# -- classification -------------------------------------------------------------


@pytest.mark.parametrize(
    ("errors", "transient"),
    [
        ([("E1", "Request timed out")], True),
        ([("TIMEOUT", "")], True),
        ([("E2", "Service temporarily unavailable")], True),
        ([("E3", "please try again later")], True),
        ([("THROTTLED", "")], True),
        ([("E4", "rate limit exceeded")], True),
        ([("E5", "Too many requests")], True),
        ([("E6", "server busy")], True),
        ([("E7", "system overloaded")], True),
        ([("INVALID_USER", "User does not exist")], False),
        ([("E8", "do not retry")], False),
        ([("E1", "timeout"), ("BAD", "invalid body")], False),
        ([("SERVER_BUSY", "")], True),
        ([("ServerBusy", "")], True),
        ([("ServiceUnavailable", "")], True),
        ([("GatewayTimeout", "")], True),
        ([("ETIMEDOUT", "")], True),
        ([("E13", "please retry again later")], True),
        ([("E14", "Please retry later")], True),
        ([("E15", "retry after 5 seconds")], True),
        ([("E16", "Try later")], True),
        ([("RetryLater", "")], True),
        ([("E17", "Recipient country in blocklist")], False),
        ([("E18", "Registry after migration rejects this id")], False),
        ([("E9", "Business rule violated")], False),
        ([("E10", "Service permanently unavailable")], False),
        ([("E11", "User not found, try again with another id")], False),
        ([("E12", "Recipient blocked the bot; do not retry")], False),
        ([], False),
    ],
)
def test_default_failure_classification(errors: list[tuple[str, str]], transient: bool) -> None:
    """A FAILURE is transient only when every error speaks of a temporary condition."""
    assert RetryPolicy().classify(failed(*errors)) is transient


def test_known_codes_override_words() -> None:
    """transient_error_codes and permanent_error_codes beat the word rule."""
    policy = RetryPolicy(transient_error_codes={"Q_FULL"}, permanent_error_codes={"TIMEOUT"})
    assert policy.classify(failed(("Q_FULL", "queue full")))
    assert not policy.classify(failed(("TIMEOUT", "timed out")))


def test_is_transient_callable_overrides_everything() -> None:
    """A user classifier replaces the default rule."""
    policy = RetryPolicy(is_transient=lambda result: result.request_uuid == "again")
    assert policy.classify(SendResult(Status.FAILURE, request_uuid="again"))
    assert not policy.classify(failed(("E", "timeout")))


def test_pattern_is_documented_words() -> None:
    """The transient word list matches its documented stems and not 'retry'."""
    assert TRANSIENT_PATTERN.search("Rate-Limit")
    assert not TRANSIENT_PATTERN.search("retry")


# -- waits ------------------------------------------------------------------------


def test_full_jitter_bounds() -> None:
    """Backoff n is uniform in [0, min(initial * 2**(n-1), cap)]."""
    rng = random.Random(1)
    policy = RetryPolicy(backoff_initial=0.5, backoff_max=8.0)
    for attempt, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (9, 8.0)]:
        waits = [full_jitter(attempt, policy, rng) for _ in range(300)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap * 0.9
        assert min(waits) < cap * 0.1


def test_parse_retry_after_forms() -> None:
    """Retry-After in seconds, as an HTTP date, and retry-after-ms are all read."""
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3", None) == 3.0
    assert parse_retry_after("1.5", None) == 1.5
    assert (
        parse_retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), None, now=now)
        == 7.0
    )
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", None, now=now) == 0.0
    assert parse_retry_after("5", "250") == 0.25
    assert parse_retry_after("-3", None) == 0.0
    assert parse_retry_after("soon", None) is None
    assert parse_retry_after(None, None) is None
    assert parse_retry_after("nan", None) is None


# -- against a real loopback server ---------------------------------------------


async def test_transient_failures_retried_then_success(
    server: ScriptedServer, make_client: MakeClient, sleeps: Sleeps
) -> None:
    """Transient FAILUREs are retried with backoff; the result counts the attempts."""
    server.script += [TRANSIENT, TRANSIENT]
    events: list[RetryEvent] = []
    async with make_client(server.base_url, on_retry=events.append) as client:
        result = await client.send(DEPT, USER, "hi")
    assert result.attempts == 3
    assert len(server.seen) == 3
    assert [e.attempt for e in events] == [1, 2]
    assert isinstance(events[0].error, SendFailedError)
    assert len(sleeps.waits) == 2
    assert 0 <= sleeps.waits[0] <= 0.5
    assert 0 <= sleeps.waits[1] <= 1.0


async def test_permanent_failure_not_retried(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A permanent FAILURE is final after one attempt."""
    server.script.append(PERMANENT)
    async with make_client(server.base_url) as client:
        with pytest.raises(SendFailedError) as info:
            await client.send(DEPT, USER, "hi")
    assert not info.value.transient
    assert info.value.attempts == 1
    assert len(server.seen) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_429_and_503_retried(
    server: ScriptedServer, make_client: MakeClient, status: int
) -> None:
    """429 and 503 are safe to retry."""
    server.script.append(answer(status, "busy"))
    async with make_client(server.base_url) as client:
        result = await client.send(DEPT, USER, "hi")
    assert result.attempts == 2


async def test_max_attempts_then_last_error(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """After max_attempts the last error is raised with the attempt count."""
    server.default = answer(503, "down")
    async with make_client(server.base_url) as client:
        with pytest.raises(APIStatusError) as info:
            await client.send(DEPT, USER, "hi")
    assert info.value.status == 503
    assert info.value.attempts == 4
    assert len(server.seen) == 4


async def test_auth_failure_not_retried(server: ScriptedServer, make_client: MakeClient) -> None:
    """401 is final."""
    server.default = answer(401, "no")
    async with make_client(server.base_url) as client:
        with pytest.raises(AuthenticationError):
            await client.send(DEPT, USER, "hi")
    assert len(server.seen) == 1


@pytest.mark.parametrize(
    "handler",
    [answer(500, "x"), answer(502, "<html>"), answer(504, "x"), answer(200, "{trunc"), drop],
)
async def test_default_policy_never_resends_ambiguous(
    server: ScriptedServer, make_client: MakeClient, handler: object
) -> None:
    """Ambiguous outcomes raise DeliveryUnknownError after exactly one attempt by default."""
    server.script.append(handler)  # type: ignore[arg-type]
    async with make_client(server.base_url) as client:
        with pytest.raises(DeliveryUnknownError) as info:
            await client.send(DEPT, USER, "hi")
    assert len(server.seen) == 1
    assert info.value.attempts == 1
    assert info.value.idempotency_key == server.seen[0][1]["Idempotency-Key"]
    assert isinstance(info.value, ServerError | InvalidResponseError | ResponseLostError)


async def test_retry_ambiguous_resends_with_same_key(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """With retry_ambiguous, a dropped answer is retried under the same idempotency key."""
    server.script += [drop, answer(502, "x")]
    async with make_client(server.base_url, retry=RetryPolicy(retry_ambiguous=True)) as client:
        result = await client.send(DEPT, USER, "hi")
    assert result.attempts == 3
    keys = {headers["Idempotency-Key"] for _, headers, _ in server.seen}
    assert len(keys) == 1
    assert [h.get("X-Retry-Count") for _, h, _ in server.seen] == [None, "1", "2"]


async def test_earlier_ambiguous_attempt_makes_outcome_unknown(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """If an ambiguous attempt is followed by a definite failure, the outcome is still unknown."""
    server.script += [answer(502, "x"), PERMANENT]
    async with make_client(server.base_url, retry=RetryPolicy(retry_ambiguous=True)) as client:
        with pytest.raises(DeliveryUnknownError) as info:
            await client.send(DEPT, USER, "hi")
    assert isinstance(info.value.__cause__, SendFailedError)
    assert info.value.attempts == 2


async def test_keys_differ_between_messages_and_can_be_given(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """Each logical send gets its own key; a caller's key is used as given."""
    async with make_client(server.base_url) as client:
        await client.send(DEPT, USER, "a")
        await client.send(DEPT, USER, "b")
        await client.send(DEPT, USER, "c", idempotency_key="order-42")
    keys = [headers["Idempotency-Key"] for _, headers, _ in server.seen]
    assert len(set(keys)) == 3
    assert keys[2] == "order-42"


async def test_retry_after_is_honoured(
    server: ScriptedServer, make_client: MakeClient, sleeps: Sleeps
) -> None:
    """A 429's Retry-After sets the wait: max(backoff, retry_after) plus a little jitter."""
    server.script.append(answer(429, "slow", headers={"Retry-After": "3"}))
    async with make_client(server.base_url) as client:
        result = await client.send(DEPT, USER, "hi")
    assert result.attempts == 2
    assert 3.0 <= sleeps.waits[0] <= 3.3 + 1e-9


async def test_retry_after_http_date(
    server: ScriptedServer, make_client: MakeClient, sleeps: Sleeps
) -> None:
    """Retry-After as an HTTP date is honoured too."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)
    server.script.append(answer(503, "down", headers={"Retry-After": when}))
    async with make_client(server.base_url) as client:
        await client.send(DEPT, USER, "hi")
    assert 3.5 <= sleeps.waits[0] <= 5.6


async def test_retry_after_beyond_cap_fails_now(
    server: ScriptedServer, make_client: MakeClient, sleeps: Sleeps
) -> None:
    """A Retry-After above max_retry_after fails at once with RateLimitedError carrying it."""
    server.default = answer(429, "slow", headers={"Retry-After": "120"})
    async with make_client(server.base_url) as client:
        with pytest.raises(RateLimitedError) as info:
            await client.send(DEPT, USER, "hi")
    assert info.value.retry_after == 120.0
    assert sleeps.waits == []
    assert len(server.seen) == 1


async def test_retry_after_past_deadline_fails_now(
    server: ScriptedServer, make_client: MakeClient, sleeps: Sleeps
) -> None:
    """A Retry-After that would cross the deadline is not slept."""
    server.default = answer(429, "slow", headers={"Retry-After": "20"})
    async with make_client(server.base_url, retry=RetryPolicy(deadline=10)) as client:
        with pytest.raises(RateLimitedError):
            await client.send(DEPT, USER, "hi")
    assert sleeps.waits == []


async def test_deadline_never_exceeded(server: ScriptedServer) -> None:
    """With a controlled clock, waits plus attempts never pass the deadline."""
    server.default = TRANSIENT
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=50, backoff_initial=1.0, backoff_max=4.0, deadline=10.0)
    async with BotMessageClient(
        server.base_url,
        "u",
        "p",
        retry=policy,
        sleep=clock.sleep,
        clock=clock,
        retry_budget=RetryBudget(ratio=1, burst=1000, clock=clock),
    ) as client:
        for _ in range(20):
            clock.waits.clear()
            start = clock.now
            with pytest.raises(SendFailedError):
                await client.send(DEPT, USER, "hi")
            assert clock.now - start < 10.0
            assert len(clock.waits) >= 2


async def test_global_pause_after_429(server: ScriptedServer) -> None:
    """After a 429 with Retry-After, the client's other sends wait for that instant too."""
    clock = FakeClock()
    server.script.append(answer(429, "slow", headers={"Retry-After": "4"}))
    async with BotMessageClient(
        server.base_url, "u", "p", sleep=clock.sleep, clock=clock, retry=RetryPolicy.none()
    ) as client:
        with pytest.raises(RateLimitedError):
            await client.send(DEPT, USER, "first")
        start = clock.now
        await client.send(DEPT, USER, "second")
    assert clock.now - start >= 4.0
    assert len(server.seen) == 2


async def test_budget_exhaustion_returns_error_at_once(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """With no retry tokens left, a retryable failure is returned after one attempt."""
    server.default = answer(503, "down")
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, burst=2)
    async with make_client(server.base_url, retry_budget=budget) as client:
        with pytest.raises(APIStatusError):
            await client.send(DEPT, USER, "one")  # 1 + 2 retries: the burst
        assert len(server.seen) == 3
        with pytest.raises(APIStatusError) as info:
            await client.send(DEPT, USER, "two")
    assert info.value.attempts == 1
    assert len(server.seen) == 4


def test_budget_deposits_and_refills() -> None:
    """Each first attempt deposits `ratio`; time refills at min_per_second."""
    now = [0.0]
    budget = RetryBudget(ratio=0.5, min_per_second=1.0, burst=2, clock=lambda: now[0])
    assert budget.try_withdraw()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    budget.deposit()
    budget.deposit()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    now[0] = 1.5
    assert budget.try_withdraw()
    assert not budget.try_withdraw()


async def test_connect_failure_retried(make_client: MakeClient, sleeps: Sleeps) -> None:
    """A refused connection is retried (nothing was sent) until attempts run out."""
    async with make_client("http://127.0.0.1:9") as client:
        with pytest.raises(TransportError) as info:
            await client.send(DEPT, USER, "hi")
    assert info.value.attempts == 4
    assert len(sleeps.waits) == 3


async def test_cancel_during_backoff(server: ScriptedServer, make_client: MakeClient) -> None:
    """Cancelling a send while it waits to retry cancels cleanly and leaves no task behind."""
    server.default = TRANSIENT
    backing_off = asyncio.Event()

    async def sleep_forever(seconds: float) -> None:
        backing_off.set()
        await asyncio.Event().wait()

    async with make_client(server.base_url, sleep=sleep_forever) as client:
        before = client_tasks()
        task = asyncio.create_task(client.send(DEPT, USER, "hi"))
        await backing_off.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client_tasks() == before
    assert len(server.seen) == 1


async def test_per_call_policy(server: ScriptedServer, make_client: MakeClient) -> None:
    """send(retry=...) overrides the client's policy for that call only."""
    server.script += [TRANSIENT, TRANSIENT]
    async with make_client(server.base_url) as client:
        with pytest.raises(SendFailedError):
            await client.send(DEPT, USER, "hi", retry=RetryPolicy.none())
        result = await client.send(DEPT, USER, "hi")
    assert result.attempts == 2


async def test_pause_never_carries_a_send_past_its_deadline(server: ScriptedServer) -> None:
    """A send told to wait out a 429 pause either fits, jitter included, or fails unsent."""
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=1, deadline=4.3)
    outcomes: set[str] = set()
    async with BotMessageClient(
        server.base_url, "u", "p", sleep=clock.sleep, clock=clock, retry=RetryPolicy.none()
    ) as client:
        for _ in range(40):
            server.script.append(answer(429, "slow", headers={"Retry-After": "4"}))
            with pytest.raises(RateLimitedError):
                await client.send(DEPT, USER, "pauses everyone")
            posts, start = len(server.seen), clock.now
            try:
                await client.send(DEPT, USER, "waits", retry=policy)
            except RateLimitedError as exc:
                refused: RateLimitedError | None = exc
            else:
                refused = None
            if refused is None:
                assert clock.now - start < 4.3
                outcomes.add("sent")
            else:
                # Refused up front: nothing sent, no time spent.
                assert refused.attempts == 0
                assert len(server.seen) == posts
                assert clock.now == start
                outcomes.add("refused")
            clock.now += 10  # let the pause lapse before the next round
    assert outcomes == {"refused", "sent"}


async def test_no_retry_is_squeezed_into_the_deadline_after_a_long_wait(
    server: ScriptedServer,
) -> None:
    """A wait that overruns past the deadline ends the send with the last real failure."""
    server.default = TRANSIENT
    clock = FakeClock()

    async def late_sleep(seconds: float) -> None:
        # The loop was busy: the wait ends far later than asked.
        await clock.sleep(seconds + 20)

    async with BotMessageClient(
        server.base_url,
        "u",
        "p",
        retry=RetryPolicy(deadline=10.0),
        sleep=late_sleep,
        clock=clock,
    ) as client:
        with pytest.raises(SendFailedError) as info:
            await client.send(DEPT, USER, "hi")
    assert info.value.transient
    assert info.value.attempts == 1
    assert len(server.seen) == 1


async def test_attempt_timeout_is_clipped_to_deadline(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A slow attempt is cut at the deadline, not at the longer attempt timeout."""
    server.default = slow(3)
    policy = RetryPolicy(deadline=0.3, attempt_timeout=10)
    async with make_client(server.base_url, retry=policy) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ResponseLostError):
            await client.send(DEPT, USER, "hi")
        assert loop.time() - start < 2.0


def test_policy_validates_fields() -> None:
    """Nonsense policy values are refused with the field named."""
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="deadline"):
        RetryPolicy(deadline=0)


async def test_mocked_retry_then_success(mock_http: aioresponses, sleeps: Sleeps) -> None:
    """The retry loop also works over the mocked transport (one 503, then SUCCESS)."""
    url = re.compile(r"^https://api\.example\.com/.*$")
    mock_http.post(url, status=503, body="down")
    mock_http.post(url, payload={"status": "SUCCESS", "messageUuid": "m"})
    async with BotMessageClient("https://api.example.com", "u", "p", sleep=sleeps) as client:
        result = await client.send(DEPT, USER, "hi")
    assert result.attempts == 2
    assert len(sleeps.waits) == 1


async def test_handler_types_used(server: ScriptedServer) -> None:
    """The scripted server helpers answer what they say (guards the other tests)."""
    server.script.append(answer(418, "teapot"))
    async with BotMessageClient(server.base_url, "u", "p") as client:
        with pytest.raises(APIStatusError) as info:
            await client.send(DEPT, USER, "hi")
    assert info.value.status == 418
    assert info.value.body_excerpt == "teapot"


def test_idempotency_keys_are_uuid4() -> None:
    """Generated keys are valid, distinct RFC 4122 version-4 UUIDs."""
    import uuid

    from botmsg_async import new_idempotency_key

    keys = [new_idempotency_key() for _ in range(1000)]
    assert len(set(keys)) == 1000
    for key in keys[:50]:
        parsed = uuid.UUID(key)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == key


async def test_first_failure_is_replayed_into_the_retry_engine(
    server: ScriptedServer, make_client: MakeClient, sleeps: Sleeps
) -> None:
    """The first attempt runs outside tenacity; its failure still drives the waits and stops."""
    server.script += [answer(503, "down")] * 3
    events: list[RetryEvent] = []
    async with make_client(server.base_url, on_retry=events.append) as client:
        with pytest.raises(APIStatusError) as info:
            await client.send(DEPT, USER, "hi", retry=RetryPolicy(max_attempts=3))
    assert info.value.attempts == 3
    assert len(server.seen) == 3
    assert [e.attempt for e in events] == [1, 2]
    assert len(sleeps.waits) == 2


MOCK_URL = re.compile(r"^https://api\.example\.com/.*$")
REFUSED = aiohttp.ClientConnectorError(
    connection_key=None,  # type: ignore[arg-type]  # only str() reads it
    os_error=ConnectionRefusedError(111, "refused"),
)


@pytest.mark.parametrize(
    ("first", "retried"),
    [
        ({"exception": REFUSED}, True),
        ({"exception": aiohttp.ConnectionTimeoutError("connect")}, True),
        ({"status": 429, "body": "slow"}, True),
        ({"status": 503, "body": "down"}, True),
        (
            {
                "payload": {
                    "status": "FAILURE",
                    "errors": [{"errorCode": "E", "errorDescription": "timed out"}],
                }
            },
            True,
        ),
        ({"payload": {"status": "FAILURE", "errors": [{"errorCode": "INVALID_USER"}]}}, False),
        ({"exception": aiohttp.ServerDisconnectedError()}, False),
        ({"exception": aiohttp.SocketTimeoutError("read")}, False),
        ({"status": 500, "body": "x"}, False),
        ({"status": 502, "body": "x"}, False),
        ({"status": 504, "body": "x"}, False),
        ({"status": 200, "body": "{not json"}, False),
        ({"status": 401, "body": "no"}, False),
        ({"status": 404, "body": "no"}, False),
    ],
)
async def test_retry_table_on_the_mock(
    mock_http: aioresponses, sleeps: Sleeps, first: dict[str, object], retried: bool
) -> None:
    """Each row of the retry table: safe failures are retried, ambiguous and final ones not."""
    mock_http.post(MOCK_URL, **first)
    mock_http.post(MOCK_URL, payload={"status": "SUCCESS", "messageUuid": "m"})
    async with BotMessageClient("https://api.example.com", "u", "p", sleep=sleeps) as client:
        if retried:
            assert (await client.send(DEPT, USER, "hi")).attempts == 2
        else:
            with pytest.raises(BotMessageError) as info:
                await client.send(DEPT, USER, "hi")
            assert info.value.attempts == 1
    calls = sum(len(c) for c in mock_http.requests.values())
    assert calls == (2 if retried else 1)
