"""The delivery rules, table-tested once: statuses, retries, outcomes, resends, stops."""

from __future__ import annotations

import copy
import pickle

import pytest

from botmsg_async import (
    APIStatusError,
    AuthenticationError,
    BatchFailedError,
    BatchStoppedError,
    BotMessageError,
    CertificateError,
    ClientClosedError,
    CoordinationError,
    DeliveryUnknownError,
    IdempotencyConflictError,
    InvalidRequestError,
    InvalidResponseError,
    NotAttemptedError,
    Outcome,
    RateLimitedError,
    ResponseLostError,
    RetryPolicy,
    SendFailedError,
    SendResult,
    ServerError,
    Status,
    TransportError,
    UnexpectedStatusError,
    WrongEventLoopError,
)
from botmsg_async._delivery import (
    StatusRule,
    is_retryable,
    may_resend,
    outcome_of,
    releases_claim,
    settles_doubt,
    status_rule,
    stops_batch,
    trips_breaker,
)
from botmsg_async._models import ApiError, ResponseHeaders

NOT_PROCESSED_FINAL_4XX = [400, 404, 409, 410, 413, 415, 422, 451, 499]


@pytest.mark.parametrize(
    ("status", "rule"),
    [
        (401, StatusRule.AUTH),
        (403, StatusRule.AUTH),
        (429, StatusRule.RATE_LIMITED),
        (408, StatusRule.RETRY_LATER),
        (425, StatusRule.RETRY_LATER),
        (503, StatusRule.RETRY_LATER),
        (301, StatusRule.REDIRECT),
        (302, StatusRule.REDIRECT),
        (307, StatusRule.REDIRECT),
        (308, StatusRule.REDIRECT),
        (501, StatusRule.REJECTED),
        (505, StatusRule.REJECTED),
        *((s, StatusRule.REJECTED) for s in NOT_PROCESSED_FINAL_4XX),
        *(
            (s, StatusRule.AMBIGUOUS)
            for s in (500, 502, 504, 520, 524, 598, 599, 303, 300, 304, 100, 102, 199)
        ),
        *((s, StatusRule.AMBIGUOUS) for s in (0, 1, 99, 600, 999, 1000, -1)),
    ],
)
def test_status_table(status: int, rule: StatusRule) -> None:
    """Each status lands in the issue's table: only proof of 'not processed' is safe."""
    assert status_rule(status) is rule


def test_every_status_is_classified_conservatively() -> None:
    """Over 0-999, a status is safe only if it is 4xx, a named redirect, 501, 503 or 505."""
    safe_5xx = {501, 503, 505}
    redirects = {301, 302, 307, 308}
    for status in range(1000):
        rule = status_rule(status)
        expect_safe = 400 <= status < 500 or status in safe_5xx or status in redirects
        assert (rule is not StatusRule.AMBIGUOUS) is expect_safe, status


def test_policy_may_name_extra_not_processed_statuses() -> None:
    """A status the service documents as 'not processed' is retried, not ambiguous."""
    assert status_rule(520) is StatusRule.AMBIGUOUS
    assert status_rule(520, frozenset({520})) is StatusRule.RETRY_LATER
    assert RetryPolicy(not_processed_statuses=[520]).not_processed_statuses == {520}


@pytest.mark.parametrize("bad", [200, 204, 99, 600, True, "520"])
def test_policy_refuses_odd_not_processed_statuses(bad: object) -> None:
    """Success statuses and non-statuses are refused when the policy is built."""
    with pytest.raises((ValueError, TypeError)):
        RetryPolicy(not_processed_statuses=[bad])  # type: ignore[list-item]


def _failure(transient: bool) -> SendFailedError:
    result = SendResult(Status.FAILURE, errors=(ApiError("E", "x"),))
    return SendFailedError(result, transient=transient)


def _unknown_after(final: BotMessageError) -> DeliveryUnknownError:
    error = DeliveryUnknownError("an earlier attempt may have delivered it")
    error.final_error = final
    return error


