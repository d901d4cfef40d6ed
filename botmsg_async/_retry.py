"""When to send again, and how long to wait: the retry policy on top of tenacity.

The rule, in short (the README's "Retries" section says it in full):

* Safe, retried by default, because the message cannot have been accepted: no
  connection could be made (DNS, refused, connect timeout), HTTP 408, 425, 429
  and 503, and a FAILURE answer whose every error looks transient.
* Ambiguous, retried only with ``retry_ambiguous=True``: the request went out
  but no usable answer came back (read timeout, reset, disconnect, HTTP 500,
  502, 504 and other 5xx, 303, a 2xx body that cannot be parsed). By default
  these raise ``DeliveryUnknownError`` at once, so the default policy never
  sends twice.
* Everything else is final (a TLS certificate failure included).

Which is which is decided in ``_delivery``; this module only schedules.

Waits are exponential with full jitter, ``uniform(0, min(initial * 2**n, cap))``;
a ``Retry-After`` is honoured as ``max(backoff, retry_after)`` plus a little
jitter. No wait starts that would cross the deadline. One ``RetryBudget`` per
client keeps retries to a share of the traffic, so a failing server is not
stormed.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import tenacity
from attrs import Attribute, define, field, setters, validators

from ._delivery import is_retryable
from ._errors import BotMessageError

if TYPE_CHECKING:
    from ._models import SendResult

__all__ = [
    "ATTEMPT_FLOOR",
    "Retrier",
    "RetryBudget",
    "RetryEvent",
    "RetryPolicy",
    "RetryState",
    "build_retrying",
    "classify_failure",
    "spread",
]

# The words that make a FAILURE's error look transient, matched case-insensitively
# anywhere in each error's code and description, so that ServiceUnavailable,
# GATEWAY_TIMEOUT, ETIMEDOUT and "please retry again" all count. Words short enough
# to hide inside others must start a word or a CamelCase part: "busy" (SERVER_BUSY,
# ServerBusy; not "business") and "(re)try later / after / in" (not "country in").
# "retry" alone is not among them: "do not retry" is a common permanent answer (and
# PERMANENT_PATTERN keeps it final even next to "retry later").
TRANSIENT_PATTERN = re.compile(
    r"(?i:time[ _-]?out|timed[ _-]?out|temporar|unavailab|try[ _-]?again|throttl"
    r"|rate[ _-]?limit|too[ _-]?many[ _-]?requests|overload)"
    r"|(?:(?<![A-Za-z])|(?<=[a-z])(?=B))(?i:busy)(?![a-z])"
    r"|(?:(?<![A-Za-z])|(?<=[a-z])(?=[RT]))(?i:(?:re)?try[ _-]?(?:later|after|in\b))"
)
# Words that make an error final even when it also sounds temporary:
# "permanently unavailable", "user not found, try again with another id".
PERMANENT_PATTERN = re.compile(
    r"permanent|not[ _-]?found|do[ _-]?not[ _-]?retry|don'?t[ _-]?retry"
    r"|invalid|forbidden|blocked|disabled|deleted",
    re.IGNORECASE,
)


def _to_frozenset(codes: Iterable[str]) -> frozenset[str]:
    return frozenset(codes)


def _seconds(value: float) -> float:
    """An int too large for a float as ``inf`` (no bound): the policy's arithmetic is
    in floats, which would raise OverflowError on it at the first send."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    return value


def _to_int_frozenset(statuses: Iterable[int]) -> frozenset[int]:
    return frozenset(statuses)


def _check_statuses(_: object, attribute: Attribute[frozenset[int]], value: frozenset[int]) -> None:
    for status in value:
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"{attribute.name}: {status!r} is not an HTTP status (100-599)")
        if 200 <= status < 300:
            raise ValueError(f"{attribute.name}: {status} is a success; its body decides")


