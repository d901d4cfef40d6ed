"""Response metadata: the HTTP status, the attempt's duration and the headers that matter."""

from __future__ import annotations

import copy
import pickle
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from botmsg_async import (
    APIStatusError,
    BotMessageClient,
    InvalidResponseError,
    RateLimitedError,
    RetryPolicy,
    SendFailedError,
    SendResult,
    ServerError,
    Status,
)
from botmsg_async._http import kept_headers
from botmsg_async._models import NO_HEADERS, ResponseHeaders

from .conftest import DEPT, SUCCESS, USER, ScriptedServer, answer, slow

MakeClient = Callable[..., BotMessageClient]

IDS = {"X-Request-Id": "req-42", "X-RateLimit-Remaining": "7"}


async def test_a_result_carries_status_elapsed_and_kept_headers(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """SUCCESS: http_status, elapsed of the attempt, ids and rate-limit headers only."""
    headers = {**IDS, "Set-Cookie": "session=abc", "Server": "nginx", "X-Trace": "no"}
    server.script.append(slow(0.05, answer(200, SUCCESS, headers)))
    async with make_client(server.base_url) as client:
        result = await client.send(DEPT, USER, "hello")
    assert result.http_status == 200
    assert result.elapsed is not None
    assert result.elapsed >= 0.04  # the server waited 0.05 s before answering
    assert dict(result.headers) == {"x-request-id": "req-42", "x-ratelimit-remaining": "7"}
    assert result.headers["X-REQUEST-ID"] == "req-42"  # looked up case-insensitively
    assert "set-cookie" not in result.headers
    with pytest.raises(TypeError):
        result.headers["x-request-id"] = "forged"  # type: ignore[index]


async def test_an_error_answer_carries_status_elapsed_and_kept_headers(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """A 429 error: http_status, elapsed, Retry-After and the request id, read-only."""
    server.script.append(answer(429, "slow down", {"Retry-After": "120", **IDS}))
    async with make_client(server.base_url, retry=RetryPolicy.none()) as client:
        with pytest.raises(RateLimitedError) as info:
            await client.send(DEPT, USER, "hello")
    error = info.value
    assert error.http_status == error.status == 429
    assert error.elapsed is not None
    assert error.elapsed >= 0
    assert error.headers == {
        "retry-after": "120",
        "x-request-id": "req-42",
        "x-ratelimit-remaining": "7",
    }


async def test_a_failure_answer_and_a_bad_body_carry_metadata(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """FAILURE's result and an unreadable 2xx's error keep the request id too."""
    server.script += [
        answer(
            200,
            {"requestUuid": "r", "status": "FAILURE", "errors": [{"errorCode": "E"}]},
            IDS,
        ),
        answer(200, "<html>", IDS),
    ]
    async with make_client(server.base_url, retry=RetryPolicy.none()) as client:
        with pytest.raises(SendFailedError) as failed_info:
            await client.send(DEPT, USER, "hello")
        with pytest.raises(InvalidResponseError) as invalid_info:
            await client.send(DEPT, USER, "hello")
    result = failed_info.value.result
    assert (result.http_status, result.headers["x-request-id"]) == (200, "req-42")
    invalid = invalid_info.value
    assert (invalid.http_status, invalid.headers["x-request-id"]) == (200, "req-42")
    assert invalid.elapsed is not None


async def test_metadata_is_the_last_attempts(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """After a retry, status, headers and elapsed are those of the attempt that answered."""
    server.script += [
        slow(0.3, answer(503, "busy", {"X-Request-Id": "first"})),
        answer(200, SUCCESS, {"X-Request-Id": "second"}),
    ]
    policy = RetryPolicy(backoff_initial=0, backoff_max=0)
    async with make_client(server.base_url, retry=policy) as client:
        begun = time.perf_counter()
        result = await client.send(DEPT, USER, "hello")
        total = time.perf_counter() - begun
    assert result.attempts == 2
    assert result.headers == {"x-request-id": "second"}
    assert result.elapsed is not None
    # The first attempt took at least 0.3 s of the total: not counted in the last one's.
    assert result.elapsed <= total - 0.25


async def test_a_body_cannot_set_the_metadata(
    server: ScriptedServer, make_client: MakeClient
) -> None:
    """http_status, elapsed and headers come from the exchange, never from the JSON body."""
    forged = {**SUCCESS, "http_status": 299, "elapsed": 99.0, "headers": {"x-request-id": "f"}}
    server.script.append(answer(200, forged))
    async with make_client(server.base_url) as client:
        result = await client.send(DEPT, USER, "hello")
    assert result.http_status == 200
    assert result.elapsed != 99.0
    assert result.headers == {}


def test_metadata_takes_no_part_in_equality() -> None:
    """Two results with the same answer are equal whatever their timing and headers."""
    one = SendResult(Status.SUCCESS, message_uuid="m", http_status=200, elapsed=0.1)
    two = SendResult(
        Status.SUCCESS, message_uuid="m", headers=ResponseHeaders({"X-Request-Id": "a"})
    )
    assert one == two
    assert hash(one) == hash(two)


KEPT = [
    "X-Request-Id",
    "x-request-id",
    "Request-Id",
    "X-Amzn-RequestId",
    "X-Correlation-Id",
    "X-Amzn-Trace-Id",
    "CF-Ray",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "X-Rate-Limit-Remaining",
    "RateLimit",
    "RateLimit-Policy",
    "RateLimit-Remaining",
    "Retry-After",
    "retry-after-ms",
]
DROPPED = [
    "Set-Cookie",
    "Server",
    "Date",
    "Content-Type",
    "Content-Length",
    "Authorization",
    "WWW-Authenticate",
    "Location",
    "X-Request",
    "X-Ratelimit",
    "Via",
]


@pytest.mark.parametrize("name", KEPT)
def test_kept_headers(name: str) -> None:
    """Ids and rate-limit advice are kept, under their lower-case name."""
    assert kept_headers(CIMultiDict({name: "v"})) == {name.lower(): "v"}


@pytest.mark.parametrize("name", DROPPED)
def test_dropped_headers(name: str) -> None:
    """Anything else is left out, cookies and credentials among it."""
    assert kept_headers(CIMultiDict({name: "v"})) is NO_HEADERS


def test_repeated_headers_are_joined_and_the_count_is_capped() -> None:
    """A repeated header's values are joined; at most 32 distinct names are kept."""
    headers = CIMultiDict([("X-Request-Id", "a"), ("x-request-id", "b")])
    headers.extend((f"X-RateLimit-N{i}", str(i)) for i in range(100))
    kept = kept_headers(CIMultiDictProxy(headers))
    assert kept["X-Request-Id"] == "a, b"
    assert len(kept) == 32


@settings(deadline=None, max_examples=200)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=30), st.text(max_size=30)), max_size=40))
def test_kept_headers_is_total(pairs: list[tuple[str, str]]) -> None:
    """Any names and values give a bounded, lower-case, read-only selection."""
    kept = kept_headers(CIMultiDict(pairs))
    assert len(kept) <= 32
    assert all(name == name.lower() for name in kept)
    assert all(isinstance(value, str) for value in kept.values())