# error, retryable (default policy), retryable (retry_ambiguous), outcome, may_resend, stops
CASES: list[tuple[str, BotMessageError, bool, bool, Outcome, bool, bool]] = [
    ("transient FAILURE", _failure(True), True, True, Outcome.FAILED, True, False),
    ("final FAILURE", _failure(False), False, False, Outcome.FAILED, False, False),
    (
        "401",
        AuthenticationError("x", status=401),
        False,
        False,
        Outcome.FAILED,
        True,
        True,
    ),
    (
        "429",
        RateLimitedError("x", status=429, retry_after=1.0),
        True,
        True,
        Outcome.FAILED,
        True,
        False,
    ),
    (
        "503",
        APIStatusError("x", status=503, retryable=True),
        True,
        True,
        Outcome.FAILED,
        True,
        False,
    ),
    ("404", APIStatusError("x", status=404), False, False, Outcome.FAILED, False, False),
    ("307", APIStatusError("x", status=307), False, False, Outcome.FAILED, False, True),
    ("500", ServerError("x", status=500), False, True, Outcome.UNKNOWN, False, False),
    ("524", ServerError("x", status=524), False, True, Outcome.UNKNOWN, False, False),
    (
        "303",
        UnexpectedStatusError("x", status=303),
        False,
        True,
        Outcome.UNKNOWN,
        False,
        False,
    ),
    ("lost", ResponseLostError("x"), False, True, Outcome.UNKNOWN, False, False),
    ("not attempted", NotAttemptedError("x"), False, False, Outcome.FAILED, True, False),
    (
        "bad body",
        InvalidResponseError("x", status=200, body_excerpt=""),
        False,
        True,
        Outcome.UNKNOWN,
        False,
        False,
    ),
    ("refused", TransportError("x"), True, True, Outcome.FAILED, True, False),
    ("certificate", CertificateError("x"), False, False, Outcome.FAILED, True, False),
    ("invalid", InvalidRequestError("f", 1, "bad"), False, False, Outcome.FAILED, False, False),
    ("second loop", WrongEventLoopError("x"), False, False, Outcome.FAILED, True, True),
    # A shared limiter or guard (Redis) failed before any attempt: not sent.
    ("shared store down", CoordinationError("x"), False, False, Outcome.FAILED, True, False),
    (
        "key reused",
        IdempotencyConflictError("idempotency_key", "k", "reused"),
        False,
        False,
        Outcome.FAILED,
        False,
        False,
    ),
    (
        "unknown then 401",
        _unknown_after(AuthenticationError("x", status=401)),
        False,
        True,
        Outcome.UNKNOWN,
        False,
        True,
    ),
    (
        "unknown then 404",
        _unknown_after(APIStatusError("x", status=404)),
        False,
        True,
        Outcome.UNKNOWN,
        False,
        False,
    ),
]