@define(frozen=True)
class RetryPolicy:
    """What to retry, how often and how long to wait.

    Args:
        max_attempts: HTTP attempts per message in total (1 disables retrying).
        backoff_initial: First backoff cap in seconds; it doubles per retry.
        backoff_max: Largest backoff cap in seconds.
        deadline: Seconds one logical send may take, all attempts and waits included.
        attempt_timeout: Total seconds for one HTTP attempt.
        connect_timeout: Seconds to get a connection for one attempt.
        retry_ambiguous: Also retry when the message may have been delivered
            (at-least-once; exactly-once with a server that deduplicates by key).
        transient_error_codes: FAILURE error codes always worth retrying.
        permanent_error_codes: FAILURE error codes never worth retrying.
        is_transient: Replaces the default FAILURE classification; gets the
            ``SendResult`` and returns whether to retry.
        idempotency_header: Header carrying the per-message key on every attempt.
        retry_count_header: Header telling the server which retry this is (None: off).
        max_retry_after: Longest Retry-After honoured; a longer one fails at once
            with ``RateLimitedError``.
        not_processed_statuses: Extra HTTP statuses that the service documents
            as "not processed, try again" (e.g. a gateway's 520 that never
            forwards): retried, and never reported as unknown. Only name a
            status the service guarantees; the default treats every 5xx but
            501, 503 and 505 as "may have been processed".

    Example:
        >>> RetryPolicy(max_attempts=6, transient_error_codes={"E_QUEUE_FULL"})
        RetryPolicy(max_attempts=6, ...)
    """

    max_attempts: int = field(default=4, validator=validators.ge(1))
    backoff_initial: float = field(default=0.5, converter=_seconds, validator=validators.ge(0))
    backoff_max: float = field(default=8.0, converter=_seconds, validator=validators.ge(0))
    deadline: float = field(default=30.0, converter=_seconds, validator=validators.gt(0))
    attempt_timeout: float = field(default=10.0, converter=_seconds, validator=validators.gt(0))
    connect_timeout: float = field(default=5.0, converter=_seconds, validator=validators.gt(0))
    retry_ambiguous: bool = False
    transient_error_codes: frozenset[str] = field(default=frozenset(), converter=_to_frozenset)
    permanent_error_codes: frozenset[str] = field(default=frozenset(), converter=_to_frozenset)
    is_transient: Callable[[SendResult], bool] | None = None
    idempotency_header: str = "Idempotency-Key"
    retry_count_header: str | None = "X-Retry-Count"
    max_retry_after: float = field(default=60.0, converter=_seconds, validator=validators.ge(0))
    not_processed_statuses: frozenset[int] = field(
        default=frozenset(), converter=_to_int_frozenset, validator=_check_statuses
    )

    @classmethod
    def none(cls) -> RetryPolicy:
        """A policy that never retries: one attempt per message."""
        return cls(max_attempts=1)

    def classify(self, result: SendResult) -> bool:
        """Return whether a FAILURE answer is transient (worth retrying).

        Transient when every error is: its code is in ``transient_error_codes``,
        or its code or description matches ``TRANSIENT_PATTERN`` (timeouts,
        temporary unavailability, try again, throttling, rate limits, busy or
        overloaded) and not ``PERMANENT_PATTERN`` (permanent, not found,
        do not retry, invalid, forbidden, blocked, disabled, deleted). Any code in
        ``permanent_error_codes``, any other error, or no error at all makes the
        failure final. ``is_transient`` overrides all this.
        """
        if self.is_transient is not None:
            return self.is_transient(result)
        if not result.errors:
            return False
        for error in result.errors:
            code = error.code or ""
            if code in self.permanent_error_codes:
                return False
            if code in self.transient_error_codes:
                continue
            text = f"{code} {error.description or ''}"
            if TRANSIENT_PATTERN.search(text) is None or PERMANENT_PATTERN.search(text):
                return False
        return True


