"""The client: one pooled aiohttp session, one send at a time or many at once."""

from __future__ import annotations

import asyncio
import logging
import random
import select
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self
from uuid import UUID

import aiohttp
import tenacity
from attrs import evolve
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import _wire
from ._delivery import StatusRule, status_rule
from ._errors import (
    APIStatusError,
    AuthenticationError,
    BotMessageError,
    CertificateError,
    ClientClosedError,
    DeliveryUnknownError,
    InvalidRequestError,
    InvalidResponseError,
    RateLimitedError,
    ResponseLostError,
    SendFailedError,
    ServerError,
    TransportError,
    UnexpectedStatusError,
    excerpt,
)
from ._models import MessageDefaults, SendRequest, SendResult, Status, TextMessage
from ._retry import (
    ATTEMPT_FLOOR,
    RetryBudget,
    RetryEvent,
    RetryPolicy,
    SendState,
    build_retrying,
    classify_failure,
    parse_retry_after,
    spread,
)
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

if TYPE_CHECKING:
    from ._batch import BatchReport, BatchStream, ItemResult, Items, Progress

__all__ = ["BotMessageClient"]

log = logging.getLogger("botmsg_async")

_PATH = "/communications/department/{}/user/{}/botmessage/send"
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024


def bounded_timeout(timeout: aiohttp.ClientTimeout, total: float) -> aiohttp.ClientTimeout:
    """Return ``timeout`` limited to ``total`` seconds, its connect phase ending first.

    A total timeout surfaces as a bare ``TimeoutError`` whatever phase it cuts,
    while a connect timeout is an ``aiohttp.ConnectionTimeoutError``. Ending the
    connect phase clearly before the total means a bare ``TimeoutError`` can
    only come after the connection was made: it is then honest to report the
    delivery as unknown, and a timeout while connecting as "nothing was sent".
    aiohttp rounds timers of ``ceil_threshold`` seconds or more up to a whole
    second, which could let an attempt run up to a second past its deadline or
    the connect timer fire after the total: the threshold is raised above the
    total, so that neither is rounded.
    """
    connect = min(timeout.connect or total, total * 0.9)
    ceil_threshold = max(timeout.ceil_threshold, total + 1.0)
    if (
        timeout.total == total
        and timeout.connect == connect
        and timeout.ceil_threshold == ceil_threshold
    ):
        return timeout
    return evolve(timeout, total=total, connect=connect, ceil_threshold=ceil_threshold)


def _scrub(exc: BaseException) -> None:
    """Drop the request headers (Authorization among them) from a chained aiohttp error."""
    if isinstance(exc, aiohttp.ClientResponseError):
        info = exc.request_info
        exc.request_info = aiohttp.RequestInfo(
            info.url, info.method, CIMultiDictProxy(CIMultiDict()), info.real_url
        )
        exc.args = (exc.request_info, exc.history)


#: aiohttp's StreamWriter methods that write a request's headers, its first bytes.
_FIRST_WRITES = frozenset({"_send_headers_with_payload", "send_headers"})


def _closed_before_written(exc: BaseException) -> bool:
    """Whether aiohttp refused to write the request's first bytes to a closed connection.

    aiohttp buffers the request line and headers and writes them together with
    the body; before handing bytes to the transport it checks that the transport
    is not closing, and raises ``ClientConnectionResetError`` if it is. Such an
    error raised within the write that carries the headers proves that not one
    byte of the request left: the server closed the pooled connection first.
    Every other failure (a later write, a drain, a disconnect noticed while
    waiting for the answer) may follow bytes that reached the server and stays
    ambiguous; so does everything on an aiohttp that writes differently, since
    then no frame matches. Only failures pay for this walk.
    """
    for error in (exc, exc.__cause__):
        if isinstance(error, aiohttp.ClientConnectionResetError):
            tb = error.__traceback__
            while tb is not None:
                code = tb.tb_frame.f_code
                if code.co_name in _FIRST_WRITES and code.co_filename.endswith("http_writer.py"):
                    return True
                tb = tb.tb_next
    return False