ERRORS = [
    APIStatusError("x", status=404, headers=ResponseHeaders({"X-Request-Id": "a"}), elapsed=0.5),
    RateLimitedError(
        "x", status=429, retry_after=1.0, headers=ResponseHeaders({"Retry-After": "1"})
    ),
    ServerError("x", status=502, headers=ResponseHeaders({"CF-Ray": "r"}), elapsed=1.5),
    InvalidResponseError(
        "x", status=200, body_excerpt="{", headers=ResponseHeaders({"Request-Id": "b"})
    ),
    SendFailedError(
        SendResult(
            Status.FAILURE,
            http_status=200,
            elapsed=0.2,
            headers=ResponseHeaders({"a-trace-id": "t"}),
        ),
        transient=False,
    ),
]


Answered = SendResult | APIStatusError | InvalidResponseError


def _answered(error: Exception) -> Answered:
    """Where an error keeps the metadata: on itself, or on a FAILURE's result."""
    source = error.result if isinstance(error, SendFailedError) else error
    assert isinstance(source, SendResult | APIStatusError | InvalidResponseError)
    return source


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_metadata_survives_pickle_and_copy(error: Exception) -> None:
    """Headers, elapsed and status travel with an error through pickle and copy."""
    source = _answered(error)
    for clone in (pickle.loads(pickle.dumps(error)), copy.deepcopy(error)):  # noqa: S301
        target = _answered(clone)
        assert target.headers == source.headers
        assert isinstance(target.headers, ResponseHeaders)
        assert target.elapsed == source.elapsed
        assert target.http_status == source.http_status