@pytest.mark.parametrize(
    ("error", "retry", "retry_ambiguous", "outcome", "resend", "stops"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_delivery_rules(
    error: BotMessageError,
    retry: bool,
    retry_ambiguous: bool,
    outcome: Outcome,
    resend: bool,
    stops: bool,
) -> None:
    """One row per kind of failure: retry now?, outcome, resend later?, stop the batch?"""
    assert is_retryable(error, retry_ambiguous=False) is retry
    assert is_retryable(error, retry_ambiguous=True) is retry_ambiguous
    assert outcome_of(error, attempts=1) is outcome
    assert may_resend(error) is resend
    assert stops_batch(error) is stops
    # Whatever may have been delivered is never resent under a new key.
    if outcome is Outcome.UNKNOWN:
        assert not may_resend(error)
    # A send guard frees a key exactly when the message may go again.
    assert releases_claim(error) is resend


def test_closed_client_outcome_depends_on_attempts() -> None:
    """A client closed before any attempt skips the item; after one, it failed."""
    error = ClientClosedError("closed")
    assert outcome_of(error, attempts=0) is Outcome.SKIPPED
    assert outcome_of(error, attempts=2) is Outcome.FAILED
    assert outcome_of(None, attempts=1) is Outcome.SENT
    assert stops_batch(error)
    assert not is_retryable(error, retry_ambiguous=True)


def test_only_sent_or_a_final_failure_settles_a_doubt() -> None:
    """A resend of an item in doubt settles it only when the answer proves what happened."""
    assert settles_doubt(Outcome.SENT, None)
    assert settles_doubt(Outcome.FAILED, _failure(False))
    assert not settles_doubt(Outcome.FAILED, _failure(True))
    assert not settles_doubt(Outcome.FAILED, APIStatusError("x", status=409))
    assert not settles_doubt(Outcome.SKIPPED, None)
    assert not settles_doubt(Outcome.UNKNOWN, ServerError("x", status=500))


def test_breaker_counts_service_failures_only() -> None:
    """Failed and unknown items trip the breaker; bad input and successes do not."""
    assert trips_breaker(Outcome.FAILED, TransportError("x"))
    assert trips_breaker(Outcome.UNKNOWN, ServerError("x", status=502))
    assert not trips_breaker(Outcome.FAILED, InvalidRequestError("f", 1, "bad"))
    assert not trips_breaker(Outcome.FAILED, NotAttemptedError("another run has it"))
    assert not trips_breaker(Outcome.SENT, None)
    assert not trips_breaker(Outcome.SKIPPED, None)


def _every_public_error() -> list[BotMessageError]:
    ids = ResponseHeaders({"X-Request-Id": "req-1", "Retry-After": "2"})
    result = SendResult(
        Status.FAILURE,
        errors=(ApiError("E", "why", "uid"),),
        http_status=200,
        elapsed=0.25,
        headers=ids,
    )
    unknown = DeliveryUnknownError("maybe", department_uuid="d", user_uuid="u", attempts=2)
    unknown.idempotency_key = "key-1"
    unknown.final_error = AuthenticationError("no", status=401, body_excerpt="b")
    return [
        BotMessageError("base", department_uuid="d", user_uuid="u", attempts=1),
        InvalidRequestError("user_uuid", "a/b", "bad", department_uuid="d", user_uuid="a/b"),
        ClientClosedError("closed"),
        WrongEventLoopError("second loop"),
        CoordinationError("redis down", department_uuid="d", user_uuid="u"),
        NotAttemptedError("another run has it", department_uuid="d", user_uuid="u"),
        IdempotencyConflictError("idempotency_key", "k", "reused", department_uuid="d"),
        SendFailedError(result, transient=True, department_uuid="d", user_uuid="u", attempts=3),
        APIStatusError(
            "x",
            status=404,
            body_excerpt="nf",
            retryable=False,
            attempts=1,
            headers=ids,
            elapsed=1.5,
        ),
        AuthenticationError("x", status=401, body_excerpt="b"),
        RateLimitedError("x", status=429, retry_after=2.5, body_excerpt="slow", headers=ids),
        ServerError("x", status=502, body_excerpt="<html>", elapsed=0.5),
        UnexpectedStatusError("x", status=303, body_excerpt=""),
        TransportError("x", department_uuid="d", user_uuid="u", attempts=4),
        CertificateError("x"),
        ResponseLostError("x", attempts=1),
        unknown,
        InvalidResponseError(
            "x", status=200, body_excerpt="{", problems=("cut",), headers=ids, elapsed=0.1
        ),
        BatchStoppedError("stop", reason="consecutive_failures", last_error=TransportError("t")),
        BatchFailedError(failed=1, unknown=2, skipped=3),
    ]


def _same(a: BaseException, b: BaseException) -> None:
    assert type(a) is type(b)
    assert str(a) == str(b)
    assert a.args == b.args
    assert set(vars(a)) == set(vars(b))
    for name, value in vars(a).items():
        other = vars(b)[name]
        if isinstance(value, BaseException):
            _same(value, other)
        elif isinstance(value, SendResult):  # == ignores the exchange's metadata
            assert value == other
            assert (value.http_status, value.elapsed) == (other.http_status, other.elapsed)
            assert value.headers == other.headers
        else:
            assert value == other, name


@pytest.mark.parametrize("error", _every_public_error(), ids=lambda e: type(e).__name__)
def test_every_error_pickles_and_copies_with_its_fields(error: BotMessageError) -> None:
    """pickle (a process pool's hand-back), copy and deepcopy keep type, text and fields."""
    for clone in (
        pickle.loads(pickle.dumps(error)),  # noqa: S301 - our own bytes, just made
        copy.copy(error),
        copy.deepcopy(error),
    ):
        _same(error, clone)


def test_every_public_error_class_is_covered() -> None:
    """The pickling test above covers every error the package exports."""
    import botmsg_async

    exported = {
        obj
        for name in botmsg_async.__all__
        if isinstance(obj := getattr(botmsg_async, name), type) and issubclass(obj, BotMessageError)
    }
    assert exported == {type(e) for e in _every_public_error()}