def _peer_spoke(connection: aiohttp.connector.Connection) -> bool:
    """Whether an idle connection has bytes or an end of stream the loop has not read yet.

    An idle keep-alive connection has nothing to read unless the server closed it
    (FIN or RST) or sent something unasked (a 408, a TLS close_notify): either
    way it must not carry a request. The check is one ``select`` with no wait.
    """
    transport = connection.transport
    if transport is None or transport.is_closing():
        return False  # aiohttp already knows; it refuses to write and we report it
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select((sock,), (), (), 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class _LiveConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that never lends a pooled connection the server already closed.

    aiohttp reuses a pooled connection unless the event loop has already seen it
    close; a server's FIN that is in the kernel but not yet read by the loop (it
    answered and closed at once, or its idle timeout just ran out) would carry
    the next request to a dead socket, and the send would end "unknown". Such a
    connection is closed and another one taken, before anything is written.
    """

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[aiohttp.tracing.Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        for _ in range(8):  # bounded: each one dropped leaves the pool smaller
            if not _peer_spoke(connection):
                break
            connection.close()
            connection = await super().connect(req, traces, timeout)
        return connection


def _tls_reason(exc: aiohttp.ClientConnectorCertificateError) -> str:
    """Why the certificate was refused, in OpenSSL's words (e.g. "self-signed certificate")."""
    cause = exc.certificate_error
    reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
    return str(reason or cause.__class__.__name__)


