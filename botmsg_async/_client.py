"""The client: its lifecycle, ``send`` and its attempt loop, the 429 pause, and batches.

HTTP itself (the session's connector, timeouts, one POST and what its answer
means) is ``_http``'s job; input checks are ``_validate``'s; retry scheduling is
``_retry``'s; which failure means what is ``_delivery``'s.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from ssl import SSLContext
from types import TracebackType
from typing import Literal, Self
from uuid import UUID

import aiohttp
from attrs import define, evolve
from yarl import URL

from . import _guard, _http
from ._batch import BatchOptions, BatchStream, Items, collect
from ._delivery import outcome_of
from ._errors import (
    BotMessageError,
    ClientClosedError,
    DeliveryUnknownError,
    InvalidRequestError,
    RateLimitedError,
    WrongEventLoopError,
)
from ._guard import SendGuard
from ._limits import PauseOnly, RateLimiter
from ._models import MessageDefaults, Outcome, SendRequest, SendResult, TextMessage
from ._observe import Observer, SendObservation, log_quietly
from ._report import BatchReport, ItemResult, Progress
from ._retry import ATTEMPT_FLOOR, Retrier, RetryBudget, RetryEvent, RetryPolicy, spread
from ._validate import (
    MAX_TEXT_BYTES,
    check_base_url,
    check_headers,
    check_id,
    check_idempotency_key,
    check_proxy,
    id_text,
    message_encoder,
    new_idempotency_key,
)
from ._version import __version__

__all__ = ["BotMessageClient"]

#: A lone surrogate: a str may hold one, UTF-8 (which credentials are sent in) cannot.
_SURROGATE = re.compile("[\ud800-\udfff]")

log = logging.getLogger("botmsg_async")


@define(frozen=True)
class _Plan:
    """What one retry policy needs on every send, built once per policy and client."""

    retrier: Retrier
    timeout: aiohttp.ClientTimeout
    rules: _http.AnswerRules


#: Headers the client sets itself (lower-case), which extra headers cannot replace:
#: the credentials (a proxy's come with its URL), the body's type and framing, and
#: the idempotency key (the policy's own header names are added by ``_protected``).
_OWN_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "content-length",
        "transfer-encoding",
        "idempotency-key",
        "proxy-authorization",
    }
)


def _check_policy_headers(policy: RetryPolicy) -> None:
    """Refuse a policy whose header names cannot carry what the client puts in them.

    Each must be an RFC 9110 token and none of the client's own headers (the
    key would replace the credentials), and the retry count must not share the
    key's name (every retry would then carry the count as its key).

    Raises:
        InvalidRequestError: naming the header, as ``retry``.
    """
    key_name, count_name = policy.idempotency_header, policy.retry_count_header
    own = _OWN_HEADERS - {"idempotency-key"}
    check_headers("retry", {key_name: ""}, own)
    if count_name:
        check_headers("retry", {count_name: ""}, own)
        if count_name.lower() == key_name.lower():
            raise InvalidRequestError(
                "retry", count_name, "is both the idempotency and the retry-count header"
            )


def _protected(policy: RetryPolicy) -> frozenset[str]:
    """The header names extra headers may not use with ``policy``, lower-case."""
    _check_policy_headers(policy)
    names = {policy.idempotency_header.lower()}
    if policy.retry_count_header:
        names.add(policy.retry_count_header.lower())
    return _OWN_HEADERS | names


class _Shared:
    """What a client shares with its ``with_options()`` views: one pool, one loop, one pause.

    The session (created on first use by whichever of them comes first), the
    event loop it lives on, whether the client that owns it was closed, and the
    instant before which no attempt may start (a 429's Retry-After).
    """

    __slots__ = ("closed", "lent_session", "loop", "paused_until", "session")

    def __init__(self, lent_session: aiohttp.ClientSession | None) -> None:
        self.lent_session = lent_session
        self.session: aiohttp.ClientSession | None = lent_session
        # The loop of the first use: the pool's connections and timers live on it.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        # Instant (on the client's clock) before which no attempt may start: set by
        # a 429's Retry-After so every send of this client waits, not just the one told.
        self.paused_until = 0.0


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
        "watch",
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
        #: The telemetry's view of this send (None: no telemetry).
        self.watch: SendObservation | None = None


def _log_fields(
    state: _Send, attempt: int, status: int | None, outcome: str | None
) -> dict[str, object]:
    """The ``extra`` of a log record about one send: fields a JSON formatter can emit as is.

    The same keys on every record about a send (None where not known yet), and
    never the message text or a credential.
    """
    return {
        "department_uuid": state.department_uuid,
        "user_uuid": state.user_uuid,
        "idempotency_key": state.idempotency_key,
        "attempt": attempt,
        "status": status,
        "outcome": outcome,
    }


def _session_options(
    *,
    max_connections: int | None,
    keepalive_timeout: float,
    proxy: URL | None,
    ssl: object,
    trust_env: object,
    trace_configs: object,
) -> _http.SessionOptions:
    """Check the options of the client's own session, before any I/O."""
    if max_connections is not None and max_connections < 1:
        raise InvalidRequestError("max_connections", max_connections, "must be >= 1 or None")
    if not keepalive_timeout > 0:  # also refuses NaN
        raise InvalidRequestError("keepalive_timeout", keepalive_timeout, "must be > 0")
    if not isinstance(ssl, SSLContext | bool):
        raise InvalidRequestError(
            "ssl", ssl, f"must be an ssl.SSLContext, True or False, not {type(ssl).__name__}"
        )
    if not isinstance(trust_env, bool):
        raise InvalidRequestError("trust_env", trust_env, "must be True or False")
    if not isinstance(trace_configs, Sequence) or not all(
        isinstance(config, aiohttp.TraceConfig) for config in trace_configs
    ):
        raise InvalidRequestError(
            "trace_configs", trace_configs, "must be a sequence of aiohttp.TraceConfig"
        )
    return _http.SessionOptions(
        max_connections=max_connections,
        keepalive_timeout=keepalive_timeout,
        ssl=ssl,
        proxy=proxy,
        trust_env=trust_env,
        trace_configs=tuple(trace_configs),
    )


def _proxy_authorization(user: str | None, password: str | None) -> str | None:
    """The ``Proxy-Authorization`` value for a proxy URL's credentials, if it has any."""
    if user is None:
        return None
    try:
        return _http.Secret(aiohttp.encode_basic_auth(user, password or ""))
    except ValueError:
        raise InvalidRequestError(
            "proxy", "<redacted>", "its user name must not contain ':' (RFC 7617)"
        ) from None


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
            Options that belong to a session (``max_connections``,
            ``keepalive_timeout``, ``proxy``, ``ssl``, ``trust_env``,
            ``trace_configs``) are then refused with ``InvalidRequestError``:
            set them on your session.
        proxy: An ``http://`` or ``https://`` proxy every request goes through
            (``CONNECT`` for https targets). Credentials in it
            (``http://user:password@proxy:3128``) are sent as
            ``Proxy-Authorization`` and never shown in a repr or an error.
        ssl: An ``ssl.SSLContext`` (a private CA, a client certificate for mTLS),
            or False to skip certificate verification (never in production).
            Default True: verified against the system's trust store.
        trust_env: Take proxy settings (``HTTPS_PROXY``, ``HTTP_PROXY``,
            ``NO_PROXY``) and ``.netrc`` from the environment, as aiohttp does.
        default_headers: Headers added to every request (a gateway's API key, a
            tenant id). ``Accept`` and ``User-Agent`` may be replaced;
            ``Authorization``, ``Proxy-Authorization`` (put a proxy's credentials
            in ``proxy``), ``Content-Type``, ``Content-Length``,
            ``Transfer-Encoding`` and the retry policy's idempotency and retry-count
            headers may not, in any case (``InvalidRequestError`` names the header).
            Values are never shown in reprs or errors.
        trace_configs: ``aiohttp.TraceConfig`` objects for the client's session,
            passed through as they are. Note that aiohttp hands their callbacks the
            request's headers, ``Authorization`` (the Basic credentials) included:
            never log those.
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
        telemetry: Told of every send, attempt, retry and batch:
            ``botmsg_async.otel.Telemetry`` records them as OpenTelemetry spans
            and metrics (the ``otel`` extra). None (default): nothing is recorded.
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
        telemetry: Observer | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        proxy: str | URL | None = None,
        ssl: SSLContext | bool = True,
        trust_env: bool = False,
        default_headers: Mapping[str, str] | None = None,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
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
            if not value.isascii() and _SURROGATE.search(value) is not None:
                # Sent as UTF-8, which a lone surrogate is not (os.environ holds one for
                # each byte of a variable that is not UTF-8): said here, for this field.
                raise InvalidRequestError(
                    field,
                    "<redacted>",
                    "is not text UTF-8 can carry (a lone surrogate; was it read as "
                    "bytes in another encoding?)",
                )
        try:
            authorization = aiohttp.encode_basic_auth(username, password)
        except ValueError:
            raise InvalidRequestError(
                "username", "<redacted>", "must not contain ':' (RFC 7617)"
            ) from None
        if max_response_bytes < 1:
            raise InvalidRequestError("max_response_bytes", max_response_bytes, "must be >= 1")
        if not isinstance(max_text_bytes, int) or max_text_bytes < 1:
            raise InvalidRequestError("max_text_bytes", max_text_bytes, "must be an int >= 1")
        proxy_url, proxy_user, proxy_password = (
            check_proxy(proxy) if proxy is not None else (None, None, None)
        )
        self._session_options = _session_options(
            max_connections=max_connections,
            keepalive_timeout=keepalive_timeout,
            proxy=proxy_url,
            ssl=ssl,
            trust_env=trust_env,
            trace_configs=trace_configs,
        )
        if session is not None and (refused := self._session_options.changed()):
            name = refused[0]
            raise InvalidRequestError(
                name,
                getattr(self._session_options, name),  # proxy: its URL without credentials
                "belongs to the session, and with session= the client uses yours as it is: "
                "set it on your aiohttp.ClientSession (or its connector) instead",
            )
        self._retry = retry or RetryPolicy()
        extra = check_headers("default_headers", default_headers or {}, _protected(self._retry))
        if user_agent is not None and any(name.lower() == "user-agent" for name in extra):
            raise InvalidRequestError(
                "default_headers", "User-Agent", "is also given as user_agent=; pass one of them"
            )
        if user_agent is not None:
            check_headers("user_agent", {"User-Agent": user_agent}, frozenset())
        #: The caller's own headers, kept to check them again in ``with_options``.
        self._extra_headers = extra
        own = {
            "Authorization": _http.Secret(authorization),
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": user_agent or f"botmsg-async/{__version__}",
        }
        # The proxy's credentials go to the proxy only: on the CONNECT that opens a
        # tunnel for https://, on the request itself (which the proxy reads) for
        # http://. Never in aiohttp's proxy URL, which its errors would show.
        self._proxy_headers: dict[str, str] | None = None
        if (proxy_authorization := _proxy_authorization(proxy_user, proxy_password)) is not None:
            if self._base_url.scheme == "https":
                self._proxy_headers = {"Proxy-Authorization": proxy_authorization}
            else:
                own["Proxy-Authorization"] = proxy_authorization
        self._headers = _http.merged_headers(own, extra)
        self._timeout = timeout
        self._clock = clock
        self._sleep = sleep
        self._budget = retry_budget if retry_budget is not None else RetryBudget(clock=clock)
        self._defaults = message_defaults or MessageDefaults()
        self._max_response_bytes = max_response_bytes
        self._max_text_bytes = max_text_bytes
        # The last department id checked, and its path form (check_id is pure).
        self._checked_department: tuple[object, str] = (None, "")
        # check_message + encode_request in one, with a fast path for plain strings.
        self._encode_message = message_encoder(self._defaults, max_text_bytes)
        self._on_retry = on_retry
        self._telemetry = telemetry
        self._rate_limiter = rate_limiter
        # A limiter of pauses only: no slot to take per send, and its pause maybe
        # readable without a coroutine (a bulk worker's, in shared memory).
        self._pause_only = rate_limiter if isinstance(rate_limiter, PauseOnly) else None
        if send_guard is not None:
            _guard.check_guard(send_guard)
        self._send_guard = send_guard
        self._shared = _Shared(session)
        #: Set on a ``with_options()`` view only: the client it shares everything with.
        self._parent: BotMessageClient | None = None
        # This client's own aclose(); a view is also closed when its parent is.
        self._closed = False
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        self._plans: dict[RetryPolicy, _Plan] = {}
        self._default_plan = self._plan_for(self._retry)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        view = " (view)" if self._parent is not None else ""
        return f"<BotMessageClient {self._base} {state}{view}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # Only a warning (``_warn`` bound early: module globals may be gone at
        # exit). Nothing is scheduled: the loop may be closed or busy elsewhere.
        shared = getattr(self, "_shared", None)  # None too if __init__ failed early
        if shared is None or self._parent is not None:  # a view owns nothing
            return
        session = shared.session
        if session is None or session is shared.lent_session or self._closed:
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
        Closing a ``with_options()`` view closes that view only; closing the
        client closes every view of it too.
        """
        if self._closed:
            return
        self._closed = True
        if self._parent is not None:
            return
        shared = self._shared
        shared.closed = True
        session, shared.session = shared.session, None
        if session is not None and session is not shared.lent_session:
            await session.close()

    @property
    def closed(self) -> bool:
        """Whether ``aclose()`` was called (on a view: on it, or on its client)."""
        return self._closed or self._shared.closed

    def with_options(
        self,
        *,
        timeout: float | aiohttp.ClientTimeout | None = None,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> BotMessageClient:
        """A view of this client with other per-request options; all else is shared.

        The view sends over the same session and connection pool, under the same
        client-wide 429 pause, retry budget and rate limiter (one vendor account):
        a 429 seen through the view pauses this client, and the other way round.
        It is cheap (no new session); closing it (``aclose()``, ``async with``)
        closes the view only, while closing this client closes every view of it.

        Args:
            timeout: The per-attempt timeout, as ``BotMessageClient(timeout=...)``;
                None keeps this client's.
            retry: The retry policy; None keeps this client's.
            headers: Headers added to this client's ``default_headers`` (one of the
                same name, in any case, replaced); the same names are refused.

        Returns:
            A ``BotMessageClient`` view.

        Raises:
            InvalidRequestError: a header that may not be set, or a bad one.
            ClientClosedError: this client is closed.

        Example:
            >>> urgent = client.with_options(timeout=2.0, retry=RetryPolicy.none())
            >>> await urgent.send(department_id, user_id, "The server room is on fire")
        """
        if self.closed:
            raise ClientClosedError("this BotMessageClient is closed; create a new one")
        policy = retry or self._retry
        protected = _protected(policy)
        extra = _http.merged_headers(
            self._extra_headers, check_headers("headers", headers or {}, protected)
        )
        # Again as a whole: this client's own headers against a new policy's names.
        check_headers("headers", extra, protected)
        view = copy.copy(self)
        view._parent = self._parent or self
        view._closed = False
        view._timeout = self._timeout if timeout is None else timeout
        view._retry = policy
        view._extra_headers = extra
        view._headers = _http.merged_headers(self._headers, extra)
        view._plans = {}
        view._default_plan = view._plan_for(policy)
        return view

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
        shared = self._shared
        if self._closed or shared.closed:
            raise ClientClosedError("this BotMessageClient is closed; create a new one")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise WrongEventLoopError(
                "this BotMessageClient was used with no running event loop; nothing was "
                "sent. Use it from async code, inside asyncio.run"
            ) from None
        if loop is not shared.loop:
            if shared.loop is not None:
                # Its pooled connections and timers belong to the first loop (often
                # closed by now): aiohttp would fail with "Event loop is closed".
                raise WrongEventLoopError(
                    "this BotMessageClient was used from a second event loop; nothing was "
                    "sent. A client belongs to the event loop that first used it; create "
                    "one per loop, inside asyncio.run"
                )
            lent = shared.lent_session
            made_on = None if lent is None else _http.session_loop(lent)
            if made_on is not None and made_on is not loop:
                # Checked once, here, where the client binds to its loop: aiohttp would
                # raise a bare RuntimeError mid-request ("Event loop is closed", or
                # "Timeout context manager should be used inside a task").
                raise WrongEventLoopError(
                    "the session passed as session= belongs to another event loop; "
                    "nothing was sent. A session belongs to the event loop it was made "
                    "on: make it, and the client, inside the coroutine asyncio.run runs"
                )
            shared.loop = loop
        session = shared.session
        if session is None:
            session = _http.new_session(self._session_options, self._default_plan.timeout)
            shared.session = session
        return session

    def _plan_for(self, policy: RetryPolicy) -> _Plan:
        plan = self._plans.get(policy)
        if plan is None:
            _check_policy_headers(policy)
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
        if state.watch is not None:
            state.watch.retry_scheduled(attempt, wait, exc)
        if log.isEnabledFor(logging.DEBUG):
            log_quietly(
                log,
                logging.DEBUG,
                "retrying department=%s user=%s after attempt %d in %.3f s: %s",
                state.department_uuid,
                state.user_uuid,
                attempt,
                wait,
                # Its type, not its text: a FAILURE's description may quote the message.
                type(exc).__name__,
                extra=_log_fields(state, attempt, getattr(exc, "status", None), None),
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
        if type(department_uuid) is not str or type(user_uuid) is not str:
            department_uuid, user_uuid = id_text(department_uuid), id_text(user_uuid)
        checked = self._checked_department
        if type(department_uuid) is str and department_uuid == checked[0]:
            dept = checked[1]  # a batch sends to few departments: checked once, not per message
        else:
            dept = check_id("department_uuid", department_uuid)
            self._checked_department = (department_uuid, dept)
        user = check_id("user_uuid", user_uuid)
        body = self._encode_message(message)
        check_idempotency_key(idempotency_key)
        self._ensure_session()
        plan = self._default_plan if retry is None else self._plan_for(retry)
        telemetry = self._telemetry
        queued = time.perf_counter() if telemetry is not None else 0.0
        if self._rate_limiter is not None and self._pause_only is None:
            # Before the deadline starts: a wait for a slot is not time lost to retries.
            await self._rate_limiter.acquire(department_uuid)
        state = _Send(
            department_uuid=department_uuid,
            user_uuid=user_uuid,
            url=_http.send_url(self._base_url, self._base_path, dept, user),
            body=body,
            idempotency_key=idempotency_key or new_idempotency_key(),
            plan=plan,
            started=self._clock(),
        )
        # The rate limiter's wait, for the telemetry (None: no limiter, or no telemetry).
        waited = (
            time.perf_counter() - queued
            if telemetry is not None and self._rate_limiter is not None
            else None
        )
        # At most once per key across every holder of the guard: a key already
        # claimed returns (or raises) what its first send got, without sending.
        guard = self._send_guard if idempotency_key is not None else None
        digest = token = ""
        if guard is not None:
            digest = _guard.fingerprint(department_uuid, user_uuid, body)
            # This send's own claim: a claim run again after its reply was lost is told
            # apart from another sender's, and the outcome settles this claim only.
            token = _guard.claim_token()
            earlier = await guard.claim(
                state.idempotency_key, digest, department_uuid, user_uuid, token=token
            )
            if earlier is not None:
                return earlier
        # The attempts, in this coroutine: every wake-up of a send passes through
        # each frame between its task and aiohttp (about 0.1 us per frame).
        if self._budget is not None:
            self._budget.deposit()
        if telemetry is not None:
            state.watch = telemetry.send_started(
                department_uuid, user_uuid, state.idempotency_key, self._base_url, waited
            )
        try:
            try:
                result = await self._attempt(state)
            except BotMessageError as first:
                result = await state.plan.retrier.retry(first, self._attempt, state)
        except BotMessageError as exc:
            settled = self._settled(exc, state)
            self._ended(state, settled)
            if guard is not None:
                await _guard.settle(guard, state.idempotency_key, digest, token, None, settled)
            if settled is exc:
                raise
            raise settled from exc
        except BaseException as exc:  # cancelled (or a callback raised): no outcome
            if state.watch is not None:
                state.watch.send_finished(None, state.attempt, exc)
            raise
        if state.watch is not None:
            state.watch.send_finished(Outcome.SENT, state.attempt, None)
        if guard is not None:
            await _guard.settle(guard, state.idempotency_key, digest, token, result, None)
        return result

    def _ended(self, state: _Send, error: BotMessageError) -> None:
        """Tell the telemetry and the log how a send that raises ``error`` ended."""
        outcome = outcome_of(error, state.attempt)
        if state.watch is not None:
            state.watch.send_finished(outcome, state.attempt, error)
        if log.isEnabledFor(logging.DEBUG):
            log_quietly(
                log,
                logging.DEBUG,
                "send to department=%s user=%s ended %s after %d attempt(s): %s",
                state.department_uuid,
                state.user_uuid,
                outcome.value,
                state.attempt,
                type(error).__name__,
                extra=_log_fields(
                    state, state.attempt, getattr(error, "status", None), outcome.value
                ),
            )

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
        paused_until = self._shared.paused_until
        return max(0.0, paused_until - self._clock()) if paused_until else 0.0

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
        common = self._shared
        if limiter is not None:
            pause_only = self._pause_only
            shared = pause_only.pause_left() if pause_only is not None else None
            if shared is None:
                shared = await limiter.paused_for()
            if shared:
                # Another holder of the limiter was told to wait: so are we.
                common.paused_until = max(common.paused_until, self._clock() + shared)
        if common.paused_until:
            await self._wait_for_pause(state)
        timeout = state.plan.timeout
        remaining = policy.deadline - (self._clock() - state.started)
        if remaining < ATTEMPT_FLOOR and state.last_error is not None:
            # A wait ran long and left this retry no time worth trying: sending
            # now could only turn the last failure into a false "unknown".
            raise state.last_error
        if timeout.total is None or remaining < timeout.total:
            timeout = _http.bounded_timeout(timeout, max(remaining, 0.001))
        session = common.session
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
        begun = time.perf_counter()  # also the answer's ``elapsed``
        timed = debug or state.watch is not None
        status: int | None = None  # of the answer, once one came
        error: BaseException | None = None
        try:
            try:
                async with _http.open_post(
                    session, state.url, state.body, headers, timeout, self._proxy_headers
                ) as response:
                    status = response.status
                    result = await _http.read_answer(response, state.plan.rules, begun)
            except _http.TRANSPORT_ERRORS as exc:
                raise _http.transport_error(exc, state.url) from exc
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if (
                    status is not None
                    or not session.closed
                    or task is None
                    or task.cancelling()
                    or not _http.raised_while_connecting(exc)
                ):
                    raise
                # Not a cancellation of this send: closing a session cancels the
                # futures of the requests still waiting for a connection (a pool
                # slot, a DNS lookup), before any of them had one to write to (the
                # cancellation came out of the connector's connect()).
                raise ClientClosedError(
                    "this BotMessageClient (or its session) was closed while this send "
                    "waited for a connection; the message was not sent"
                ) from None
        except RateLimitedError as exc:
            error = exc
            state.retry_after = exc.retry_after
            if exc.status == 429 and exc.retry_after:
                common.paused_until = max(common.paused_until, self._clock() + exc.retry_after)
                if limiter is not None:
                    await limiter.pause(exc.retry_after)
            raise
        except BaseException as exc:  # a BotMessageError, or cancelled mid-attempt
            error = exc
            raise
        finally:
            if timed:
                duration = time.perf_counter() - begun
                if state.watch is not None:
                    state.watch.attempt_finished(state.attempt, status, error, duration)
                if debug:
                    log_quietly(
                        log,
                        logging.DEBUG,
                        "POST %s -> %s in %.1f ms (attempt %d)",
                        state.url.path,
                        status or "no answer",
                        duration * 1000,
                        state.attempt,
                        # A SUCCESS answer settles the send; a failure may yet be retried.
                        extra=_log_fields(
                            state, state.attempt, status, "sent" if error is None else None
                        ),
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
        are consumed. See ``send_many`` for the arguments, and for what an error
        of the input or of a callback does: the items in flight still finish and
        are yielded, and the error is raised by the read after the last of them
        (or by the ``async with`` block's exit, if it is left before).

        Example:
            >>> async with client.stream_many(rows, concurrency=100) as results:
            ...     async for item in results:
            ...         journal.write(item)
        """
        if retry is not None:
            self._plan_for(retry)  # a policy that cannot be sent fails here, not per item
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
        return BatchStream(self, items, options, telemetry=self._telemetry)

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

        The report keeps results as ``keep`` says: ``"all"`` (default) holds every
        item's result in memory, stored as columns (about 250 bytes an item, the
        answer's two ids included: 250 MB for a million; each ``ItemResult`` is
        built when read), ``"failures"`` only those not SENT, ``"none"`` only the
        counts. For very large jobs, prefer ``stream_many`` and write results out
        as they come.

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
                records "about to send". If it raises, the item is not sent
                (reported SKIPPED) and the batch stops (see Raises).
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
            Exception: whatever reading ``items`` raised, or an ``on_start``,
                ``on_result`` or ``on_progress`` callback. Either stops the
                batch: no new item starts (one already taken, or waiting for a
                rate limit or a 429 pause, is reported SKIPPED; an async input
                waiting for its next item is cancelled there; an item answered
                429 is not sent again), the sends in flight finish and are counted and
                reported, ``on_result`` included even after it raised for
                another item (it may succeed for them), and then the first such
                error is raised, with its own ``__cause__``. Later callback
                errors are dropped; a note on the raised one counts them. A
                CancelledError of theirs (not a cancellation of the batch) is
                raised as a ``RuntimeError`` chained to it.
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
