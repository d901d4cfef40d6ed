"""The client: its lifecycle, ``send`` and its attempt loop, the 429 pause, and batches.

HTTP itself (the session's connector, timeouts, one POST and what its answer
means) is ``_http``'s job; input checks are ``_validate``'s; retry scheduling is
``_retry``'s; which failure means what is ``_delivery``'s.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import warnings
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Literal, Self
from uuid import UUID

import aiohttp
from attrs import define, evolve
from yarl import URL

from . import _guard, _http, _wire
from ._batch import BatchOptions, BatchStream, Items, collect
from ._errors import (
    BotMessageError,
    ClientClosedError,
    DeliveryUnknownError,
    InvalidRequestError,
    RateLimitedError,
    WrongEventLoopError,
)
from ._guard import SendGuard
from ._limits import RateLimiter
from ._models import MessageDefaults, SendRequest, SendResult, TextMessage
from ._report import BatchReport, ItemResult, Progress
from ._retry import ATTEMPT_FLOOR, Retrier, RetryBudget, RetryEvent, RetryPolicy, spread
from ._validate import (
    MAX_TEXT_BYTES,
    check_base_url,
    check_id,
    check_idempotency_key,
    check_message,
    id_text,
    new_idempotency_key,
)
from ._version import __version__

__all__ = ["BotMessageClient"]

log = logging.getLogger("botmsg_async")


@define(frozen=True)
class _Plan:
    """What one retry policy needs on every send, built once per policy and client."""

    retrier: Retrier
    timeout: aiohttp.ClientTimeout
    rules: _http.AnswerRules


class _Send:
    """Everything one logical send carries across its attempts."""

    __slots__ = (
        "attempt",
        "body",
        "department_uuid",
        "idempotency_key",
        "last_error",
        "maybe_delivered",
        "plan",
        "policy",
        "retry_after",
        "started",
        "url",
        "user_uuid",
    )

    def __init__(
        self,
        *,
        department_uuid: str,
        user_uuid: str,
        url: URL,
        body: bytes,
        idempotency_key: str,
        plan: _Plan,
        started: float,
    ) -> None:
        self.department_uuid = department_uuid
        self.user_uuid = user_uuid
        self.url = url
        self.body = body
        self.idempotency_key = idempotency_key
        self.plan = plan
        self.policy = plan.retrier.policy
        self.started = started
        self.attempt = 0
        #: Seconds the last answer asked to wait (Retry-After), if any.
        self.retry_after: float | None = None
        #: An earlier attempt may have been delivered (only with retry_ambiguous).
        self.maybe_delivered = False
        #: The failure being retried, while the retry engine waits.
        self.last_error: BotMessageError | None = None


class BotMessageClient:
    """An asyncio client for the "send a bot message to a user" endpoint.

    The client owns one ``aiohttp.ClientSession`` over a pooled connector,
    created on first use inside the running loop, so the client itself may be
    built anywhere. Use it as an async context manager, or call ``aclose()``.

    Args:
        base_url: Scheme, host and any gateway prefix before ``/communications``,
            e.g. ``"https://api.example.com"``.
        username: Basic-auth user name.
        password: Basic-auth password. Never logged, never in a repr or an error.
        timeout: Per-attempt timeout: seconds in total, or an ``aiohttp.ClientTimeout``.
            None takes the retry policy's ``attempt_timeout`` and ``connect_timeout``.
        max_connections: Size of the connection pool; None (default) leaves the
            pool uncapped so that ``send_many(concurrency=...)`` is the only cap.
        keepalive_timeout: Seconds an idle pooled connection is kept for reuse. Shorter
            than the servers' own idle timeouts (5 s for uvicorn and Node), so that a
            send rarely picks a connection the server is closing at that moment; lower
            it below your service's idle timeout if that is shorter.
        retry: The retry policy for every send (default ``RetryPolicy()``).
        retry_budget: The client-wide retry allowance; None (the default) gives the
            client a ``RetryBudget()`` of its own.
        user_agent: Sent as ``User-Agent``.
        session: A session of your own. The client uses it and never closes it.
        allow_insecure_http: Permit ``http://`` to a host that is not loopback.
        message_defaults: Values for messages given as plain strings.
        max_response_bytes: Largest answer body read; a larger one is an error.
        max_text_bytes: Largest message body sent, in bytes of UTF-8 (default 1 MiB);
            a larger one is refused with ``InvalidRequestError`` before any I/O.
        rate_limiter: Shared by every send of this client (and of any other client
            given the same limiter): a slot per logical send, taken before its
            deadline starts, and one pause that a 429 seen by any holder imposes on
            all. A batch's own ``rate_limit`` applies on top: the stricter wins.
            ``LocalRateLimiter`` is the in-process one.
        send_guard: At-most-once across processes for sends that carry a caller's
            ``idempotency_key``: the first send of a key claims it and records the
            outcome; a later send of that key (another worker, a job queue's
            redelivery) returns the recorded result, or raises the recorded error,
            without sending. ``botmsg_async.shared.RedisSendGuard`` is one.
        on_retry: Called with a ``RetryEvent`` before each retry's wait.
        sleep: How to wait (tests pass a fake to never wait for real).
        clock: Monotonic clock for deadlines (tests may pass a fake).

    Raises:
        InvalidRequestError: ``base_url`` is unusable or unsafe.

    Example:
        >>> async with BotMessageClient("https://api.example.com", "bot", pw) as client:
        ...     result = await client.send(department_id, user_id, "Hello!")
        ...     print(result.message_uuid)
    """

    def __init__(
        self,
        base_url: str | URL,
        username: str,
        password: str,
        *,
        timeout: float | aiohttp.ClientTimeout | None = None,
        max_connections: int | None = None,
        keepalive_timeout: float = 4.0,
        retry: RetryPolicy | None = None,
        retry_budget: RetryBudget | None = None,
        user_agent: str | None = None,
        session: aiohttp.ClientSession | None = None,
        allow_insecure_http: bool = False,
        message_defaults: MessageDefaults | None = None,
        max_response_bytes: int = _http.DEFAULT_MAX_RESPONSE_BYTES,
        max_text_bytes: int = MAX_TEXT_BYTES,
        rate_limiter: RateLimiter | None = None,
        send_guard: SendGuard | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base_url = check_base_url(base_url, allow_insecure_http=allow_insecure_http)
        self._base = str(self._base_url)
        self._base_path = self._base_url.raw_path.rstrip("/")
        # One check per field, so the error names the one at fault; neither is echoed.
        for field, value in (("username", username), ("password", password)):
            if not isinstance(value, str):
                raise InvalidRequestError(
                    field, "<redacted>", f"must be a str, not {type(value).__name__}"
                )
        try:
            authorization = aiohttp.encode_basic_auth(username, password)
        except ValueError:
            raise InvalidRequestError(
                "username", "<redacted>", "must not contain ':' (RFC 7617)"
            ) from None
        if max_connections is not None and max_connections < 1:
            raise InvalidRequestError("max_connections", max_connections, "must be >= 1 or None")
        if not keepalive_timeout > 0:  # also refuses NaN
            raise InvalidRequestError("keepalive_timeout", keepalive_timeout, "must be > 0")
        if max_response_bytes < 1:
            raise InvalidRequestError("max_response_bytes", max_response_bytes, "must be >= 1")
        if not isinstance(max_text_bytes, int) or max_text_bytes < 1:
            raise InvalidRequestError("max_text_bytes", max_text_bytes, "must be an int >= 1")
        self._headers = {
            "Authorization": _http.Secret(authorization),
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": user_agent or f"botmsg-async/{__version__}",
        }
        self._timeout = timeout
        self._max_connections = max_connections
        self._keepalive_timeout = keepalive_timeout
        self._retry = retry or RetryPolicy()
        self._clock = clock
        self._sleep = sleep
        self._budget = retry_budget if retry_budget is not None else RetryBudget(clock=clock)
        self._defaults = message_defaults or MessageDefaults()
        self._max_response_bytes = max_response_bytes
        self._max_text_bytes = max_text_bytes
        self._on_retry = on_retry
        self._rate_limiter = rate_limiter
        self._send_guard = send_guard
        self._lent_session = session
        self._session: aiohttp.ClientSession | None = session
        # The loop of the first use: the pool's connections and timers live on it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        # Instant (on self._clock) before which no attempt may start: set by a
        # 429's Retry-After so every send of this client waits, not just the one told.
        self._paused_until = 0.0
        self._plans: dict[RetryPolicy, _Plan] = {}
        self._default_plan = self._plan_for(self._retry)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<BotMessageClient {self._base} {state}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # Only a warning (``_warn`` bound early: module globals may be gone at
        # exit). Nothing is scheduled: the loop may be closed or busy elsewhere.
        session = getattr(self, "_session", None)  # None too if __init__ failed early
        if session is None or session is self._lent_session or self._closed:
            return
        _warn(
            f"unclosed {self!r}: a BotMessageClient holds a connection pool until closed; "
            "use `async with BotMessageClient(...) as client:` or `await client.aclose()`",
            ResourceWarning,
            source=self,
        )

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client and the session it owns; a second call does nothing.

        A session passed in as ``session=`` is left open: it is the caller's.
        """
        if self._closed:
            return
        self._closed = True
        session, self._session = self._session, None
        if session is not None and session is not self._lent_session:
            await session.close()

    @property
    def closed(self) -> bool:
        """Whether ``aclose()`` was called."""
        return self._closed

    @property
    def retry_budget(self) -> RetryBudget | None:
        """The retry allowance shared by every send of this client."""
        return self._budget

    def ensure_open(self) -> None:
        """Raise ``ClientClosedError`` if the client was closed; open its session if needed.

        A batch calls it before its first item, so that a closed client fails at
        once rather than item by item.
        """
        self._ensure_session()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClientClosedError("this BotMessageClient is closed; create a new one")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise WrongEventLoopError(
                "this BotMessageClient was used with no running event loop; nothing was "
                "sent. Use it from async code, inside asyncio.run"
            ) from None
        if loop is not self._loop:
            if self._loop is not None:
                # Its pooled connections and timers belong to the first loop (often
                # closed by now): aiohttp would fail with "Event loop is closed".
                raise WrongEventLoopError(
                    "this BotMessageClient was used from a second event loop; nothing was "
                    "sent. A client belongs to the event loop that first used it; create "
                    "one per loop, inside asyncio.run"
                )
            self._loop = loop
        session = self._session
        if session is None:
            session = _http.new_session(
                max_connections=self._max_connections,
                keepalive_timeout=self._keepalive_timeout,
                timeout=self._default_plan.timeout,
            )
            self._session = session
        return session

    def _plan_for(self, policy: RetryPolicy) -> _Plan:
        plan = self._plans.get(policy)
        if plan is None:
            if len(self._plans) >= 32:  # a caller building a policy per call
                self._plans.clear()
            plan = _Plan(
                retrier=Retrier(
                    policy,
                    budget=self._budget,
                    clock=self._clock,
                    sleep=self._sleep,
                    before_sleep=self._before_retry,
                    rng=self._rng,
                ),
                timeout=_http.attempt_timeout(
                    self._timeout, policy.attempt_timeout, policy.connect_timeout
                ),
                rules=_http.AnswerRules(
                    max_response_bytes=self._max_response_bytes,
                    not_processed=policy.not_processed_statuses,
                    classify=policy.classify,
                ),
            )
            self._plans[policy] = plan
        return plan

    def _before_retry(self, state: _Send, attempt: int, wait: float, exc: BaseException) -> None:
        if state.policy.retry_ambiguous and isinstance(exc, DeliveryUnknownError):
            state.maybe_delivered = True
        state.retry_after = None
        state.last_error = exc if isinstance(exc, BotMessageError) else None
        log.debug(
            "retrying department=%s user=%s after attempt %d in %.3f s: %s",
            state.department_uuid,
            state.user_uuid,
            attempt,
            wait,
            exc,
        )
        if self._on_retry is not None:
            self._on_retry(RetryEvent(state.department_uuid, state.user_uuid, attempt, wait, exc))

    # -- sending -------------------------------------------------------------

    async def send(
        self,
        department_uuid: str | UUID,
        user_uuid: str | UUID,
        message: str | TextMessage,
        *,
        retry: RetryPolicy | None = None,
        idempotency_key: str | None = None,
    ) -> SendResult:
        """Send one bot message to one user of one department.

        Args:
            department_uuid: The department's id (a ``str``, or a ``uuid.UUID``).
            user_uuid: The user's id (a ``str``, or a ``uuid.UUID``).
            message: The text, or a ``TextMessage`` for subject, sender and the rest.
            retry: A policy for this send only, instead of the client's.
            idempotency_key: The key every attempt carries (default: a new UUID4).
                Pass the same key again only to resend the same message. With a
                ``send_guard``, a key already used returns (or raises) what its
                first send got, without sending again.

        Returns:
            The service's SUCCESS answer; ``attempts`` says how many tries it took.

        Raises:
            InvalidRequestError: bad input; nothing was sent.
            SendFailedError: the service answered FAILURE.
            AuthenticationError: the credentials were refused.
            RateLimitedError: throttled for longer than the policy waits.
            DeliveryUnknownError: the message may or may not have been delivered
                (``ServerError``, ``ResponseLostError``, ``InvalidResponseError``).
            TransportError: no connection could be made.
            APIStatusError: any other HTTP error.
            CoordinationError: the shared rate limiter or send guard failed; nothing
                was sent.
            IdempotencyConflictError: with a ``send_guard``, the key was already
                used for another message; nothing was sent.
            ClientClosedError: the client was closed.
            WrongEventLoopError: the client is used from another event loop than
                the one that first used it; nothing was sent.
        """
        department_uuid, user_uuid = id_text(department_uuid), id_text(user_uuid)
        dept = check_id("department_uuid", department_uuid)
        user = check_id("user_uuid", user_uuid)
        text = check_message(message, self._defaults, self._max_text_bytes)
        check_idempotency_key(idempotency_key)
        self._ensure_session()
        if self._rate_limiter is not None:
            # Before the deadline starts: a wait for a slot is not time lost to retries.
            await self._rate_limiter.acquire(department_uuid)
        state = _Send(
            department_uuid=department_uuid,
            user_uuid=user_uuid,
            url=_http.send_url(self._base_url, self._base_path, dept, user),
            body=_wire.encode_request(text),
            idempotency_key=idempotency_key or new_idempotency_key(),
            plan=self._default_plan if retry is None else self._plan_for(retry),
            started=self._clock(),
        )
        if self._send_guard is not None and idempotency_key is not None:
            return await self._send_guarded(self._send_guard, state)
        return await self._deliver(state)

    async def _send_guarded(self, guard: SendGuard, state: _Send) -> SendResult:
        """Send at most once per key across every holder of ``guard``."""
        key = state.idempotency_key
        digest = _guard.fingerprint(state.department_uuid, state.user_uuid, state.body)
        earlier = await guard.claim(key, digest, state.department_uuid, state.user_uuid)
        if earlier is not None:
            return earlier
        try:
            result = await self._deliver(state)
        except BotMessageError as exc:
            await _guard.settle(guard, key, digest, None, exc)
            raise
        await _guard.settle(guard, key, digest, result, None)
        return result

    async def _deliver(self, state: _Send) -> SendResult:
        """Make the attempts of one logical send; raise its settled error."""
        if self._budget is not None:
            self._budget.deposit()
        try:
            try:
                return await self._attempt(state)
            except BotMessageError as first:
                return await state.plan.retrier.retry(first, self._attempt, state)
        except BotMessageError as exc:
            settled = self._settled(exc, state)
            if settled is exc:
                raise
            raise settled from exc

    def _settled(self, exc: BotMessageError, state: _Send) -> BotMessageError:
        """The error a send ends with, told which message it concerns (the one place)."""
        exc.department_uuid = state.department_uuid
        exc.user_uuid = state.user_uuid
        exc.attempts = state.attempt
        if state.maybe_delivered and not isinstance(exc, DeliveryUnknownError):
            # An earlier attempt may have gone through: the truth is "unknown".
            unknown = DeliveryUnknownError(
                f"an earlier attempt may have delivered the message; the last one failed: "
                f"{exc.message}",
                department_uuid=state.department_uuid,
                user_uuid=state.user_uuid,
                attempts=state.attempt,
            )
            unknown.idempotency_key = state.idempotency_key
            # The definite error still decides what happens next (a batch
            # stops on refused credentials); delivery stays unknown.
            unknown.final_error = exc
            return unknown
        if isinstance(exc, DeliveryUnknownError):
            exc.idempotency_key = state.idempotency_key
        return exc

    def pause_remaining(self) -> float:
        """Seconds until the client-wide pause a 429's Retry-After asked for ends.

        Every send of this client waits it out before its next attempt; a
        batch waits it out before starting new items. 0 when there is none.
        """
        return max(0.0, self._paused_until - self._clock()) if self._paused_until else 0.0

    async def wait_out_pause(self) -> None:
        """Sleep (on the client's own sleep) until the client-wide 429 pause ends.

        Clients told to come back at one instant do not all come back at once:
        the wait gets up to a tenth more (1 s at most). Returns at once when
        there is no pause.
        """
        wait = self.pause_remaining()
        if wait:
            await self._sleep(spread(wait, self._rng))

    async def _wait_for_pause(self, state: _Send) -> None:
        wait = self.pause_remaining()
        if not wait:
            return
        delay = spread(wait, self._rng)
        remaining = state.policy.deadline - (self._clock() - state.started)
        if delay + ATTEMPT_FLOOR >= remaining:
            # At least the time left, so that the retry engine stops here too.
            state.retry_after = max(wait, remaining)
            raise RateLimitedError(
                f"the service asked to wait {wait:.1f} s, past this send's deadline; "
                "slow down or raise RetryPolicy.deadline",
                status=429,
                retry_after=wait,
            )
        await self._sleep(delay)

    async def _attempt(self, state: _Send) -> SendResult:
        policy = state.policy
        limiter = self._rate_limiter
        if limiter is not None and (shared := await limiter.paused_for()):
            # Another holder of the limiter was told to wait: so are we.
            self._paused_until = max(self._paused_until, self._clock() + shared)
        if self._paused_until:
            await self._wait_for_pause(state)
        timeout = state.plan.timeout
        remaining = policy.deadline - (self._clock() - state.started)
        if remaining < ATTEMPT_FLOOR and state.last_error is not None:
            # A wait ran long and left this retry no time worth trying: sending
            # now could only turn the last failure into a false "unknown".
            raise state.last_error
        if timeout.total is None or remaining < timeout.total:
            timeout = _http.bounded_timeout(timeout, max(remaining, 0.001))
        session = self._session
        if self._closed or session is None or session.closed:
            # Closed while this send waited to retry (or its lent session was):
            # this attempt is not made, so nothing new can have been sent.
            raise ClientClosedError(
                "this BotMessageClient was closed before the next attempt; "
                "the message was not sent again"
            )
        state.attempt += 1
        headers = self._headers.copy()
        headers[policy.idempotency_header] = state.idempotency_key
        if state.attempt > 1 and policy.retry_count_header:
            headers[policy.retry_count_header] = str(state.attempt - 1)
        debug = log.isEnabledFor(logging.DEBUG)
        begun = time.perf_counter() if debug else 0.0
        outcome = "no answer"
        try:
            try:
                async with _http.open_post(
                    session, state.url, state.body, headers, timeout
                ) as response:
                    result = await _http.read_answer(response, state.plan.rules)
            except _http.TRANSPORT_ERRORS as exc:
                raise _http.transport_error(exc, state.url) from exc
            outcome = "200"
        except RateLimitedError as exc:
            outcome = str(exc.status)
            state.retry_after = exc.retry_after
            if exc.status == 429 and exc.retry_after:
                self._paused_until = max(self._paused_until, self._clock() + exc.retry_after)
                if limiter is not None:
                    await limiter.pause(exc.retry_after)
            raise
        except BotMessageError as exc:
            outcome = str(getattr(exc, "status", None) or "no answer")
            raise
        finally:
            if debug:
                log.debug(
                    "POST %s -> %s in %.1f ms (attempt %d)",
                    state.url.path,
                    outcome,
                    (time.perf_counter() - begun) * 1000,
                    state.attempt,
                )
        if state.attempt != 1:
            result = evolve(result, attempts=state.attempt)
        return result

    # -- many ------------------------------------------------------------------

    def stream_many(
        self,
        items: Items,
        *,
        concurrency: int = 64,
        rate_limit: float | None = None,
        per_department_rate_limit: float | None = None,
        retry: RetryPolicy | None = None,
        on_result: Callable[[ItemResult], object] | None = None,
        on_start: Callable[[int, SendRequest], object] | None = None,
        on_progress: Callable[[Progress], object] | None = None,
        progress_interval: float = 1.0,
        stop_after_consecutive_failures: int | None = 100,
        max_pause: float = 300.0,
    ) -> BatchStream:
        """Send many messages; yield each ``ItemResult`` as soon as it is known.

        Memory stays flat whatever the input's size: a fixed pool of
        ``concurrency`` workers pulls ``items`` lazily, only as fast as results
        are consumed. See ``send_many`` for the arguments.

        Example:
            >>> async with client.stream_many(rows, concurrency=100) as results:
            ...     async for item in results:
            ...         journal.write(item)
        """
        options = BatchOptions(
            concurrency=concurrency,
            rate_limit=rate_limit,
            per_department_rate_limit=per_department_rate_limit,
            retry=retry,
            on_result=on_result,
            on_start=on_start,
            on_progress=on_progress,
            progress_interval=progress_interval,
            stop_after_consecutive_failures=stop_after_consecutive_failures,
            max_pause=max_pause,
        )
        return BatchStream(self, items, options)

    async def send_many(
        self,
        items: Items,
        *,
        concurrency: int = 64,
        rate_limit: float | None = None,
        per_department_rate_limit: float | None = None,
        retry: RetryPolicy | None = None,
        on_result: Callable[[ItemResult], object] | None = None,
        on_start: Callable[[int, SendRequest], object] | None = None,
        on_progress: Callable[[Progress], object] | None = None,
        progress_interval: float = 1.0,
        stop_after_consecutive_failures: int | None = 100,
        max_pause: float = 300.0,
        keep: Literal["all", "failures", "none"] = "all",
    ) -> BatchReport:
        """Send many messages concurrently and report what became of each.

        One item's failure never stops the others. Refused credentials, a
        redirect, a closed client, ``stop_after_consecutive_failures`` FAILED or
        UNKNOWN items in a row (the circuit breaker: a service that answers 502
        to everything would otherwise turn a whole batch into UNKNOWN), or a 429
        pause longer than ``max_pause`` stop the batch: no new item starts, the
        rest are reported SKIPPED, and ``BatchReport.stopped_by`` says why.

        A 429 with a Retry-After pauses the whole batch until the instant the
        service named; the item that got it was not processed and is sent again
        after the pause, under the same idempotency key, with a fresh deadline.

        The report keeps results as ``keep`` says: ``"all"`` (default) holds one
        ``ItemResult`` per item in memory (about 300 bytes each: 300 MB for a
        million), ``"failures"`` only those not SENT, ``"none"`` only the counts.
        For very large jobs, prefer ``stream_many`` and write results out as they come.

        Args:
            items: ``SendRequest``s or ``(department_uuid, user_uuid, message)``
                tuples; any iterable or async iterable, read lazily.
            concurrency: Most requests in flight at once.
            rate_limit: Most messages per second across the batch (needs the
                ``rate`` extra: aiolimiter).
            per_department_rate_limit: Most messages per second to one department.
            retry: A policy for this batch instead of the client's.
            on_result: Called with every ``ItemResult`` as it is known.
            on_start: Called with an item's input index and request right before
                its first attempt (after any rate-limit wait): where a journal
                records "about to send".
            on_progress: Called about every ``progress_interval`` seconds with a
                ``Progress`` snapshot, and once at the end.
            progress_interval: Seconds between ``on_progress`` calls.
            stop_after_consecutive_failures: Stop after this many FAILED or
                UNKNOWN items in a row (default 100; None: never).
            max_pause: Longest 429 pause, in seconds, the batch waits out
                (default 300). A longer one stops the batch, and so does an item
                throttled again and again once its pauses add up past it.
            keep: Which results the report holds.

        Returns:
            A ``BatchReport``: results in input order, counts, rate, ``stopped_by``.

        Raises:
            InvalidRequestError: a bad argument (before anything is sent).
            ClientClosedError: the client was closed.
            WrongEventLoopError: the client is used from another event loop than
                the one that first used it; nothing was sent.
        """
        # The same checks and defaults as stream_many: one place builds the options.
        stream = self.stream_many(
            items,
            concurrency=concurrency,
            rate_limit=rate_limit,
            per_department_rate_limit=per_department_rate_limit,
            retry=retry,
            on_result=on_result,
            on_start=on_start,
            on_progress=on_progress,
            progress_interval=progress_interval,
            stop_after_consecutive_failures=stop_after_consecutive_failures,
            max_pause=max_pause,
        )
        return await collect(stream, keep)