class _Secret(str):
    """A credential as text: sent as it is, shown as ``'<redacted>'`` by ``repr``.

    Headers live in dicts that tracebacks print with ``capture_locals=True`` and
    that debuggers and loggers ``repr``; the value itself still goes on the wire.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'"


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
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_text_bytes: int = MAX_TEXT_BYTES,
        on_retry: Callable[[RetryEvent], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base_url = check_base_url(base_url, allow_insecure_http=allow_insecure_http)
        self._base = str(self._base_url)
        self._base_path = self._base_url.raw_path.rstrip("/")
        if not isinstance(username, str) or not isinstance(password, str):
            raise InvalidRequestError("username", "<redacted>", "username and password must be str")
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
            "Authorization": _Secret(authorization),
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
        self._lent_session = session
        self._session: aiohttp.ClientSession | None = session
        self._closed = False
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        # Instant (on self._clock) before which no attempt may start: set by a
        # 429's Retry-After so every send of this client waits, not just the one told.
        self._paused_until = 0.0
        self._retrying: dict[RetryPolicy, tenacity.AsyncRetrying] = {}
        self._timeouts: dict[RetryPolicy, aiohttp.ClientTimeout] = {}
        self._default_retrying = self._retrying_for(self._retry)
        self._default_timeout = self._timeout_for(self._retry)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<BotMessageClient {self._base} {state}>"

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

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClientClosedError("this BotMessageClient is closed; create a new one")
        session = self._session
        if session is None:
            connector = _LiveConnector(
                limit=self._max_connections or 0,
                limit_per_host=0,
                ttl_dns_cache=300,
                keepalive_timeout=self._keepalive_timeout,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                # Cookies play no part in this API; skipping them saves work per answer.
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self._timeout_for(self._retry),
                trust_env=False,
            )
            self._session = session
        return session

    # -- retry plumbing -----------------------------------------------------

    def _retrying_for(self, policy: RetryPolicy) -> tenacity.AsyncRetrying:
        retrying = self._retrying.get(policy)
        if retrying is None:
            if len(self._retrying) >= 32:  # a caller building a policy per call
                self._retrying.clear()
            retrying = build_retrying(
                policy,
                budget=self._budget,
                clock=self._clock,
                sleep=self._sleep,
                before_sleep=self._before_retry,
                rng=self._rng,
            )
            self._retrying[policy] = retrying
        return retrying

    def _timeout_for(self, policy: RetryPolicy) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(policy)
        if timeout is None:
            if isinstance(self._timeout, aiohttp.ClientTimeout):
                timeout = self._timeout
                if timeout.total is not None:
                    timeout = bounded_timeout(timeout, timeout.total)
            else:
                total = policy.attempt_timeout if self._timeout is None else self._timeout
                timeout = bounded_timeout(
                    aiohttp.ClientTimeout(total=total, connect=policy.connect_timeout), total
                )
            if len(self._timeouts) >= 32:
                self._timeouts.clear()
            self._timeouts[policy] = timeout
        return timeout

    def _before_retry(
        self, state: SendState, attempt: int, wait: float, exc: BaseException
    ) -> None:
        if state.policy.retry_ambiguous and isinstance(exc, DeliveryUnknownError):
            state.maybe_delivered = True
        state.retry_after = None
        state.last_error = exc
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
                Pass the same key again only to resend the same message.

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
            ClientClosedError: the client was closed.
        """
        department_uuid, user_uuid = id_text(department_uuid), id_text(user_uuid)
        dept = check_id("department_uuid", department_uuid)
        user = check_id("user_uuid", user_uuid)
        text = check_message(message, self._defaults, self._max_text_bytes)
        check_idempotency_key(idempotency_key)
        session = self._ensure_session()
        policy = retry or self._retry
        retrying = self._default_retrying if retry is None else self._retrying_for(retry)
        state = SendState(
            department_uuid=department_uuid,
            user_uuid=user_uuid,
            url=self._base_url.with_path(self._base_path + _PATH.format(dept, user), encoded=True),
            body=_wire.encode_request(text),
            idempotency_key=idempotency_key or new_idempotency_key(),
            policy=policy,
            started=self._clock(),
        )
        if self._budget is not None:
            self._budget.deposit()
        try:
            # Most sends succeed at once; entering tenacity costs more than the rest
            # of a send (it inspects every callback on every call), so the first
            # attempt runs directly and tenacity takes over only to retry.
            try:
                return await self._attempt(state, session)
            except BotMessageError as first:
                if policy.max_attempts == 1 or not classify_failure(first, policy):
                    raise
                state.replay = first
            result: SendResult = await retrying(self._attempt, state, session)
        except BotMessageError as exc:
            # Errors are raised deep in one attempt; say here which message they concern.
            exc.department_uuid = department_uuid
            exc.user_uuid = user_uuid
            exc.attempts = state.attempt
            if state.maybe_delivered and not isinstance(exc, DeliveryUnknownError):
                # An earlier attempt may have gone through: the truth is "unknown".
                unknown = DeliveryUnknownError(
                    f"an earlier attempt may have delivered the message; the last one failed: "
                    f"{exc.message}",
                    department_uuid=department_uuid,
                    user_uuid=user_uuid,
                    attempts=state.attempt,
                )
                unknown.idempotency_key = state.idempotency_key
                # The definite error still decides what happens next (a batch
                # stops on refused credentials); delivery stays unknown.
                unknown.final_error = exc
                raise unknown from exc
            if isinstance(exc, DeliveryUnknownError):
                exc.idempotency_key = state.idempotency_key
            raise
        return result

    def pause_remaining(self) -> float:
        """Seconds until the client-wide pause a 429's Retry-After asked for ends.

        Every send of this client waits it out before its next attempt; a
        batch waits it out before starting new items. 0 when there is none.
        """
        return max(0.0, self._paused_until - self._clock()) if self._paused_until else 0.0

    async def _wait_for_pause(self, state: SendState) -> None:
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
                department_uuid=state.department_uuid,
                user_uuid=state.user_uuid,
            )
        await self._sleep(delay)

    async def _attempt(self, state: SendState, session: aiohttp.ClientSession) -> SendResult:
        if state.replay is not None:
            # Hand the first attempt's failure to tenacity as its own first outcome,
            # so that its predicate, wait and stop decide what happens next.
            failure, state.replay = state.replay, None
            raise failure
        policy = state.policy
        if self._paused_until:
            await self._wait_for_pause(state)
        timeout = self._default_timeout if policy is self._retry else self._timeout_for(policy)
        remaining = policy.deadline - (self._clock() - state.started)
        if remaining < ATTEMPT_FLOOR and state.last_error is not None:
            # A wait ran long and left this retry no time worth trying: sending
            # now could only turn the last failure into a false "unknown".
            raise state.last_error
        if timeout.total is None or remaining < timeout.total:
            timeout = bounded_timeout(timeout, max(remaining, 0.001))
        if self._closed or session.closed:
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
        status = 0
        try:
            async with session.post(
                state.url,
                data=state.body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
                return await self._read_answer(state, response)
        except BotMessageError:
            raise
        except aiohttp.ClientConnectorCertificateError as exc:
            raise CertificateError(
                f"TLS verification of {self._base_url.host} failed: {_tls_reason(exc)}; "
                "the server's certificate is not trusted. Nothing was sent; not retried",
                department_uuid=state.department_uuid,
                user_uuid=state.user_uuid,
            ) from exc
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise TransportError(
                f"could not connect to {self._base_url.host}: {exc.__class__.__name__}; "
                "nothing was sent, check the host and the network",
                department_uuid=state.department_uuid,
                user_uuid=state.user_uuid,
            ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            _scrub(exc)
            if _closed_before_written(exc):
                # A stale pooled connection: safe to retry, on another connection
                # (aiohttp drops this one).
                raise TransportError(
                    "the pooled connection was closed before the request was written; "
                    "nothing was sent",
                    department_uuid=state.department_uuid,
                    user_uuid=state.user_uuid,
                ) from exc
            raise ResponseLostError(
                f"the request was sent but no answer came back ({exc.__class__.__name__}); "
                "the message may or may not have been delivered",
                department_uuid=state.department_uuid,
                user_uuid=state.user_uuid,
            ) from exc
        finally:
            if debug:
                log.debug(
                    "POST %s -> %s in %.1f ms (attempt %d)",
                    state.url.path,
                    status or "no answer",
                    (time.perf_counter() - begun) * 1000,
                    state.attempt,
                )

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes | None:
        """Read the body, or return None if it is larger than allowed (unread)."""
        limit = self._max_response_bytes
        length = response.content_length
        if length is not None:
            if length > limit:
                return None
            # Content-Length counts the compressed bytes: a small gzip body can
            # inflate to gigabytes, so only a plain one is read in one go.
            if "Content-Encoding" not in response.headers:
                return await response.read()
        chunks = bytearray()
        while chunk := await response.content.read(65536):
            chunks += chunk
            if len(chunks) > limit:
                return None
        return bytes(chunks)

    async def _read_answer(self, state: SendState, response: aiohttp.ClientResponse) -> SendResult:
        status = response.status
        if 200 <= status < 300:
            try:
                body = await self._read_body(response)
            except (aiohttp.ClientError, TimeoutError) as exc:
                _scrub(exc)
                raise ResponseLostError(
                    f"HTTP {status} but the body was cut off ({exc.__class__.__name__}); "
                    "the message may or may not have been delivered",
                ) from exc
            if body is None:
                raise InvalidResponseError(
                    f"HTTP {status} with a body over {self._max_response_bytes} bytes; "
                    "not read. The message may or may not have been delivered",
                    status=status,
                    body_excerpt="",
                    problems=("body too large",),
                )
            try:
                result = _wire.decode_response(body)
            except _wire.WireFormatError as exc:
                raise InvalidResponseError(
                    f"HTTP {status} but the body is not the documented JSON "
                    f"({'; '.join(exc.problems)}); the message may or may not have been delivered",
                    status=status,
                    body_excerpt=excerpt(body),
                    problems=exc.problems,
                ) from exc
            if state.attempt != 1:
                result = evolve(result, attempts=state.attempt)
            if result.status is Status.SUCCESS:
                return result
            raise SendFailedError(result, transient=state.policy.classify(result))

        try:
            body = await self._read_body(response)
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        text = excerpt(body) if body is not None else "[body too large, not read]"
        rule = status_rule(status, state.policy.not_processed_statuses)
        if rule is StatusRule.AUTH:
            raise AuthenticationError(
                f"HTTP {status}: the service refused the credentials; "
                "check the username, the password and their rights",
                status=status,
                body_excerpt=text,
            )
        if rule is StatusRule.AMBIGUOUS:
            if 500 <= status < 600:
                raise ServerError(
                    f"HTTP {status}: the service failed while handling the request; "
                    "the message may or may not have been delivered",
                    status=status,
                    body_excerpt=text,
                )
            raise UnexpectedStatusError(
                f"HTTP {status}: an answer that does not say whether the message was "
                "processed; it may or may not have been delivered",
                status=status,
                body_excerpt=text,
            )
        if rule is StatusRule.REDIRECT:
            raise APIStatusError(
                f"HTTP {status}: redirect to {response.headers.get('Location', '?')!r} not "
                "followed, so credentials stay with this host; check base_url",
                status=status,
                body_excerpt=text,
            )
        if rule is StatusRule.REJECTED:
            raise APIStatusError(
                f"HTTP {status}: the service refused the request; check the request and base_url",
                status=status,
                body_excerpt=text,
            )
        # Not processed, worth retrying: 429, 408, 425, 503, or a status the policy names.
        retry_after = parse_retry_after(
            response.headers.get("Retry-After"), response.headers.get("retry-after-ms")
        )
        if rule is StatusRule.RATE_LIMITED or retry_after is not None:
            state.retry_after = retry_after
            if rule is StatusRule.RATE_LIMITED and retry_after:
                self._paused_until = max(self._paused_until, self._clock() + retry_after)
            when = f"after {retry_after:.1f} s" if retry_after is not None else "later"
            raise RateLimitedError(
                f"HTTP {status}: the service asks to slow down; try again {when}",
                status=status,
                retry_after=retry_after,
                body_excerpt=text,
            )
        raise APIStatusError(
            f"HTTP {status}: the service did not process the request; try again later",
            status=status,
            body_excerpt=text,
            retryable=True,
        )

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
        from ._batch import BatchStream

        return BatchStream(
            self,
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
        """
        from ._batch import collect

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