@define(on_setattr=setters.NO_OP)  # the balance changes on every send: keep that cheap
class RetryBudget:
    """One client's allowance of retries, so that a failing server is not stormed.

    Finagle's rule: retries may add ``ratio`` of the first attempts (20%), plus
    ``min_per_second`` (10/s) so that a quiet client can still retry. Each first
    attempt deposits ``ratio`` of a token, time adds ``min_per_second`` tokens per
    second, each retry takes one; the balance never exceeds ``burst``. When no
    token is left, the failure is returned at once instead of retried.

    Args:
        ratio: Share of first attempts that retries may add.
        min_per_second: Retries per second always allowed.
        burst: Most tokens that can be saved up.
    """

    ratio: float = field(default=0.2, validator=validators.ge(0))
    min_per_second: float = field(default=10.0, validator=validators.ge(0))
    burst: float = field(default=100.0, validator=validators.gt(0))
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _balance: float = field(init=False, default=0.0, repr=False)
    _last: float | None = field(init=False, default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        self._balance = self.burst

    @property
    def balance(self) -> float:
        """Tokens available now."""
        self._refill()
        return self._balance

    def _refill(self) -> None:
        now = self.clock()
        if self._last is not None and self.min_per_second:
            self._balance = min(
                self.burst, self._balance + (now - self._last) * self.min_per_second
            )
        self._last = now

    def deposit(self) -> None:
        """Record a first attempt."""
        self._balance = min(self.burst, self._balance + self.ratio)

    def try_withdraw(self) -> bool:
        """Take a token for one retry; return False when there is none."""
        self._refill()
        if self._balance < 1.0:
            return False
        self._balance -= 1.0
        return True


@define(frozen=True)
class RetryEvent:
    """What ``on_retry`` is told before each wait.

    Attributes:
        department_uuid: Department of the message.
        user_uuid: User of the message.
        attempt: The attempt that just failed (1 for the first).
        wait: Seconds until the next attempt.
        error: Why it failed.
    """

    department_uuid: str
    user_uuid: str
    attempt: int
    wait: float
    error: BaseException


class RetryState(Protocol):
    """What the retry engine reads of one logical send (the client's own state object)."""

    #: When the send began, on the client's clock.
    started: float
    #: Seconds the last answer asked to wait (Retry-After), if any.
    retry_after: float | None


#: The least time, in seconds, worth giving an attempt: a retry that would have
#: less before the deadline is not made (it could only end in a timeout).
ATTEMPT_FLOOR = 0.05


def classify_failure(exc: BaseException, policy: RetryPolicy) -> bool:
    """Return whether ``exc``, raised by one attempt, may be retried under ``policy``.

    The rule itself is ``_delivery.is_retryable``; this only adapts it to the policy.
    """
    return isinstance(exc, BotMessageError) and is_retryable(
        exc, retry_ambiguous=policy.retry_ambiguous
    )


def spread(wait: float, rng: random.Random) -> float:
    """``wait`` plus up to a tenth of it (1 s at most), so that clients told to
    come back at the same instant do not all come back at once."""
    return wait + rng.uniform(0.0, min(1.0, wait / 10))


def full_jitter(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Backoff before retry number ``attempt`` (1-based): AWS's "full jitter"."""
    cap = min(policy.backoff_initial * 2 ** (attempt - 1), policy.backoff_max)
    return rng.uniform(0.0, cap)


def build_retrying(
    policy: RetryPolicy,
    *,
    budget: RetryBudget | None,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
    before_sleep: Callable[[Any, int, float, BaseException], None],
    rng: random.Random,
) -> tenacity.AsyncRetrying:
    """Build the tenacity engine for one policy; callers reuse it for every send.

    One instance serves concurrent sends: its predicate, wait and stop are plain
    functions that read the per-send ``SendState`` passed as the wrapped
    function's argument, and tenacity runs them without suspending, so sends
    cannot interleave inside its bookkeeping.
    """

    def state_of(rs: tenacity.RetryCallState) -> RetryState:
        send_state: RetryState = rs.args[0]
        return send_state

    def should_retry(rs: tenacity.RetryCallState) -> bool:
        outcome = rs.outcome
        if outcome is None or not outcome.failed:
            return False
        exc = outcome.exception()
        assert exc is not None
        return classify_failure(exc, policy)

    def wait(rs: tenacity.RetryCallState) -> float:
        state = state_of(rs)
        backoff = full_jitter(rs.attempt_number, policy, rng)
        if state.retry_after is None:
            return backoff
        return max(backoff, spread(state.retry_after, rng))

    def stop(rs: tenacity.RetryCallState) -> bool:
        state = state_of(rs)
        if rs.attempt_number >= policy.max_attempts:
            return True
        if state.retry_after is not None and state.retry_after > policy.max_retry_after:
            return True
        elapsed = clock() - state.started
        # Never start a wait that leaves the next attempt too little time to finish.
        if elapsed + (rs.upcoming_sleep or 0.0) + ATTEMPT_FLOOR >= policy.deadline:
            return True
        return budget is not None and not budget.try_withdraw()

    def announce(rs: tenacity.RetryCallState) -> None:
        state = state_of(rs)
        outcome = rs.outcome
        exc = outcome.exception() if outcome is not None else None
        assert exc is not None
        before_sleep(state, rs.attempt_number, rs.upcoming_sleep, exc)

    return tenacity.AsyncRetrying(
        sleep=sleep,
        stop=stop,
        wait=wait,
        retry=should_retry,
        before_sleep=announce,
        reraise=True,
    )


S = TypeVar("S", bound=RetryState)
T = TypeVar("T")


class Retrier:
    """One policy's retry engine, made once and shared by every send under it.

    The caller makes the first attempt directly: most sends succeed at once,
    and entering tenacity costs more than the rest of a send (it inspects every
    callback on every call). Only a failure worth retrying is handed over
    (``retry``); tenacity gets it as its own first outcome, so that its
    predicate, wait and stop decide what happens next.

    Args:
        policy: What to retry and how long to wait.
        budget: The client-wide retry allowance, if any.
        clock: The client's monotonic clock (deadlines).
        sleep: How to wait.
        before_sleep: Called with ``(state, attempt, wait, error)`` before each wait.
        rng: Jitter.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        budget: RetryBudget | None,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        before_sleep: Callable[[Any, int, float, BaseException], None],
        rng: random.Random,
    ) -> None:
        self.policy = policy
        self._engine = build_retrying(
            policy, budget=budget, clock=clock, sleep=sleep, before_sleep=before_sleep, rng=rng
        )

    async def retry(
        self, first: BotMessageError, attempt: Callable[[S], Awaitable[T]], state: S
    ) -> T:
        """After ``first`` failed the first attempt: retry ``attempt(state)`` as the policy says.

        The caller makes the first attempt itself (one coroutine layer less on
        the path most sends take) and hands over only its failure.

        Raises:
            BotMessageError: ``first`` when it is not worth retrying, else the
                last attempt's failure.
        """
        if self.policy.max_attempts == 1 or not classify_failure(first, self.policy):
            raise first
        replay: BotMessageError | None = first

        async def again(state: S) -> T:
            nonlocal replay
            if replay is not None:
                failure, replay = replay, None
                raise failure
            return await attempt(state)

        result: T = await self._engine(again, state)
        return result
